"""Devices to plan for: Cloud TPU accelerator names, libtpu topologies, or `cpu:N`.

    devices = topology_devices("v5p-16")       # 8 compile-only TPU v5p devices
    devices = topology_devices("v5litepod-4")  # 4 TPU v5e devices
    devices = topology_devices("v5p:2x2x2")    # a libtpu topology string as is
    devices = topology_devices("cpu:8")        # 8 host devices (XLA_FLAGS must allow 8)
    devices = topology_devices("v5p-16", num_slices=2)  # 2 slices over DCN: 16 devices

Cloud names count TensorCores for v4 / v5p (2 per chip; a JAX device is one
megacore chip) and chips for v5e / v6e. TPU devices come from libtpu's
topology description (jax.experimental.topologies): compile-only, no TPU
needed, but `libtpu` must be installed (the `plan` extra) and JAX must run with
JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1 set before it starts (launch/plan.py
does this), or libtpu looks for TPU hardware and cloud metadata for minutes.
"""
from __future__ import annotations

import math
import re

import jax
from jax.experimental import topologies

# Cloud name prefix -> (libtpu generation, TensorCores per JAX device, topology rank)
_GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5litepod": ("v5e", 1, 2),
    "v5e": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}


def _grid(chips: int, rank: int) -> tuple:
  """Chip grid of a slice: 4 chips = 2x2(x1), then double the smallest axis (last on ties)."""
  if chips < 4:
    return (1,) * rank if chips == 1 else None
  dims = [2, 2] + [1] * (rank - 2)
  while math.prod(dims) < chips:
    i = max(j for j in range(rank) if dims[j] == min(dims))
    dims[i] *= 2
  return tuple(dims) if math.prod(dims) == chips else None


def tpu_topology_name(name: str) -> tuple[str, dict]:
  """("v5p:2x2x2", get_topology_desc kwargs) of a Cloud name such as v5p-16."""
  if ":" in name:
    return name, {}
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"topology {name!r}: expected a Cloud TPU name (v5p-16, v5litepod-4, "
                     f"v4-8, v6e-8, ...), a libtpu topology (v5p:2x2x2) or cpu:N")
  gen, per_device, rank = _GENERATIONS[m.group(1)]
  count = int(m.group(2))
  chips = count // per_device
  dims = _grid(chips, rank) if count % per_device == 0 else None
  if dims is None:
    raise ValueError(f"topology {name!r}: {count} is not a slice size of {m.group(1)} "
                     f"(1, 4, 8, 16, ... {'TensorCores' if per_device == 2 else 'chips'})")
  kwargs = {"chip_config_name": "megacore"} if gen == "v4" else {}
  if chips == 1:
    kwargs["chips_per_host_bounds"] = (1, 1, 1)
  return f"{gen}:{'x'.join(map(str, dims))}", kwargs


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of `name` (module docstring), in topology order; of num_slices such slices.

  TPU slices are libtpu's multi-slice topology (each device has its slice_index);
  cpu:N with num_slices=S is S*N host devices, split in order into S stand-in slices.
  """
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices}: expected 1 or more")
  if name.startswith("cpu:"):
    n = name.split(":", 1)[1]
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"topology {name!r}: cpu:N needs a device count N >= 1, e.g. cpu:8")
    n = int(n) * num_slices
    have = jax.devices("cpu")
    if len(have) < n:
      raise ValueError(f"topology {name} x {num_slices}: JAX has {len(have)} CPU devices; "
                       f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                       "(launch.plan sets this)")
    return list(have[:n])
  topo, kwargs = tpu_topology_name(name)
  if num_slices > 1:
    kwargs = dict(kwargs, num_slices=num_slices)
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topo,
                                             **kwargs).devices)
  except Exception as e:  # no libtpu, or a name it does not know
    raise RuntimeError(
        f"topology {name} ({topo}): cannot build TPU devices ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Install the plan extra "
        "(pip install -e '.[plan]', i.e. libtpu) and run with JAX_PLATFORMS=cpu") from None
