"""Rewards -> advantages: gdpo / grpo / rank, looked up by name, and their diagnostics.

Pure array functions, jittable (group_size and mode static). Shape letters
(package legend, safecrs_jax/__init__.py): B rollouts of a batch = prompts x G,
a group is G *consecutive* rows; R reward functions; I ranked list items
scored per completion (rec_num).

    adv = compute_advantages(rewards, group_size, weights, mode="gdpo")

  gdpo  Â_r = (r_r - mean_G(r_r)) / (std_G(r_r) + ADV_EPS) for each reward r
        within its group, A = Σ_r w_r Â_r, then A normalised over the batch.
  grpo  r = Σ_r w_r r_r, then A = (r - mean_G(r)) / (std_G(r) + ADV_EPS).
  rank  per-rank rewards [B, R, I]: each reward normalised per group *and per
        rank*, the weighted sum over rewards, then one normalisation over every
        (row, rank) entry of the batch -> [B, I] (the reference's GDPO branch of
        Rank-GRPO).
  rank_no_batch_norm  the same without the final batch step (each (row, rank)
        entry keeps its per-group, per-rank normalisation).
std is the unbiased (n - 1) estimate, as in the reference trainers.

Missing rewards (NaN) — one rule everywhere: a missing entry carries no
information. It is left out of every count, mean and std; its normalised value is
0 (exactly "group average"). Concretely:
  * per-group statistics use only the present entries; the std is the unbiased
    (n - 1) estimate over the n present entries, and taken as 0 when n < 2
    (so a lone present entry normalises to 0, never NaN);
  * gdpo: Â_r = 0 where r_r is missing, then A = Σ_r w_r Â_r (a nansum, as in
    the reference GDPO trainer);
  * grpo: a missing r_r is imputed with its group's mean over the present
    entries before the weighted sum (the same "average" reading; TRL's nansum
    would instead count it as a raw 0);
  * a row whose rewards are all missing gets advantage 0 and is left out of the
    group statistics and of gdpo's batch-level normalisation.
"""
import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

ADV_EPS = 1e-4  # (r - mean) / (std + ADV_EPS), as in the reference trainers


def _masked_group_normalise(x, valid, group_size):
  """Normalises x within groups of `group_size` consecutive rows.

  x: [B, ...] float; valid: [B, ...] bool (same shape). Statistics per trailing
  position over the present entries of each group. Returns [B, ...], 0 where
  not valid.
  """
  n = x.shape[0]
  if n % group_size:
    raise ValueError(f"advantages: {n} rows are not a multiple of group_size={group_size}")
  shape = (n // group_size, group_size) + x.shape[1:]
  g, v = x.reshape(shape), valid.reshape(shape)
  cnt = v.sum(1, keepdims=True).astype(x.dtype)
  mean = jnp.where(v, g, 0.0).sum(1, keepdims=True) / jnp.maximum(cnt, 1.0)
  dev = jnp.where(v, g - mean, 0.0)
  std = jnp.sqrt((dev * dev).sum(1, keepdims=True) / jnp.maximum(cnt - 1.0, 1.0))
  return jnp.where(v, dev / (std + ADV_EPS), 0.0).reshape(x.shape)


def gdpo_advantages(r, valid, weights, group_size):
  """[B, R] rewards (0 where missing), valid [B, R] -> [B]: per-reward group norm, sum, batch norm."""
  norm = _masked_group_normalise(r, valid, group_size)           # [B, R]
  combined = norm @ weights                                       # [B]
  return _masked_group_normalise(combined, valid.any(-1), r.shape[0])


def grpo_advantages(r, valid, weights, group_size):
  """[B, R] -> [B]: missing entries imputed with their group mean, weighted sum, group norm."""
  n, num_rewards = r.shape
  g = r.reshape(n // group_size, group_size, num_rewards)
  v = valid.reshape(g.shape)
  mean = g.sum(1, keepdims=True) / jnp.maximum(v.sum(1, keepdims=True), 1)
  filled = jnp.where(v, g, mean).reshape(n, num_rewards)
  return _masked_group_normalise(filled @ weights, valid.any(-1), group_size)


def rank_advantages_no_batch_norm(r, valid, weights, group_size):
  """[B, R, I] per-rank rewards -> [B, I]: normalised per group and rank, weighted sum."""
  norm = _masked_group_normalise(r, valid, group_size)
  return jnp.einsum("bri,r->bi", norm, weights)


def rank_advantages(r, valid, weights, group_size):
  """rank_advantages_no_batch_norm, then normalised over all present (row, rank) entries."""
  combined = rank_advantages_no_batch_norm(r, valid, weights, group_size)     # [B, I]
  present = valid.any(1).reshape(-1)                                          # [B*I]
  flat = _masked_group_normalise(combined.reshape(-1), present, present.shape[0])
  return flat.reshape(combined.shape)


@dataclasses.dataclass(frozen=True)
class Advantage:
  """A registered advantage mode."""
  fn: Callable      # fn(rewards 0 where missing, valid, weights [R], group_size)
  per_rank: bool    # takes per-rank rewards [B, R, I] and returns [B, I]; else [B, R] -> [B]


ADVANTAGES = {
    "gdpo": Advantage(gdpo_advantages, per_rank=False),
    "grpo": Advantage(grpo_advantages, per_rank=False),
    "rank": Advantage(rank_advantages, per_rank=True),
    "rank_no_batch_norm": Advantage(rank_advantages_no_batch_norm, per_rank=True),
}
ADVANTAGE_MODES = tuple(ADVANTAGES)


def _check_rewards(rewards, group_size, weights, mode):
  if mode not in ADVANTAGES:
    raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
  per_rank = ADVANTAGES[mode].per_rank
  if rewards.ndim != (3 if per_rank else 2):
    legend = "[B, R, rec_num]" if per_rank else "[B, R]"
    raise ValueError(f"rewards must be {legend} in mode {mode!r}, got shape {rewards.shape}")
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards: {rewards.shape[0]} rows are not a multiple of "
                     f"group_size={group_size}")
  num_rewards = rewards.shape[1]
  if weights is None:
    return jnp.ones((num_rewards,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (num_rewards,):
    raise ValueError(f"reward weights shape {weights.shape} != ({num_rewards},) (one per reward)")
  return weights


def compute_advantages(rewards, group_size, weights=None, mode="gdpo"):
  """Group-relative advantages (module docstring).

  Args:
    rewards: [B, R] float (NaN = missing), or [B, R, I] per-rank rewards in
      mode "rank". Rows i*G .. i*G+G-1 are the G rollouts of prompt i.
    group_size: G.
    weights: [R] reward weights (default all 1).
    mode: a name in ADVANTAGES.
  Returns:
    [B] float32 advantages ([B, I] in mode "rank").
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  weights = _check_rewards(rewards, group_size, weights, mode)
  valid = ~jnp.isnan(rewards)
  return ADVANTAGES[mode].fn(jnp.where(valid, rewards, 0.0), valid, weights, group_size)


def _collapse_share(rewards, adv, group_size, tol=1e-5):
  """Share of groups holding two rows with different rewards but equal advantages."""
  n = rewards.shape[0]
  r = rewards.reshape(n // group_size, group_size, -1)
  a = adv.reshape(n // group_size, group_size, -1)
  both_nan = jnp.isnan(r[:, :, None]) & jnp.isnan(r[:, None])
  same_r = jnp.all((r[:, :, None] == r[:, None]) | both_nan, -1)
  same_a = jnp.all(jnp.abs(a[:, :, None] - a[:, None]) <= tol * (1.0 + jnp.abs(a[:, :, None])), -1)
  return jnp.mean(jnp.any(same_a & ~same_r, axis=(1, 2)).astype(jnp.float32))


def advantage_diagnostics(rewards, group_size, weights=None):
  """What the advantages can and cannot see in this batch. Jittable.

  Args: rewards [B, R] (or [B, R, I] per-rank), group_size G, weights [R].
  Returns a dict of float32 arrays:
    reward_mean, reward_std: [R] over the present entries of the batch
      (all ranks pooled for per-rank rewards); NaN where none is present.
    reward_missing: [R] share of missing entries.
    zero_var_groups: [R] share of groups in which reward r is constant over
      its present entries (no learning signal from that reward there).
    collapse_<mode>: scalar share of groups in which two rollouts with
      different reward vectors get identical advantages under <mode> (gdpo and
      grpo for [B, R]; rank for [B, R, I]).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  mode = "rank" if rewards.ndim == 3 else "gdpo"
  weights = _check_rewards(rewards, group_size, weights, mode)
  valid = ~jnp.isnan(rewards)
  flat = jnp.moveaxis(rewards, 1, -1).reshape(-1, rewards.shape[1])  # [B*I, R]
  fvalid = ~jnp.isnan(flat)
  cnt = fvalid.sum(0)
  mean = jnp.where(fvalid, flat, 0.0).sum(0) / cnt
  dev = jnp.where(fvalid, flat - mean, 0.0)
  std = jnp.sqrt((dev * dev).sum(0) / jnp.maximum(cnt - 1, 1))
  g = rewards.reshape((-1, group_size) + rewards.shape[1:])            # [prompts, G, R, (I)]
  gv = valid.reshape(g.shape)
  hi = jnp.where(gv, g, -jnp.inf).max(1)
  lo = jnp.where(gv, g, jnp.inf).min(1)
  const = ~(hi > lo)                                                   # [prompts, R, (I)]
  if mode == "rank":
    const = const.all(-1)
  out = {
      "reward_mean": mean,
      "reward_std": std,
      "reward_missing": 1.0 - cnt / flat.shape[0],
      "zero_var_groups": const.astype(jnp.float32).mean(0),
  }
  for m in (("rank",) if mode == "rank" else ("gdpo", "grpo")):
    adv = compute_advantages(rewards, group_size, weights, m)
    out[f"collapse_{m}"] = _collapse_share(rewards, adv, group_size)
  return out
