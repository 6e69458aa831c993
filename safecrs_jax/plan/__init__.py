"""Will it fit? Compile a stage's programs for a topology and read their memory, no hardware.

    rows = plan.plan_config(config, plan.topology_devices("v5p-16"))
    print(plan.format_table(rows)); ok, message = plan.verdict(rows, config)
    plan.preflight(config)     # training start-up: the same check on the real devices

  python -m launch.plan --config=configs/llama31.py:stage=gdpo --topology=v5p-16 [--json]
  python -m launch.plan --config=configs/llama31.py:stage=sft --topology=v5p-16 --num_slices=2

The stage's real programs (programs.py: the Safe-SFT step; Safe-GDPO rollout
generation, reference log-probs and learner step; evaluation generation) are
AOT-compiled for the topology's devices and the config's mesh from abstract
inputs; report.py reads `compiled.memory_analysis()` and the HLO. chips.py holds
the per-device HBM / peak FLOP/s table. TPU topologies need libtpu (the `plan`
extra) and JAX_PLATFORMS=cpu, TPU_SKIP_MDS_QUERY=1 set before JAX starts.
"""
from __future__ import annotations

import jax
from absl import logging

from safecrs_jax import config as config_lib
from safecrs_jax.infra import chips
from safecrs_jax.infra import sharding as shd
from safecrs_jax.infra.chips import CHIPS, Chip, chip_of
from safecrs_jax.plan import programs, report
from safecrs_jax.plan.report import format_table, gradient_reductions, loop_param_all_gathers
from safecrs_jax.plan.topology import topology_devices, tpu_topology_name

__all__ = ["CHIPS", "Chip", "chip_of", "format_table", "gradient_reductions", "loop_param_all_gathers", "plan_config",
           "preflight", "topology_devices", "tpu_topology_name", "verdict"]


def plan_config(config, devices, *, hbm_bytes=None, only=None) -> list:
  """One row (report.measure) per program of config.stage on `devices`.

  The mesh is config.mesh.shape over all `devices` (mesh.num_devices is
  ignored: the topology decides), one slice's shape when mesh.num_slices > 1
  (topology_devices(name, num_slices) gives the devices of that many slices). hbm_bytes overrides the chip table. only:
  program names to compile (default all).
  """
  config = config_lib.resolve(config)
  mesh = shd.make_mesh(shd.as_tuples(config.mesh.shape), devices=list(devices),
                       num_slices=int(config.mesh.num_slices))
  rules = shd.as_tuples(config.mesh.rules)
  chip = chips.chip_of(devices[0])
  hbm = hbm_bytes if hbm_bytes is not None else (chip.hbm_bytes if chip else None)
  model_cfg, progs = programs.stage_programs(config, mesh, rules)
  rows = []
  for p in progs:
    if only is None or p.name in only:
      row = report.measure(p, model_cfg, chip, hbm, mesh)
      row.update(device_kind=devices[0].device_kind, num_devices=len(devices),
                 mesh=dict(mesh.shape))
      rows.append(row)
  return rows


def verdict(rows, config) -> tuple[bool, str]:
  """(all fit, message naming the programs that do not and the knobs that would help)."""
  bad = [r for r in rows if r["fits"] is False]
  if not bad:
    return True, "every program fits"
  lines = []
  for r in bad:
    peak = "?" if r["peak_bytes"] is None else f"{r['peak_bytes'] / (1 << 30):.1f}"
    lines.append(f"{r['name']} needs {peak} GiB per device of {r['hbm_bytes'] / (1 << 30):.1f}; "
                 f"try: {'; '.join(report.knobs(r, config))}")
  return False, "does not fit:\n  " + "\n  ".join(lines)


def preflight(config, devices=None):
  """Start-up check of a training stage on the devices it will run on.

  Skipped on CPU (no fixed device memory). Raises SystemExit with the planner's
  message when a program of the stage does not fit, before any weights load.
  """
  config = config_lib.resolve(config)
  if devices is None:
    n = int(config.mesh.num_devices)
    devices = jax.devices()[:n] if n > 0 else jax.devices()
  devices = list(devices)
  if devices[0].platform == "cpu":
    return None
  hbm = chips.device_memory(devices[0])
  rows = plan_config(config, devices, hbm_bytes=hbm)
  ok, message = verdict(rows, config)
  if not ok:
    raise SystemExit(f"{config.stage}: {message}\n{format_table(rows)}")
  logging.info("preflight: %s\n%s", message, format_table(rows))
  return rows
