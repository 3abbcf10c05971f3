"""TPU slices by name: Cloud TPU accelerator names as JAX topology strings, and their devices from libtpu's
topology description (no TPU needed)."""
from __future__ import annotations

import importlib.util
import os
import re

import jax

from sfd_jax.errors import UserError

# Cloud TPU accelerator names: v5e/v6e count chips, v4/v5p count TensorCores (two per chip). Slice shapes of the
# standard sizes; any other shape is given as a JAX topology string (e.g. v5p:4x4x12).
_GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5", 2), "v5e": ("v5e", 1), "v5litepod": ("v5e", 1), "v6e": ("v6e", 1)}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TOPOLOGY_STRING = re.compile(r"^(v4|v5|v5p|v5e|v6e):(\d+(x\d+){1,2})$")


def topology_string(name: str) -> str:
  """A JAX topology string for a Cloud TPU accelerator name: 'v5e-64' and 'v5litepod-64' → 'v5e:8x8', 'v4-64' →
  'v4:2x4x4' (32 chips), 'v5p-128' → 'v5:4x4x4' (64 chips); a topology string ('v5e:4x8') passes through."""
  name = name.strip().lower()
  match = _TOPOLOGY_STRING.match(name)
  if match:
    return name.replace("v5p:", "v5:")
  generation, _, count = name.partition("-")
  if generation not in _GENERATIONS or not count.isdigit():
    raise UserError(f"--topology={name!r} is neither a Cloud TPU accelerator name (v4-64, v5e-64 or v5litepod-64, "
                    "v5p-128, v6e-64) nor a JAX topology string (v5e:8x8, v5p:4x4x12)")
  prefix, cores_per_chip = _GENERATIONS[generation]
  chips, rest = divmod(int(count), cores_per_chip)
  shapes = _SHAPES_3D if prefix in ("v4", "v5") else _SHAPES_2D
  if rest or chips not in shapes:
    raise UserError(f"--topology={name!r}: no standard {generation} slice has {count} "
                    f"{'TensorCores' if cores_per_chip == 2 else 'chips'}; sizes: "
                    f"{', '.join(f'{generation}-{n * cores_per_chip}' for n in sorted(shapes))}, or give the shape "
                    f"as a topology string ({prefix}:AxB{'xC' if shapes is _SHAPES_3D else ''})")
  return f"{prefix}:{shapes[chips]}"


def tpu_devices(name: str, num_slices: int = 1) -> list:
  """The devices of a TPU slice (`num_slices` of them over DCN) from libtpu's topology description, on any host."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError("planning for a TPU topology needs libtpu: pip install 'jax[tpu]==0.10.2' (no TPU needed)")
  topology = topology_string(name)
  # A topology description drives no chip: several planners (and a TPU job's own libtpu) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}  # one device per v4 chip
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices,
                                             **kwargs).devices)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"libtpu cannot describe topology {topology!r} ({num_slices} slice(s)): "
                    f"{str(e).splitlines()[0]}") from None


def slice_count(devices) -> int:
  """How many slices (joined over the data-center network) `devices` span."""
  return len({getattr(d, "slice_index", 0) for d in devices})
