"""Optimiser and learning-rate schedules from the `optim` config section.

`make_optimizer(optim_cfg, total_steps)` returns `(tx, schedule)`: AdamW with
decoupled weight decay (applied to matrices only, never to norms or biases)
behind global-norm clipping, and the schedule so the driver can log the
learning rate of every step. Schedules follow the Hugging Face Trainer (the
paper's reference): linear warmup from 0 over `ceil(warmup_ratio * total)`
steps, then cosine to 0 at `total_steps`, or constant. `lr_drop_step` >= 0
switches to the constant `lr_drop_to` from that update on (the reference
Safe-GDPO recipe for the 3B / 8B models: 1e-6, then 1e-7 from step 8000).
"""
import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant", "linear")


def warmup_steps(optim_cfg, total_steps):
  """Number of warmup steps: ceil(warmup_ratio * total_steps), as HF does."""
  ratio = float(optim_cfg.warmup_ratio)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {ratio}")
  return int(math.ceil(ratio * total_steps))


def make_schedule(optim_cfg, total_steps):
  """lr(step) for step = number of updates already applied (0 for the first)."""
  lr = float(optim_cfg.lr)
  kind = optim_cfg.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}")
  warm = warmup_steps(optim_cfg, total_steps)
  decay = max(total_steps - warm, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "linear":
    after = optax.linear_schedule(lr, 0.0, decay)
  else:
    after = optax.cosine_decay_schedule(lr, decay, alpha=0.0)
  sched = after if warm == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm), after], [warm])
  drop = int(optim_cfg.lr_drop_step)
  if drop < 0:
    return sched
  return optax.join_schedules(
      [sched, optax.constant_schedule(float(optim_cfg.lr_drop_to))], [drop])


def decay_mask(params):
  """True for the leaves weight decay applies to: matrices (ndim >= 2)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim_cfg, total_steps):
  """(optax GradientTransformation, schedule) for `total_steps` updates."""
  schedule = make_schedule(optim_cfg, total_steps)
  parts = []
  clip = float(optim_cfg.grad_clip)
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
      eps=float(optim_cfg.eps), weight_decay=float(optim_cfg.weight_decay),
      mask=decay_mask))
  return optax.chain(*parts), schedule
