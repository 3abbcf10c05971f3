"""Meshes, sharding rules and multi-host batches: the ground floor that training, data, sampling and eval share.

Every mesh has the axes ('data', 'fsdp') with `AxisType.Auto`. Batches are split over both axes (all devices);
parameters are sharded over 'fsdp' by regex rules (see `param_shardings`). The same code runs on one CPU, eight
fake CPU devices, a GPU, and a TPU pod.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence

import flax
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sfd_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # a batch is split over every device


class ShardingError(UserError):
  """A mesh or batch layout that cannot work on the devices present."""


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; one of the two sizes may be -1 (fill with what is left).

  Devices are laid out as `jax.experimental.mesh_utils` maps logical axes onto the TPU torus. Over several slices
  (multislice: devices with different `slice_index`), 'data' spans the slices over the data-center network and
  'fsdp' stays within each slice, where its parameter gathers run over ICI.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ShardingError("mesh: at most one of data and fsdp may be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known <= 0 or n % known:
      raise ShardingError(f"mesh: {n} devices cannot be split into groups of {known}; "
                          f"set mesh.data and mesh.fsdp so that data × fsdp = {n}")
    data, fsdp = (n // known, known) if data == -1 else (known, n // known)
  if data * fsdp != n or data <= 0 or fsdp <= 0:
    raise ShardingError(f"mesh: data {data} × fsdp {fsdp} = {data * fsdp} does not match the {n} devices "
                        f"present; set mesh.data and mesh.fsdp so that their product is {n} (or one of them to -1)")
  return Mesh(_device_grid(data, fsdp, devices), AXES, axis_types=(AxisType.Auto,) * 2)


def _device_grid(data: int, fsdp: int, devices: list) -> np.ndarray:
  """The (data, fsdp) array of devices: one slice's torus, or the slices stacked along 'data'.

  Where the sizes do not factor the torus (data 2 × fsdp 8 on a 4×4 v6e slice), physical axes are split rather than
  refused (`jax.make_mesh` refuses them except on v5e): the mesh builds, its collectives may run on partial rings.
  """
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    build = lambda split: mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=split)
  elif data % slices:
    raise ShardingError(f"mesh: data {data} × fsdp {fsdp} over {slices} slices of {len(devices) // slices} devices "
                        f"would stretch fsdp across slices; set mesh.data to a multiple of {slices} "
                        f"(e.g. mesh.data={slices} mesh.fsdp=-1) so that fsdp stays within a slice")
  else:
    build = lambda split: mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices,
                                                              allow_split_physical_axes=split)
  try:
    return build(False)
  except NotImplementedError:  # mesh_utils' way of saying the logical axes do not factor the torus
    logging.warning("mesh data %d × fsdp %d splits physical axes of the torus of %d %s devices%s (sizes that are "
                    "products of its sides keep each axis on whole rings)", data, fsdp, len(devices) // slices,
                    devices[0].device_kind, " per slice" if slices > 1 else "")
    return build(True)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis split over every device, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_devices(mesh) -> int:
  """How many ways a batch is split: the product of the BATCH_AXES sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def traced_with_mesh(mesh: Mesh, fn):
  """fn, traced with `mesh` in context (`jax.sharding.use_abstract_mesh`): what `constrain_batch` and the TPU
  attention kernel (`models.layers.attention`) read. Wrap a step with it before jitting it for `mesh`."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def constrain_batch(x):
  """x with its leading (batch) axis split over every device of the mesh in context (`traced_with_mesh`), as the
  step's batch is.

  Called on the activations a scanned layer carries, so that XLA keeps the batch split inside the loop instead of
  re-laying the activations out to suit the (FSDP-sharded) weights. Without a mesh in context, on one device, or
  for a batch the devices do not divide (one sample of the sampler's vmap), x is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if (mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or batch_devices(mesh) == 1
      or x.shape[0] % batch_devices(mesh)):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def fsdp_size() -> int:
  """How many ways the mesh in context (`traced_with_mesh`) shards parameters over 'fsdp': 1 without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or "fsdp" not in mesh.axis_names else mesh.shape["fsdp"]


def gather(x):
  """x replicated over every device of the mesh in context: an all-gather of what FSDP shards."""
  return jax.lax.with_sharding_constraint(x, P())


def check_batch_size(mesh: Mesh, global_batch: int, what: str = "batch_size") -> int:
  """How many rows of a global batch this process feeds (`host_rows`); a global batch that the mesh cannot split
  evenly stops with what to change."""
  n = mesh.devices.size
  if global_batch % n:
    raise ShardingError(f"{what} {global_batch} is not divisible by the {n} devices of the mesh; "
                        f"use a multiple of {n}")
  return len(host_rows(mesh, global_batch))


def shard_batch(mesh: Mesh, local_batch):
  """Per-process numpy arrays (this process's rows, `host_rows`) → global jax arrays split over the batch axes."""
  own_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] // own_devices * mesh.devices.size, *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
  return jax.tree.map(put, local_batch)


def to_host(tree):
  """Global jax arrays → full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def host_rows(mesh: Mesh, global_batch: int, process_index: int | None = None) -> np.ndarray:
  """The global rows that process `process_index` (default: this one) feeds to `shard_batch`, in the order it
  places them.

  `jax.make_array_from_process_local_data` lays a process's rows onto the row blocks of its own devices, in
  increasing order. A TPU mesh orders devices by the physical ring, which interleaves processes, so a process's
  rows are in general not one contiguous range; they are read off the batch sharding, which needs no backend
  (libtpu topology descriptions, several slices).
  """
  if global_batch % mesh.devices.size:
    raise ShardingError(f"a batch of {global_batch} rows cannot be split evenly over the {mesh.devices.size} devices "
                        "of the mesh")
  process_index = jax.process_index() if process_index is None else process_index
  placement = batch_sharding(mesh).devices_indices_map((global_batch,))
  blocks = sorted({index[0].indices(global_batch)[:2] for device, index in placement.items()
                   if device.process_index == process_index})
  return np.concatenate([np.arange(start, stop) for start, stop in blocks] or [np.zeros(0, np.int64)])


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, Sequence]], mesh: Mesh,
             min_size: int = 2 ** 14) -> P:
  """The PartitionSpec of one parameter: the first regex rule that matches `path` wins.

  A rule's spec is a tuple with one entry per dimension (None or an axis name), `()` (replicate), or ends in
  `"fsdp_largest"`: the largest of the remaining dimensions that is divisible by the fsdp size, after the
  leading dimensions the entries before it name (`(None, "fsdp_largest")` keeps the stacked layer axis of the
  scanned DiT blocks whole). Tensors smaller than `min_size` elements are replicated.
  """
  if math.prod(shape) < min_size:
    return P()
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = tuple(spec)
      if spec == ():
        return P()
      if spec[-1] == "fsdp_largest":
        lead = spec[:-1]
        if len(lead) >= len(shape):
          raise ShardingError(f"sharding rule {pattern!r} names {len(lead)} leading axes for {path} of shape {shape}")
        _check_divisible(pattern, path, lead, shape, mesh)
        entries = (*lead, *_largest_divisible(shape[len(lead):], mesh.shape["fsdp"]))
        return P(*entries) if any(e is not None for e in entries) else P()
      if len(spec) != len(shape):
        raise ShardingError(f"sharding rule {pattern!r} gives {len(spec)} axes for {path} of shape {shape}")
      _check_divisible(pattern, path, spec, shape, mesh)
      return P(*spec)
  return P()


def _check_divisible(pattern, path, spec, shape, mesh):
  for name, dim in zip(spec, shape):
    if name is not None and dim % mesh.shape[name]:
      raise ShardingError(f"sharding rule {pattern!r}: dimension {dim} of {path} is not divisible by "
                          f"mesh axis {name!r} of size {mesh.shape[name]}")


def _largest_divisible(shape, n: int) -> tuple:
  """One entry per dimension: 'fsdp' on the largest dimension divisible by n, None elsewhere."""
  if n > 1:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % n == 0:
        return tuple("fsdp" if d == dim else None for d in range(len(shape)))
  return (None,) * len(shape)


# Vectors (biases, norm scales) replicated; every matrix sharded over 'fsdp' along its largest dimension, for the
# scanned DiT blocks (`blocks/…`, stacked on a leading layer axis) along the largest dimension but that axis.
DEFAULT_RULES = ((r"(bias|scale)$", ()), (r"^blocks/", (None, "fsdp_largest")), (".*", ("fsdp_largest",)))


def param_shardings(mesh: Mesh, params, rules=DEFAULT_RULES, min_size: int = 2 ** 14):
  """A NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs) from the regex `rules`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  specs = {k: NamedSharding(mesh, spec_for(k, tuple(v.shape), rules, mesh, min_size)) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(specs, sep="/")
