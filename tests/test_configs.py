"""configs/: every file loads (all stages), overrides are checked, big models fit the rules."""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from jax.sharding import AbstractMesh, AxisType
from ml_collections import config_flags

from configs import common, demo
from safecrs_jax import config as config_lib
from safecrs_jax import models
from safecrs_jax.infra import sharding
from safecrs_jax.models import lora
from safecrs_jax.train import optim, policy
from safecrs_jax.train import state as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith(("__init__.py", "common.py")))


def test_config_files_present():
  assert {"demo", "qwen25", "llama32", "llama31"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("stage", ["sft", "gdpo"])
def test_every_config_loads(name, stage):
  mod = importlib.import_module(f"configs.{name}")
  c = mod.get_config(f"stage={stage}")
  assert c.stage == stage
  typed = config_lib.from_dict(c)                       # every field known and well typed
  assert typed.to_dict() == c.to_dict()
  assert c.model.preset in models.PRESETS
  cfg = policy.model_config(c)                          # builds a valid ModelConfig
  assert cfg.dtype == c.model.dtype
  assert max(c.tokenizer.buckets) >= c.tokenizer.max_length
  assert max(c.gdpo.prompt_buckets) >= c.gdpo.max_prompt_length
  assert len(c.gdpo.reward_weights) == len(c.gdpo.rewards)
  names = {n for n, _ in c.mesh.rules}
  axes = set(jax.tree.leaves(models.param_logical_axes(cfg)))
  assert axes <= names, f"logical axes without a rule: {axes - names}"
  c.lock()
  with pytest.raises(AttributeError):
    c.sft.num_stepz = 3                               # typos fail loudly
  if stage == "sft":
    assert (c.optim.lr, c.optim.schedule) == ((5e-5, "cosine") if name != "demo" else
                                              (c.optim.lr, "cosine"))
  else:
    assert c.optim.schedule == "constant"


def test_paper_defaults_and_args():
  c = importlib.import_module("configs.qwen25").get_config("data_dir=/d,model_dir=/m")
  assert (c.data.dir, c.model.hf_dir, c.tokenizer.path) == ("/d", "/m", "")
  assert (c.optim.lr, c.optim.warmup_ratio, c.sft.epochs, c.sft.batch_size,
          c.sft.grad_accum, c.tokenizer.max_length) == (5e-5, 0.05, 10, 12, 8, 1024)
  g = importlib.import_module("configs.llama31").get_config("stage=gdpo,init=/run")
  assert (g.optim.lr, g.optim.b2, g.gdpo.group_size, g.gdpo.init_checkpoint) == (
      1e-6, 0.99, 8, "/run")
  assert g.model.dtype == "bfloat16" and g.model.param_dtype == "float32"
  with pytest.raises(ValueError, match="unknown config arg"):
    common.parse_arg("stage=sft,sise=1", stage="sft")
  with pytest.raises(ValueError, match="size"):
    importlib.import_module("configs.demo").get_config("size=huge")


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_are_checked():
  path = os.path.join(REPO, "configs", "demo.py")
  c = _parse(["prog", f"--config={path}:size=test", "--config.sft.num_steps=7",
              "--config.tokenizer.buckets=(128,256)"])
  assert c.sft.num_steps == 7 and tuple(c.tokenizer.buckets) == (128, 256)
  with pytest.raises(Exception, match="num_steps"):     # "did you mean num_steps"
    _parse(["prog", f"--config={path}", "--config.sft.num_stepz=7"])


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 16, 4)])
def test_8b_training_state_fits_the_sharding_rules(mesh_shape):
  """Abstract 8B params + AdamW state on an abstract mesh: no compute, no memory."""
  c = importlib.import_module("configs.llama31").get_config()
  cfg = policy.model_config(c)
  assert 7.9e9 < models.count_params(cfg) < 8.1e9
  tx, _ = optim.make_optimizer(c.optim, 1000)
  zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),  # noqa: E731
                               models.abstract_params(cfg))
  abstract = jax.eval_shape(lambda: ts.create(zeros(), tx))
  mesh = AbstractMesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  sh = ts.shardings(abstract, models.param_logical_axes(cfg), mesh, sharding.as_tuples(c.mesh.rules))
  n_model = mesh_shape[1] * mesh_shape[2]            # params are replicated over "data"
  total = per_device = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(sh)):
    spec = tuple(s.spec) + (None,) * (a.ndim - len(s.spec))
    for dim, axes in zip(a.shape, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      size = int(np.prod([dict(zip(mesh.axis_names, mesh_shape))[x] for x in axes]))
      assert dim % size == 0, (a.shape, s.spec)
    if a.size > 1 << 20:                              # every big array is fully sharded
      assert np.prod(s.shard_shape(a.shape)) * n_model == a.size, (a.shape, s.spec)
    total += a.size * a.dtype.itemsize
    per_device += np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
  assert total / 2**30 > 89                          # 8B x (param + mu + nu) in float32
  assert per_device <= total / n_model * 1.01

  # LoRA on the same model: the optimiser state mirrors the adapters only, and the
  # adapters take their kernels' shardings (rank dimension replicated)
  targets = tuple(c.sft.lora.targets)
  abstract_l = jax.eval_shape(lambda: ts.create(
      zeros(), tx, lora.init(zeros(), 16, targets, jax.random.key(0))))
  sh_l = ts.shardings(abstract_l, models.param_logical_axes(cfg), mesh,
                      sharding.as_tuples(c.mesh.rules))
  n_adapter = sum(x.size for x in jax.tree.leaves(abstract_l.lora))
  assert 30e6 < n_adapter < 50e6                      # 8B, rank 16, 7 targets: ~42M
  assert sum(x.size for x in jax.tree.leaves(abstract_l.opt_state)) <= 2 * n_adapter + 8
  adapter_bytes = sum(np.prod(s.shard_shape(a.shape)) * 4 for a, s in zip(
      jax.tree.leaves(abstract_l.lora), jax.tree.leaves(sh_l.lora)))
  assert adapter_bytes < 2**30                        # small even where replicated


def test_fused_projections_off_on_a_tensor_parallel_mesh():
  c = demo.get_config("size=test,relational=off")
  assert policy.model_config(c).fuse_projections is True
  c.mesh.shape = (("data", 1), ("fsdp", -1), ("tensor", 2))
  assert policy.model_config(c).fuse_projections is False
  c.mesh.shape = (("data", 1), ("fsdp", 2), ("tensor", -1))   # "the rest" may be > 1
  assert policy.model_config(c).fuse_projections is False


def test_demo_recipes():
  from safecrs_jax import demo as demo_run
  plain = demo_run.get_configs("test")                  # the default: off; typed configs
  assert all(isinstance(c, config_lib.Config) for c in plain)
  twins = demo_run.get_configs("test", relational="twins")
  rel = demo_run.get_configs("test", relational="on")
  for c in plain:
    assert c.data.relational_mix == 0.0 and c.tokenizer.max_length == 256
    assert c.gdpo.rewards == ("relevance", "safety") and c.gdpo.lambda_count == 0.0
  # twins: Safe-SFT is the plain one (same checkpoint fingerprint); both GDPO runs mix in
  # counterfactual triples only, with over_filter and count.
  assert twins[0].to_dict() == plain[0].to_dict()
  for c in twins[1:]:
    assert c.data.relational_mix == 0.375 and c.data.relational_parts == ("counterfactual",)
    assert c.data.relational_controls == ("none",)
    assert c.gdpo.rewards == ("relevance", "safety", "over_filter", "count")
    assert c.gdpo.lambda_count == 1.0 and c.gdpo.target_count == 10
    assert max(c.gdpo.prompt_buckets) == c.gdpo.max_prompt_length == 384
  assert twins[2].gdpo.advantage_mode == "grpo"
  sft_c, gdpo_c, grpo_c = rel
  assert sft_c.data.relational_mix == 0.1 and gdpo_c.data.relational_mix == 0.2
  assert "counterfactual" not in sft_c.data.relational_parts
  assert "counterfactual" in gdpo_c.data.relational_parts
  assert gdpo_c.gdpo.rewards == grpo_c.gdpo.rewards == ("relevance", "safety", "over_filter")
  assert len(gdpo_c.gdpo.reward_weights) == 3 and grpo_c.gdpo.advantage_mode == "grpo"
  assert max(gdpo_c.gdpo.prompt_buckets) == gdpo_c.gdpo.max_prompt_length == 384
  with pytest.raises(ValueError, match="relational='maybe'"):
    demo_run.get_configs("test", relational="maybe")
  with pytest.raises(ValueError, match="relational='maybe'"):
    demo.get_config("relational=maybe")
