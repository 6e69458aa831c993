"""Chunked output head: equal to the full-logits path (values and gradients), far less memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safecrs_jax import models
from safecrs_jax.models import head


def _cfg(**kw):
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, initializer_range=0.1)
  base.update(kw)
  return models.ModelConfig(**base)


def _batch(b=3, t=10, vocab=256, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, t))
  mask = np.ones((b, t), np.int32)
  mask[0, :4] = 0   # left padding
  mask[1, :1] = 0
  loss = mask.copy()
  loss[:, : t // 2] = 0  # targets: the second half only
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(loss)


def _full_logprobs(hidden, w, targets, temperature=1.0):
  """The unchunked reference: [B,T,V] float32 log-softmax, picked."""
  logits = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _shifted_nll(logits, input_ids, loss_mask):
  """sft.shifted_nll's formula: masked next-token NLL over full logits."""
  logits = logits[:, :-1].astype(jnp.float32)
  weights = loss_mask[:, 1:].astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum((lse - picked) * weights), jnp.sum(weights)


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 64])   # 3, 7 do not divide T=10
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_values_and_grads_equal_full(chunk, temperature):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k1, (3, 10, 16))
  w = jax.random.normal(k2, (16, 50)) * 0.5
  targets = jax.random.randint(k3, (3, 10), 0, 50)
  cot = jax.random.normal(k4, (3, 10))   # arbitrary cotangent: every position's grad counts

  def f_chunked(h, w):
    return jnp.sum(cot * head.chunked_token_logprobs(h, w, targets, chunk=chunk,
                                                     temperature=temperature))

  def f_full(h, w):
    return jnp.sum(cot * _full_logprobs(h, w, targets, temperature))

  got = head.chunked_token_logprobs(hidden, w, targets, chunk=chunk, temperature=temperature)
  assert got.shape == (3, 10) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _full_logprobs(hidden, w, targets, temperature),
                             atol=1e-5, rtol=1e-5)
  gh, gw = jax.grad(f_chunked, argnums=(0, 1))(hidden, w)
  rh, rw = jax.grad(f_full, argnums=(0, 1))(hidden, w)
  np.testing.assert_allclose(gh, rh, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gw, rw, atol=1e-5, rtol=1e-5)


def test_logprobs_of_a_one_hot_head_are_hand_computable():
  """hidden = e_i, w = c * I: logits are c at i, 0 elsewhere; log p(i) = c - log(e^c + V-1)."""
  c, v = 2.0, 4
  hidden = jnp.eye(v)[None]                              # [1,4,4]
  w = c * jnp.eye(v)
  targets = jnp.asarray([[0, 1, 2, 0]])
  got = head.chunked_token_logprobs(hidden, w, targets, chunk=3)
  hit, miss = c - np.log(np.exp(c) + v - 1), -np.log(np.exp(c) + v - 1)
  np.testing.assert_allclose(got, [[hit, hit, hit, miss]], atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [4, 6])   # T-1 = 9 positions: neither divides
def test_chunked_nll_on_the_model_equals_shifted_nll_of_forward(tied, chunk):
  cfg = _cfg(tie_word_embeddings=tied)
  params = models.init_params(cfg, jax.random.key(1))
  ids, mask, loss_mask = _batch()
  np.testing.assert_allclose(
      models.forward_hidden(cfg, params, ids, mask) @ head.head_weight(cfg, params),
      models.forward(cfg, params, ids, mask), atol=1e-5)

  def full(params):
    return _shifted_nll(models.forward(cfg, params, ids, mask), ids, loss_mask)

  def chunked(params):
    hidden = models.forward_hidden(cfg, params, ids, mask)
    return models.chunked_nll_sum(hidden[:, :-1], models.head_weight(cfg, params),
                                  ids[:, 1:], loss_mask[:, 1:], chunk=chunk)

  (ref, ref_n), (got, got_n) = full(params), chunked(params)
  assert float(got_n) == float(ref_n) == float(loss_mask[:, 1:].sum())
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  g_ref = jax.grad(lambda p: full(p)[0])(params)
  g_got = jax.grad(lambda p: chunked(p)[0])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               g_got, g_ref)


def test_prefill_last_only_equals_last_column():
  cfg = _cfg()
  params = models.init_params(cfg, jax.random.key(2))
  ids, mask, _ = _batch()
  full, cache_full = models.forward_cached(cfg, params, ids, mask, models.init_cache(cfg, 3, 12))
  last, cache_last = models.forward_cached(cfg, params, ids, mask,
                                           models.init_cache(cfg, 3, 12), last_only=True)
  assert last.shape == (3, 1, cfg.vocab_size)
  np.testing.assert_allclose(last, full[:, -1:], atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, cache_last, cache_full)


def test_chunked_program_needs_far_less_temporary_memory():
  """Loss + gradients of 4 x 1024 tokens, vocab 32768: chunking keeps [4,C,V], not [4,T,V]."""
  b, t, d, v = 4, 1024, 64, 32768
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  tg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(logprobs_fn):
    def loss(h, w, tg):
      return -jnp.sum(logprobs_fn(h, w, tg))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, tg).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = temp_bytes(_full_logprobs)
  chunked = temp_bytes(lambda h, w, tg: head.chunked_token_logprobs(h, w, tg, chunk=64))
  logits_bytes = b * t * v * 4
  print(f"temp bytes: full {full / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB")
  assert full >= logits_bytes   # the reference really holds [B,T,V] float32
  assert chunked < full / 4
  assert chunked < logits_bytes / 4


def test_forward_hidden_dtype_follows_cfg():
  cfg = dataclasses.replace(_cfg(), dtype="bfloat16")
  params = models.init_params(cfg, jax.random.key(3))
  ids, mask, _ = _batch()
  hidden = models.forward_hidden(cfg, params, ids, mask)
  assert hidden.shape == (3, 10, cfg.hidden_size) and hidden.dtype == jnp.bfloat16
  logp = head.chunked_token_logprobs(hidden, head.head_weight(cfg, params), ids, chunk=4)
  ref = _full_logprobs(hidden, head.head_weight(cfg, params), ids)
  assert logp.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref, atol=1e-5)
