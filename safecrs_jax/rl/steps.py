"""The jitted steps of both stages over one gradient-accumulation scan.

Shape letters (package legend): A micro-batches accumulated per optimizer
step, B rows per micro-batch (global), T tokens (Safe-SFT: the padded
sequence; Safe-GDPO: completion tokens), P prompt tokens, V vocab.

    state, metrics = sft_train_step(state, TokenBatch [A, B, T], rng, ...)
    nll_sum, count = sft_eval_step(state, TokenBatch [B, T], ...)
    ref_logp = reference_logprobs(ref_params, RolloutBatch [A, B, ...], ...)   # [A, B, T]
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

Memory knobs (see models/head.py); logits_chunk and ref_logp move memory, not values:
  logits_chunk  0: the output head on every position at once ([B, T, V] logits,
                fastest for a small vocabulary); C > 0: final hidden states
                (models.forward_hidden) meet the head C positions at a time
                (models.chunked_nll_sum / chunked_token_logprobs), so no step
                holds more than [B, C, V]. Safe-GDPO always runs the head on the
                T completion positions only (never on the prompt).
  lora_dropout  Safe-SFT with LoRA: p > 0 runs the unmerged adapters with
                dropout on their input, one key per micro-batch from
                fold_in(rng, step); p = 0 merges W + scale·A@B.
  ref_logp      Safe-GDPO: reference log-probs computed once per rollout batch
                (`reference_logprobs`, before the mu updates) instead of one
                reference forward inside every update.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from safecrs_jax import models
from safecrs_jax.models import lora as lora_lib
from safecrs_jax.rl import policy_loss


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
  ref_logp: Any = None  # [A, B, T] float32 reference log-probs (reference_logprobs), or
                        # None: gdpo_train_step runs the reference inside each update


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


def batch_nll(params, lora_params, batch, *, model_cfg, lora_scale=None, lora_dropout=0.0,
              dropout_rng=None, logits_chunk=0, mesh=None, rules=None):
  """(sum NLL, loss tokens) of one micro-batch (TokenBatch [B,T]).

  LoRA adapters are merged (W + scale·A@B) unless dropout is on (lora_dropout > 0
  and a dropout_rng): then they run unmerged, with dropout on their input.
  logits_chunk > 0: the head in chunks of that many positions (module docstring).
  """
  lora_kw, p = {}, params
  if lora_params is not None and lora_dropout > 0 and dropout_rng is not None:
    lora_kw = dict(lora=lora_params, lora_scale=float(lora_scale),
                   lora_dropout=float(lora_dropout), dropout_rng=dropout_rng)
  elif lora_params is not None:
    p = lora_lib.merge(params, lora_params, lora_scale)
  if logits_chunk <= 0:
    logits = models.forward(model_cfg, p, batch.input_ids, batch.attention_mask,
                            mesh=mesh, rules=rules, **lora_kw)       # [B,T,V]
    return shifted_nll(logits, batch.input_ids, batch.loss_mask)
  hidden = models.forward_hidden(model_cfg, p, batch.input_ids, batch.attention_mask,
                                 mesh=mesh, rules=rules, **lora_kw)  # [B,T,D]
  return models.chunked_nll_sum(hidden[:, :-1], models.head_weight(model_cfg, p),
                                batch.input_ids[:, 1:], batch.loss_mask[:, 1:],
                                chunk=logits_chunk, dtype=model_cfg.dtype, mesh=mesh,
                                rules=rules)


def sft_train_step(state, batch, rng, *, model_cfg, tx, schedule, lora_scale=None,
                   lora_dropout=0.0, logits_chunk=0, mesh=None, rules=None):
  """One Safe-SFT optimizer step over an accumulated TokenBatch [A,B,T].

  rng: root key; the step's key fold_in(rng, step) is split into one LoRA
  dropout key per micro-batch (used when LoRA is on and lora_dropout > 0).
  Returns (state', metrics {loss, grad_norm, lr, loss_tokens}).
  """
  use_lora = state.lora is not None
  keys = jax.random.split(jax.random.fold_in(rng, state.step), batch.input_ids.shape[0])
  total = jnp.maximum(jnp.sum(batch.loss_mask[:, :, 1:]).astype(jnp.float32), 1.0)

  def micro_sum(trainable, xs):
    mb, key = xs
    params, lora_p = (state.params, trainable) if use_lora else (trainable, None)
    s, _ = batch_nll(params, lora_p, mb, model_cfg=model_cfg, lora_scale=lora_scale,
                     lora_dropout=lora_dropout, dropout_rng=key if use_lora else None,
                     logits_chunk=logits_chunk, mesh=mesh, rules=rules)
    return s, {}

  grads, nll_sum, _ = accumulate(jax.value_and_grad(micro_sum, has_aux=True),
                                 state.trainable, (batch, keys), {})
  grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, state.trainable)
  metrics = {"loss": nll_sum / total, "grad_norm": optax.global_norm(grads),
             "lr": schedule(state.step), "loss_tokens": total}
  return apply_gradients(state, grads, tx), metrics


def sft_eval_step(state, batch, *, model_cfg, lora_scale=None, logits_chunk=0, mesh=None,
                  rules=None):
  """(sum NLL, loss tokens) of one validation TokenBatch [B,T] under `state`'s weights."""
  return batch_nll(state.params, state.lora, batch, model_cfg=model_cfg,
                   lora_scale=lora_scale, logits_chunk=logits_chunk, mesh=mesh, rules=rules)


# -- Safe-GDPO --------------------------------------------------------------------

def completion_logprobs(model_cfg, params, prompt_ids, prompt_mask, completion_ids,
                        completion_mask, temperature=1.0, *, logits_chunk=0, mesh=None,
                        rules=None):
  """log pi(completion token) of the tempered model, the head on completion positions only.

  prompt_ids / prompt_mask [n, P] left-padded; completion_ids / completion_mask
  [n, T]. Hidden states at positions P-1 .. P+T-2 (those predicting the T
  completion tokens) meet the head `logits_chunk` positions at a time (0: all T
  at once). Returns [n, T] float32, 0 off the mask.
  """
  ids = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
  p, t = prompt_ids.shape[1], completion_ids.shape[1]
  hidden = models.forward_hidden(model_cfg, params, ids, mask, mesh=mesh, rules=rules)
  hidden = hidden[:, p - 1:p + t - 1]                                    # [n, T, D]
  chunk = t if logits_chunk <= 0 else int(logits_chunk)
  logp = models.chunked_token_logprobs(
      hidden, models.head_weight(model_cfg, params), completion_ids, chunk=chunk,
      temperature=temperature, dtype=model_cfg.dtype, mesh=mesh, rules=rules)  # [n, T]
  return logp * completion_mask.astype(jnp.float32)


def reference_logprobs(ref_params, batch, *, model_cfg, temperature=1.0, logits_chunk=0,
                       mesh=None, rules=None):
  """RolloutBatch [A, B, ...] -> [A, B, T] float32 reference log-probs, one micro-batch at a time.

  Run once per rollout batch (before the mu updates) and pass the result as
  RolloutBatch.ref_logp; gdpo_train_step then needs no reference forward.
  """
  def one(mb):
    return completion_logprobs(model_cfg, ref_params, mb.prompt_ids, mb.prompt_mask,
                               mb.completion_ids, mb.completion_mask, temperature,
                               logits_chunk=logits_chunk, mesh=mesh, rules=rules)
  return jax.lax.map(one, batch.replace(ref_logp=None))


def gdpo_train_step(state, ref_params, batch, *, model_cfg, loss_cfg, tx, schedule,
                    temperature=1.0, logits_chunk=0, mesh=None, rules=None):
  """One Safe-GDPO optimizer update on a RolloutBatch, accumulating over A micro-batches.

  state: TrainState (full fine-tuning: state.lora is None). ref_params: the
  frozen reference params, or None when loss_cfg.beta == 0 or batch.ref_logp is
  set (then the precomputed reference log-probs are used). Log-probs are taken
  at `temperature` (as the sampler reports them), the head on completion
  positions only (completion_logprobs). The loss is LossConfig's aggregation
  over the whole step; each micro-batch adds the gradient of its share
  (policy_loss.micro_batch_loss), so A micro-batches equal one big one.
  Returns (state', metrics: loss, the token means policy_loss.TOKEN_MEANS (kl,
  clip_low, clip_high, ratio), grad_norm, lr, tokens).
  """
  if state.lora is not None:
    raise ValueError("gdpo_train_step trains full parameters; merge LoRA adapters first")
  if loss_cfg.beta > 0 and batch.ref_logp is None and ref_params is None:
    raise ValueError("beta > 0 needs ref_params or batch.ref_logp (reference_logprobs)")
  mask_all = batch.completion_mask.astype(jnp.float32)
  num_micro, rows = mask_all.shape[:2]
  total_tokens = jnp.maximum(mask_all.sum(), 1.0)

  def logp_of(params, mb):
    return completion_logprobs(model_cfg, params, mb.prompt_ids, mb.prompt_mask,
                               mb.completion_ids, mb.completion_mask, temperature,
                               logits_chunk=logits_chunk, mesh=mesh, rules=rules)  # [B, T]

  def micro(params, mb):
    logp = logp_of(params, mb)
    ref = None
    if loss_cfg.beta > 0:
      ref = mb.ref_logp if mb.ref_logp is not None else logp_of(ref_params, mb)
      ref = jax.lax.stop_gradient(ref)
    share, sums = policy_loss.micro_batch_loss(
        logp, mb.old_logp, ref, mb.advantages, mb.completion_mask, loss_cfg,
        total_tokens=total_tokens, total_seqs=num_micro * rows, num_micro=num_micro)
    mask = mb.completion_mask.astype(jnp.float32)
    sums["ratio"] = policy_loss.masked_sum(jnp.exp(logp - mb.old_logp), mask)
    return share, sums

  zero_sums = {k: jnp.zeros((), jnp.float32) for k in policy_loss.TOKEN_MEANS + ("tokens",)}
  grads, loss, sums = accumulate(jax.value_and_grad(micro, has_aux=True), state.params,
                                 batch, zero_sums)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  tok = jnp.maximum(sums["tokens"], 1.0)
  metrics = {"loss": loss, **{k: sums[k] / tok for k in policy_loss.TOKEN_MEANS},
             "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
             "tokens": sums["tokens"]}
  return apply_gradients(state, grads, tx), metrics
