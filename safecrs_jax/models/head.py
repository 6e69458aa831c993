"""The output head applied in chunks of positions: log-probs and NLL without [B,T,V].

Shape legend: B batch, T positions, C positions per chunk, D hidden, V vocab.

A full-vocabulary head on a long batch is the largest buffer of a training step
(float32 [B,T,V]: 28 GiB for 32 x 1536 tokens of Qwen2.5's 151,936 words). Here the
final hidden states (models.forward_hidden) meet the head weight one chunk of C
positions at a time under lax.scan: a step holds [B,C,V] logits only. The chunk
body is wrapped in jax.checkpoint, so the backward pass saves nothing per chunk but
its inputs and recomputes that chunk's logits, one chunk at a time as well.

Numerics match the unchunked path (`shifted_nll` in sft.py, `token_logprobs` in
rollout.py): logits by a cfg.dtype matmul, cast to float32, divided by the
temperature, log-softmax in float32.

Callers pick the positions first (hidden[:, :-1] for next-token targets
input_ids[:, 1:]; hidden[:, P-1:P+T-1] for the T completion tokens after a prompt
of P), so the head runs only where a log-prob is needed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from safecrs_jax.infra import sharding as shd
from safecrs_jax.models.config import ModelConfig

DEFAULT_CHUNK = 128


def head_weight(cfg: ModelConfig, params):
  """The output projection [D,V] in its storage dtype.

  Tied embeddings: the embedding table transposed; else the lm_head kernel.
  forward() logits == forward_hidden() @ head_weight (both in cfg.dtype).
  """
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T                       # [D,V]
  return params["lm_head"]["kernel"]                                  # [D,V]


def _chunks(x, chunk, fill):
  """[B,T,...] -> [T/C (rounded up), B, C, ...], padding T with `fill`."""
  b, t = x.shape[:2]
  n = -(-t // chunk)
  pad = [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(b, n, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _chunk_logprobs(h, w, targets, inv_temp, dt, mesh, rules):
  """h [B,C,D], w [D,V], targets [B,C] -> log softmax(h @ w / temp)[target] [B,C] f32."""
  logits = jnp.einsum("bcd,dv->bcv", h.astype(dt), w.astype(dt))      # [B,C,V] dt
  logits = shd.constrain(logits, ("act_batch", "act_length", "act_vocab"), mesh, rules)
  logits = logits.astype(jnp.float32) * inv_temp                      # [B,C,V] f32
  lse = jax.nn.logsumexp(logits, axis=-1)                             # [B,C]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - lse


def chunked_token_logprobs(hidden, w, targets, *, chunk=DEFAULT_CHUNK, temperature=1.0,
                           dtype=None, mesh=None, rules=None):
  """log p(target) per position, the head applied C = `chunk` positions at a time.

  hidden [B,T,D] (final normed hidden states); w [D,V] (head_weight); targets [B,T]
  int -> [B,T] float32, log softmax(hidden @ w / temperature)[targets]. Each scan
  step materialises [B,C,V] logits only, forward and backward (the chunk body is
  rematerialised); C need not divide T (the tail chunk is padded). `dtype`: matmul
  dtype (cfg.dtype; default hidden's dtype). Differentiable in hidden and w.
  """
  b, t, _ = hidden.shape
  chunk = max(1, min(int(chunk), t))
  dt = jnp.dtype(dtype) if dtype is not None else hidden.dtype
  inv_temp = 1.0 / float(temperature)

  @jax.checkpoint
  def body(h, tg):
    return _chunk_logprobs(h, w, tg, inv_temp, dt, mesh, rules)

  def step(_, xs):
    return None, body(*xs)

  hs = _chunks(hidden, chunk, 0)                                      # [n,B,C,D]
  ts = _chunks(targets.astype(jnp.int32), chunk, 0)                   # [n,B,C]
  _, out = jax.lax.scan(step, None, (hs, ts))                         # [n,B,C]
  return jnp.moveaxis(out, 0, 1).reshape(b, -1)[:, :t]                # [B,T]


def chunked_nll_sum(hidden, w, targets, weights, *, chunk=DEFAULT_CHUNK, dtype=None,
                    mesh=None, rules=None):
  """(sum of weights * NLL [], sum of weights []) in float32, the head in chunks.

  hidden [B,T,D]; w [D,V]; targets [B,T] int; weights [B,T] (loss mask, any dtype).
  For next-token SFT pass hidden[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]: the
  result equals sft.shifted_nll(forward(...), input_ids, loss_mask).
  """
  logp = chunked_token_logprobs(hidden, w, targets, chunk=chunk, dtype=dtype,
                                mesh=mesh, rules=rules)               # [B,T]
  weights = weights.astype(jnp.float32)
  return -jnp.sum(logp * weights), jnp.sum(weights)

