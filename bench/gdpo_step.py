"""Where a Safe-GDPO step spends its time: rollout, rewards, learner.

Runs a few loop steps of `gdpo.Run` on SafeRec-mini with a random model of the
given preset (no Safe-SFT checkpoint is needed for timing: rows then run to the
completion budget, the worst case), and prints JSON: per-phase seconds (mean
over the steps after the first, which compiles), their shares of the step,
generated tokens/s of the rollouts and tokens/s of the learner.

  python bench/gdpo_step.py [--preset tiny] [--prompts 8] [--group 8] [--new 128] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from safecrs_jax.train import gdpo  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--prompts", type=int, default=8, help="prompts per step (batch_size x devices)")
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--accum", type=int, default=1)
  ap.add_argument("--new", type=int, default=128, help="max completion tokens")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--beta", type=float, default=1e-3)
  args = ap.parse_args(argv)
  c = common.build(stage="gdpo", model_preset=args.preset)
  dp = len(jax.devices())
  if args.prompts % dp:
    raise SystemExit(f"--prompts {args.prompts} must divide by the {dp} devices")
  c.gdpo.batch_size = args.prompts * args.group // dp   # completions per device
  c.gdpo.grad_accum = args.accum
  c.gdpo.group_size = args.group
  c.gdpo.max_completion_length = args.new
  c.gdpo.max_prompt_length = 128
  c.gdpo.prompt_buckets = (128,)
  c.gdpo.beta = args.beta
  c.gdpo.num_steps = args.steps
  c.log.progress = False
  c.log.tensorboard = False
  c.checkpoint.save_every = 10 ** 9
  c.checkpoint.async_save = False
  with tempfile.TemporaryDirectory() as workdir:
    run = gdpo.Run(c, workdir)
    state, hist = run.state, []
    for step in range(args.steps):
      state, (host, _) = run.step(state, step, timed=True)
      hist.append(host)
    run.ckpt.close()
  timed = hist[1:] or hist

  def mean(k):
    return float(np.mean([h[k] for h in timed]))

  phases = {p: mean(f"time/{p}_s") for p in ("rollout", "reward", "learner")}
  total = mean("time/step_s")
  out = {
      "preset": args.preset, "devices": dp, "prompts_per_step": args.prompts * args.accum,
      "group_size": args.group, "rollouts_per_step": args.prompts * args.accum * args.group,
      "max_completion_length": args.new, "beta": args.beta,
      "completion_length_mean": mean("rollout/length"),
      "step_s": round(total, 4), "compile_step_s": round(hist[0]["time/step_s"], 2),
      "seconds": {k: round(v, 4) for k, v in phases.items()},
      "share": {k: round(v / total, 4) for k, v in phases.items()},
      "rollout_tokens_per_s": round(mean("perf/rollout_tokens_per_s"), 1),
      "learner_tokens_per_s": round(mean("perf/learner_tokens_per_s"), 1),
      "timing": f"mean over steps 2..{args.steps} (step 1 compiles); shared machine",
      "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
  }
  print(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()
