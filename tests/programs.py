"""What a program holds, read where the platform would read it: the matmuls of its jaxpr (with their precision) and
the Pallas kernels of the executable libtpu compiles for a TPU topology description (no TPU needed)."""
import functools
import os

from jax.experimental import topologies
from jax.extend import core as jex

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu


@functools.cache
def tpu_slice(topology: str = "v5e:2x2") -> tuple:
  """The devices of a TPU slice as libtpu describes them (process, coordinates, kind)."""
  return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def tpu_kernel_calls(compiled) -> int:
  """How many Pallas (Mosaic) kernels a libtpu-compiled executable calls."""
  return compiled.as_text().count("tpu_custom_call")


def matmuls(jaxpr, in_kernel=False):
  """(primitive, operand dtype, precision, inside a Pallas kernel) of every dot_general and convolution in a jaxpr
  and the jaxprs inside it (scan and remat bodies, custom-gradient calls, Pallas kernels)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn.primitive.name, eqn.invars[0].aval.dtype, eqn.params["precision"], in_kernel
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jex.ClosedJaxpr, jex.Jaxpr)):
          yield from matmuls(getattr(sub, "jaxpr", sub), in_kernel or eqn.primitive.name == "pallas_call")
