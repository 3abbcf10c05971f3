"""Throughput and model-FLOPs utilisation (MFU) for training logs and benchmarks."""
from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor datasheets).
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The bf16 peak of a device, or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device: jax.Device | None = None):
  """Achieved / peak FLOP/s over `num_devices`; None where the peak is unknown."""
  peak = peak_flops(device)
  return None if peak is None else flops_per_step / step_seconds / (peak * num_devices)
