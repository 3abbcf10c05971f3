"""A TPU pod's device order for multi-process tests on CPU: runs a module or script (as `python` would) after
teaching JAX to lay a 16-device mesh out as it lays out a TPU v5e-16 slice, processes interleaved along the ring.

  python -m tests.pod_order -m sfd_jax.cli.sample --out=... --coordinator=HOST:PORT --num_processes=4 --process_id=I
  python -m tests.pod_order tests/test_eval_sharding.py ARGS...

On a TPU, `jax.make_mesh` (through `mesh_utils.create_device_mesh`) asks the handler of the device kind for the
physical ring order; XLA:CPU has none and keeps the devices grouped by process. Registering one for 'cpu' is the
only change: the program, sfd_jax included, runs as it would on the pod, and `jax.devices()` stays grouped by
process, as it is on a TPU. The order is the one libtpu's v5e:4x4 topology description gives `sharding.make_mesh()`
(tests/test_host_rows.py checks it); a mesh of another device count is left to XLA:CPU's order.
"""
import runpy
import sys

import numpy as np
from jax._src import mesh_utils

# The devices of `sharding.make_mesh()` on a v5e-16, in mesh order: (process, rank among its devices by id).
V5E_16_RING = ((0, 0), (0, 1), (1, 0), (1, 1), (1, 3), (1, 2), (0, 3), (2, 1), (3, 0), (3, 1), (3, 3), (3, 2),
               (2, 3), (2, 2), (2, 0), (0, 2))
NOTE = "pod_order: a 16-device mesh in v5e-16 ring order, processes"


def ring_order(devices) -> list:
  """`devices` (4 processes × 4) in the order of `V5E_16_RING`."""
  by_process = {}
  for device in sorted(devices, key=lambda d: d.id):
    by_process.setdefault(device.process_index, []).append(device)
  return [by_process[process][rank] for process, rank in V5E_16_RING]


def create_device_mesh(mesh_shape, devices, **_):
  """The 'cpu' handler of `mesh_utils.create_device_mesh`: None (XLA:CPU's own order) but for 16 devices."""
  if len(devices) != len(V5E_16_RING):
    return None
  ordered = ring_order(devices)
  mesh = np.empty(len(ordered), dtype=object)
  mesh[:] = ordered
  print(NOTE, *(d.process_index for d in ordered), file=sys.stderr, flush=True)
  return mesh.reshape(mesh_shape)


def main(argv):
  mesh_utils.device_kind_handler_dict["cpu"] = create_device_mesh
  if argv[0] == "-m":
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
  else:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
  main(sys.argv[1:])
