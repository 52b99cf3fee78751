"""Accelerator facts: dense bf16 peak FLOP/s and memory per device, for MFU and for planning.

Two tables, vendor numbers (dense, no sparsity): GPUs per device, TPUs per chip. JAX enumerates
one device per chip from TPU v4 on (megacore) and one per TensorCore on v2/v3 (two per chip), so
the per-device peak and memory of a v2/v3 device is half the chip's. A TPU slice name such as
``v4-256`` or ``v2-64`` counts TensorCores (v2-v5p) or chips (``v5litepod-16``, ``v6e-16``);
:func:`tpu_chips` turns it into chips, the unit Cloud TPU is billed in. The paper trains U-Nets on
64 TPUv2 cores and U-ViTs on 128 TPUv4 chips (appendix B).
"""
from __future__ import annotations

import dataclasses
import re

import jax

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One accelerator kind: per-chip peak dense bf16 FLOP/s and memory, devices per chip."""
  name: str
  peak_bf16: float          # per chip
  memory_bytes: int         # per chip (HBM)
  devices_per_chip: int = 1
  cores_in_slice_name: bool = False  # TPU slice names count TensorCores (True) or chips

  @property
  def peak_per_device(self) -> float:
    return self.peak_bf16 / self.devices_per_chip

  @property
  def memory_per_device(self) -> int:
    return self.memory_bytes // self.devices_per_chip


GPUS = {a.name: a for a in (
    Accelerator("H100", 989e12, 80 * GiB), Accelerator("H200", 989e12, 141 * GiB),
    Accelerator("B200", 2250e12, 180 * GiB), Accelerator("A100", 312e12, 80 * GiB),
    Accelerator("A100-40GB", 312e12, 40 * GiB), Accelerator("L40S", 362e12, 48 * GiB),
    Accelerator("L4", 121e12, 24 * GiB), Accelerator("A10", 125e12, 24 * GiB),
)}
TPUS = {a.name: a for a in (
    Accelerator("v2", 45e12, 16 * GiB, devices_per_chip=2, cores_in_slice_name=True),
    Accelerator("v3", 123e12, 32 * GiB, devices_per_chip=2, cores_in_slice_name=True),
    Accelerator("v4", 275e12, 32 * GiB, cores_in_slice_name=True),
    Accelerator("v5p", 459e12, 95 * GiB, cores_in_slice_name=True),
    Accelerator("v5litepod", 197e12, 16 * GiB), Accelerator("v6e", 918e12, 32 * GiB),
)}

# ``Device.device_kind`` substrings -> table entries (longest first: 'TPU v5 lite' before 'TPU v5').
_DEVICE_KINDS = {
    "H100": GPUS["H100"], "H200": GPUS["H200"], "B200": GPUS["B200"],
    "A100-SXM4-40GB": GPUS["A100-40GB"],
    "A100-PCIE-40GB": GPUS["A100-40GB"], "A100": GPUS["A100"], "L40S": GPUS["L40S"],
    "L4": GPUS["L4"],
    "A10": GPUS["A10"], "TPU v2": TPUS["v2"], "TPU v3": TPUS["v3"], "TPU v4": TPUS["v4"],
    "TPU v5 lite": TPUS["v5litepod"], "TPU v5e": TPUS["v5litepod"], "TPU v5p": TPUS["v5p"],
    "TPU v5": TPUS["v5p"], "TPU v6 lite": TPUS["v6e"], "TPU v6e": TPUS["v6e"],
}


def for_device_kind(device_kind: str) -> Accelerator | None:
  """The table entry for a ``Device.device_kind`` string (None for CPUs and unknown devices)."""
  for name in sorted(_DEVICE_KINDS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return _DEVICE_KINDS[name]
  return None


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one JAX device of this kind (None for CPUs and unknown devices)."""
  acc = for_device_kind(device_kind)
  return acc.peak_per_device if acc else None


def peak_flops_per_second(device=None) -> float | None:
  """The peak of ``device`` (default: the first device); None means MFU is not reported."""
  device = device or jax.devices()[0]
  return peak_flops(getattr(device, "device_kind", ""))


def parse_tpu_type(tpu_type: str) -> tuple[Accelerator, int]:
  """``'v4-256'`` -> (the v4 entry, 128 chips). Raises ValueError naming the valid generations."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", tpu_type.strip())
  if not m or m.group(1) not in TPUS:
    raise ValueError(f"unknown TPU type {tpu_type!r}; use <generation>-<size> with a generation of "
                     f"{', '.join(TPUS)} (e.g. v4-256, v5p-128, v6e-64)")
  acc = TPUS[m.group(1)]
  return acc, tpu_chips(acc, int(m.group(2)))


def tpu_chips(acc: Accelerator, size: int) -> int:
  """Chips in a slice named ``<generation>-<size>`` (v2-v5p count TensorCores, two per chip)."""
  return size // 2 if acc.cores_in_slice_name else size


def devices_in_slice(acc: Accelerator, chips: int) -> int:
  """JAX devices in a slice of ``chips`` chips."""
  return chips * acc.devices_per_chip
