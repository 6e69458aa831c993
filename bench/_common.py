"""Shared helpers for the benchmarks: timing, machine peak, model FLOP counts.

The machine is shared: every timing takes the best of several repeats (the least
disturbed run), and reports say so.
"""
from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable


def _block(out):
  """Waits for jax arrays (and torch needs nothing: it is synchronous on CPU)."""
  try:
    import jax
    jax.block_until_ready(out)
  except ImportError:
    pass
  return out


def time_fn(fn: Callable[[], object], warmup: int = 2, iters: int = 5,
            repeats: int = 1) -> dict:
  """Times fn() (which must finish its work before returning, or return jax arrays).

  Runs `warmup` untimed calls (compilation), then `repeats` x `iters` timed calls.
  Returns per-call wall times {"best_s", "median_s", "mean_s", "times_s", "iters"}
  and the process CPU time of each call ("cpu_times_s", "cpu_best_s": all threads
  of this process; less sensitive than wall time to other people's load). Use
  best_s on a shared machine.
  """
  for _ in range(warmup):
    _block(fn())
  times, cpu = [], []
  for _ in range(repeats * iters):
    c0, t0 = time.process_time(), time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {"best_s": min(times), "median_s": statistics.median(times),
          "mean_s": statistics.fmean(times), "times_s": times, "iters": len(times),
          "cpu_times_s": cpu, "cpu_best_s": min(cpu)}


def _cpuinfo() -> tuple[str, set, float | None]:
  try:
    text = open("/proc/cpuinfo", encoding="utf-8").read()
  except OSError:
    return "", set(), None
  flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split()) \
      if re.search(r"^flags", text, re.M) else set()
  model = (re.search(r"^model name\s*:\s*(.*)$", text, re.M) or [None, ""])[1]
  mhz = None
  m = re.search(r"^bogomips\s*:\s*([\d.]+)", text, re.M)
  if m:  # bogomips = 2 x nominal MHz on x86
    mhz = float(m.group(1)) / 2
  m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
  if m and float(m.group(1)) > 0:
    mhz = max(mhz or 0.0, float(m.group(1)))
  return model, flags, mhz


def cpu_peak_estimate_gflops() -> dict:
  """float32 peak from cores x SIMD lanes x 2 FMA pipes x 2 flops x clock (nominal)."""
  model, flags, mhz = _cpuinfo()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
  fma = 2 if "fma" in flags or "avx512f" in flags else 1
  flops_per_cycle = lanes * 2 * (2 if fma == 2 else 1)
  ghz = (mhz or 2000.0) / 1000
  return {"gflops": cores * flops_per_cycle * ghz, "cores": cores, "simd_f32_lanes": lanes,
          "flops_per_cycle_per_core": flops_per_cycle, "clock_ghz": round(ghz, 3),
          "cpu": model.strip(),
          "how": "cores x f32 SIMD lanes x 2 FMA pipes x 2 flops/FMA x nominal clock"}


def cpu_peak_gflops(n: int = 2048, repeats: int = 5) -> dict:
  """Measured float32 peak: best of `repeats` jitted n x n x n matmuls (2 n^3 flops).

  Also returns the spec-sheet style estimate (cpu_peak_estimate_gflops) for context.
  """
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  t = time_fn(lambda: mm(a, b), warmup=2, iters=repeats)
  measured = 2 * n ** 3 / t["best_s"] / 1e9
  return {"gflops": measured, "how": f"best of {repeats} jitted {n}x{n} float32 matmuls "
          "(XLA CPU)", "estimate": cpu_peak_estimate_gflops()}


def train_flops_per_token(cfg, seq_len: int) -> float:
  """Forward + backward FLOPs per token of a decoder (the 6N + 12 L T d_attn rule).

  N counts the matmul weights (attention projections, MLP, LM head; the embedding
  lookup is free but a tied head still multiplies by V x D). Attention scores and
  weighted values add 2 x 2 x T x N_heads x H per layer forward; x3 for backward.
  Norms, softmax and RoPE are ignored (a few % at these sizes).
  """
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qh, kh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = d * qh + 2 * d * kh + qh * d + 3 * d * f
  n_matmul = cfg.num_layers * per_layer + d * v
  attn = 12 * cfg.num_layers * seq_len * qh
  return 6 * n_matmul + attn


def llama_25m_config() -> dict:
  """The ~25M-parameter Llama of the SFT / forward-backward benchmarks (HF config dict)."""
  from safecrs_jax import models
  return dict(models.PRESETS["tiny"], hidden_size=512, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, head_dim=64,
              intermediate_size=1536, vocab_size=8192)
