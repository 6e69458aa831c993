"""The clipped policy objective of Safe-GDPO: per-token loss, KL to the reference, aggregation.

Shape letters (package legend): B sequences of a micro-batch, T completion
tokens, A micro-batches of an optimizer step.

    loss, terms = per_token_loss(logp, old_logp, ref_logp, advantages, mask, cfg)   # [B, T]
    share, sums = micro_batch_loss(..., total_tokens=, total_seqs=, num_micro=)     # one micro-batch

The shares of a step's micro-batches sum to the step loss (rl.steps accumulates them).

The importance ratio is per token or per sequence (exp of the mean token
log-ratio, GSPO / TRL "sequence"); the KL term is the k3 estimator
exp(ref - logp) - (ref - logp) - 1. Aggregations are looked up by name in
AGGREGATIONS (see LossConfig).
"""
import dataclasses

import jax.numpy as jnp

IS_LEVELS = ("sequence", "token")

# The learner's loss metrics, named once. CLIP_TERMS: per-token terms of
# per_token_loss that micro_batch_loss sums over a micro-batch's completion
# tokens; the learner step (steps.gdpo_train_step) adds the sum of the token
# ratio exp(logp - old_logp) and reports each sum / tokens as a token mean
# (TOKEN_MEANS). LOSS_METRICS are what the stage logs as train/<name> window
# means (beside train/lr, the last value).
CLIP_TERMS = ("kl", "clip_low", "clip_high")
TOKEN_MEANS = CLIP_TERMS + ("ratio",)
LOSS_METRICS = ("loss",) + TOKEN_MEANS + ("grad_norm",)


def masked_sum(x, mask, axis=None):
  """Σ x·mask (float32)."""
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x, mask, axis=None, keepdims=False):
  """Σ x·mask / max(Σ mask, 1)."""
  num = jnp.sum(x * mask, axis=axis, keepdims=keepdims)
  return num / jnp.maximum(jnp.sum(mask, axis=axis, keepdims=keepdims), 1.0)


def _dapo(loss, mask, total_tokens, total_seqs, num_micro):
  return loss.sum() / jnp.maximum(total_tokens, 1.0)


def _grpo(loss, mask, total_tokens, total_seqs, num_micro):
  return masked_mean(loss, mask, axis=-1).sum() / total_seqs


def _bnpo(loss, mask, total_tokens, total_seqs, num_micro):
  return loss.sum() / jnp.maximum(mask.sum(), 1.0) / num_micro


def _dr_grpo(loss, mask, total_tokens, total_seqs, num_micro):
  return loss.sum() / (total_seqs * loss.shape[-1])


# name -> share of one micro-batch (loss [B, T] masked, mask [B, T], step totals)
AGGREGATIONS = {"dapo": _dapo, "grpo": _grpo, "bnpo": _bnpo, "dr_grpo": _dr_grpo}
LOSS_AGGS = tuple(AGGREGATIONS)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the clipped surrogate (hashable: a jit static arg).

  loss_agg — how per-token losses ℓ (masked by the completion mask) become one
  number, over the *global* batch of an optimizer step (all micro-batches, all
  devices; n sequences in all, A micro-batches, T = max completion length):
    dapo:    Σ_all ℓ / Σ_all mask                      (token mean over the step)
    grpo:    (1/n) Σ_seq (Σ_t ℓ / Σ_t mask)            (sequence means, then mean)
    bnpo:    (1/A) Σ_micro (Σ_micro ℓ / Σ_micro mask)  (token mean per micro-batch, then mean)
    dr_grpo: Σ_all ℓ / (n · T)                         (constant normaliser)
  Empty denominators count as 1.
  """
  beta: float = 1e-3           # k3 KL weight to the reference; 0 = no reference at all
  eps_low: float = 0.2         # ratio clipped below at 1 - eps_low
  eps_high: float = 0.2        # ... and above at 1 + eps_high
  importance_sampling: str = "sequence"  # "sequence" | "token"
  loss_agg: str = "dapo"       # "dapo" | "grpo" | "bnpo" | "dr_grpo"

  def __post_init__(self):
    if self.importance_sampling not in IS_LEVELS:
      raise ValueError(f"importance_sampling must be one of {IS_LEVELS}, "
                       f"got {self.importance_sampling!r}")
    if self.loss_agg not in LOSS_AGGS:
      raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
    if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
      raise ValueError(f"beta / eps_low / eps_high must be >= 0, got {self}")


def per_token_loss(logp, old_logp, ref_logp, advantages, mask, cfg):
  """Per-token clipped-surrogate loss with the k3 KL term.

  Args:
    logp: [B, T] float32 log-probs of the completion tokens under the policy
      being trained (logits / temperature, as the sampler).
    old_logp: [B, T] log-probs under the policy that sampled (the rollout's).
    ref_logp: [B, T] under the frozen reference, or None when cfg.beta == 0.
    advantages: [B] sequence-level, or [B, T] per token (rank mode).
    mask: [B, T] {0,1} completion mask (tokens up to and including the stop).
    cfg: LossConfig.
  Returns:
    (loss [B, T] (0 outside the mask), dict of [B, T] float32 terms: ratio,
     kl, clip_low, clip_high).
  The importance weight is exp(logp - old) per token, or at the sequence level
  exp(mean_t(logp - old)) over the completion, shared by the sequence's tokens
  (its gradient carries the 1/|y| of the mean; GSPO / TRL "sequence").
  """
  mask = mask.astype(jnp.float32)
  log_ratio = logp - old_logp
  if cfg.importance_sampling == "sequence":
    log_ratio = masked_mean(log_ratio, mask, axis=-1, keepdims=True)  # [B, 1]
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
      "clip_low": ((ratio < 1.0 - cfg.eps_low) & (adv < 0)).astype(jnp.float32),
      "clip_high": ((ratio > 1.0 + cfg.eps_high) & (adv > 0)).astype(jnp.float32),
  }
  return loss * mask, terms


def micro_batch_loss(logp, old_logp, ref_logp, advantages, mask, cfg, *,
                     total_tokens, total_seqs, num_micro):
  """One micro-batch's share of the step loss; the shares sum to the step loss.

  total_tokens: Σ mask over the whole step; total_seqs: n, sequences in the whole step;
  num_micro: A. Returns (scalar loss share, dict of metric *sums* over the
  micro-batch's completion tokens: CLIP_TERMS and tokens).
  """
  loss, terms = per_token_loss(logp, old_logp, ref_logp, advantages, mask, cfg)
  mask = mask.astype(jnp.float32)
  share = AGGREGATIONS[cfg.loss_agg](loss, mask, total_tokens, total_seqs, num_micro)
  sums = {k: masked_sum(terms[k], mask) for k in CLIP_TERMS}
  sums["tokens"] = mask.sum()
  return share, sums
