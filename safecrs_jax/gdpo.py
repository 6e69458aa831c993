"""Safe-GDPO: advantages (gdpo / grpo / rank), the clipped policy loss, the step, the loop.

Shape legend:
  N  rollouts in a batch: prompts x G, a group is G *consecutive* rows
  G  group size (rollouts per prompt)
  R  reward functions
  K  ranks scored per completion in rank mode (rec_num)
  T  completion length (max new tokens); P prompt length
  M  micro-batches per optimizer step (gradient accumulation)

`train(config, workdir)` is the whole stage (see the loop section at the end).

Missing rewards (NaN) — one rule everywhere: a missing entry carries no
information. It is left out of every count, mean and std; its normalised value is
0 (exactly "group average"). Concretely:
  * per-group statistics use only the present entries; the std is the unbiased
    (n - 1) estimate over the n present entries, and taken as 0 when n < 2
    (so a lone present entry normalises to 0, never NaN);
  * gdpo: Â_i = 0 where r_i is missing, then A = Σ_i w_i Â_i (a nansum, as in
    the reference GDPO trainer);
  * grpo: a missing r_i is imputed with its group's mean over the present
    entries before the weighted sum (the same "average" reading; TRL's nansum
    would instead count it as a raw 0);
  * a row whose rewards are all missing gets advantage 0 and is left out of the
    group statistics and of gdpo's batch-level normalisation.
"""
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding, PartitionSpec

from safecrs_jax import assets, checkpoint, metrics_log, models, optim, rollout, sft, tokens
from safecrs_jax import sharding as shd
from safecrs_jax import train_state as ts

ADV_EPS = 1e-4  # (r - mean) / (std + ADV_EPS), as in the reference trainers
ADVANTAGE_MODES = ("gdpo", "grpo", "rank")
LOSS_AGGS = ("dapo", "grpo", "bnpo", "dr_grpo")
IS_LEVELS = ("sequence", "token")


# --------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------

def _masked_group_normalise(x, valid, group_size):
  """Normalises x within groups of `group_size` consecutive rows.

  x: [N, ...] float; valid: [N, ...] bool (same shape). Statistics per trailing
  position over the present entries of each group. Returns [N, ...], 0 where
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


def _check_rewards(rewards, group_size, weights, mode):
  if mode not in ADVANTAGE_MODES:
    raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
  want = 3 if mode == "rank" else 2
  if rewards.ndim != want:
    legend = "[N, R, rec_num]" if mode == "rank" else "[N, R]"
    raise ValueError(f"rewards must be {legend} in mode {mode!r}, got shape {rewards.shape}")
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards: {rewards.shape[0]} rows are not a multiple of group_size={group_size}")
  num_rewards = rewards.shape[1]
  if weights is None:
    return jnp.ones((num_rewards,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (num_rewards,):
    raise ValueError(f"reward weights shape {weights.shape} != ({num_rewards},) (one per reward)")
  return weights


def compute_advantages(rewards, group_size, weights=None, mode="gdpo"):
  """Group-relative advantages. Jittable (group_size and mode static).

  Args:
    rewards: [N, R] float (NaN = missing), or [N, R, K] per-rank rewards in
      mode "rank". Rows i*G .. i*G+G-1 are the G rollouts of prompt i.
    group_size: G.
    weights: [R] reward weights (default all 1).
    mode: "gdpo" — normalise each reward within its group, weighted sum, then
      normalise over the whole batch; "grpo" — weighted sum, then group
      normalisation; "rank" — each reward normalised per group *and per rank*,
      then the weighted sum over rewards (no batch step; Rank-GRPO).
  Returns:
    [N] float32 advantages ([N, K] in mode "rank").
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  weights = _check_rewards(rewards, group_size, weights, mode)
  valid = ~jnp.isnan(rewards)
  r = jnp.where(valid, rewards, 0.0)
  if mode == "rank":                                   # [N, R, K] -> [N, K]
    norm = _masked_group_normalise(r, valid, group_size)
    return jnp.einsum("nrk,r->nk", norm, weights)
  row_valid = valid.any(-1)                            # [N]
  if mode == "gdpo":
    norm = _masked_group_normalise(r, valid, group_size)          # [N, R]
    combined = norm @ weights                                     # [N]
    return _masked_group_normalise(combined, row_valid, r.shape[0])
  # grpo: impute missing entries with their group mean, then sum and normalise.
  n, num_rewards = r.shape
  g, v = r.reshape(n // group_size, group_size, num_rewards), valid.reshape(-1, group_size, num_rewards)
  mean = g.sum(1, keepdims=True) / jnp.maximum(v.sum(1, keepdims=True), 1)
  filled = jnp.where(v, g, mean).reshape(n, num_rewards)
  return _masked_group_normalise(filled @ weights, row_valid, group_size)


def _collapse_share(rewards, adv, group_size, tol=1e-5):
  """Share of groups holding two rows with different rewards but equal advantages."""
  n = rewards.shape[0]
  r = rewards.reshape(n // group_size, group_size, -1)
  a = adv.reshape(n // group_size, group_size, -1)
  same_r = jnp.all((r[:, :, None] == r[:, None]) | (jnp.isnan(r[:, :, None]) & jnp.isnan(r[:, None])), -1)
  same_a = jnp.all(jnp.abs(a[:, :, None] - a[:, None]) <= tol * (1.0 + jnp.abs(a[:, :, None])), -1)
  return jnp.mean(jnp.any(same_a & ~same_r, axis=(1, 2)).astype(jnp.float32))


def advantage_diagnostics(rewards, group_size, weights=None):
  """What the advantages can and cannot see in this batch. Jittable.

  Args: rewards [N, R] (or [N, R, K] per-rank), group_size G, weights [R].
  Returns a dict of float32 arrays:
    reward_mean, reward_std: [R] over the present entries of the batch
      (all ranks pooled for per-rank rewards); NaN where none is present.
    reward_missing: [R] share of missing entries.
    zero_var_groups: [R] share of groups in which reward i is constant over
      its present entries (no learning signal from that reward there).
    collapse_<mode>: scalar share of groups in which two rollouts with
      different reward vectors get identical advantages under <mode> (gdpo and
      grpo for [N, R]; rank for [N, R, K]).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  mode = "rank" if rewards.ndim == 3 else "gdpo"
  weights = _check_rewards(rewards, group_size, weights, mode)
  valid = ~jnp.isnan(rewards)
  flat = jnp.moveaxis(rewards, 1, -1).reshape(-1, rewards.shape[1])  # [N*K, R]
  fvalid = ~jnp.isnan(flat)
  cnt = fvalid.sum(0)
  mean = jnp.where(fvalid, flat, 0.0).sum(0) / cnt
  dev = jnp.where(fvalid, flat - mean, 0.0)
  std = jnp.sqrt((dev * dev).sum(0) / jnp.maximum(cnt - 1, 1))
  g = rewards.reshape((-1, group_size) + rewards.shape[1:])            # [B, G, R, (K)]
  gv = valid.reshape(g.shape)
  hi = jnp.where(gv, g, -jnp.inf).max(1)
  lo = jnp.where(gv, g, jnp.inf).min(1)
  const = ~(hi > lo)                                                   # [B, R, (K)]
  if mode == "rank":
    const = const.all(-1)
  out = {
      "reward_mean": mean,
      "reward_std": std,
      "reward_missing": 1.0 - cnt / flat.shape[0],
      "zero_var_groups": const.astype(jnp.float32).mean(0),
  }
  modes = ("rank",) if mode == "rank" else ("gdpo", "grpo")
  for m in modes:
    adv = compute_advantages(rewards, group_size, weights, m)
    out[f"collapse_{m}"] = _collapse_share(rewards, adv, group_size)
  return out


# --------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the clipped surrogate (hashable: a jit static arg).

  loss_agg — how per-token losses ℓ (masked by the completion mask) become one
  number, over the *global* batch of an optimizer step (all micro-batches, all
  devices; N sequences, M micro-batches, T = max completion length):
    dapo:    Σ_all ℓ / Σ_all mask                      (token mean over the step)
    grpo:    (1/N) Σ_seq (Σ_t ℓ / Σ_t mask)            (sequence means, then mean)
    bnpo:    (1/M) Σ_micro (Σ_micro ℓ / Σ_micro mask)  (token mean per micro-batch, then mean)
    dr_grpo: Σ_all ℓ / (N · T)                         (constant normaliser)
  Empty denominators count as 1.
  """
  beta: float = 1e-3           # k3 KL weight to the reference; 0 = no reference at all
  eps_low: float = 0.2         # ratio clipped below at 1 - eps_low
  eps_high: float = 0.2        # ... and above at 1 + eps_high
  importance_sampling: str = "sequence"  # "sequence" | "token"
  loss_agg: str = "dapo"       # "dapo" | "grpo" | "bnpo" | "dr_grpo"

  def __post_init__(self):
    if self.importance_sampling not in IS_LEVELS:
      raise ValueError(f"importance_sampling must be one of {IS_LEVELS}, got {self.importance_sampling!r}")
    if self.loss_agg not in LOSS_AGGS:
      raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
    if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
      raise ValueError(f"beta / eps_low / eps_high must be >= 0, got {self}")


def masked_sum(x, mask, axis=None):
  """Σ x·mask (float32)."""
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None, keepdims=False):
  """Σ x·mask / max(Σ mask, 1)."""
  num = jnp.sum(x * mask, axis=axis, keepdims=keepdims)
  return num / jnp.maximum(jnp.sum(mask, axis=axis, keepdims=keepdims), 1.0)


def per_token_loss(logp, old_logp, ref_logp, advantages, mask, cfg):
  """Per-token clipped-surrogate loss with the k3 KL term.

  Args:
    logp: [n, T] float32 log-probs of the completion tokens under the policy
      being trained (logits / temperature, as the sampler).
    old_logp: [n, T] log-probs under the policy that sampled (the rollout's).
    ref_logp: [n, T] under the frozen reference, or None when cfg.beta == 0.
    advantages: [n] sequence-level, or [n, T] per token (rank mode).
    mask: [n, T] {0,1} completion mask (tokens up to and including the stop).
    cfg: LossConfig.
  Returns:
    (loss [n, T] (0 outside the mask), dict of [n, T] float32 terms: ratio,
     kl, low_clipped, high_clipped).
  The importance weight is exp(logp - old) per token, or at the sequence level
  exp(mean_t(logp - old)) over the completion, shared by the sequence's tokens
  (its gradient carries the 1/|y| of the mean; GSPO / TRL "sequence").
  """
  mask = mask.astype(jnp.float32)
  log_ratio = logp - old_logp
  if cfg.importance_sampling == "sequence":
    log_ratio = masked_mean(log_ratio, mask, axis=-1, keepdims=True)  # [n, 1]
  ratio = jnp.broadcast_to(jnp.exp(log_ratio), logp.shape)
  adv = advantages if advantages.ndim == 2 else advantages[:, None]
  adv = jnp.broadcast_to(adv.astype(jnp.float32), logp.shape)
  clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  if cfg.beta > 0:
    if ref_logp is None:
      raise ValueError("per_token_loss: beta > 0 needs ref_logp")
    d = ref_logp - logp
    kl = jnp.exp(d) - d - 1.0
    loss = loss + cfg.beta * kl
  else:
    kl = jnp.zeros_like(logp)
  terms = {
      "ratio": ratio,
      "kl": kl,
      "low_clipped": ((ratio < 1.0 - cfg.eps_low) & (adv < 0)).astype(jnp.float32),
      "high_clipped": ((ratio > 1.0 + cfg.eps_high) & (adv > 0)).astype(jnp.float32),
  }
  return loss * mask, terms


def micro_batch_loss(logp, old_logp, ref_logp, advantages, mask, cfg, *,
                     total_tokens, total_seqs, num_micro):
  """One micro-batch's share of the step loss; the shares sum to the step loss.

  total_tokens: Σ mask over the whole step; total_seqs: N of the whole step;
  num_micro: M. Returns (scalar loss share, dict of metric *sums* over the
  micro-batch's completion tokens: kl, low_clipped, high_clipped, tokens).
  """
  loss, terms = per_token_loss(logp, old_logp, ref_logp, advantages, mask, cfg)
  mask = mask.astype(jnp.float32)
  agg = cfg.loss_agg
  if agg == "dapo":
    share = loss.sum() / jnp.maximum(total_tokens, 1.0)
  elif agg == "grpo":
    share = masked_mean(loss, mask, axis=-1).sum() / total_seqs
  elif agg == "bnpo":
    share = loss.sum() / jnp.maximum(mask.sum(), 1.0) / num_micro
  else:  # dr_grpo
    share = loss.sum() / (total_seqs * logp.shape[-1])
  sums = {k: masked_sum(terms[k], mask) for k in ("kl", "low_clipped", "high_clipped")}
  sums["tokens"] = mask.sum()
  return share, sums


def policy_loss(logp, old_logp, ref_logp, advantages, mask, cfg):
  """The step loss of a single micro-batch holding the whole step (see LossConfig).

  Returns (scalar loss, metrics: kl, clip_low, clip_high (token means)).
  """
  loss, sums = micro_batch_loss(
      logp, old_logp, ref_logp, advantages, mask, cfg,
      total_tokens=jnp.sum(mask).astype(jnp.float32), total_seqs=logp.shape[0], num_micro=1)
  tok = jnp.maximum(sums["tokens"], 1.0)
  return loss, {"kl": sums["kl"] / tok, "clip_low": sums["low_clipped"] / tok,
                "clip_high": sums["high_clipped"] / tok}


# --------------------------------------------------------------------------
# Rank mode: which list item each completion token belongs to
# --------------------------------------------------------------------------

def newline_token_ids(tokenizer):
  """Sorted ids whose decoded text contains a newline (they end a line)."""
  ids = [i for i in range(len(tokenizer))
         if "\n" in tokenizer.decode([i], skip_special_tokens=False)]
  return np.asarray(ids, np.int32)


def item_index(tokens, mask, newline_ids, stop_ids, rec_num, decode=None):
  """Host-side token -> list-item map for rank-level advantages.

  tokens / mask: [N, T] completion ids and completion mask; stop_ids: the
  sampler's stop tokens (a final stop token belongs to no item). A line ends at a
  token holding a newline (that token belongs to the line before). Without
  `decode`, line j is item j (the Rank-GRPO convention for bare lists). With
  `decode` (ids -> text), only lines that parse as one `Title (Year)` count as
  items, numbered in order; inside a `<solution>` block when the completion has
  one — so tags and reasoning lines never take an item's advantage.
  Returns [N, T] int32 item index in [0, rec_num), or -1 (no item: non-item
  lines, tokens past item rec_num, the stop token, padding).
  """
  from safecrs_jax.saferec import parsing
  tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
  stop_ids = {int(i) for i in stop_ids}
  is_nl = np.isin(tokens, np.asarray(newline_ids)) & mask
  line = np.cumsum(is_nl, axis=1) - is_nl                     # line of each token
  out = np.full(tokens.shape, -1, np.int32)
  for r in range(tokens.shape[0]):
    n = int(mask[r].sum())
    if n == 0:
      continue
    body = n - 1 if int(tokens[r, n - 1]) in stop_ids else n  # the stop token: no item
    if body == 0:
      continue
    if decode is None:
      item_of_line = np.arange(line[r, body - 1] + 1)
    else:
      ends = np.flatnonzero(is_nl[r, :body])
      starts = np.concatenate([[0], ends + 1])
      stops = np.concatenate([ends + 1, [body]])
      texts = [decode(tokens[r, a:b].tolist()) for a, b in zip(starts, stops)]
      full = "".join(texts)
      inside = "<solution>" not in full
      item_of_line, k = np.full(len(texts), -1), 0
      for j, text in enumerate(texts):
        if "<solution>" in text:
          inside = True
          text = text.split("<solution>", 1)[1]
        if "</solution>" in text:
          text, inside_after = text.split("</solution>", 1)[0], False
        else:
          inside_after = inside
        if inside and parsing.parse_line(text.strip()) is not None:
          item_of_line[j], k = k, k + 1
        inside = inside_after
    idx = item_of_line[line[r, :body]]
    out[r, :body] = np.where(idx < rec_num, idx, -1)
  return out


def token_advantages(rank_adv, items):
  """[N, K] item advantages + [N, T] item index (-1 = none) -> [N, T] per-token advantages."""
  rank_adv, items = np.asarray(rank_adv, np.float32), np.asarray(items)
  picked = np.take_along_axis(rank_adv, np.clip(items, 0, rank_adv.shape[1] - 1), axis=1)
  return np.where(items >= 0, picked, 0.0).astype(np.float32)


# --------------------------------------------------------------------------
# The learner step
# --------------------------------------------------------------------------

def train_step(state, ref_params, batch, *, model_cfg, loss_cfg, tx, schedule,
               temperature=1.0, mesh=None, rules=None):
  """One optimizer update on a rollout batch, accumulating over M micro-batches.

  state: train_state.TrainState (full fine-tuning: state.lora is None).
  ref_params: the frozen reference params, or None when loss_cfg.beta == 0.
  batch: dict of arrays with a leading micro-batch axis M, rows n per micro-batch:
    prompt_ids, prompt_mask [M, n, P] (left-padded, one row per rollout),
    completion_ids, completion_mask [M, n, T], old_logp [M, n, T] (the
    rollout's log-probs), advantages [M, n] or [M, n, T] (rank mode).
  Log-probs are taken at `temperature` (as the sampler reports them). The loss
  is LossConfig's aggregation over the whole step; each micro-batch adds the
  gradient of its share (micro_batch_loss), so M micro-batches equal one big one.
  Returns (state', metrics: loss, kl, clip_low, clip_high, ratio (token mean),
  grad_norm, lr, tokens).
  """
  if state.lora is not None:
    raise ValueError("gdpo.train_step trains full parameters; merge LoRA adapters first")
  mask_all = batch["completion_mask"].astype(jnp.float32)
  num_micro, n_per = mask_all.shape[:2]
  total_tokens = jnp.maximum(mask_all.sum(), 1.0)
  total_seqs = num_micro * n_per

  def logp_of(params, mb):
    return rollout.token_logprobs(model_cfg, params, mb["prompt_ids"], mb["prompt_mask"],
                                  mb["completion_ids"], mb["completion_mask"],
                                  temperature, mesh=mesh, rules=rules)

  def micro(params, mb):
    logp = logp_of(params, mb)                                              # [n, T]
    ref = None
    if loss_cfg.beta > 0:
      ref = jax.lax.stop_gradient(logp_of(ref_params, mb))
    share, sums = micro_batch_loss(
        logp, mb["old_logp"], ref, mb["advantages"], mb["completion_mask"], loss_cfg,
        total_tokens=total_tokens, total_seqs=total_seqs, num_micro=num_micro)
    sums["ratio"] = masked_sum(jnp.exp(logp - mb["old_logp"]), mb["completion_mask"].astype(jnp.float32))
    return share, sums

  grad_fn = jax.value_and_grad(micro, has_aux=True)
  params = state.params

  def body(carry, mb):
    g_acc, l_acc, s_acc = carry
    (share, sums), g = grad_fn(params, mb)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    s_acc = jax.tree.map(jnp.add, s_acc, sums)
    return (g_acc, l_acc + share, s_acc), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zero_sums = {k: jnp.zeros((), jnp.float32)
               for k in ("kl", "low_clipped", "high_clipped", "tokens", "ratio")}
  (grads, loss, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), zero_sums), batch)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                            opt_state=opt_state)
  tok = jnp.maximum(sums["tokens"], 1.0)
  metrics = {"loss": loss, "kl": sums["kl"] / tok, "clip_low": sums["low_clipped"] / tok,
             "clip_high": sums["high_clipped"] / tok, "ratio": sums["ratio"] / tok,
             "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "tokens": sums["tokens"]}
  return new_state, metrics


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------
#
# One loop step = one batch of prompts: M = grad_accum chunks of b =
# batch_size x (data-parallel devices) prompts are rolled out (G samples each)
# -> texts -> rewards on the host -> advantages over the whole step (N = M·b·G
# rollouts) -> mu optimizer updates on that batch (old policy = the rollout's
# log-probs). Resuming replays the same trajectory: prompt order from
# (seed, epoch) permutations, rollout keys fold_in(seed key, loop step, chunk).

def loss_config(gcfg):
  return LossConfig(beta=float(gcfg.beta), eps_low=float(gcfg.eps_low),
                    eps_high=float(gcfg.eps_high),
                    importance_sampling=str(gcfg.importance_sampling),
                    loss_agg=str(gcfg.loss_agg))


def _numerics(config):
  over = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
              remat=bool(config.model.remat))
  if config.model.get("scan_layers", None) is not None:
    over["scan_layers"] = bool(config.model.scan_layers)
  return over


def load_policy(config, mesh, rules, data_dir):
  """(model_cfg, params, tokenizer) to start Safe-GDPO from.

  gdpo.init_checkpoint: an orbax run dir / step dir written by Safe-SFT (its
  model_config.json and tokenizer/ are used; LoRA adapters are merged), or a
  Hugging Face dir (config.json + safetensors; its tokenizer if it has one).
  Empty: the model section (model.hf_dir, else a random model.preset) — for
  smoke tests and benchmarks only.
  """
  path = config.gdpo.init_checkpoint
  over = _numerics(config)
  if not path:
    tok = tokens.load_tokenizer(assets.resolve_tokenizer_path(config, data_dir))
    cfg = sft.model_config(config, tok)
    if config.model.hf_dir:
      return models.load_hf(config.model.hf_dir, mesh=mesh, rules=rules, **over) + (tok,)
    return cfg, models.init_params(cfg, jax.random.key(int(config.seed)), mesh=mesh, rules=rules), tok
  if not os.path.exists(path):
    raise FileNotFoundError(f"gdpo.init_checkpoint {path!r} does not exist")
  is_hf = os.path.isdir(path) and any(
      n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in os.listdir(path))
  if is_hf:
    cfg, params = models.load_hf(path, mesh=mesh, rules=rules, **over)
    tok_dir = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else \
        assets.resolve_tokenizer_path(config, data_dir)
    return cfg, params, tokens.load_tokenizer(tok_dir)
  cfg, params = checkpoint.load_params(path, mesh, rules, **over)
  return cfg, params, tokens.load_tokenizer(checkpoint.tokenizer_dir(path))


def _to_host(x):
  """Global array -> full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _upload(full, sharding):
  """Full numpy array (same on every process) -> global array in `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(full, sharding)
  idx = sharding.addressable_devices_indices_map(full.shape)
  return jax.make_array_from_single_device_arrays(
      full.shape, sharding, [jax.device_put(full[i], d) for d, i in idx.items()])


def rollout_svr(violations, lengths):
  """[N] per-rollout violation ratio: violating items / items (0 for an empty list)."""
  v = np.asarray(violations).sum(1)
  n = np.asarray(lengths)
  return np.where(n > 0, v / np.maximum(n, 1), 0.0)


class Run:
  """Everything `train` builds before looping (tests and benchmarks use the pieces)."""

  def __init__(self, config, workdir):
    from safecrs_jax import saferec
    self.config, self.workdir = config, os.path.abspath(workdir)
    g = self.gcfg = config.gdpo
    if g.advantage_mode not in ADVANTAGE_MODES:
      raise ValueError(f"gdpo.advantage_mode must be one of {ADVANTAGE_MODES}, got {g.advantage_mode!r}")
    if len(g.rewards) != len(g.reward_weights):
      raise ValueError(f"gdpo.rewards {tuple(g.rewards)} and gdpo.reward_weights "
                       f"{tuple(g.reward_weights)} must have the same length")
    if g.advantage_mode == "rank" and not set(g.rewards) <= {"relevance", "safety"}:
      raise ValueError(f"gdpo.advantage_mode='rank' has per-rank forms of relevance and safety "
                       f"only, got rewards {tuple(g.rewards)}")
    self.loss_cfg = loss_config(g)
    self.mu = int(g.mu)
    if self.mu < 1:
      raise ValueError(f"gdpo.mu must be >= 1, got {self.mu}")
    self.mesh, self.rules = sft.make_mesh(config)
    self.data_dir = assets.resolve_data_dir(config)
    self.rows = saferec.load_split(self.data_dir, "train", stage="grpo",
                                   strict=config.data.get("strict", True))
    self.oracle = saferec.load_oracle(self.data_dir, float(config.data.risk_threshold))
    self.model_cfg, params, self.tokenizer = load_policy(config, self.mesh, self.rules, self.data_dir)

    dp = sft.data_parallel_size(self.mesh)
    self.group = int(g.group_size)
    self.micro_prompts = int(g.batch_size) * dp          # b prompts per chunk
    self.accum = int(g.grad_accum)                       # M chunks
    self.step_prompts = self.micro_prompts * self.accum
    self.steps_per_epoch = len(self.rows) // self.step_prompts
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(self.rows)} GDPO prompts < one step of {self.step_prompts} "
                       "(batch_size x devices x grad_accum); lower gdpo.batch_size / grad_accum")
    self.num_steps = int(g.num_steps)
    self.sampling = rollout.SamplingConfig(
        max_new_tokens=int(g.max_completion_length), num_samples=self.group,
        temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
        stop_ids=tokens.stop_token_ids(self.tokenizer), pad_id=tokens.pad_id(self.tokenizer))
    self.temperature = float(g.temperature) if float(g.temperature) > 0 else 1.0
    self.weights = np.asarray(g.reward_weights, np.float32)
    self.newline_ids = (newline_token_ids(self.tokenizer) if g.advantage_mode == "rank" else None)

    self.tx, self.schedule = optim.make_optimizer(config.optim, self.num_steps * self.mu)
    p_sh = models.param_shardings(self.model_cfg, self.mesh, self.rules)
    abstract = jax.eval_shape(lambda p: ts.create(p, self.tx), models.abstract_params(self.model_cfg))
    self.state_shardings = ts.shardings(abstract, models.param_logical_axes(self.model_cfg),
                                        self.mesh, self.rules)
    self.abstract_state = ts.with_shardings(abstract, self.state_shardings)
    self.fingerprint = {
        "model": sft.fingerprint(self.model_cfg, config, self.step_prompts)["model"],
        "param_dtype": self.model_cfg.param_dtype, "stage": "gdpo",
        "step_prompts": self.step_prompts, "group_size": self.group, "mu": self.mu,
        "seed": int(config.seed)}
    ck = config.checkpoint
    self.ckpt = checkpoint.Checkpointer(
        os.path.join(self.workdir, checkpoint.CHECKPOINTS), save_every=ck.save_every,
        keep=ck.keep, async_save=ck.async_save)
    self.root_key = jax.random.key(int(config.seed))
    restored = self.ckpt.restore_latest(self.abstract_state, self.fingerprint)
    copy = jax.jit(lambda p: ts.create(jax.tree.map(jnp.copy, p), self.tx),
                   out_shardings=self.state_shardings)
    if restored is not None:
      self.state, data = restored
      self.start_step = int(data["step"])
      if int(jax.device_get(self.state.step)) != self.start_step * self.mu:
        raise checkpoint.CheckpointError(
            f"checkpoint in {self.ckpt.directory}: optimizer step {int(self.state.step)} != "
            f"loop step {self.start_step} x mu {self.mu}")
    else:
      self.state, self.start_step = copy(params), 0
    self.ref_params = params if self.loss_cfg.beta > 0 else None
    del params
    sft.write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)

    self.batch_sharding = lambda ndim: NamedSharding(
        self.mesh, PartitionSpec(None, shd.BATCH_AXES, *([None] * (ndim - 2))))
    self.prompt_sharding = NamedSharding(self.mesh, PartitionSpec(shd.BATCH_AXES, None))
    repl = NamedSharding(self.mesh, PartitionSpec())
    batch_sh = {k: self.batch_sharding(3) for k in (
        "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp")}
    batch_sh["advantages"] = self.batch_sharding(3 if g.advantage_mode == "rank" else 2)
    self.train_step = jax.jit(
        functools.partial(train_step, model_cfg=self.model_cfg, loss_cfg=self.loss_cfg,
                          tx=self.tx, schedule=self.schedule, temperature=self.temperature,
                          mesh=self.mesh, rules=self.rules),
        in_shardings=(self.state_shardings, None if self.ref_params is None else p_sh, batch_sh),
        out_shardings=(self.state_shardings, repl), donate_argnums=0)
    adv_mode = str(g.advantage_mode)
    self.advantages = jax.jit(functools.partial(compute_advantages, group_size=self.group,
                                                mode=adv_mode))
    self.diagnostics = jax.jit(functools.partial(advantage_diagnostics, group_size=self.group))

  # -- pieces of one loop step -------------------------------------------------
  def prompt_indices(self, step):
    """[M, b] row indices of loop step `step` (epoch permutation, drop-last)."""
    epoch, index = divmod(int(step), self.steps_per_epoch)
    perm = sft.epoch_permutation(self.config.seed, epoch, len(self.rows))
    return perm[index * self.step_prompts:(index + 1) * self.step_prompts].reshape(
        self.accum, self.micro_prompts)

  def generate(self, params, idx, step):
    """Rollouts of the prompts idx [M, b]: dict of [M, b·G, ...] numpy arrays."""
    g = self.gcfg
    flat = [self.rows[i]["prompt"] for i in idx.reshape(-1)]
    pb = tokens.encode_prompts(self.tokenizer, flat, max_prompt_length=int(g.max_prompt_length),
                               buckets=tuple(g.prompt_buckets))
    p_ids = pb.input_ids.reshape(self.accum, self.micro_prompts, -1)
    p_mask = pb.attention_mask.reshape(self.accum, self.micro_prompts, -1)
    outs = []
    for a in range(self.accum):
      key = jax.random.fold_in(jax.random.fold_in(self.root_key, step), a)
      r = rollout.generate(self.model_cfg, params, _upload(p_ids[a], self.prompt_sharding),
                           _upload(p_mask[a], self.prompt_sharding), key, self.sampling,
                           mesh=self.mesh, rules=self.rules)
      outs.append(r)
    host = [jax.tree.map(_to_host, r) for r in outs]
    stack = lambda f: np.stack([getattr(h, f) for h in host])
    return {"prompt_ids": np.repeat(p_ids, self.group, axis=1),
            "prompt_mask": np.repeat(p_mask, self.group, axis=1),
            "completion_ids": stack("tokens"), "completion_mask": stack("mask"),
            "old_logp": stack("logprobs"), "truncated_prompts": pb.num_truncated}

  def score(self, batch, idx):
    """Rewards of a rollout batch: (rewards [N, R] or [N, R, K], texts, rows, info)."""
    from safecrs_jax import saferec
    g = self.gcfg
    ids = batch["completion_ids"].reshape(-1, batch["completion_ids"].shape[-1])
    mask = batch["completion_mask"].reshape(ids.shape)
    texts = self.tokenizer.batch_decode([row[m > 0].tolist() for row, m in zip(ids, mask)],
                                        skip_special_tokens=True)
    rows = [self.rows[i] for i in np.repeat(idx.reshape(-1), self.group)]
    parsed = saferec.parse_all(texts)
    kw = dict(rec_num=int(g.rec_num), lambda_safe=float(g.lambda_safe),
              penalty_safe=float(g.penalty_safe))
    if g.advantage_mode == "rank":
      parts = saferec.rank_rewards(parsed, rows, rows, self.oracle, mode=str(g.rank_reward),
                                   components=True, **kw)
      rewards = np.stack([parts[n] for n in g.rewards], axis=1)             # [N, R, K]
    else:
      out = saferec.compute_rewards(parsed, rows, self.oracle, tuple(g.rewards),
                                    target_count=int(g.target_count),
                                    lambda_count=float(g.lambda_count),
                                    relevance_dcg=(g.relevance == "dcg"), **kw)
      rewards = np.stack([out[n] for n in g.rewards], axis=1)                # [N, R]
    k = int(g.rec_num)
    o_rows = self.oracle.rows(parsed, k)                                      # [N, k]
    masks = self.oracle.masks([r["constraints"] for r in rows])
    viol = self.oracle.trait_violations(o_rows, masks).any(-1)
    n_items = np.array([min(len(p), k) for p in parsed])
    present = np.arange(k)[None] < n_items[:, None]
    unknown = ((o_rows == self.oracle.unknown_row) & present).sum() / max(present.sum(), 1)
    hit = saferec.relevance_reward(parsed, rows, int(g.rec_num))
    info = {"rollout/svr": float(rollout_svr(viol, n_items).mean()),
            "rollout/hit": float(hit.mean()),
            "rollout/num_items": float(n_items.mean()),
            "rollout/unknown": float(unknown),
            "rollout/unparsed": float((n_items == 0).mean())}
    return rewards.astype(np.float32), texts, info

  def token_advantages(self, rewards, batch):
    """[M, b·G] (or [M, b·G, T] in rank mode) advantages + their diagnostics."""
    m, n, t = batch["completion_ids"].shape
    adv = np.asarray(self.advantages(rewards, weights=self.weights))
    diag = jax.device_get(self.diagnostics(rewards, weights=self.weights))
    if self.gcfg.advantage_mode == "rank":
      ids = batch["completion_ids"].reshape(m * n, t)
      items = item_index(ids, batch["completion_mask"].reshape(m * n, t), self.newline_ids,
                         self.sampling.stop_ids, int(self.gcfg.rec_num),
                         decode=lambda x: self.tokenizer.decode(x, skip_special_tokens=True))
      tok = token_advantages(adv, items)
      return tok.reshape(m, n, t), adv, diag
    return adv.reshape(m, n).astype(np.float32), adv, diag

  def learner_batch(self, batch, adv):
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp")
    out = {k: _upload(np.asarray(batch[k]), self.batch_sharding(np.ndim(batch[k]))) for k in keys}
    out["advantages"] = _upload(adv, self.batch_sharding(adv.ndim))
    return out

  def data_position(self, step):
    epoch, index = divmod(int(step), self.steps_per_epoch)
    return {"step": int(step), "epoch": epoch, "index": index, "rng_seed": int(self.config.seed),
            "fingerprint": self.fingerprint}

  def step(self, state, step):
    """One loop step: (state', host metrics of the rollouts, learner metrics (device))."""
    t0 = time.perf_counter()
    idx = self.prompt_indices(step)
    batch = self.generate(state.params, idx, step)
    t1 = time.perf_counter()
    rewards, _, info = self.score(batch, idx)
    t2 = time.perf_counter()
    adv, raw_adv, diag = self.token_advantages(rewards, batch)
    lb = self.learner_batch(batch, adv)
    learner = []
    for _ in range(self.mu):
      state, m = self.train_step(state, self.ref_params, lb)
      learner.append(m)
    jax.block_until_ready(state.step)
    t3 = time.perf_counter()
    mask = batch["completion_mask"]
    lengths = mask.sum(-1)
    gen_tokens = float(lengths.sum())
    host = dict(info)
    for i, name in enumerate(self.gcfg.rewards):
      host[f"reward/{name}"] = float(diag["reward_mean"][i])
      host[f"reward/{name}_std"] = float(diag["reward_std"][i])
      host[f"adv/zero_var_{name}"] = float(diag["zero_var_groups"][i])
    for k, v in diag.items():
      if k.startswith("collapse_"):
        host[f"adv/{k}"] = float(v)
    host.update({
        "adv/mean": float(raw_adv.mean()), "adv/std": float(raw_adv.std()),
        "adv/abs_mean": float(np.abs(raw_adv).mean()),
        "adv/zero_share": float((np.abs(raw_adv) < 1e-6).mean()),
        "rollout/length": float(lengths.mean()),
        "rollout/stopped": float(np.mean(np.isin(np.take_along_axis(
            batch["completion_ids"], np.maximum(lengths - 1, 0)[..., None], -1)[..., 0],
            self.sampling.stop_ids) & (lengths > 0))),
        "rollout/truncated_prompts": float(batch["truncated_prompts"]),
        "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learner_s": t3 - t2,
        "time/step_s": t3 - t0,
        "perf/rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
        "perf/learner_tokens_per_s": self.mu * float(
            batch["prompt_mask"].sum() + gen_tokens) / max(t3 - t2, 1e-9),
    })
    return state, host, learner


def _learner_record(fetched):
  last = fetched[-1]
  out = {f"train/{k}": float(np.mean([float(m[k]) for m in fetched]))
         for k in ("loss", "kl", "clip_low", "clip_high", "ratio", "grad_norm")}
  out["train/lr"] = float(last["lr"])
  return out


def train(config, workdir):
  """Runs (or resumes) Safe-GDPO in `workdir`; returns a summary dict.

  Summary: start_step, final_step, history (one dict of host metrics per loop
  step run in this call: rollout SVR / hit rate, rewards, advantage
  diagnostics, timings, and train/* for logged steps), preempted, run.
  """
  run = Run(config, workdir)
  log_cfg = config.log
  writer = metrics_log.MetricWriter(run.workdir, tensorboard=bool(log_cfg.tensorboard))
  progress = metrics_log.Progress(run.num_steps, initial=run.start_step, desc="gdpo",
                                  enabled=bool(log_cfg.progress))
  watch = checkpoint.PreemptionWatch()
  summary = {"workdir": run.workdir, "start_step": run.start_step, "history": [],
             "preempted": False}
  progress.write(f"gdpo: {len(run.rows)} prompts, {run.num_steps} steps of {run.step_prompts} "
                 f"prompts x G={run.group}, mu={run.mu}, advantages={config.gdpo.advantage_mode}"
                 + (f"; resuming at step {run.start_step}" if run.start_step else ""))
  every = max(int(log_cfg.every), 1)
  state, step = run.state, run.start_step
  window, pending = [], []
  try:
    while step < run.num_steps:
      state, host, learner = run.step(state, step)
      step += 1
      window.append(host)
      pending.extend(learner)
      summary["history"].append(dict(host, step=step))
      if step % every == 0 or step == run.num_steps:
        record = {k: float(np.mean([h[k] for h in window])) for k in window[0]}
        record.update(_learner_record(jax.device_get(pending)))
        summary["history"][-1].update({k: v for k, v in record.items() if k.startswith("train/")})
        writer.write(step, record)
        progress.update(len(window), svr=record["rollout/svr"], hit=record["rollout/hit"],
                        kl=record["train/kl"])
        window, pending = [], []
      if run.ckpt.should_save(step) or step == run.num_steps:
        run.ckpt.save(step, state, run.data_position(step), force=True)
      if watch.reached(step) and step < run.num_steps:
        run.ckpt.save(step, state, run.data_position(step), force=True)
        summary["preempted"] = True
        progress.write(f"gdpo: SIGTERM at step {step}; checkpoint written, exiting")
        break
  finally:
    run.ckpt.close()
    writer.close()
    progress.close()
    watch.close()
  run.state = state
  summary["final_step"] = step
  summary["run"] = run
  return summary
