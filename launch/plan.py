r"""Will it fit? AOT-compile a stage's programs for a topology and print their memory.

  python -m launch.plan --config=configs/llama31.py:stage=gdpo --topology=v5p-16
  python -m launch.plan --config=configs/qwen25.py --topology=v5litepod-4 --json
  python -m launch.plan --config=configs/demo.py --topology=cpu:8
  python -m launch.plan --config=configs/llama31.py:stage=sft --topology=v5p-16 --num_slices=2

--topology: a Cloud TPU name (v5p-16 = 8 chips, v5litepod-4, v4-8, v6e-8, ...),
a libtpu topology (v5p:2x2x2), or cpu:N (N host devices standing in for a GPU
host; --hbm_gib sets their memory). --num_slices=S plans for S such slices
joined over DCN (mesh.num_slices: the config's mesh is one slice's, data
parallelism spans the slices). TPU names need libtpu (pip install '.[plan]');
no TPU is used. Exits 1 when a program does not fit, naming knobs.
"""
import os
import re
import sys

# Before JAX starts: keep the backend on CPU (libtpu would otherwise probe for TPU
# hardware and cloud metadata for minutes) and give cpu:N its N devices.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TPU_SKIP_MDS_QUERY"] = "1"
_cpu = [m.group(1) for a in sys.argv for m in [re.fullmatch(r"--topology=cpu:([1-9]\d*)", a)]
        if m]
_slices = [m.group(1) for a in sys.argv for m in [re.fullmatch(r"--num_slices=(\d+)", a)] if m]
if _cpu and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _n = int(_cpu[0]) * max(1, int(_slices[0]) if _slices else 1)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}").strip()

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import launch  # noqa: E402
from safecrs_jax import plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:args]",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-16 | v5litepod-4 | v5p:2x2x2 | cpu:8")
_JSON = flags.DEFINE_bool("json", False, "print a JSON list of per-program rows")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "device memory override in GiB (0 = chip table)")
_ONLY = flags.DEFINE_list("programs", None, "compile only these programs (default all)")
_SLICES = flags.DEFINE_integer("num_slices", 0, "slices of --topology joined over DCN "
                               "(0 = the config's mesh.num_slices)")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  slices = {"mesh.num_slices": _SLICES.value} if _SLICES.value else {}
  config = launch.typed_config(_CONFIG.value, **slices)
  try:
    devices = plan.topology_devices(_TOPOLOGY.value, int(config.mesh.num_slices))
  except ValueError as e:
    raise app.UsageError(f"--topology={_TOPOLOGY.value}: {e}") from None
  rows = plan.plan_config(config, devices, only=_ONLY.value,
                          hbm_bytes=int(_HBM.value * (1 << 30)) if _HBM.value else None)
  ok, message = plan.verdict(rows, config)
  if _JSON.value:
    print(json.dumps(rows, indent=1))
  else:
    where = _TOPOLOGY.value
    if config.mesh.num_slices > 1:
      where = f"{config.mesh.num_slices} x {where} (DCN)"
    print(plan.format_table(rows, header=f"{config.stage} on {where}: {len(devices)} x "
                            f"{devices[0].device_kind}, mesh {rows[0]['mesh'] if rows else ''}"))
    print(message)
  if not ok:
    print(message, file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
  launch.run(main)
