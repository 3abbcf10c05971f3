"""What one accelerator chip can do, by the exact `device_kind` JAX reports: the peaks that the MFU (`training.metrics`)
and the pod planner's roofline (`sfd_jax.plan`) divide by.

A leaf module (no JAX), so that the trainer reads the table without importing the planner. Kinds are matched
exactly: one generation's name is a prefix of another's ('TPU v5' is v5p, 'TPU v5 lite' is v5e), and a card's
variants differ (H100 PCIe is not H100 SXM), so a kind not listed gets no entry (no MFU shown) rather than a wrong one.
"""
from __future__ import annotations

import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device as the roofline sees it (on a TPU with two TensorCores per chip that JAX shows as two devices,
  v2, v3 and TPU7x, one TensorCore's share)."""
  peak_bf16_flops: float        # dense (no sparsity) bf16 FLOP/s; float16 on cards without bf16 units
  hbm_bandwidth: float          # bytes/s
  hbm_bytes: float              # HBM one program may use
  ici_bandwidth: float | None   # bidirectional inter-chip bytes/s per device; None where no figure is published
  dcn_bandwidth: float | None   # data-center-network bytes/s per device (between slices); None where unpublished
  source: str


Gbps = 1e9 / 8  # bytes/s

# TPUs: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<version>; for v2 the paper its page
# defers to, Jouppi et al., "A Domain Specific Supercomputer for Training Deep Neural Networks", CACM 2020; for v4
# lite, the v4i inference chip, Jouppi et al., ISCA 2021). HBM is what libtpu 0.0.42's compiler lets one program use
# (its out-of-memory message on the topology descriptions) of the nominal 8 / 16 (v2 / v3 per TensorCore), 32 (v4),
# 16 (v5e), 96 (v5p), 32 (v6e) and 96 GiB (TPU7x per TensorCore); v4i (no topology description) its nominal 8 GiB.
# ICI is the pages' bidirectional bandwidth per chip: v5p and TPU7x state it; for v3, v4, v5e and v6e, which give
# the all-reduce bandwidth per pod, twice that over the pod's chips (v5e 2 x 51.2 TB/s / 256 and v6e 2 x 102.4 TB/s
# / 256, the pages' 1,600 and 3,200 Gbps per chip each way; v4 2 x 1.1 PB/s / 4096; v3 2 x 340 TB/s / 1024). DCN
# (between slices) is the per-chip figure of the v5p and TPU7x pages (50, 100 Gbps), for v5e and v6e the per-host
# NICs over the host's 8 chips (2 x 100, 4 x 200 Gbps); none is published for v2, v3, v4 and v4i. Cost-model
# inputs: peaks no program exceeds, not measurements.
_V5E = Chip(197e12, 819e9, 15.75 * GiB, 400e9, 2 * 100 * Gbps / 8, "cloud.google.com/tpu/docs/v5e")
_V5P = Chip(459e12, 2765e9, 95.74 * GiB, 1200e9, 50 * Gbps, "cloud.google.com/tpu/docs/v5p")
_V6E = Chip(918e12, 1638e9, 31.25 * GiB, 800e9, 4 * 200 * Gbps / 8, "cloud.google.com/tpu/docs/v6e")

# GPUs: NVIDIA datasheets, dense tensor-core peaks (half the "with sparsity" figures); the key is the CUDA device
# name, which JAX reports as device_kind.
_A100_40 = Chip(312e12, 1555e9, 40e9, None, None, "NVIDIA A100 datasheet (40 GB)")

CHIPS: dict[str, Chip] = {
    "TPU v2": Chip(46e12 / 2, 700e9 / 2, 7.48 * GiB, None, None, "Jouppi et al., CACM 2020 (per TensorCore)"),
    "TPU v3": Chip(123e12 / 2, 900e9 / 2, 15.48 * GiB, 340e12 / 1024, None,
                   "cloud.google.com/tpu/docs/v3 (per TensorCore)"),
    "TPU v4": Chip(275e12, 1200e9, 30.75 * GiB, 2 * 1.1e15 / 4096, None, "cloud.google.com/tpu/docs/v4"),
    "TPU v4 lite": Chip(138e12, 614e9, 8 * GiB, None, None, "Jouppi et al., ISCA 2021 (TPU v4i)"),
    "TPU v5 lite": _V5E,
    "TPU v5e": _V5E,
    "TPU v5": _V5P,
    "TPU v5p": _V5P,
    "TPU v6 lite": _V6E,
    "TPU v6e": _V6E,
    "TPU7x": Chip(2307e12 / 2, 7380e9 / 2, 94.75 * GiB, 1200e9 / 2, 100 * Gbps / 2,
                  "cloud.google.com/tpu/docs/tpu7x (per TensorCore)"),
    "NVIDIA H100 80GB HBM3": Chip(989e12, 3350e9, 80e9, None, None, "NVIDIA H100 datasheet (SXM)"),
    "NVIDIA H100 PCIe": Chip(756e12, 2000e9, 80e9, None, None, "NVIDIA H100 datasheet (PCIe)"),
    "NVIDIA H100 NVL": Chip(835e12, 3900e9, 94e9, None, None, "NVIDIA H100 datasheet (NVL)"),
    "NVIDIA H200": Chip(989e12, 4800e9, 141e9, None, None, "NVIDIA H200 datasheet (SXM)"),
    "NVIDIA A100-SXM4-40GB": _A100_40,
    "NVIDIA A100-PCIE-40GB": _A100_40,
    "NVIDIA A100-SXM4-80GB": Chip(312e12, 2039e9, 80e9, None, None, "NVIDIA A100 datasheet (80 GB SXM)"),
    "NVIDIA A100 80GB PCIe": Chip(312e12, 1935e9, 80e9, None, None, "NVIDIA A100 datasheet (80 GB PCIe)"),
    "NVIDIA L4": Chip(121e12, 300e9, 24e9, None, None, "NVIDIA L4 datasheet"),
    # No bfloat16 tensor cores: the float16 peak, at which a 16-bit model runs on them.
    "Tesla T4": Chip(65e12, 320e9, 16e9, None, None, "NVIDIA T4 datasheet (float16)"),
    "Tesla V100-SXM2-16GB": Chip(125e12, 900e9, 16e9, None, None, "NVIDIA V100 datasheet (SXM2, float16)"),
    "Tesla V100-SXM2-32GB": Chip(125e12, 900e9, 32e9, None, None, "NVIDIA V100 datasheet (SXM2, float16)"),
    "Tesla V100-PCIE-16GB": Chip(112e12, 900e9, 16e9, None, None, "NVIDIA V100 datasheet (PCIe, float16)"),
    "Tesla V100-PCIE-32GB": Chip(112e12, 900e9, 32e9, None, None, "NVIDIA V100 datasheet (PCIe, float16)"),
}


def chip_of(device_kind: str) -> Chip | None:
  """The entry of a device kind exactly as JAX reports it ('TPU v5 lite', 'NVIDIA H100 PCIe'); None where unknown
  (CPUs, cards not listed)."""
  return CHIPS.get(device_kind)
