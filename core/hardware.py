"""Peak dense bf16 FLOP/s per device, for model FLOPs utilisation (MFU) in logs and benchmarks."""
from __future__ import annotations

import jax

# Vendor peak dense bf16 (no sparsity) per device as JAX enumerates them.
PEAK_BF16 = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak for a ``Device.device_kind`` string (None for CPUs and unknown devices)."""
  for name in sorted(PEAK_BF16, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name.lower() in device_kind.lower():
      return PEAK_BF16[name]
  return None


def peak_flops_per_second(device=None) -> float | None:
  """The peak of ``device`` (default: the first device); None means MFU is not reported."""
  device = device or jax.devices()[0]
  return peak_flops(getattr(device, "device_kind", ""))
