"""`sharding.host_rows` on real TPU device orders: libtpu's own topology descriptions (no TPU needed), whose
meshes interleave processes along the physical ring.

The reference is the PartitionSpec's meaning, not the code under test: a batch split over ('data', 'fsdp') puts
row block k on the k-th device of the mesh in row-major order, and `jax.make_array_from_process_local_data` fills
a process's blocks from its local rows in increasing block order.
"""
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="TPU topology descriptions come from libtpu: pip install 'jax[tpu]==0.10.2' "
                                     "(CI installs it with the test extra)")

from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from sfd_jax import sharding as shd  # noqa: E402
from tests.pod_order import V5E_16_RING  # noqa: E402

TOPOLOGIES = {"v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v6e-16": "v6e:4x4", "v5p-32": "v5p:2x2x4"}
LAYOUTS = {"data x 1": (-1, 1), "1 x fsdp": (1, -1), "2 x fsdp": (2, -1)}
ROWS_PER_DEVICE = 3


def topology_devices(name: str, num_slices: int = 1):
  return topologies.get_topology_desc(topology_name=TOPOLOGIES[name], platform="tpu", num_slices=num_slices).devices


def expected_rows(mesh, global_batch: int) -> dict[int, np.ndarray]:
  """{process: its rows}, from the mesh's row-major device order alone."""
  block = global_batch // mesh.devices.size
  rows = {}
  for k, device in enumerate(mesh.devices.flat):
    rows.setdefault(device.process_index, []).extend(range(k * block, (k + 1) * block))
  return {p: np.asarray(r) for p, r in rows.items()}


def placement_rows(mesh, global_batch: int) -> dict[int, np.ndarray]:
  """{process: its rows}, from the sharding's own device → index map, each process's blocks in increasing order."""
  blocks = {}
  for device, index in shd.batch_sharding(mesh).devices_indices_map((global_batch,)).items():
    blocks.setdefault(device.process_index, []).append(range(*index[0].indices(global_batch)))
  return {p: np.concatenate([np.asarray(b) for b in sorted(bs, key=lambda b: b.start)]) for p, bs in blocks.items()}


def check_rows(mesh):
  global_batch = ROWS_PER_DEVICE * mesh.devices.size
  expected, placed = expected_rows(mesh, global_batch), placement_rows(mesh, global_batch)
  assert sorted(expected) == sorted(placed) == sorted({d.process_index for d in mesh.devices.flat})
  for p in expected:
    rows = shd.host_rows(mesh, global_batch, process_index=p)
    np.testing.assert_array_equal(rows, expected[p])
    np.testing.assert_array_equal(rows, placed[p])
  every = np.concatenate([shd.host_rows(mesh, global_batch, process_index=p) for p in expected])
  np.testing.assert_array_equal(np.sort(every), np.arange(global_batch))  # each row fed exactly once
  return expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_host_rows_are_the_rows_the_sharding_places_on_each_process(topology, layout):
  devices = topology_devices(topology)
  mesh = shd.make_mesh(*LAYOUTS[layout], devices=devices)
  assert mesh.devices.size == 16 if topology != "v5e-64" else 64
  check_rows(mesh)


def test_tpu_meshes_interleave_processes():
  """What makes the contiguous rule (process p feeds rows [p·L, (p+1)·L)) wrong on a pod."""
  devices = topology_devices("v5e-16")
  mesh = shd.make_mesh(-1, 1, devices=devices)
  assert [d.process_index for d in mesh.devices.flat] == [0, 0, 1, 1, 1, 1, 0, 2, 3, 3, 3, 3, 2, 2, 2, 0]
  ids = {p: sorted(d.id for d in devices if d.process_index == p) for p in range(4)}
  # What the CPU stand-in of the multi-process tests (tests/pod_order.py) reproduces.
  assert [(d.process_index, ids[d.process_index].index(d.id)) for d in mesh.devices.flat] == list(V5E_16_RING)
  rows = check_rows(mesh)
  np.testing.assert_array_equal(rows[0], [0, 1, 2, 3, 4, 5, 18, 19, 20, 45, 46, 47])
  # Local row i of process p lands on global row host_rows(p)[i]; the contiguous rule meant it for p·L + i.
  for name, global_batch, moved in (("v5e-16", 512, 448), ("v5e-64", 2048, 1920)):
    mesh = shd.make_mesh(-1, 1, devices=topology_devices(name))
    processes = len({d.process_index for d in mesh.devices.flat})
    local = global_batch // processes
    elsewhere = sum(np.sum(shd.host_rows(mesh, global_batch, process_index=p) != np.arange(p * local, (p + 1) * local))
                    for p in range(processes))
    assert elsewhere == moved, name


def test_host_rows_on_two_slices():
  """A multislice mesh (data across slices over DCN, fsdp within each slice, as mesh_utils builds it): every
  process of both slices feeds the rows its devices hold, and slice 1's processes only rows of its half."""
  devices = topology_devices("v5e-16", num_slices=2)
  mesh = Mesh(mesh_utils.create_hybrid_device_mesh((1, 16), (2, 1), devices), shd.AXES,
              axis_types=(AxisType.Auto,) * 2)
  rows = check_rows(mesh)
  assert len(rows) == 8
  global_batch = ROWS_PER_DEVICE * 32
  for p, r in rows.items():
    in_slice_1 = {d.slice_index for d in devices if d.process_index == p} == {1}
    assert (r >= global_batch // 2).all() if in_slice_1 else (r < global_batch // 2).all()
