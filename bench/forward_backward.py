"""Forward + backward (next-token cross-entropy) throughput: ours (JAX) vs HF PyTorch.

Same config, batch, length, float32, CPU, in one process. Prints JSON:
  sizes.<name>: tokens/s and GFLOP/s of both, ratio = ours / PyTorch;
  ratio: the smaller of the per-size ratios (best wall time vs best wall time);
  ratio_median / ratio_cpu_time: the same from median wall time / best process CPU
  time per step (both less sensitive to other users of a shared machine);
  peak_gflops: the machine's float32 peak (measured matmul, plus a spec estimate).

  python bench/forward_backward.py [--sizes tiny,25m] [--repeats 4] [--iters 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench._common import cpu_peak_gflops, llama_25m_config, time_fn, train_flops_per_token  # noqa: E402
from safecrs_jax import models  # noqa: E402

# name -> (HF config dict, batch, length)
_25M = llama_25m_config()
SIZES = {
    "tiny": (models.PRESETS["tiny"], 8, 256),
    "25m": (_25M, 8, 256),
}


def ours(hf: dict, batch: int, length: int):
  """(cfg, step) for our jitted forward + backward."""
  cfg = models.ModelConfig.from_hf(hf, scan_layers=False)
  params = models.init_params(cfg, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size, jnp.int32)
  mask = jnp.ones_like(ids)

  def loss(params, ids):
    logits = models.forward(cfg, params, ids[:, :-1], mask[:, :-1]).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))

  step = jax.jit(jax.value_and_grad(loss))
  return cfg, lambda: step(params, ids)


def pytorch(hf: dict, batch: int, length: int):
  """(info, step) for the same model in HF transformers (PyTorch, eager)."""
  import torch
  import transformers
  torch.manual_seed(0)
  conf = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items()
                                              if k != "architectures"})
  model = transformers.AutoModelForCausalLM.from_config(conf).float().train()
  ids = torch.randint(0, conf.vocab_size, (batch, length))

  def step():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    return loss
  info = {"threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation}
  return info, step


def compare(name: str, iters: int, repeats: int) -> dict:
  """Times both, interleaved (ours, torch, ours, ...) so both see the same load."""
  hf, batch, length = SIZES[name]
  cfg, ours_step = ours(hf, batch, length)
  info, torch_step = pytorch(hf, batch, length)
  runs = {"ours": [], "pytorch": []}
  cpu = {"ours": [], "pytorch": []}
  for r in range(repeats):
    for key, fn in (("ours", ours_step), ("pytorch", torch_step)):
      t = time_fn(fn, warmup=2 if r == 0 else 0, iters=iters)
      runs[key] += t["times_s"]
      cpu[key] += t["cpu_times_s"]
  tokens = batch * (length - 1)
  flops = train_flops_per_token(cfg, length - 1) * tokens
  row = {"params": models.count_params(cfg), "batch": batch, "length": length,
         "train_gflop_per_step": round(flops / 1e9, 2)}
  for key, times in runs.items():
    best = min(times)
    row[key] = {"tokens_per_s": round(tokens / best, 1), "gflops": round(flops / best / 1e9, 2),
                "best_s": round(best, 4), "median_s": round(sorted(times)[len(times) // 2], 4),
                "cpu_best_s": round(min(cpu[key]), 4)}
  row["pytorch"].update(info)
  row["ratio"] = round(min(runs["pytorch"]) / min(runs["ours"]), 3)
  # Secondary figures, less exposed to the machine's varying load:
  row["ratio_median"] = round(row["pytorch"]["median_s"] / row["ours"]["median_s"], 3)
  row["ratio_cpu_time"] = round(min(cpu["pytorch"]) / min(cpu["ours"]), 3)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="tiny,25m")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=4)
  args = ap.parse_args(argv)
  load0 = os.getloadavg()
  out = {"sizes": {}, "timing": f"best of {args.iters * args.repeats} timed steps each, "
         f"{args.repeats} interleaved rounds (ours, pytorch, ...), after 2 warm-up steps; "
         "shared machine: best = least disturbed",
         "dtype": "float32", "device": str(jax.devices()[0].device_kind),
         "jax": jax.__version__}
  for name in args.sizes.split(","):
    out["sizes"][name] = compare(name, args.iters, args.repeats)
  out["ratio"] = min(r["ratio"] for r in out["sizes"].values())
  peak = cpu_peak_gflops()
  out["peak_gflops"] = round(peak["gflops"], 1)
  out["peak_how"] = peak["how"]
  est = peak["estimate"]
  out["peak_estimate_gflops"] = round(est["gflops"], 1)
  out["peak_estimate_how"] = (f"{est['cores']} cores x {est['flops_per_cycle_per_core']} "
                              f"f32 flops/cycle x {est['clock_ghz']} GHz ({est['how']})")
  out["loadavg"] = {"before": [round(x, 2) for x in load0],   # the machine is shared
                    "after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}
  print(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()
