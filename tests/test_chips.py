"""The chip table against the device kinds JAX and libtpu report, with the datasheet peaks written out here."""
import os

import pytest

from sfd_jax import chips

# Dense bf16 (float16 for T4, V100) FLOP/s per JAX device and the HBM a program may use, from the vendors' pages:
# every spelling JAX reports (jax.experimental.mesh_utils names 'TPU v5 lite' and 'TPU v5e', 'TPU v5' and 'TPU v5p';
# GPUs report the CUDA device name).
EXPECTED = {
    "TPU v2": (23e12, 7.48), "TPU v3": (61.5e12, 15.48), "TPU v4": (275e12, 30.75), "TPU v4 lite": (138e12, 8.0),
    "TPU v5 lite": (197e12, 15.75), "TPU v5e": (197e12, 15.75), "TPU v5": (459e12, 95.74),
    "TPU v5p": (459e12, 95.74), "TPU v6 lite": (918e12, 31.25), "TPU v6e": (918e12, 31.25),
    "TPU7x": (1153.5e12, 94.75),
    "NVIDIA H100 80GB HBM3": (989e12, 80e9), "NVIDIA H100 PCIe": (756e12, 80e9), "NVIDIA H100 NVL": (835e12, 94e9),
    "NVIDIA H200": (989e12, 141e9), "NVIDIA A100-SXM4-40GB": (312e12, 40e9), "NVIDIA A100-PCIE-40GB": (312e12, 40e9),
    "NVIDIA A100-SXM4-80GB": (312e12, 80e9), "NVIDIA A100 80GB PCIe": (312e12, 80e9), "NVIDIA L4": (121e12, 24e9),
    "Tesla T4": (65e12, 16e9), "Tesla V100-SXM2-16GB": (125e12, 16e9), "Tesla V100-SXM2-32GB": (125e12, 32e9),
    "Tesla V100-PCIE-16GB": (112e12, 16e9), "Tesla V100-PCIE-32GB": (112e12, 32e9),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_reported_kind_has_its_own_entry(kind):
  peak, hbm = EXPECTED[kind]
  chip = chips.chip_of(kind)
  assert chip.peak_bf16_flops == pytest.approx(peak)
  assert chip.hbm_bytes == pytest.approx(hbm * 2 ** 30 if kind.startswith("TPU") else hbm)


def test_v5e_is_not_v5p_and_pcie_is_not_sxm():
  """The prefix match this table replaces took 'TPU v5e' for v5p and H100 PCIe for SXM."""
  assert chips.chip_of("TPU v5e") is chips.chip_of("TPU v5 lite") is not chips.chip_of("TPU v5")
  assert chips.chip_of("TPU v5e").hbm_bandwidth == 819e9 and chips.chip_of("TPU v5p").hbm_bandwidth == 2765e9
  assert chips.chip_of("NVIDIA H100 PCIe").hbm_bandwidth == 2000e9
  assert chips.chip_of("NVIDIA H100 80GB HBM3").hbm_bandwidth == 3350e9


@pytest.mark.parametrize("kind", ["cpu", "TPU v5 litepod", "TPU v7", "NVIDIA H100", "NVIDIA GeForce RTX 4090",
                                  "TPU v6", "tpu v5 lite", ""])
def test_unknown_kinds_get_no_entry(kind):
  assert chips.chip_of(kind) is None


def test_interconnects():
  """Per chip (per TensorCore device on TPU7x): ICI bidirectional, DCN as the Cloud TPU pages give them."""
  v5e, v5p, v6e, v4 = (chips.chip_of(k) for k in ("TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4"))
  assert (v5e.ici_bandwidth, v5p.ici_bandwidth, v6e.ici_bandwidth) == (400e9, 1200e9, 800e9)
  assert v4.ici_bandwidth == pytest.approx(537e9, rel=1e-3)  # 2 × 1.1 PB/s all-reduce per pod / 4096 chips
  assert (v5e.dcn_bandwidth, v5p.dcn_bandwidth, v6e.dcn_bandwidth) == (25e9 / 8, 50e9 / 8, 100e9 / 8)
  assert chips.chip_of("TPU7x").dcn_bandwidth == 50e9 / 8 and v4.dcn_bandwidth is None


def test_kinds_of_libtpu_topologies():
  """The device_kind of each TPU generation's topology description (what JAX reports on that TPU) is in the table,
  with the HBM libtpu's compiler grants a program there."""
  pytest.importorskip("libtpu", reason="TPU topology descriptions come from libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  for topology, kind in (("v2:2x2", "TPU v2"), ("v3:2x2", "TPU v3"), ("v5e:2x2", "TPU v5 lite"),
                         ("v5:2x2x1", "TPU v5"), ("v6e:2x2", "TPU v6 lite"), ("tpu7x:2x2x1", "TPU7x")):
    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    assert device.device_kind == kind and chips.chip_of(device.device_kind) is not None, topology
  megacore = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu", chip_config_name="megacore")
  assert megacore.devices[0].device_kind == "TPU v4"


def test_mfu_reads_the_table():
  pytest.importorskip("libtpu", reason="a TPU device object comes from libtpu's topology description")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  from jax.experimental import topologies

  from sfd_jax.training import metrics
  v5e = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
  assert metrics.mfu(197e12 * 4 * 0.5, 1.0, 4, v5e) == pytest.approx(0.5)  # half of 4 × 197 TFLOP/s
  assert metrics.peak_flops(jax.devices("cpu")[0]) is None

