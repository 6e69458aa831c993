"""Device mesh, logical-axis rules and multi-host setup.

The mesh has three named axes:
  data    — pure data parallelism (parameters replicated),
  fsdp    — data parallelism with parameters sharded along their `embed` axis,
  tensor  — tensor (model) parallelism over heads / mlp / vocab.
Every parameter and activation carries logical axis names (embed, heads, mlp, ...);
RULES map them to mesh axes. The same code runs on 1 CPU device, 8 fake CPU devices,
a GPU host or a TPU pod slice: only the mesh changes.

Several slices (mesh.num_slices > 1): the mesh shape is one slice's and `data` also
spans the slices over DCN (slices.py).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The default logical -> mesh axis table is the config schema's mesh.rules default.
from safecrs_jax.config.sections import BATCH_AXES, DEFAULT_RULES
from safecrs_jax.infra.slices import hybrid_devices

MESH_AXES = ("data", "fsdp", "tensor")


def _sizes(mesh_shape, n: int) -> tuple[tuple[str, ...], list[int]]:
  """(names, sizes) of ((axis, size), ...) over n devices, the one -1 filled in."""
  names = tuple(name for name, _ in mesh_shape)
  sizes = [s for _, s in mesh_shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh_shape {mesh_shape}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or n % known:
      raise ValueError(f"mesh_shape {mesh_shape}: {n} devices not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh_shape {mesh_shape} needs {math.prod(sizes)} devices, "
                     f"have {n}")
  return names, sizes


def make_mesh(mesh_shape=(("data", 1), ("fsdp", -1), ("tensor", 1)),
              devices: Sequence[jax.Device] | None = None, num_slices: int = 1) -> Mesh:
  """Builds a Mesh from ((axis, size), ...); one size may be -1 = all remaining devices.

  Sizes must multiply to the device count. Uses jax.make_mesh (topology-aware on
  TPU/GPU) when given all devices. Axes are AxisType.Auto (GSPMD propagation).
  num_slices > 1: `mesh_shape` is one slice's mesh (-1 = the rest of a slice)
  and the data axis is num_slices times its size, across the slices (module
  docstring; `slices.slice_groups` says which devices form a slice).
  """
  mesh_shape = tuple((str(n), int(s)) for n, s in (
      mesh_shape.items() if hasattr(mesh_shape, "items") else mesh_shape))
  all_devices = devices is None
  devices = list(jax.devices() if devices is None else devices)
  # Auto axes: shardings propagate through jit (newer jax defaults to Explicit).
  auto = (jax.sharding.AxisType.Auto,) * len(mesh_shape)
  if num_slices > 1:
    if len(devices) % num_slices:
      raise ValueError(f"{len(devices)} devices do not split into {num_slices} slices")
    names, sizes = _sizes(mesh_shape, len(devices) // num_slices)
    return Mesh(hybrid_devices(names, sizes, devices, num_slices), names, axis_types=auto)
  if num_slices < 1:
    raise ValueError(f"mesh.num_slices={num_slices}: expected 1 or more")
  names, sizes = _sizes(mesh_shape, len(devices))
  if all_devices:
    try:
      return jax.make_mesh(tuple(sizes), names, axis_types=auto)
    except Exception:  # odd topologies: plain reshape below
      pass
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=auto)


def _axes_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES,
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Logical axis names of one array -> PartitionSpec.

  With `shape` and `mesh`, a mesh axis is used for a dimension only if its size
  divides that dimension (else the next matching rule, else replicated), so odd
  sizes (14 heads on tensor=4, vocab 151936 on 3 devices) never fail to shard.
  Each mesh axis is used at most once per array.
  """
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    chosen = None
    for rule_name, axes in rules:
      if rule_name != name:
        continue
      axes = tuple(a for a in _axes_tuple(axes)
                   if mesh is None or a in mesh.shape)
      if mesh is not None:  # size-1 axes shard nothing: leave them out
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if any(a in used for a in axes):
        continue
      if shape is not None and mesh is not None and axes:
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
          # try the longest prefix of the axes that divides
          while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
      chosen = axes
      break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def logical_to_sharding(logical_axes_tree, mesh: Mesh, rules=None, shapes=None):
  """Tree of logical-name tuples -> tree of NamedSharding.

  `shapes`: optional matching tree of arrays / ShapeDtypeStructs; with it, dims that
  a mesh axis does not divide are replicated instead of failing.
  """
  if shapes is None:
    return jax.tree.map(lambda n: NamedSharding(mesh, logical_to_spec(n, rules)),
                        logical_axes_tree, is_leaf=_is_names)
  return jax.tree.map(
      lambda n, s: NamedSharding(mesh, logical_to_spec(n, rules, s.shape, mesh)),
      logical_axes_tree, shapes, is_leaf=_is_names)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
  """Sharding of an array whose dimension `batch_dim` holds rows: rows over (data, fsdp).

  [B, ...] batches use batch_dim=0; accumulated [A, B, ...] batches batch_dim=1.
  """
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  spec = [None] * ndim
  spec[batch_dim] = axes
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """Devices a batch's rows are split over (the data and fsdp axes)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def as_tuples(x):
  """Nested lists (as configs hold them) -> nested tuples (hashable, jit-static)."""
  if isinstance(x, (list, tuple)):
    return tuple(as_tuples(v) for v in x)
  return x


def mesh_from_config(config, devices=None):
  """(mesh, rules) from a run config's `mesh` section (shape, num_slices, rules, num_devices)."""
  n = int(config.mesh.num_devices)
  if devices is None and n > 0:
    if jax.process_count() > 1:
      raise ValueError("mesh.num_devices only applies to single-process runs")
    if n > jax.device_count():
      raise ValueError(f"mesh.num_devices={n} > {jax.device_count()} devices")
    devices = jax.devices()[:n]
  mesh = make_mesh(as_tuples(config.mesh.shape), devices=devices,
                   num_slices=int(config.mesh.num_slices))
  return mesh, as_tuples(config.mesh.rules)


# -- CPU cores as devices ------------------------------------------------------

CPU_DEVICE_FLAG = "xla_force_host_platform_device_count"
MAX_CPU_DEVICES = 16


def cpu_cores() -> int:
  """Cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def expose_cpu_cores(environ=None) -> int:
  """One XLA CPU device per core (at most MAX_CPU_DEVICES): call before JAX's CPU backend starts.

  XLA:CPU runs one program at a time per device, and the small matmuls and reductions
  of a decode step use a second core poorly, so rollouts and evaluation
  generation on CPU split their prompts over one device per core (rollout.host_mesh).
  Training takes `mesh.num_devices` of them (the demo: 1, whose matmuls still use
  every core's thread; a config with -1 = all shards over them). Nothing is changed when
  XLA_FLAGS already sets the device count, or JAX_PLATFORMS excludes the CPU.
  Returns the device count now asked for (0 when left alone).
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  platforms = environ.get("JAX_PLATFORMS", "")
  if CPU_DEVICE_FLAG in flags or (platforms and "cpu" not in platforms.split(",")):
    return 0
  n = min(cpu_cores(), MAX_CPU_DEVICES)
  if n > 1:
    environ["XLA_FLAGS"] = f"{flags} --{CPU_DEVICE_FLAG}={n}".strip()
  return n if n > 1 else 0


# -- host <-> global arrays ---------------------------------------------------

def to_global(x, sharding: NamedSharding, global_shape=None):
  """numpy -> global jax array in `sharding`.

  Without `global_shape` (or when it equals x.shape), x is the whole array and
  every process holds the same copy. With a larger `global_shape`, x holds only
  the rows this process's devices own (see `local_rows`).
  """
  x = np.asarray(x)
  if global_shape is None or tuple(global_shape) == x.shape:
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))


def to_host(x) -> np.ndarray:
  """Global jax array -> the whole array as numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(sharding: NamedSharding, global_shape, axis: int) -> tuple[int, int]:
  """[lo, hi) of `axis` held by this process's devices (must be contiguous)."""
  idx = sharding.addressable_devices_indices_map(tuple(global_shape))
  spans = set()
  for sl in idx.values():
    s = sl[axis]
    spans.add((s.start or 0, global_shape[axis] if s.stop is None else s.stop))
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous rows {sorted(spans)}")
  return lo, hi


def constrain(x, names: Sequence[str | None], mesh: Mesh | None, rules=None):
  """with_sharding_constraint by logical names; identity when mesh is None."""
  if mesh is None:
    return x
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# -- multi-host ---------------------------------------------------------------

_DISTRIBUTED_ENV = (
    "JAX_COORDINATOR_ADDRESS",   # explicit jax launch
    "COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",      # Cloud TPU pod slice (multi-host)
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",              # SLURM (GPU clusters)
    "OMPI_COMM_WORLD_SIZE",      # Open MPI
)


def _env_num_processes() -> int | None:
  for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "WORLD_SIZE"):
    if os.environ.get(key, "").isdigit():
      return int(os.environ[key])
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
  if hosts:
    return len([h for h in hosts.split(",") if h])
  return None


_initialized = False


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when launched as one of several processes.

  Detection: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), a Cloud
  TPU pod slice (TPU_WORKER_HOSTNAMES with >1 host), SLURM (SLURM_NTASKS > 1) or
  Open MPI. jax auto-detects coordinator and ids for TPU / SLURM / MPI; explicit
  JAX_* variables are passed through. Single-process runs are left untouched.
  Returns True when initialize() was called (now or earlier).
  """
  global _initialized
  is_init = getattr(jax.distributed, "is_initialized", None)
  if _initialized or (is_init is not None and is_init()):
    return True
  num = _env_num_processes()
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
  if not addr and (num is None or num <= 1):
    return False
  if not addr and not any(k in os.environ for k in _DISTRIBUTED_ENV):
    return False
  kwargs = {}
  if addr:
    kwargs["coordinator_address"] = addr
    if num is not None:
      kwargs["num_processes"] = num
    pid = os.environ.get("JAX_PROCESS_ID")
    if pid is not None and pid.isdigit():
      kwargs["process_id"] = int(pid)
  jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0
