"""The train state pytree and its shardings (shared by Safe-SFT and Safe-GDPO).

    TrainState(step [] int32, params, opt_state, lora)

`params` are the model parameters (frozen when `lora` is set), `lora` the
adapters (see lora.py) or None, `opt_state` the optax state of whichever of the
two is trained. Everything is created abstractly first (`jax.eval_shape`) and
then materialised straight into its shardings.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora as lora_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # [] int32: optimizer updates applied so far
  params: Any            # model params (plain pytree)
  opt_state: Any         # optax state of `trainable`
  lora: Any = None       # LoRA adapters, or None for full fine-tuning

  @property
  def trainable(self):
    return self.params if self.lora is None else self.lora


def create(params, tx, lora=None):
  """A fresh state at step 0 (call under jit with out_shardings for big models)."""
  trainable = params if lora is None else lora
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(trainable), lora=lora)


def _key_names(path):
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh):
  """Shardings of an optax state: every params-shaped copy (mu, nu, ...) is sharded
  like the param whose key path it ends with; everything else is replicated."""
  by_path = {}
  for (path, p), (_, s) in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                               jax.tree_util.tree_leaves_with_path(param_shardings)):
    by_path[_key_names(path)] = (tuple(p.shape), s)
  repl = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    names = _key_names(path)
    for i in range(len(names)):
      hit = by_path.get(names[i:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return repl
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def shardings(abstract_state, param_axes, mesh, rules=None):
  """TrainState of NamedSharding for `abstract_state` (from jax.eval_shape)."""
  p_sh = shd.logical_to_sharding(param_axes, mesh, rules, shapes=abstract_state.params)
  l_sh = None
  if abstract_state.lora is not None:
    l_axes = lora_lib.logical_axes(param_axes, abstract_state.lora)
    l_sh = shd.logical_to_sharding(l_axes, mesh, rules, shapes=abstract_state.lora)
  train_abs = abstract_state.params if abstract_state.lora is None else abstract_state.lora
  train_sh = p_sh if l_sh is None else l_sh
  o_sh = opt_state_shardings(abstract_state.opt_state, train_abs, train_sh, mesh)
  return TrainState(step=NamedSharding(mesh, PartitionSpec()), params=p_sh,
                    opt_state=o_sh, lora=l_sh)


def with_shardings(abstract_tree, sharding_tree):
  """ShapeDtypeStructs carrying shardings (restore / load targets)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, sharding_tree)
