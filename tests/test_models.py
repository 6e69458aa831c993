"""Decoder parity with transformers (PyTorch) on tiny random models, HF I/O, KV cache.

Reference models are built locally (config -> random init -> save_pretrained), never
downloaded. Logits are compared on non-pad positions of a left-padded batch.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from safecrs_jax import models
from safecrs_jax.models import hf_io

TOL = 1e-4
VOCAB = 128


def _hf_config(kind, **kw):
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.15, bos_token_id=1, eos_token_id=2)
  base.update(kw)
  cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
         "qwen3": transformers.Qwen3Config}[kind]
  return cls(**base)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                  tie_word_embeddings=True)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3_qk_norm": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),
}


def _build(kind, kw, out_dir, **save_kw):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind, **kw)).eval()
  with torch.no_grad():  # non-trivial norms and biases, so they are really tested
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(out_dir, **save_kw)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: (_build(kind, kw, str(root / name)), str(root / name))
          for name, (kind, kw) in CASES.items()}


def _batch(b=3, t=12, seed=0):
  ids = np.random.default_rng(seed).integers(0, VOCAB, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[0, :5] = 0   # left padding
  mask[1, :1] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.float().numpy()


def _max_diff(a, b, mask):
  return float(np.abs(np.where(mask[..., None] > 0, np.asarray(a, np.float32) - b, 0)).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_transformers(hf_models, case):
  model, path = hf_models[case]
  cfg, params = models.load_hf(path)
  ids, mask = _batch()
  ref = _torch_logits(model, ids, mask)
  got = models.forward(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  assert got.shape == ref.shape and got.dtype == jnp.float32
  assert np.abs(ref).max() > 0.5  # logits are not trivially small
  assert _max_diff(got, ref, mask) <= TOL


def test_config_fields(hf_models):
  cfg = models.ModelConfig.from_hf(hf_models["qwen3_qk_norm"][1])
  assert (cfg.model_type, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == ("qwen3", 32, True,
                                                                             False)
  cfg = models.ModelConfig.from_hf(hf_models["qwen2_bias"][1])
  assert cfg.attention_bias and not cfg.attention_out_bias and cfg.tie_word_embeddings
  cfg = models.ModelConfig.from_hf(hf_models["llama3_rope"][1])
  assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
  hash(cfg)
  assert models.ModelConfig.from_hf(cfg.to_hf_dict()) == cfg
  assert models.ModelConfig.from_hf(cfg.to_hf_dict(), dtype="bfloat16").dtype == "bfloat16"


def test_llama3_rope_frequencies_match_transformers(hf_models):
  model, path = hf_models["llama3_rope"]
  cfg = models.ModelConfig.from_hf(path)
  from safecrs_jax.models.layers import rope_inv_freq
  ref = model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(rope_inv_freq(cfg), ref, rtol=1e-6)
  plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  assert not np.allclose(plain, ref)  # the scaling really changes something


@pytest.mark.parametrize("case", ["llama3_rope", "qwen3_qk_norm"])
def test_save_hf_round_trip_through_transformers(hf_models, tmp_path, case):
  model, path = hf_models[case]
  cfg, params = models.load_hf(path)
  models.save_hf(cfg, params, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = _batch(seed=1)
  ref = _torch_logits(model, ids, mask)
  assert _max_diff(_torch_logits(reloaded, ids, mask), ref, mask) <= 1e-6
  cfg2, params2 = models.load_hf(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_with_index(hf_models, tmp_path):
  model, _ = hf_models["llama_gqa_untied"]
  hf_dir = tmp_path / "hf_sharded"
  model.save_pretrained(str(hf_dir), max_shard_size="40KB")
  assert (hf_dir / hf_io.INDEX_FILE).exists()
  assert len(list(hf_dir.glob("*.safetensors"))) > 1
  cfg, params = models.load_hf(hf_dir)
  ids, mask = _batch()
  got = models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
  assert _max_diff(got, _torch_logits(model, ids, mask), mask) <= TOL
  # our writer shards too, and reads back identically
  ours = tmp_path / "ours"
  models.save_hf(cfg, params, ours, max_shard_bytes=50_000)
  assert (ours / hf_io.INDEX_FILE).exists()
  _, params2 = models.load_hf(ours)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _tiny_cfg(**kw):
  return models.ModelConfig.from_hf(models.PRESETS["tiny"], **kw)


def _small_cfg(**kw):
  return models.ModelConfig.from_hf(_hf_config("llama").to_dict(), **kw)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_cached_prefill_and_decode_equal_forward(scan_layers):
  cfg = dataclasses.replace(
      models.ModelConfig.from_hf(_hf_config("qwen3", head_dim=32).to_dict()),
      scan_layers=scan_layers)
  params = models.init_params(cfg, jax.random.key(0))
  b, p, steps = 3, 7, 4
  ids, mask = _batch(b, p + steps)
  mask[:, p:] = 1  # decode tokens are real
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  full = np.asarray(models.forward(cfg, params, ids, mask))
  cache = models.init_cache(cfg, b, 16)
  assert cache["k"].shape == (cfg.num_layers, b, 16, cfg.num_kv_heads, cfg.head_dim)
  logits, cache = models.forward_cached(cfg, params, ids[:, :p], mask[:, :p], cache)
  outs = [np.asarray(logits)]
  for t in range(p, p + steps):
    logits, cache = models.forward_cached(cfg, params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
    outs.append(np.asarray(logits))
  assert int(cache["index"]) == p + steps
  np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :p + steps], np.asarray(mask) > 0)
  assert _max_diff(np.concatenate(outs, 1), full, np.asarray(mask)) <= 1e-5


def test_decode_inside_while_loop():
  """Greedy decoding under lax.while_loop (static shapes) equals step-by-step forward."""
  cfg = _small_cfg()
  params = models.init_params(cfg, jax.random.key(1))
  ids, mask = _batch(2, 6)
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  steps = 3

  @jax.jit
  def generate(params, ids, mask):
    cache = models.init_cache(cfg, 2, 6 + steps)
    logits, cache = models.forward_cached(cfg, params, ids, mask, cache)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    out = jnp.zeros((2, steps), jnp.int32).at[:, 0].set(tok)

    def body(state):
      i, tok, cache, out = state
      logits, cache = models.forward_cached(cfg, params, tok[:, None],
                                            jnp.ones((2, 1), jnp.int32), cache)
      tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
      return i + 1, tok, cache, out.at[:, i].set(tok)
    return jax.lax.while_loop(lambda s: s[0] < steps, body, (1, tok, cache, out))[3]

  out = np.asarray(generate(params, ids, mask))
  seq, m = ids, mask
  for i in range(steps):
    nxt = jnp.argmax(models.forward(cfg, params, seq, m)[:, -1], -1).astype(jnp.int32)
    np.testing.assert_array_equal(out[:, i], np.asarray(nxt))
    seq = jnp.concatenate([seq, nxt[:, None]], 1)
    m = jnp.concatenate([m, jnp.ones((2, 1), jnp.int32)], 1)


def test_bfloat16_forward_is_close(hf_models):
  cfg, params = models.load_hf(hf_models["llama_gqa_untied"][1])
  ids, mask = _batch()
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  ref = np.asarray(models.forward(cfg, params, ids, mask))
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  got = models.forward(cfg16, params, ids, mask)
  assert got.dtype == jnp.bfloat16
  err = _max_diff(got, ref, np.asarray(mask))
  assert err < 0.05 * np.abs(ref).max(), err
  # bf16 parameters too
  cfg16p, params16 = models.load_hf(hf_models["llama_gqa_untied"][1], dtype="bfloat16",
                                    param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
  assert _max_diff(models.forward(cfg16p, params16, ids, mask), ref,
                   np.asarray(mask)) < 0.05 * np.abs(ref).max()


def test_remat_gradients_equal():
  cfg = _small_cfg()
  params = models.init_params(cfg, jax.random.key(2))
  ids, mask = _batch(2, 8)
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

  def loss(params, cfg):
    logp = jax.nn.log_softmax(models.forward(cfg, params, ids, mask).astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[..., None], -1))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g0 = grad(params, cfg)
  g1 = grad(params, dataclasses.replace(cfg, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_fused_projection_gradients_equal_unfused_one_matmul_per_kernel():
  """layers.fused_dot: the fused forward, each kernel's gradient from its own matmul (so
  FSDP can reduce-scatter it, plan/report.py); values equal the unfused projections'."""
  from safecrs_jax.models import layers
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (12, 16))
  ks = [jax.random.normal(k, (16, n)) for k, n in zip(keys[1:], (16, 8, 8))]

  def loss(x, ks, fused):
    ys = layers.fused_dot(x, *ks) if fused else [x @ k for k in ks]
    return sum(jnp.sum(jnp.tanh(y) * (i + 1)) for i, y in enumerate(ys))
  for argnums in ((0, 1), 0, 1):          # input and kernels, input only, kernels only
    got = jax.grad(loss, argnums)(x, ks, True)
    want = jax.grad(loss, argnums)(x, ks, False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 got, want)
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  jaxpr = str(jax.make_jaxpr(jax.grad(jax.checkpoint(
      lambda ks: loss(x, ks, True), policy=policy)))(ks))
  assert jaxpr.count("dot_general") == 1 + len(ks)   # forward (saved, not recomputed) + one per kernel


def test_param_logical_axes_cover_every_param():
  cfg = models.ModelConfig.from_hf(_hf_config("qwen2").to_dict())
  axes = models.param_logical_axes(cfg)
  shapes = models.abstract_params(cfg)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == \
      jax.tree.structure(shapes)
  for names, sds in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                        jax.tree.leaves(shapes)):
    assert len(names) == len(sds.shape) and all(isinstance(n, str) for n in names)
  assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
  assert axes["layers"]["self_attn"]["k_proj"]["bias"] == ("layers", "kv_heads")
  assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")


# -- bad input --------------------------------------------------------------------

@pytest.fixture
def good_dir(hf_models, tmp_path):
  src = hf_models["llama_gqa_untied"][1]
  d = tmp_path / "ckpt"
  d.mkdir()
  for f in ("config.json", "model.safetensors"):
    (d / f).write_bytes(open(os.path.join(src, f), "rb").read())
  return d


def test_missing_files(good_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_hf(tmp_path / "nowhere")
  os.remove(good_dir / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"safetensors.*ckpt"):
    models.load_hf(good_dir)


def test_missing_file_listed_in_index(good_dir):
  idx = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
  (good_dir / hf_io.INDEX_FILE).write_text(json.dumps(idx))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    models.load_hf(good_dir)


def _edit(d, fn):
  tensors = load_file(str(d / "model.safetensors"))
  fn(tensors)
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_tensor_and_file(good_dir):
  name = "model.layers.1.self_attn.k_proj.weight"
  _edit(good_dir, lambda t: t.__setitem__(name, np.zeros((8, 64), np.float32)))
  with pytest.raises(hf_io.CheckpointError, match=rf"{name}.*model.safetensors.*\[8, 64\]"):
    models.load_hf(good_dir)


def test_missing_tensor_names_tensor(good_dir):
  name = "model.layers.0.mlp.up_proj.weight"
  _edit(good_dir, lambda t: t.pop(name))
  with pytest.raises(hf_io.CheckpointError, match=rf"{name}.*missing.*ckpt"):
    models.load_hf(good_dir)


def test_extra_tensor_names_tensor_and_file(good_dir):
  name = "model.layers.0.self_attn.q_proj.bias"
  _edit(good_dir, lambda t: t.__setitem__(name, np.zeros((64,), np.float32)))
  with pytest.raises(hf_io.CheckpointError,
                     match=rf"unexpected tensor '{name}'.*model.safetensors"):
    models.load_hf(good_dir)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt2", "model_type='gpt2'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
])
def test_unsupported_config_raises(field, value, match):
  d = dict(models.PRESETS["tiny"], **{field: value})
  with pytest.raises(models.ConfigError, match=match):
    models.ModelConfig.from_hf(d)


def test_unknown_override_raises():
  with pytest.raises(models.ConfigError, match="no_such_field"):
    models.ModelConfig.from_hf(models.PRESETS["tiny"], no_such_field=1)


# -- full-size shapes, no compute -----------------------------------------------------

@pytest.mark.parametrize("name,published", [
    ("qwen2.5-0.5b", 0.494e9), ("llama-3.2-3b", 3.21e9), ("llama-3.1-8b", 8.03e9)])
def test_full_size_parameter_counts(name, published):
  cfg = models.ModelConfig.from_hf(models.PRESETS[name])
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert abs(n - published) / published < 1e-3, n
  assert shapes["layers"]["mlp"]["up_proj"]["kernel"].shape == (
      cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
  assert ("lm_head" in shapes) == (not cfg.tie_word_embeddings)


def test_tiny_preset_is_small():
  cfg = _tiny_cfg()
  assert cfg.vocab_size == 2048 and 1e6 < models.count_params(cfg) < 2e7
