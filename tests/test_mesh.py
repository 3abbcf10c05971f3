"""Meshes on real TPU device layouts (libtpu's topology descriptions, no TPU needed): every data × fsdp builds, over
several slices 'fsdp' stays within a slice, and each process's rows are where the sharding puts them."""
import logging
import os

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="TPU topology descriptions come from libtpu: pip install 'jax[tpu]==0.10.2'")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from sfd_jax import sharding as shd  # noqa: E402


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices).devices)


def slice_of(device) -> int:
  return getattr(device, "slice_index", 0)  # single-slice descriptions have none


def expected_rows(mesh, global_batch: int, process: int) -> np.ndarray:
  """The batch is split over ('data', 'fsdp') in row-major order: the device at flat position k of the mesh holds
  rows [k·L, (k+1)·L); a process feeds its devices' blocks in increasing order."""
  per_device = global_batch // mesh.devices.size
  blocks = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == process]
  return np.concatenate([np.arange(k * per_device, (k + 1) * per_device) for k in blocks])


def assert_rows_follow_the_sharding(mesh, global_batch: int):
  processes = sorted({d.process_index for d in mesh.devices.flat})
  fed = []
  for p in processes:
    rows = np.arange(global_batch)[shd.host_rows(mesh, global_batch, process_index=p)]
    np.testing.assert_array_equal(rows, expected_rows(mesh, global_batch, p))
    fed.append(rows)
  np.testing.assert_array_equal(np.sort(np.concatenate(fed)), np.arange(global_batch))  # each row fed once


@pytest.mark.parametrize("topology", ["v6e:4x4", "v5e:4x4"])
def test_every_layout_builds(topology, caplog):
  """v6e-16's 4×4 torus does not factor data 2 × fsdp 8 (jax.make_mesh refused it); it builds, with a warning that
  the layout splits physical axes, and a layout that factors the torus builds without one."""
  devices = tpu_devices(topology)
  for data in (1, 2, 4, 8, 16):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      mesh = shd.make_mesh(data, -1, devices=devices)
    assert mesh.shape == {"data": data, "fsdp": 16 // data}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    warned = [r.getMessage() for r in caplog.records if "splits physical axes" in r.getMessage()]
    assert len(warned) == (data in (2, 8)), (data, warned)  # 2 × 8 and 8 × 2 cut a side of 4 in two
    assert_rows_follow_the_sharding(mesh, 64)


@pytest.mark.parametrize("topology", ["v5e:4x4", "v6e:4x4", "v5:2x2x4"])
def test_same_layout_as_jax_make_mesh_where_that_builds(topology):
  """One slice: the devices sit where `jax.make_mesh` puts them (the torus-aware order the rest of the package was
  checked on), for every layout it accepts."""
  import jax
  devices = tpu_devices(topology)
  for data in (1, 2, 4, 8, 16):
    try:
      reference = jax.make_mesh((data, 16 // data), shd.AXES, devices=devices)
    except NotImplementedError:  # a layout that does not factor the torus (off v5e): see test_every_layout_builds
      continue
    assert [d.id for d in shd.make_mesh(data, -1, devices=devices).devices.flat] == \
        [d.id for d in reference.devices.flat], data


@pytest.mark.parametrize("topology,chips_per_slice", [("v5e:2x2", 4), ("v5e:4x4", 16)])
def test_multislice_keeps_fsdp_within_a_slice(topology, chips_per_slice):
  devices = tpu_devices(topology, num_slices=2)
  assert sorted({slice_of(d) for d in devices}) == [0, 1]
  n = 2 * chips_per_slice
  for data in [d for d in range(2, n + 1, 2) if n % d == 0]:
    mesh = shd.make_mesh(data, -1, devices=devices)
    grid = np.vectorize(slice_of)(mesh.devices)
    assert all(len(set(row)) == 1 for row in grid), (data, grid)  # each fsdp group is one slice
    assert sorted(grid[:, 0]) == [0] * (data // 2) + [1] * (data // 2)  # 'data' spans both slices evenly
    assert_rows_follow_the_sharding(mesh, 4 * n)
  default = shd.make_mesh(devices=devices)  # data -1 × fsdp 1: the sampler's and extraction's layout
  assert default.shape == {"data": n, "fsdp": 1}
  assert_rows_follow_the_sharding(default, n)


@pytest.mark.parametrize("data,fsdp", [(1, -1), (-1, 8), (3, -1)])
def test_fsdp_across_slices_is_a_user_error(data, fsdp):
  devices = tpu_devices("v5e:2x2", num_slices=2)
  with pytest.raises(shd.ShardingError) as raised:
    shd.make_mesh(data, fsdp, devices=devices)
  message = str(raised.value)
  assert message.count(";") <= 1 and "\n" not in message
  if data != 3:  # 3 does not divide the 8 devices at all: the size message
    assert "over 2 slices" in message and "mesh.data to a multiple of 2" in message
