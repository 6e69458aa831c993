"""LoRA adapters inside the forward pass: y = x W + s (dropout(x) A) B."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safecrs_jax import models
from safecrs_jax.models import adapters, lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE = 2.0


def _cfg(**kw):
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=16, initializer_range=0.1)
  base.update(kw)
  return models.ModelConfig(**base)


def _setup(cfg, rank=4):
  params = models.init_params(cfg, jax.random.key(0))
  ad = lora.init(params, rank, TARGETS, jax.random.key(1))
  # B = 0 at init would hide every adapter bug: give B random values.
  ad = jax.tree_util.tree_map_with_path(
      lambda p, x: (jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.1
                    if p[-1].key == "lora_b" else x), ad)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 128, (2, 10)), jnp.int32)
  mask = jnp.ones((2, 10), jnp.int32).at[0, :3].set(0)
  return params, ad, ids, mask


@pytest.mark.parametrize("fuse,scan", [(True, True), (False, False)])
def test_no_dropout_equals_merged_weights(fuse, scan):
  cfg = _cfg(fuse_projections=fuse, scan_layers=scan)
  params, ad, ids, mask = _setup(cfg)
  merged = models.forward(cfg, lora.merge(params, ad, SCALE), ids, mask)
  plain = models.forward(cfg, params, ids, mask)
  assert float(jnp.abs(merged - plain).max()) > 1e-2          # the adapters matter
  got = models.forward(cfg, params, ids, mask, lora=ad, lora_scale=SCALE)
  np.testing.assert_allclose(got, merged, atol=2e-5)
  # rate 0 with a key, and rate > 0 without a key: no dropout either
  for kw in (dict(lora_dropout=0.0, dropout_rng=jax.random.key(5)), dict(lora_dropout=0.3)):
    np.testing.assert_allclose(
        models.forward(cfg, params, ids, mask, lora=ad, lora_scale=SCALE, **kw), got,
        atol=1e-6)
  hidden = models.forward_hidden(cfg, params, ids, mask, lora=ad, lora_scale=SCALE)
  np.testing.assert_allclose(hidden @ models.head_weight(cfg, params), merged, atol=2e-5)


def test_adapter_grads_equal_those_through_merge():
  cfg = _cfg()
  params, ad, ids, mask = _setup(cfg)

  def loss(logits):
    return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])
  g_in = jax.grad(lambda a: loss(models.forward(cfg, params, ids, mask, lora=a,
                                                lora_scale=SCALE)))(ad)
  g_merge = jax.grad(lambda a: loss(models.forward(cfg, lora.merge(params, a, SCALE),
                                                   ids, mask)))(ad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               g_in, g_merge)
  # A standard LoRA start (B = 0): A gets no gradient, B does.
  zero_b = lora.init(params, 4, TARGETS, jax.random.key(1))
  g0 = jax.grad(lambda a: loss(models.forward(cfg, params, ids, mask, lora=a,
                                              lora_scale=SCALE)))(zero_b)
  q = g0["layers"]["self_attn"]["q_proj"]
  assert float(jnp.abs(q["lora_a"]).max()) == 0.0 and float(jnp.abs(q["lora_b"]).max()) > 0


def test_dropout_is_deterministic_per_key_and_changes_outputs():
  cfg = _cfg()
  params, ad, ids, mask = _setup(cfg)

  def fwd(key):
    return models.forward(cfg, params, ids, mask, lora=ad, lora_scale=SCALE, lora_dropout=0.3,
                          dropout_rng=key)

  ref = models.forward(cfg, params, ids, mask, lora=ad, lora_scale=SCALE)
  a, a2, b = fwd(jax.random.key(7)), fwd(jax.random.key(7)), fwd(jax.random.key(8))
  np.testing.assert_array_equal(a, a2)
  assert float(jnp.abs(a - ref).max()) > 1e-3
  assert float(jnp.abs(a - b).max()) > 1e-3
  # The base path has no dropout: with zero adapters, dropout changes nothing.
  zero = jax.tree.map(jnp.zeros_like, ad)
  np.testing.assert_allclose(
      models.forward(cfg, params, ids, mask, lora=zero, lora_dropout=0.3,
                     dropout_rng=jax.random.key(7)),
      models.forward(cfg, params, ids, mask), atol=1e-6)
  # Gradients reach the adapters through the dropped-out branch.
  g = jax.grad(lambda a: jnp.sum(models.forward(
      cfg, params, ids, mask, lora=a, lora_scale=SCALE, lora_dropout=0.3,
      dropout_rng=jax.random.key(7)) ** 2))(ad)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))


def test_adapter_delta_by_hand():
  """One projection: s * ((x * keep / (1 - p)) @ A) @ B with the key's own keep mask."""
  x = jax.random.normal(jax.random.key(0), (6, 5))
  a = jax.random.normal(jax.random.key(1), (5, 3))
  b = jax.random.normal(jax.random.key(2), (3, 4))
  key, p = jax.random.key(3), 0.25
  run = adapters.AdapterRun(scale=1.5, dropout=p)
  got = adapters.adapter_delta(x, adapters.Adapter(a, b, run, key), jnp.float32)
  keep = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))
  want = 1.5 * ((np.asarray(x) * keep / (1 - p)) @ np.asarray(a)) @ np.asarray(b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert 0 < (~keep).sum() < keep.size
  # Its mean over keys is the undropped delta (dropout is unbiased; loose check).
  keys = jax.random.split(jax.random.key(4), 4000)
  mean = jax.vmap(lambda k: adapters.adapter_delta(
      x, adapters.Adapter(a, b, run, k), jnp.float32))(keys).mean(0)
  exact = 1.5 * (x @ a) @ b
  assert float(jnp.abs(mean - exact).max()) < 0.05 * float(jnp.abs(exact).max())
  with pytest.raises(ValueError, match="dropout"):
    adapters.AdapterRun(dropout=1.0)


def test_model_mean_over_keys_approaches_no_dropout():
  cfg = _cfg()
  params, ad, ids, mask = _setup(cfg)
  ref = models.forward(cfg, params, ids, mask, lora=ad, lora_scale=SCALE)
  keys = jax.random.split(jax.random.key(11), 256)
  outs = jax.lax.map(lambda k: models.forward(cfg, params, ids, mask, lora=ad,
                                              lora_scale=SCALE, lora_dropout=0.1,
                                              dropout_rng=k), keys)
  sample_err = float(jnp.abs(outs - ref).mean())
  mean_err = float(jnp.abs(outs.mean(0) - ref).mean())
  assert mean_err < 0.25 * sample_err, (mean_err, sample_err)


def test_lm_head_adapter_is_refused_by_forward_hidden():
  cfg = _cfg()
  params, _, ids, mask = _setup(cfg)
  ad = lora.init(params, 2, ("lm_head",), jax.random.key(1))
  with pytest.raises(ValueError, match="lm_head"):
    models.forward_hidden(cfg, params, ids, mask, lora=ad)


def test_config_defaults_follow_the_reference():
  c = common.build(stage="sft")
  assert (c.sft.lora.rank, c.sft.lora.alpha, c.sft.lora.dropout) == (0, 32.0, 0.05)
  c.sft.lora.rank = 16
  assert lora.check_config(c.sft.lora)
