"""Per-device facts of the accelerators the stack targets: memory, peak bf16 FLOP/s, bandwidth.

The one table of these numbers in the package: the planner's fits / headroom and
its MFU ceilings read it, and so does anything that reports MFU at run time
(`chip_of(jax.devices()[0]).peak_flops`). Keys are `jax.Device.device_kind`
strings (the same for a real device and a compile-only topology device). Values
are per device as JAX sees it: a TPU v4 / v5p device is one megacore chip.
"""
from __future__ import annotations

import dataclasses

import jax

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str              # short name used in tables
  hbm_bytes: int         # device memory
  peak_flops: float      # dense bf16 FLOP/s
  hbm_bandwidth: float   # bytes/s


CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1.2e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 0.82e12),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2.76e12),
    "TPU v5p": Chip("v5p", 95 * GiB, 459e12, 2.76e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1.64e12),
    "NVIDIA A100-SXM4-40GB": Chip("a100-40", 40 * 10**9, 312e12, 1.56e12),
    "NVIDIA A100-SXM4-80GB": Chip("a100-80", 80 * 10**9, 312e12, 2.04e12),
    "NVIDIA H100 80GB HBM3": Chip("h100", 80 * 10**9, 989e12, 3.35e12),
    "NVIDIA H100": Chip("h100", 80 * 10**9, 989e12, 3.35e12),
    "NVIDIA H200": Chip("h200", 141 * 10**9, 989e12, 4.8e12),
}

# CPU has no fixed device memory. The planner's `cpu:N` stands in for an N-GPU
# host: 80 GB devices with H100 numbers unless --hbm_gib says otherwise. Rough:
# XLA:CPU fuses and schedules differently from XLA:GPU, so treat its bytes as a
# +-30% estimate.
CPU_STAND_IN = dataclasses.replace(CHIPS["NVIDIA H100 80GB HBM3"], name="cpu(~h100)")


def chip_of(device) -> Chip | None:
  """The Chip of a jax device (exact device_kind, then by prefix); None when unknown."""
  kind = getattr(device, "device_kind", "")
  if kind in CHIPS:
    return CHIPS[kind]
  for key, chip in CHIPS.items():
    if kind.startswith(key):
      return chip
  if getattr(device, "platform", "") == "cpu":
    return CPU_STAND_IN
  return None


def mfu(flops, seconds, devices=None):
  """Model FLOPs utilisation: flops / (seconds x peak x devices); None on CPU or unknown chips."""
  devices = jax.devices() if devices is None else devices
  chip = chip_of(devices[0])
  if chip is None or devices[0].platform == "cpu" or seconds <= 0:
    return None
  return float(flops) / (seconds * chip.peak_flops * len(devices))


def device_memory(device) -> int | None:
  """Bytes the runtime says a real device can hold (memory_stats), else the table's HBM."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only and CPU devices have none
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  chip = chip_of(device)
  return None if chip is None else chip.hbm_bytes
