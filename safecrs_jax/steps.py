"""The jitted steps of both stages over one gradient-accumulation scan.

Shape letters (package legend): A micro-batches accumulated per optimizer
step, B rows per micro-batch (global), T tokens (Safe-SFT: the padded
sequence; Safe-GDPO: completion tokens), P prompt tokens, V vocab.

    state, metrics = sft_train_step(state, TokenBatch [A, B, T], rng, ...)
    nll_sum, count = sft_eval_step(state, TokenBatch [B, T], ...)
    state, metrics = gdpo_train_step(state, ref_params, RolloutBatch [A, B, ...], ...)

Both train steps compute Σ over micro-batches of each micro-batch's gradient
(`accumulate`, one lax.scan), then one optimizer update (`apply_gradients`).

Safe-SFT loss normalisation (documented choice): the loss of one optimizer
step is the mean next-token NLL over *every* loss token of the accumulated batch,

    loss = Σ_{a,b,t} nll[a,b,t] · w[a,b,t]  /  Σ_{a,b,t} w[a,b,t],

so micro-batches are weighted by their token counts and A micro-batches of k
rows give exactly the same loss and gradient as one batch of A·k rows. Each
micro-batch contributes the gradient of its *sum* of NLL; the accumulated sum is
divided once by the total token count. Safe-GDPO's micro-batches contribute
their share of policy_loss's aggregation over the whole step instead.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from safecrs_jax import models, policy_loss, rollout
from safecrs_jax import lora as lora_lib


@flax.struct.dataclass
class TokenBatch:
  """Safe-SFT rows: [A, B, T] for a train step, [B, T] for evaluation."""
  input_ids: Any        # int32 token ids, right-padded
  attention_mask: Any   # {0,1} real tokens
  loss_mask: Any        # {0,1} token t is a target (completion + end of turn)


@flax.struct.dataclass
class RolloutBatch:
  """Safe-GDPO learner batch, one row per rollout, leading micro-batch axis A."""
  prompt_ids: Any       # [A, B, P] int32, left-padded
  prompt_mask: Any      # [A, B, P] {0,1}
  completion_ids: Any   # [A, B, T] int32
  completion_mask: Any  # [A, B, T] {0,1}: tokens up to and including the stop
  old_logp: Any         # [A, B, T] float32 log-probs of the sampling policy
  advantages: Any       # [A, B] (or [A, B, T] per token in rank mode) float32


def accumulate(value_and_grad, trainable, batch, aux_zeros):
  """Σ over the leading axis A of `batch` of value_and_grad(trainable, micro_batch).

  value_and_grad returns ((value [], aux dict of []), grads like trainable).
  Returns (grads summed in float32, Σ value, Σ aux).
  """
  def body(carry, mb):
    g_acc, v_acc, a_acc = carry
    (value, aux), g = value_and_grad(trainable, mb)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    return (g_acc, v_acc + value, jax.tree.map(jnp.add, a_acc, aux)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
  init = (zeros, jnp.zeros((), jnp.float32), aux_zeros)
  (grads, value, aux), _ = jax.lax.scan(body, init, batch)
  return grads, value, aux


def apply_gradients(state, grads, tx):
  """One optimizer update of the state's trainable part (params, or the LoRA adapters)."""
  trainable = state.trainable
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  if state.lora is not None:
    return state.replace(step=state.step + 1, lora=new, opt_state=opt_state)
  return state.replace(step=state.step + 1, params=new, opt_state=opt_state)


# -- Safe-SFT ---------------------------------------------------------------------

def shifted_nll(logits, input_ids, loss_mask):
  """Masked next-token NLL, float32.

  logits [B,T,V] (any dtype), input_ids [B,T], loss_mask [B,T] (token t is a
  target) -> (sum of NLL over target tokens [], number of target tokens []).
  """
  logits = logits[:, :-1].astype(jnp.float32)                     # [B,T-1,V]
  targets = input_ids[:, 1:]                                        # [B,T-1]
  weights = loss_mask[:, 1:].astype(jnp.float32)                    # [B,T-1]
  lse = jax.nn.logsumexp(logits, axis=-1)                           # [B,T-1]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - picked
  return jnp.sum(nll * weights), jnp.sum(weights)


def batch_nll(params, lora_params, batch, *, model_cfg, lora_scale=None, mesh=None,
              rules=None):
  """(sum NLL, loss tokens) of one micro-batch (TokenBatch [B,T])."""
  p = params if lora_params is None else lora_lib.merge(params, lora_params, lora_scale)
  logits = models.forward(model_cfg, p, batch.input_ids, batch.attention_mask,
                          mesh=mesh, rules=rules)                  # [B,T,V]
  return shifted_nll(logits, batch.input_ids, batch.loss_mask)


def sft_train_step(state, batch, rng, *, model_cfg, tx, schedule, lora_scale=None,
                   mesh=None, rules=None):
  """One Safe-SFT optimizer step over an accumulated TokenBatch [A,B,T].

  rng: root key (the step is folded in here; unused by the deterministic model
  but kept so stochastic regularisers get a per-step key).
  Returns (state', metrics {loss, grad_norm, lr, loss_tokens}).
  """
  step_rng = jax.random.fold_in(rng, state.step)  # noqa: F841 (no stochastic layers yet)
  use_lora = state.lora is not None
  total = jnp.maximum(jnp.sum(batch.loss_mask[:, :, 1:]).astype(jnp.float32), 1.0)

  def micro_sum(trainable, mb):
    params, lora_p = (state.params, trainable) if use_lora else (trainable, None)
    s, _ = batch_nll(params, lora_p, mb, model_cfg=model_cfg, lora_scale=lora_scale,
                     mesh=mesh, rules=rules)
    return s, {}

  grads, nll_sum, _ = accumulate(jax.value_and_grad(micro_sum, has_aux=True),
                                 state.trainable, batch, {})
  grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, state.trainable)
  metrics = {"loss": nll_sum / total, "grad_norm": optax.global_norm(grads),
             "lr": schedule(state.step), "loss_tokens": total}
  return apply_gradients(state, grads, tx), metrics


def sft_eval_step(state, batch, *, model_cfg, lora_scale=None, mesh=None, rules=None):
  """(sum NLL, loss tokens) of one validation TokenBatch [B,T] under `state`'s weights."""
  return batch_nll(state.params, state.lora, batch, model_cfg=model_cfg,
                   lora_scale=lora_scale, mesh=mesh, rules=rules)


# -- Safe-GDPO --------------------------------------------------------------------

_GDPO_SUMS = ("kl", "low_clipped", "high_clipped", "tokens", "ratio")


def gdpo_train_step(state, ref_params, batch, *, model_cfg, loss_cfg, tx, schedule,
                    temperature=1.0, mesh=None, rules=None):
  """One Safe-GDPO optimizer update on a RolloutBatch, accumulating over A micro-batches.

  state: TrainState (full fine-tuning: state.lora is None). ref_params: the
  frozen reference params, or None when loss_cfg.beta == 0. Log-probs are taken
  at `temperature` (as the sampler reports them). The loss is LossConfig's
  aggregation over the whole step; each micro-batch adds the gradient of its
  share (policy_loss.micro_batch_loss), so A micro-batches equal one big one.
  Returns (state', metrics: loss, kl, clip_low, clip_high, ratio (token mean),
  grad_norm, lr, tokens).
  """
  if state.lora is not None:
    raise ValueError("gdpo_train_step trains full parameters; merge LoRA adapters first")
  mask_all = batch.completion_mask.astype(jnp.float32)
  num_micro, rows = mask_all.shape[:2]
  total_tokens = jnp.maximum(mask_all.sum(), 1.0)

  def logp_of(params, mb):
    return rollout.token_logprobs(model_cfg, params, mb.prompt_ids, mb.prompt_mask,
                                  mb.completion_ids, mb.completion_mask,
                                  temperature, mesh=mesh, rules=rules)   # [B, T]

  def micro(params, mb):
    logp = logp_of(params, mb)
    ref = None
    if loss_cfg.beta > 0:
      ref = jax.lax.stop_gradient(logp_of(ref_params, mb))
    share, sums = policy_loss.micro_batch_loss(
        logp, mb.old_logp, ref, mb.advantages, mb.completion_mask, loss_cfg,
        total_tokens=total_tokens, total_seqs=num_micro * rows, num_micro=num_micro)
    mask = mb.completion_mask.astype(jnp.float32)
    sums["ratio"] = policy_loss.masked_sum(jnp.exp(logp - mb.old_logp), mask)
    return share, sums

  zero_sums = {k: jnp.zeros((), jnp.float32) for k in _GDPO_SUMS}
  grads, loss, sums = accumulate(jax.value_and_grad(micro, has_aux=True), state.params,
                                 batch, zero_sums)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  tok = jnp.maximum(sums["tokens"], 1.0)
  metrics = {"loss": loss, "kl": sums["kl"] / tok, "clip_low": sums["low_clipped"] / tok,
             "clip_high": sums["high_clipped"] / tok, "ratio": sums["ratio"] / tok,
             "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "tokens": sums["tokens"]}
  return apply_gradients(state, grads, tx), metrics
