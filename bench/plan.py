r"""Will the paper's models fit? The planner's rows for them on TPU slices, as JSON.

  python bench/plan.py [--quick] [--only=llama31_sft,...]     (needs the plan extra: libtpu)

Cases (compile-only for the topology's devices; no TPU used):
  llama31_sft / llama31_gdpo_p{2048,4096}                 Llama-3.1-8B on v5p-16 (8 chips)
  llama31_gdpo_p2048_bs8                                  ... 8 completions per device
  qwen25_sft / qwen25_gdpo[_bs8]                          Qwen2.5-0.5B on v5litepod-4 (4 chips)
  llama31_learner_seq{1k..8k}                             Safe-GDPO learner step alone at
                                                          P + T = 1k .. 8k tokens (linear?)
Targets (issue 11): headroom >= 20% for Llama-3.1-8B on v5p, >= 15% for Qwen2.5-0.5B
on v5e. Safe-GDPO: completion 1024, G = 8, beta > 0; the learner-only
sequence scan uses the default gdpo.batch_size (4 completions per device, the reference). Prints one JSON object
{case: [rows]} plus the compile seconds of each case; 8B compiles take minutes.
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TPU_SKIP_MDS_QUERY"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from configs import llama31, qwen25  # noqa: E402
from safecrs_jax import plan  # noqa: E402

TARGET = {"v5p-16": 0.20, "v5litepod-4": 0.15}


def _gdpo(module, prompt, batch_size=None):
  c = module.get_config("stage=gdpo")
  c.gdpo.max_prompt_length, c.gdpo.max_completion_length = prompt, 1024
  if batch_size:  # completions per device per micro-batch (reference default: 4)
    c.gdpo.batch_size = batch_size
  c.gdpo.prompt_buckets = tuple(b for b in (256, 512, 1024, 2048, 4096) if b <= prompt)
  return c


def _learner_at(total):
  c = _gdpo(llama31, total // 2)
  c.gdpo.max_completion_length = total - total // 2
  return c


def cases():
  out = {"llama31_sft": (llama31.get_config("stage=sft"), "v5p-16", None),
         "llama31_gdpo_p2048": (_gdpo(llama31, 2048), "v5p-16", None),
         "llama31_gdpo_p4096": (_gdpo(llama31, 4096), "v5p-16", None),
         "llama31_gdpo_p2048_bs8": (_gdpo(llama31, 2048, 8), "v5p-16", None),
         "qwen25_sft": (qwen25.get_config("stage=sft"), "v5litepod-4", None),
         "qwen25_gdpo": (_gdpo(qwen25, 2048), "v5litepod-4", None),
         "qwen25_gdpo_bs8": (_gdpo(qwen25, 2048, 8), "v5litepod-4", None)}
  for total in (1024, 2048, 4096, 8192):
    out[f"llama31_learner_seq{total // 1024}k"] = (_learner_at(total), "v5p-16",
                                                   ("gdpo_learner",))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="", help="comma-separated case names")
  args = ap.parse_args()
  only = set(filter(None, args.only.split(",")))
  report = {}
  for name, (config, topo, programs) in cases().items():
    if only and name not in only:
      continue
    t0 = time.perf_counter()
    rows = plan.plan_config(config, plan.topology_devices(topo), only=programs)
    for r in rows:
      r["target_headroom"] = TARGET[topo]
      r["meets_target"] = r["headroom"] is not None and r["headroom"] >= TARGET[topo]
    report[name] = {"topology": topo, "compile_s": round(time.perf_counter() - t0, 1),
                    "model": {k: str(v) for k, v in config.model.items() if k != "overrides"},
                    "rows": rows}
    print(f"{name}: {time.perf_counter() - t0:.0f}s\n" + plan.format_table(rows),
          file=sys.stderr, flush=True)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
