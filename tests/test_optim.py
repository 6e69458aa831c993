"""optim.py: schedules (HF Trainer semantics), decay mask, clipping; lora.py basics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safecrs_jax import config as config_lib
from safecrs_jax.models import lora
from safecrs_jax.train import optim


def _cfg(**kw):
  return config_lib.Optim(**kw)              # the schema's (Safe-SFT) optimiser + kw


def test_cosine_with_warmup_matches_hf_formula():
  total, lr = 100, 5e-5
  sched = optim.make_schedule(_cfg(lr=lr, warmup_ratio=0.05), total)
  warm = 5                                                     # ceil(0.05 * 100)
  assert optim.warmup_steps(_cfg(warmup_ratio=0.05), 30) == 2  # ceil(1.5)
  for s in range(total + 1):
    if s < warm:
      want = lr * s / warm
    else:
      want = lr * 0.5 * (1 + np.cos(np.pi * (s - warm) / (total - warm)))
    np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-12)
  assert float(sched(0)) == 0.0 and float(sched(total)) == pytest.approx(0.0, abs=1e-12)


def test_constant_and_errors():
  g = common.build(stage="gdpo").optim
  sched = optim.make_schedule(g, 50)
  assert all(float(sched(s)) == pytest.approx(1e-6) for s in (0, 10, 49))
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_cfg(schedule="poly"), 10)
  with pytest.raises(ValueError, match="warmup_ratio"):
    optim.make_schedule(_cfg(warmup_ratio=1.5), 10)


def test_adamw_clip_and_decay_mask():
  params = {"w": jnp.ones((3, 4)), "norm": jnp.ones((4,))}
  tx, _ = optim.make_optimizer(_cfg(lr=0.1, warmup_ratio=0.0, schedule="constant",
                                    weight_decay=0.5, grad_clip=1.0), 10)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((3, 4)), rtol=1e-6)  # decayed
  np.testing.assert_allclose(upd["norm"], 0.0)                                    # not decayed
  # clipping: a huge gradient gives the same Adam step direction as a clipped one
  big = {"w": jnp.full((3, 4), 1e6), "norm": jnp.zeros((4,))}
  tx2, _ = optim.make_optimizer(_cfg(lr=0.1, warmup_ratio=0.0, schedule="constant",
                                     grad_clip=1.0), 10)
  upd2, _ = tx2.update(big, tx2.init(params), params)
  assert np.isfinite(np.asarray(upd2["w"])).all()


def test_lora_merge_and_axes():
  params = {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((2, 8, 6))},
                                "o_proj": {"kernel": jnp.ones((2, 6, 8))}},
                       "norm": {"scale": jnp.ones((2, 8))}},
            "embed": {"embedding": jnp.ones((10, 8))}}
  axes = {"layers": {"attn": {"q_proj": {"kernel": ("layers", "embed", "heads")},
                              "o_proj": {"kernel": ("layers", "heads", "embed")}},
                     "norm": {"scale": ("layers", "norm")}},
          "embed": {"embedding": ("vocab", "embed")}}
  ad = lora.init(params, 4, ("q_proj",), jax.random.key(0))
  assert jax.tree.map(jnp.shape, ad) == {"layers": {"attn": {"q_proj": {
      "lora_a": (2, 8, 4), "lora_b": (2, 4, 6)}}}}
  assert lora.logical_axes(axes, ad)["layers"]["attn"]["q_proj"] == {
      "lora_a": ("layers", "embed", None), "lora_b": ("layers", None, "heads")}
  merged0 = lora.merge(params, ad, 2.0)                      # B = 0: unchanged
  jax.tree.map(np.testing.assert_array_equal, merged0, params)
  ad["layers"]["attn"]["q_proj"]["lora_b"] = jnp.ones((2, 4, 6))
  merged = lora.merge(params, ad, 2.0)
  a = np.asarray(ad["layers"]["attn"]["q_proj"]["lora_a"])
  want = 1.0 + 2.0 * np.einsum("lir,lro->lio", a, np.ones((2, 4, 6)))
  np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"]["kernel"], want, rtol=1e-6)
  np.testing.assert_array_equal(merged["layers"]["attn"]["o_proj"]["kernel"], 1.0)
  with pytest.raises(ValueError, match="match no kernel"):
    lora.init(params, 4, ("nope",), jax.random.key(0))
  assert lora.check_config(config_lib.Lora(   # adapter dropout is supported
      rank=4, alpha=8.0, dropout=0.1, targets=("q_proj",)))
  with pytest.raises(ValueError, match="dropout"):
    lora.check_config(config_lib.Lora(rank=4, alpha=8.0, dropout=1.0, targets=("q_proj",)))
  assert not lora.check_config(common.build(stage="sft").sft.lora)
