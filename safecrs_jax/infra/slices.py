"""Multi-slice meshes: TPU slices joined over the data-centre network (DCN).

The mesh shape describes one slice, and the `data` axis (DCN_AXIS) also spans
the slices, slice-major (data index = slice * per-slice data + index within the
slice), as jax.experimental.mesh_utils.create_hybrid_device_mesh lays it out.
Only the gradient reduction of data parallelism crosses DCN; FSDP gathers and
tensor parallelism stay on a slice's ICI. sharding.make_mesh(..., num_slices=N)
uses this.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

DCN_AXIS = "data"        # the mesh axis that spans slices


def slice_groups(devices: Sequence[jax.Device], num_slices: int) -> list[list[jax.Device]]:
  """The devices of each slice, in slice order.

  TPU devices carry `slice_index` (real multi-slice runs and the planner's
  compile-only topologies); elsewhere (GPU hosts as slices, CPU test stand-ins)
  the devices are split in their given order into num_slices equal groups.
  """
  devices = list(devices)
  if hasattr(devices[0], "slice_index"):
    groups: dict[int, list] = {}
    for d in devices:
      groups.setdefault(d.slice_index, []).append(d)
    if len(groups) != num_slices:
      raise ValueError(f"mesh.num_slices={num_slices}, but the devices belong to "
                       f"{len(groups)} slice(s)")
    return [groups[k] for k in sorted(groups)]
  if len(devices) % num_slices:
    raise ValueError(f"{len(devices)} devices do not split into {num_slices} slices")
  k = len(devices) // num_slices
  return [devices[i * k:(i + 1) * k] for i in range(num_slices)]


def hybrid_devices(names, sizes, devices, num_slices: int) -> np.ndarray:
  """Device array of a multi-slice mesh: per-slice mesh `sizes`, DCN_AXIS across slices."""
  if DCN_AXIS not in names:
    raise ValueError(f"mesh.num_slices={num_slices} needs a {DCN_AXIS!r} mesh axis")
  dcn = [num_slices if name == DCN_AXIS else 1 for name in names]
  groups = slice_groups(devices, num_slices)
  if hasattr(devices[0], "slice_index"):
    flat = [d for g in groups for d in g]
    return mesh_utils.create_hybrid_device_mesh(sizes, dcn, flat,
                                                allow_split_physical_axes=True)
  # No slice_index (CPU stand-ins, GPU hosts): the same block layout by hand.
  axis = names.index(DCN_AXIS)
  return np.concatenate([np.asarray(g, dtype=object).reshape(sizes) for g in groups],
                        axis=axis)
