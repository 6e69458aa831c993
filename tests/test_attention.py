"""Attention backends agree with today's einsum path on padded batches and cached decode.

On CPU: the roll + sequence-length arithmetic of the cuDNN path runs through
jax.nn.dot_product_attention(implementation="xla"), and splash runs in Pallas
interpret mode; cudnn / splash selected for CPU devices raise a ConfigError.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safecrs_jax import models
from safecrs_jax.infra import sharding
from safecrs_jax.models import attention, layers

B, K, G, T, H = 2, 2, 2, 128, 8


def _qkv_mask(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, K, G, T, H)) * 0.3
  k = jax.random.normal(ks[1], (B, K, T, H))
  v = jax.random.normal(ks[2], (B, K, T, H))
  valid = np.ones((B, T), bool)
  valid[0, :50] = False                     # left padding
  valid[1, :2] = False                      # left padding ...
  valid[1, 100:] = False                    # ... and right padding (after EOS)
  valid = jnp.asarray(valid)
  causal = jnp.tril(jnp.ones((T, T), bool))
  mask = (causal[None] & valid[:, None, :])[:, None, None]        # [B,1,1,T,S]
  return q, k, v, valid, mask


def _check_values_and_grads(fn):
  """fn(q, k, v, valid) vs layers.attend on the valid query rows, values and grads."""
  q, k, v, valid, mask = _qkv_mask()
  sel = np.asarray(valid)[:, None, None, :, None]
  cot = jax.random.normal(jax.random.key(9), q.shape) * sel

  def loss(f):
    return lambda q, k, v: jnp.sum(cot * f(q, k, v))
  def ref_fn(q, k, v):
    return layers.attend(q, k, v, mask, jnp.float32)

  def got_fn(q, k, v):
    return fn(q, k, v, valid)

  np.testing.assert_allclose(np.where(sel, got_fn(q, k, v), 0),
                             np.where(sel, ref_fn(q, k, v), 0), atol=1e-5)
  g_got = jax.grad(loss(got_fn), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_sdpa_roll_with_sequence_lengths_equals_einsum():
  _check_values_and_grads(
      lambda q, k, v, valid: attention.sdpa_attention(q, k, v, valid, implementation="xla"))


def test_splash_kernel_in_interpret_mode_equals_einsum():
  _check_values_and_grads(
      lambda q, k, v, valid: attention.splash_attention(q, k, v, valid, interpret=True))


def test_splash_inside_shard_map_equals_unsharded():
  q, k, v, valid, _ = _qkv_mask(seed=1)
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 2), ("tensor", 2)), jax.devices()[:4])
  ref = attention.splash_attention(q, k, v, valid, interpret=True)
  got = jax.jit(lambda *a: attention.splash_attention(*a, mesh=mesh, interpret=True))(
      q, k, v, valid)
  np.testing.assert_allclose(got, ref, atol=1e-6)


def _cfg(**kw):
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, initializer_range=0.1)
  base.update(kw)
  return models.ModelConfig(**base)


def test_resolution_on_cpu():
  assert attention.platform_of() == "cpu"
  assert attention.resolve(_cfg()) == "xla"
  assert attention.resolve(_cfg(attention="auto", dtype="bfloat16")) == "xla"
  with pytest.raises(models.ConfigError, match="needs a GPU"):
    attention.resolve(_cfg(attention="cudnn", dtype="bfloat16"))
  with pytest.raises(models.ConfigError, match="TPU only"):
    attention.resolve(_cfg(attention="splash"))
  with pytest.raises(models.ConfigError, match="attention='flash'"):
    _cfg(attention="flash")


def test_resolution_on_other_platforms(monkeypatch):
  monkeypatch.setattr(attention, "platform_of", lambda mesh=None: "tpu")
  assert attention.resolve(_cfg()) == "splash"
  monkeypatch.setattr(attention, "platform_of", lambda mesh=None: "gpu")
  assert attention.resolve(_cfg(dtype="bfloat16")) == "cudnn"
  assert attention.resolve(_cfg()) == "xla"          # cuDNN flash needs bf16 / fp16
  with pytest.raises(models.ConfigError, match="dtype bfloat16"):
    attention.resolve(_cfg(attention="cudnn"))


def test_selecting_cudnn_or_splash_on_cpu_fails_clearly():
  cfg = _cfg(attention="splash")
  params = models.init_params(cfg, jax.random.key(0))
  ids = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(models.ConfigError, match="TPU only"):
    models.forward(cfg, params, ids, jnp.ones_like(ids))


def _model_batch(t=128):
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 128, (2, t)), jnp.int32)
  mask = np.ones((2, t), np.int32)
  mask[0, :40] = 0
  mask[1, :3] = 0
  return ids, jnp.asarray(mask)


def test_model_with_splash_equals_xla_and_decode_continues_it(monkeypatch):
  """Whole decoder, splash (interpret) vs xla: forward values, grads and cached decode."""
  monkeypatch.setattr(attention, "platform_of", lambda mesh=None: "tpu")
  monkeypatch.setattr(layers, "SPLASH_INTERPRET", True)
  cfg_x, cfg_s = _cfg(attention="xla"), _cfg(attention="splash")
  params = models.init_params(cfg_x, jax.random.key(3))
  ids, mask = _model_batch()
  sel = np.asarray(mask)[..., None] > 0
  ref = models.forward(cfg_x, params, ids, mask)
  got = models.forward(cfg_s, params, ids, mask)
  np.testing.assert_allclose(np.where(sel, got, 0), np.where(sel, ref, 0), atol=1e-5)

  def loss(cfg):
    return lambda p: jnp.sum(jnp.where(sel, models.forward(cfg, p, ids, mask), 0) ** 2)
  # Gradients of summed squared logits reach ~300; float32 sums in a different order
  # differ by ~1e-6 of that, so the absolute tolerance scales with each leaf's largest.
  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  jax.tree.map(close, jax.grad(loss(cfg_s))(params), jax.grad(loss(cfg_x))(params))

  # Cached prefill of 127 tokens + one decode step (xla inside) = the splash forward.
  cache = models.init_cache(cfg_s, 2, 128)
  _, cache = models.forward_cached(cfg_s, params, ids[:, :-1], mask[:, :-1], cache)
  last, _ = models.forward_cached(cfg_s, params, ids[:, -1:], mask[:, -1:], cache)
  np.testing.assert_allclose(last[:, 0], got[:, -1], atol=1e-5)


def test_auto_on_cpu_is_todays_path():
  cfg = _cfg()
  params = models.init_params(cfg, jax.random.key(4))
  ids, mask = _model_batch(16)
  np.testing.assert_array_equal(
      models.forward(cfg, params, ids, mask),
      models.forward(dataclasses.replace(cfg, attention="xla"), params, ids, mask))


def test_attend_with_transposed_keys_equals_the_plain_layout():
  """Decode's key layout [B,K,H,S], by matmul and by multiply-adds, = [B,K,S,H] keys."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, 2, 2, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 2, 24, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 2, 24, 16)), jnp.float32)
  valid = np.ones((3, 24), bool)
  valid[0, :5] = False
  valid[2, 20:] = False
  mask = jnp.asarray(valid)[:, None, None, None, :]
  ref = layers.attend(q, k, v, mask, jnp.float32)
  kt = k.transpose(0, 1, 3, 2)
  for by_sum in (False, True):
    got = layers.attend(q, kt, v, mask, jnp.float32, keys_transposed=True,
                         scores_by_sum=by_sum)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  # masked keys are ignored: changing them changes nothing
  k2 = k.at[0, :, :5].set(100.0)
  got = layers.attend(q, k2.transpose(0, 1, 3, 2), v, mask, jnp.float32,
                       keys_transposed=True, scores_by_sum=True)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
