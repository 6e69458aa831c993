"""Meshes over 8 fake CPU devices: sharded params / forward equal unsharded ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo
from safecrs_jax import config as config_lib
from safecrs_jax import models
from safecrs_jax.infra import sharding

# Every sharded dim divides by 4: D=64, heads*H=64, kv_heads*H=32, F=96, V=128.
HF = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


def _mesh(shape):
  return sharding.make_mesh(tuple(zip(sharding.MESH_AXES, shape)))


@pytest.fixture(scope="module")
def setup():
  cfg = models.ModelConfig.from_hf(HF)
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (8, 10)).astype(np.int32)
  mask = np.ones((8, 10), np.int32)
  mask[::2, :3] = 0
  ref = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
  return cfg, params, ids, mask, ref


def test_make_mesh_fills_minus_one():
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh = sharding.make_mesh((("data", 2), ("fsdp", -1), ("tensor", 2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  one = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  assert one.devices.size == 1
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh((("data", -1), ("fsdp", -1), ("tensor", 1)))
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((("data", 2), ("fsdp", 3), ("tensor", 1)))


def test_multi_slice_mesh_puts_data_across_slices():
  """Fake slices on CPU (no slice_index: 4 devices each, in order): the mesh shape is
  one slice's, `data` spans the slices slice-major, fsdp / tensor stay within a slice."""
  devs = jax.devices()
  slice_of = {d: i // 4 for i, d in enumerate(devs)}
  mesh = sharding.make_mesh((("data", 1), ("fsdp", -1), ("tensor", 1)), num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for i in range(2):
    assert {slice_of[d] for d in mesh.devices[i].ravel()} == {i}
  # two data-parallel groups per slice: data index = slice * 2 + index in the slice
  mesh = sharding.make_mesh((("data", 2), ("fsdp", -1), ("tensor", 2)), num_slices=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert [{slice_of[d] for d in mesh.devices[i].ravel()} for i in range(4)] == \
      [{0}, {0}, {1}, {1}]
  # the config field: mesh_from_config builds such a mesh (the demo's shape is one slice's)
  config = config_lib.override(config_lib.resolve(demo.get_config()), "mesh.num_slices", 2)
  assert dict(config.mesh.shape) == {"data": 1, "fsdp": -1, "tensor": 1}
  got, _ = sharding.mesh_from_config(config, devices=devs)
  assert dict(got.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert [{slice_of[d] for d in got.devices[i].ravel()} for i in range(2)] == [{0}, {1}]
  with pytest.raises(ValueError, match="do not split into 3 slices"):
    sharding.make_mesh(num_slices=3)
  with pytest.raises(ValueError, match="needs a 'data' mesh axis"):
    sharding.make_mesh((("fsdp", -1), ("tensor", 1)), num_slices=2)
  with pytest.raises(ValueError, match="needs 8 devices, have 4"):
    sharding.make_mesh((("data", 1), ("fsdp", 8), ("tensor", 1)), num_slices=2)


def test_logical_to_spec_rules_and_divisibility():
  mesh = _mesh((1, 2, 4))
  assert sharding.logical_to_spec(("layers", "embed", "heads"), None, (2, 64, 64), mesh) == \
      P(None, "fsdp", "tensor")
  # 14 heads * 64 does divide by 4, but 2 kv heads * 3 does not: replicate that dim
  assert sharding.logical_to_spec(("embed", "kv_heads"), None, (64, 6), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("act_batch", "act_length"), None, (8, 10), mesh) == \
      P("fsdp", None)  # size-1 data axis left out
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_init_and_forward_equal_unsharded(setup, shape):
  cfg, params, ids, mask, ref = setup
  mesh = _mesh(shape)
  data, fsdp, tensor = shape
  sharded = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  # same values as the unsharded init, really split across devices
  jax.tree.map(np.testing.assert_array_equal, sharded, params)
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]               # [L, D, N*H]
  assert q.sharding.spec == P(None, "fsdp" if fsdp > 1 else None,
                              "tensor" if tensor > 1 else None)
  assert q.addressable_shards[0].data.shape == (2, 64 // fsdp, 64 // tensor)
  emb = sharded["embed_tokens"]["embedding"]                           # [V, D]
  assert emb.addressable_shards[0].data.shape == (128 // tensor, 64 // fsdp)
  batch = sharding.batch_sharding(mesh)
  g_ids, g_mask = jax.device_put(ids, batch), jax.device_put(mask, batch)
  got = models.forward(cfg, sharded, g_ids, g_mask)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)
  # with activation constraints as well
  got = models.forward(cfg, sharded, g_ids, g_mask, mesh=mesh, rules=sharding.DEFAULT_RULES)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)


def test_load_hf_into_mesh_and_save_back(setup, tmp_path):
  cfg, params, ids, mask, ref = setup
  models.save_hf(cfg, params, tmp_path / "ckpt")
  mesh = _mesh((1, 2, 4))
  cfg2, loaded = models.load_hf(tmp_path / "ckpt", mesh=mesh)
  want = models.param_shardings(cfg2, mesh)
  for arr, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
    assert arr.sharding == s
  assert loaded["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert loaded["layers"]["mlp"]["down_proj"]["kernel"].addressable_shards[0].data.shape == \
      (2, 96 // 4, 64 // 2)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # sharded params gather back to an identical checkpoint
  models.save_hf(cfg2, loaded, tmp_path / "again")
  _, again = models.load_hf(tmp_path / "again")
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_sharded_kv_cache_decode(setup):
  cfg, params, ids, mask, ref = setup
  mesh = _mesh((2, 2, 2))
  sharded = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  cache = models.init_cache(cfg, 8, 12, mesh=mesh)
  assert cache["k"].sharding.spec == P(None, ("data", "fsdp"), None, "tensor", None)
  batch = sharding.batch_sharding(mesh)
  logits, cache = models.forward_cached(cfg, sharded, jax.device_put(ids[:, :9], batch),
                                        jax.device_put(mask[:, :9], batch), cache)
  last, cache = models.forward_cached(cfg, sharded, jax.device_put(ids[:, 9:], batch),
                                      jax.device_put(mask[:, 9:], batch), cache)
  valid = mask[:, :9, None] > 0  # pad positions hold arbitrary (finite) values
  np.testing.assert_allclose(np.where(valid, np.asarray(logits), 0),
                             np.where(valid, ref[:, :9], 0), atol=2e-5)
  np.testing.assert_allclose(np.asarray(last), ref[:, 9:], atol=2e-5)


def test_single_process_helpers(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
              "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE",
              "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(key, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")   # one task: still single-process
  assert sharding.maybe_initialize_distributed() is False
  assert sharding.is_main_process()
  mesh = _mesh((2, 2, 2))
  bs = sharding.batch_sharding(mesh)
  assert sharding.local_rows(bs, (8, 2), 0) == (0, 8)
  arr = sharding.to_global(np.arange(16).reshape(8, 2), bs)
  assert arr.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(arr), np.arange(16).reshape(8, 2))
  np.testing.assert_array_equal(sharding.to_host(arr), np.arange(16).reshape(8, 2))
