"""LoRA adapters over the plain params pytree.

For every target kernel W [..., I, O] (leading axes, e.g. the stacked-layer
axis, are batch axes) the adapter holds

    lora_a [..., I, r]  ~ U(-1/sqrt(I), 1/sqrt(I))    (as PEFT's kaiming init)
    lora_b [..., r, O]  = 0                            (so training starts at W)

with scale = alpha / r. Training runs the adapters inside the model,
y = x W + scale · (dropout(x) A) B (models.forward(..., lora=, lora_scale=,
lora_dropout=, dropout_rng=); see models/adapters.py), so adapter dropout is real.
`merge` gives W + scale · A @ B (float32, cast to W's dtype): the same function
without dropout, for inference (rollouts, evaluation) and export — merged params
are ordinary params for `models.save_hf`.

The adapter tree mirrors the params tree, holding only the target modules:
{"layers": {"attn": {"q_proj": {"lora_a": ..., "lora_b": ...}}}} for a kernel at
params["layers"]["attn"]["q_proj"]["kernel"].
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

KERNEL = "kernel"


def check_config(lora_cfg):
  """Validates the sft.lora section; returns True when LoRA is on (rank > 0)."""
  rank = int(lora_cfg.rank)
  if rank < 0:
    raise ValueError(f"sft.lora.rank must be >= 0, got {rank}")
  dropout = float(lora_cfg.dropout)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"sft.lora.dropout must be in [0, 1), got {dropout}")
  if rank and not lora_cfg.targets:
    raise ValueError("sft.lora.targets is empty")
  return rank > 0


def scale(alpha, rank):
  return float(alpha) / float(rank)


def target_paths(params, targets):
  """Sorted key tuples of the kernels whose module name is in `targets`."""
  targets = tuple(targets)
  flat = traverse_util.flatten_dict(params)
  paths = sorted(k for k, v in flat.items()
                 if k[-1] == KERNEL and len(k) >= 2 and k[-2] in targets
                 and np.ndim(v) >= 2)
  return paths


def init(params, rank, targets, rng, dtype=jnp.float32):
  """Adapter tree for `params` (concrete or abstract); raises if no target matches."""
  paths = target_paths(params, targets)
  if not paths:
    names = sorted({k[-2] for k in traverse_util.flatten_dict(params) if len(k) >= 2})
    raise ValueError(f"LoRA targets {tuple(targets)} match no kernel; modules: {names}")
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, path in enumerate(paths):
    shape = tuple(flat[path].shape)
    lead, fan_in, fan_out = shape[:-2], shape[-2], shape[-1]
    bound = 1.0 / np.sqrt(fan_in)
    key = jax.random.fold_in(rng, i)
    out[path[:-1] + ("lora_a",)] = jax.random.uniform(
        key, lead + (fan_in, rank), dtype, -bound, bound)
    out[path[:-1] + ("lora_b",)] = jnp.zeros(lead + (rank, fan_out), dtype)
  return traverse_util.unflatten_dict(out)


def abstract(params, rank, targets, dtype=jnp.float32):
  """ShapeDtypeStruct tree of `init` without computing."""
  return jax.eval_shape(lambda: init(params, rank, targets, jax.random.key(0), dtype))


def logical_axes(param_axes, lora_params):
  """Logical axis names of the adapters from those of their kernels.

  lora_a keeps the kernel's leading and input axes (rank replicated); lora_b its
  leading and output axes.
  """
  flat_axes = traverse_util.flatten_dict(param_axes)
  out = {}
  for path in traverse_util.flatten_dict(lora_params):
    kernel_axes = tuple(flat_axes[path[:-1] + (KERNEL,)])
    if path[-1] == "lora_a":
      out[path] = kernel_axes[:-1] + (None,)
    else:
      out[path] = kernel_axes[:-2] + (None, kernel_axes[-1])
  return traverse_util.unflatten_dict(out)


def merge(params, lora_params, lora_scale):
  """params with every adapted kernel replaced by W + scale · A @ B (W's dtype)."""
  if lora_params is None:
    return params
  flat = dict(traverse_util.flatten_dict(params))
  flat_lora = traverse_util.flatten_dict(lora_params)
  for path in {k[:-1] for k in flat_lora}:
    kpath = path + (KERNEL,)
    if kpath not in flat:
      raise KeyError(f"LoRA adapter {'/'.join(path)} has no kernel in params")
    w = flat[kpath]
    a = flat_lora[path + ("lora_a",)].astype(jnp.float32)
    b = flat_lora[path + ("lora_b",)].astype(jnp.float32)
    delta = jnp.einsum("...ir,...ro->...io", a, b) * lora_scale
    flat[kpath] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)

