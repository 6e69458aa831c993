"""Safe-SFT training-step throughput: our jitted step vs a Hugging Face PyTorch step.

Both do the whole step on the same model config, batch and length, float32,
CPU, in one process: forward, masked next-token cross-entropy (a random prompt
prefix of every row carries no loss), backward, global-norm clipping and an
AdamW update. Ours is `steps.sft_train_step` jitted with donated state, exactly as
the training loop runs it. Prints JSON:
  sizes.<name>: tokens/s and achieved GFLOP/s of both, ratio = ours / PyTorch,
  ratio: the smaller of the per-size ratios; peak_gflops: the machine's float32
  peak (measured matmul; the nominal estimate is printed too).

  python bench/sft_step.py [--sizes demo,25m] [--iters 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import cpu_peak_gflops, llama_25m_config, time_fn, train_flops_per_token  # noqa: E402
from safecrs_jax import config as config_lib  # noqa: E402
from safecrs_jax import models  # noqa: E402
from safecrs_jax.rl import steps
from safecrs_jax.train import optim
from safecrs_jax.train import state as ts  # noqa: E402

_25M = llama_25m_config()
# name -> (HF config dict, batch, length)
SIZES = {
    "demo": (models.PRESETS["tiny"], 8, 256),   # configs/demo.py's model
    "25m": (_25M, 8, 256),
}


def make_batch(vocab, batch, length, seed=0):
  """Token ids, full attention, loss on everything after a random prompt prefix."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  prompt = rng.integers(16, length // 4, (batch,))
  loss = (np.arange(length)[None] >= prompt[:, None]).astype(np.int32)
  return ids, np.ones_like(ids), loss


def optim_cfg():
  return config_lib.Optim(lr=5e-5, warmup_ratio=0.0, weight_decay=0.0)   # else Safe-SFT's


def ours(hf, batch, length, iters, repeats):
  cfg = models.ModelConfig.from_hf(hf, scan_layers=False)
  tx, sched = optim.make_optimizer(optim_cfg(), 10_000)
  state = jax.jit(lambda p: ts.create(p, tx))(models.init_params(cfg, jax.random.key(0)))
  ids, attn, loss = make_batch(cfg.vocab_size, batch, length)
  data = steps.TokenBatch(**jax.device_put({"input_ids": ids[None], "attention_mask": attn[None],
                                           "loss_mask": loss[None]}))   # [A=1, B, T]
  step = jax.jit(functools.partial(steps.sft_train_step, model_cfg=cfg, tx=tx, schedule=sched),
                 donate_argnums=0)
  key = jax.random.key(0)
  box = [state]

  def run():
    box[0], m = step(box[0], data, key)
    return m["loss"]
  t = time_fn(run, warmup=2, iters=iters, repeats=repeats)
  return {"params": models.count_params(cfg), "cfg": cfg, **t}


def pytorch(hf, batch, length, iters, repeats):
  import torch
  import transformers
  torch.manual_seed(0)
  conf = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items()
                                              if k != "architectures"})
  model = transformers.AutoModelForCausalLM.from_config(conf).float().train()
  c = optim_cfg()
  opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(c.b1, c.b2), eps=c.eps,
                          weight_decay=c.weight_decay)
  ids, attn, loss_mask = (torch.from_numpy(x).long() for x in make_batch(conf.vocab_size,
                                                                          batch, length))
  labels = ids.masked_fill(loss_mask == 0, -100)             # HF convention: -100 = no loss

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=attn, labels=labels)  # shifted token-mean CE
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    return out.loss
  t = time_fn(step, warmup=2, iters=iters, repeats=repeats)
  return {"threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation, **t}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="demo,25m")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  load0 = os.getloadavg()
  out = {"what": "full SFT step: forward, masked CE, backward, clip, AdamW (float32)",
         "sizes": {}, "timing": f"best of {args.iters * args.repeats} timed steps after 2 "
         "warm-up steps (shared machine: best = least disturbed)",
         "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  for name in args.sizes.split(","):
    hf, batch, length = SIZES[name]
    a = ours(hf, batch, length, args.iters, args.repeats)
    b = pytorch(hf, batch, length, args.iters, args.repeats)
    tokens = batch * length
    flops = train_flops_per_token(a.pop("cfg"), length) * tokens
    row = {"params": a["params"], "batch": batch, "length": length}
    for key, r in (("ours", a), ("pytorch", b)):
      row[key] = {"tokens_per_s": round(tokens / r["best_s"], 1),
                  "gflops": round(flops / r["best_s"] / 1e9, 2),
                  "best_s": round(r["best_s"], 4), "median_s": round(r["median_s"], 4)}
    row["pytorch"]["threads"] = b["threads"]
    row["pytorch"]["attn_implementation"] = b["attn_implementation"]
    row["ratio"] = round(b["best_s"] / a["best_s"], 3)
    out["sizes"][name] = row
  out["ratio"] = min(r["ratio"] for r in out["sizes"].values())
  peak = cpu_peak_gflops()
  out["peak_gflops"] = round(peak["gflops"], 1)
  out["peak_how"] = peak["how"]
  est = peak["estimate"]
  out["peak_estimate_gflops"] = round(est["gflops"], 1)
  out["peak_note"] = ("the measured peak is only as good as the quietest of 5 matmuls; on a "
                      "busy machine compare with the nominal estimate as well")
  for row in out["sizes"].values():
    for key in ("ours", "pytorch"):
      row[key]["share_of_peak"] = round(row[key]["gflops"] / out["peak_gflops"], 3)
      row[key]["share_of_nominal_peak"] = round(
          row[key]["gflops"] / out["peak_estimate_gflops"], 3)
  out["loadavg"] = {"before": [round(x, 2) for x in load0],   # the machine is shared
                    "after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}
  print(json.dumps(out, indent=2))
  return out


if __name__ == "__main__":
  main()
