"""Plans a TPU run on any host: the real train, sampling and extraction steps compiled ahead of time for a TPU slice,
with their HBM per chip, cost-model FLOPs and bytes, collectives and roofline bounds (`python -m sfd_jax.cli.plan`).

libtpu's compiler needs no TPU: `jax.experimental.topologies.get_topology_desc` describes the devices of any slice,
and `jax.jit(step).lower(abstract arguments).compile()` builds the executable that slice would run, allocating
nothing. Its `memory_analysis()` is what the program needs on each chip; its `cost_analysis()` is XLA's cost model
of one chip's share (FLOPs, bytes of HBM traffic). That model counts the body of a while loop (a `lax.scan`:
gradient accumulation, scanned blocks, a Runge-Kutta step's stages) once, so each loop body is costed again here
from the optimised HLO (dot and convolution FLOPs and elementwise FLOPs as XLA counts them, operand and result
bytes of every instruction), scaled to XLA's units by the ratio of XLA's cost to this count over the program as
XLA costs it, and added trip count − 1 more times. Collectives and the bytes they move are read from the optimised
HLO as well.

Over several slices (multislice) libtpu compiles one slice's program and hands what crosses slices to its
data-center-network (DCN) runtime: host transfers (`send`/`recv` to `xla_megascale_runtime`) whose type
(ALL_REDUCE: the data-parallel gradient reduction) and buffer are in the HLO, read here as the DCN traffic.

The step-time bound is the roofline max(FLOPs / peak, HBM bytes / bandwidth, collective bytes received / ICI
bandwidth, bytes received over DCN / DCN bandwidth) with the chip's numbers from `sfd_jax.chips`: no step runs faster
on that chip, and a memory-bound step shows as a low MFU bound. All of it is a cost-model bound, not a measurement.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
from jax._src import config as jax_config

from sfd_jax import generate as generate_lib, sharding as shd
from sfd_jax.chips import Chip, chip_of
from sfd_jax.convert.files import SD_VAE_F16D32
from sfd_jax.data import extract as extract_lib
from sfd_jax.diffusion import sampler
from sfd_jax.errors import UserError
from sfd_jax.models import layers
from sfd_jax.models.dinov2 import dinov2
from sfd_jax.models.dit import REMAT_POLICIES
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import config as config_lib, state as state_lib, step as step_lib

# ---------------------------------------------------------------------------------------------------------- topology

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


# ------------------------------------------------------------------------------------------------- the optimised HLO

_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_ARRAY = re.compile(r"\b(pred|[su]\d+|bf16|f16|f32|f64|c64|c128|f8e\w+?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "rsqrt",
                   "sqrt", "cbrt", "sine", "cosine", "tan", "tanh", "erf", "atan2"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "abs", "negate", "compare", "select",
                "and", "or", "xor", "not", "remainder", "clamp", "sign", "floor", "ceil", "round-nearest-even",
                "round-nearest-afz", "convert", "is-finite"}


def _array_bytes(type_text: str) -> float:
  """Bytes of every array in an HLO type ('f32[8,128]{1,0}' or a tuple of them)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 1)
             for dtype, dims in _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
  match = _ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


@dataclasses.dataclass
class _Instruction:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start]."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  root, name, rest = bool(match.group(1)), match.group(2), match.group(3)
  end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
  if end <= 0:
    return None
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren <= 0:
    return None
  opcode = rest[:paren]
  close = _closing(rest, paren)
  operands = [token.split()[-1].lstrip("%") for token in _split_top(rest[paren + 1:close - 1]) if token.strip()]
  return _Instruction(name, type_text, opcode, operands, rest[close:], root)


def _split_top(text: str) -> list[str]:
  """Splits at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def parse_hlo(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """({computation: instructions}, entry computation) of an HLO module's text."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  return computations, entry


def _callees(instruction: _Instruction) -> list[tuple[str, str]]:
  """(role, computation) of every computation an instruction calls."""
  found = [(role, name) for role, name in _CALLEES.findall(instruction.attrs)]
  for role, names in _CALLEE_LISTS.findall(instruction.attrs):
    found += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
  return found


def _trip_count(computations, condition: str, body: str, init_tuple: _Instruction | None, by_name,
                limit: int = 1 << 20) -> int | None:
  """The trip count of a counted while loop (every `lax.scan` and `fori_loop`): its condition is a function of one
  integer tuple element, which starts at a constant and the body steps by a constant. The condition is evaluated
  for each value of the counter; None where the loop is not of that form."""
  cond = {i.name: i for i in computations.get(condition, [])}
  root = next((i for i in cond.values() if i.root), None)
  counters = {int(re.search(r"index=(\d+)", i.attrs).group(1)) for i in cond.values()
              if i.opcode == "get-tuple-element" and re.search(r"index=(\d+)", i.attrs)}
  if root is None or len(counters) != 1:
    return None
  (index,) = counters

  def value(name, counter):
    i = cond[name]
    if i.opcode == "get-tuple-element":
      return counter
    if i.opcode == "constant":
      return int(i.operands[0]) if i.operands[0].lstrip("-").isdigit() else {"true": 1, "false": 0}[i.operands[0]]
    args = [value(o, counter) for o in i.operands]
    if i.opcode == "compare":
      op = re.search(r"direction=(\w+)", i.attrs).group(1)
      return {"LT": args[0] < args[1], "LE": args[0] <= args[1], "GT": args[0] > args[1],
              "GE": args[0] >= args[1], "EQ": args[0] == args[1], "NE": args[0] != args[1]}[op]
    return {"add": lambda: args[0] + args[1], "subtract": lambda: args[0] - args[1], "and": lambda: all(args),
            "or": lambda: any(args), "not": lambda: not args[0], "copy": lambda: args[0]}[i.opcode]()

  def constant_of(instruction):
    while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
      instruction = by_name.get(instruction.operands[0])
    if instruction is not None and instruction.opcode == "constant" and instruction.operands[0].lstrip("-").isdigit():
      return int(instruction.operands[0])
    return None

  body_items = {i.name: i for i in computations.get(body, [])}
  body_root = next((i for i in body_items.values() if i.root), None)
  step = 1
  if body_root is not None and body_root.opcode == "tuple" and index < len(body_root.operands):
    update = body_items.get(body_root.operands[index])
    if update is not None and update.opcode == "add":
      step = next((c for c in (constant_of(body_items.get(o)) for o in update.operands) if c is not None), 1)
  start = 0
  if init_tuple is not None and init_tuple.opcode == "tuple" and index < len(init_tuple.operands):
    start = constant_of(by_name.get(init_tuple.operands[index])) or 0
  try:
    trips, counter = 0, start
    while value(root.name, counter) and trips < limit:
      trips, counter = trips + 1, counter + step
  except (KeyError, AttributeError, IndexError, ValueError):
    return None
  return trips if trips < limit and step > 0 else None


@dataclasses.dataclass
class HloCosts:
  """What the optimised HLO of one chip's program shows."""
  loop_trip_counts: list[int]                 # per while loop (None where not a scan-style counter)
  flops_loop_extra: float                      # FLOPs of loop bodies beyond their first iteration
  bytes_loop_extra: float                      # and their bytes of traffic
  flops_estimate: float                        # this module's own count of the whole program (for checking)
  bytes_estimate: float
  collectives: dict                            # kind -> {'count', 'bytes', 'received_bytes'} per step
  dcn: dict                                    # transfer type -> {'count', 'bytes', 'received_bytes'} per step


def analyse_hlo(text: str, slices: int = 1) -> HloCosts:
  """Loop trip counts, the cost of the iterations XLA's cost model leaves out, and the collectives (over ICI) and
  data-center-network transfers (between the `slices` slices) of an optimised HLO module."""
  computations, entry = parse_hlo(text)
  by_name = {i.name: i for body in computations.values() for i in body}
  callers: dict[str, list[tuple[str, int, bool]]] = {name: [] for name in computations}  # (caller, trips, fused)
  trips = []
  for caller, body in computations.items():
    for instruction in body:
      trip = None
      if instruction.opcode == "while":
        roles = dict(_callees(instruction))
        init = by_name.get(instruction.operands[0]) if instruction.operands else None
        trip = _trip_count(computations, roles.get("condition"), roles.get("body"), init, by_name)
        trips.append(trip)
      for role, callee in _callees(instruction):
        if callee not in computations:
          continue
        factor = trip if (trip is not None and role in ("body", "condition")) else 1
        inlined = (role == "calls" and instruction.opcode == "fusion") or role == "to_apply"  # no HBM of its own
        callers[callee].append((caller, factor, inlined))

  multiplicity, multiplicity_once = {}, {}

  def count(name, real: bool, memo) -> float:
    """Executions of computation `name` per run of the program (with every loop taken once unless `real`)."""
    if name in memo:
      return memo[name]
    memo[name] = 0.0  # cycle guard
    total = 1.0 if name == entry else 0.0
    for caller, factor, _ in callers[name]:
      total += count(caller, real, memo) * (factor if real else 1)
    memo[name] = total
    return total

  for name in computations:
    count(name, True, multiplicity)
    count(name, False, multiplicity_once)

  fused_computations = {name for name, edges in callers.items() if edges and all(e[2] for e in edges)}
  flops_extra = bytes_extra = flops_total = bytes_total = 0.0
  collectives: dict[str, dict] = {}
  transfers: dict[tuple[str, str], dict] = {}  # one DCN collective: a send and a recv of one rendezvous
  seen_channels = set()
  for name, body in computations.items():
    real, once = multiplicity[name], multiplicity_once[name]
    if real == 0:
      continue
    local = {i.name: i for i in body}
    flops = sum(_flops(i, local, by_name, computations) for i in body)
    traffic = 0.0 if name in fused_computations else sum(_traffic(i, local, by_name, computations) for i in body)
    flops_total += real * flops
    bytes_total += real * traffic
    flops_extra += (real - once) * flops
    bytes_extra += (real - once) * traffic
    for i in body:
      kind = i.opcode.removesuffix("-start")
      if kind in ("send", "recv") and "xla_megascale_runtime" in i.attrs:
        transfer = transfers.setdefault((name, _attribute(i.attrs, "_xla_host_transfer_rendezvous")), {
            "type": _attribute(i.attrs, "_xla_megascale_transfer_type"), "times": real, "bytes": 0.0})
        transfer["bytes"] = max(transfer["bytes"], _first_array_bytes(i.type))
        continue
      if kind not in COLLECTIVES:
        continue
      channel = re.search(r"channel_id=(\d+)", i.attrs)
      key = channel.group(1) if channel else f"{name}/{i.name}"
      if key in seen_channels:  # one async collective is spread over start / update / done computations
        continue
      seen_channels.add(key)
      size = max([_array_bytes(i.type)] + [_array_bytes(by_name[o].type) for o in i.operands if o in by_name])
      n = _group_size(i.attrs)
      share = (n - 1) / n if n else 1.0
      received = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share) * size
      entry_ = collectives.setdefault(kind, {"count": 0, "bytes": 0.0, "received_bytes": 0.0})
      entry_["count"] += real
      entry_["bytes"] += real * size
      entry_["received_bytes"] += real * received
  dcn: dict[str, dict] = {}
  for transfer in transfers.values():
    entry_ = dcn.setdefault(transfer["type"], {"count": 0, "bytes": 0.0, "received_bytes": 0.0})
    entry_["count"] += transfer["times"]
    entry_["bytes"] += transfer["times"] * transfer["bytes"]
    entry_["received_bytes"] += transfer["times"] * transfer["bytes"] * _dcn_share(transfer["type"], slices)
  return HloCosts(trips, flops_extra, bytes_extra, flops_total, bytes_total, collectives, dcn)


def _attribute(attrs: str, key: str) -> str:
  match = re.search(rf'{key}="([^"]*)"', attrs)
  return match.group(1) if match else "?"


def _first_array_bytes(type_text: str) -> float:
  """Bytes of the first array of an HLO type: the buffer of a (buffer, u32[], token[]) send or recv."""
  match = _ARRAY.search(type_text)
  return _array_bytes(match.group(0)) if match else 0.0


def _dcn_share(transfer_type: str, slices: int) -> float:
  """Bytes each chip receives over DCN per byte of its buffer in one transfer between `slices` slices, by the rule
  used for ICI (a ring over the slices: an all-reduce receives 2 (s - 1) / s of it, a gather, scatter or all-to-all
  (s - 1) / s, a permutation all of it)."""
  share = (slices - 1) / slices if slices > 1 else 1.0
  return {"ALL_REDUCE": 2 * share, "ALL_GATHER": share, "REDUCE_SCATTER": share, "ALL_TO_ALL": share}.get(
      transfer_type, 1.0)


def _group_size(attrs: str) -> int | None:
  """Devices per replica group: explicit `{{0,1},{2,3}}`, iota `[4,2]<=[8]`, or mesh `mesh['x'=2,'y'=4] {'y'}`."""
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if explicit:
    return len([d for d in explicit.group(1).split(",") if d])
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if iota:
    return int(iota.group(1).split(",")[-1])
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if mesh:
    sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[^']*')=(\d+)", mesh.group(1)))
    axes = [a.strip().strip("'") for a in mesh.group(2).split(",") if a.strip()]
    return math.prod(sizes.get(a, 1) for a in axes)
  return None


def _operand_type(name: str, local, by_name) -> str:
  instruction = local.get(name) or by_name.get(name)
  return instruction.type if instruction is not None else ""


def _flops(i: _Instruction, local, by_name, computations) -> float:
  """XLA's counting: 2 per multiply-add of a dot or convolution, 1 per element of other arithmetic."""
  out = math.prod(_dims(i.type)) if _ARRAY.search(i.type) else 0
  if i.opcode == "dot":
    lhs = _dims(_operand_type(i.operands[0], local, by_name))
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * out * k
  if i.opcode == "convolution":
    return _convolution_flops(i, out, local, by_name)
  if i.opcode in _ELEMENTWISE:
    return float(out)
  if i.opcode in ("reduce", "reduce-window"):
    return float(sum(math.prod(_dims(_operand_type(o, local, by_name)) or [0]) for o in i.operands[:1]))
  return 0.0


def _convolution_flops(i: _Instruction, out: int, local, by_name) -> float:
  """2 × outputs × input features × the window taps that land on input elements (not on padding or dilation holes):
  TPU HLO writes every dot as a convolution, its batch and head dimensions as padded or dilated windows."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attrs)
  lhs = _dims(_operand_type(i.operands[0], local, by_name))
  kernel = _dims(_operand_type(i.operands[1], local, by_name))
  if not labels or not kernel or "i" not in labels.group(2):
    return 0.0
  lhs_labels, out_labels, out_dims = labels.group(1), labels.group(3), _dims(i.type)
  window = re.search(r"window=\{([^}]*)\}", i.attrs)
  fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  per_dim = lambda key, default: [int(v) for v in fields[key].split("x")] if key in fields else [default] * len(spatial)
  sizes, strides = per_dim("size", 1), per_dim("stride", 1)
  lhs_dilation, rhs_dilation = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * len(spatial)
  taps = 1.0
  for d, name in enumerate(spatial):
    length = (lhs[lhs_labels.index(name)] - 1) * lhs_dilation[d] + 1
    outputs = out_dims[out_labels.index(name)]
    valid = sum(1 for o in range(outputs) for k in range(sizes[d])
                if 0 <= (p := o * strides[d] + k * rhs_dilation[d] - pads[d]) < length and p % lhs_dilation[d] == 0)
    taps *= valid / max(outputs, 1)
  return 2.0 * out * kernel[labels.group(2).index("i")] * taps


def _fused_read(fused: list[_Instruction], index: int, size: float, computations) -> float:
  """Bytes a fusion reads of its operand `index` (of `size` bytes): only the slices where every use slices it (also
  inside a nested fusion, as TPU fusions take a scan's stacked buffers), nothing where it is only updated in place,
  all of it otherwise."""
  param = next((p for p in fused if p.opcode == "parameter" and p.operands == [str(index)]), None)
  uses = [f for f in fused if param is not None and param.name in f.operands]
  if not uses:
    return size
  if all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in uses):
    return 0.0  # updated in place: only the update is written (counted as the fusion's output)
  read = 0.0
  for u in uses:
    if u.opcode in ("dynamic-slice", "slice"):
      read += _array_bytes(u.type)
    elif u.opcode == "fusion" and u.operands.count(param.name) == 1:
      read += _fused_read(computations.get(dict(_callees(u)).get("calls"), []), u.operands.index(param.name), size,
                          computations)
    else:
      return size
  return min(read, size)


def _traffic(i: _Instruction, local, by_name, computations) -> float:
  """HBM bytes of one top-level instruction: its operands read and its result written, where an in-place update
  (dynamic-update-slice) writes only the update and a sliced read reads only the slice."""
  if i.opcode in _NO_TRAFFIC or i.opcode.endswith("-done"):
    return 0.0
  operand_bytes = [_array_bytes(_operand_type(o, local, by_name)) for o in i.operands]
  if i.opcode == "dynamic-update-slice":
    return 2.0 * (operand_bytes[1] if len(operand_bytes) > 1 else 0.0)
  if i.opcode in ("dynamic-slice", "slice"):
    return 2.0 * _array_bytes(i.type)
  if i.opcode != "fusion":
    return sum(operand_bytes) + _array_bytes(i.type)
  fused = computations.get(dict(_callees(i)).get("calls"), [])
  read = sum(_fused_read(fused, index, size, computations) for index, size in enumerate(operand_bytes))
  root = next((f for f in fused if f.root), None)
  names = {f.name: f for f in fused}
  outputs = [names.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
  written = 0.0
  for out in outputs:
    if out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
      written += _array_bytes(_operand_type(out.operands[1], names, by_name))
    elif out is not None:
      written += _array_bytes(out.type)
  return read + written


# ---------------------------------------------------------------------------------------------------- the programs

@dataclasses.dataclass
class Program:
  """One program to compile: a jitted function, its abstract (sharded) arguments, and what one call does."""
  name: str
  fn: Callable                               # jitted: shardings and donation as the real code sets them
  args: tuple
  images_per_step: int                       # images the whole slice processes per call
  model_flops: float                         # model FLOPs of one call over the whole slice
  full_run_steps: float | None = None        # calls of a full run (a recipe, a 50K-image evaluation)
  full_run: str = ""                         # what that full run is
  note: str = ""


def abstract_batch(cfg, mesh) -> dict:
  """The train step's batch as the data pipeline delivers it: float32 latents, int32 labels, float32 DINO tokens."""
  m, b = cfg.model, cfg.batch_size
  grid = m.input_size // m.patch_size
  batch = {"x": ((b, m.input_size, m.input_size, m.in_channels), jnp.float32), "y": ((b,), jnp.int32)}
  if m.use_repa:
    batch["dino"] = ((b, grid * grid, m.repa_z_dim), jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in batch.items()}


def train_program(cfg, mesh) -> Program:
  """The train step of `cfg` exactly as the trainer builds it, with the abstract sharded state and batch."""
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  abstract, shardings = state_lib.abstract_train_state(model, tx, mesh, cfg.sharding)
  step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  flops = 3.0 * model.forward_flops(with_repa=cfg.model.use_repa) * cfg.batch_size
  return Program("train_step", step, (abstract, abstract_batch(cfg, mesh)), cfg.batch_size, flops,
                 cfg.total_steps, f"{cfg.total_steps:,} steps × {cfg.batch_size} images")


def _replicated(tree, mesh):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd.replicated(mesh)), tree)


def sample_programs(cfg, mesh, batch: int, guidance: str = "cfg", guide_preset: str = "B",
                    num_images: int = 50_000) -> list[Program]:
  """One Dopri5 step and one Euler step of the guided three-phase field on a batch split over every device, with
  the EMA params replicated: the program `sfd_jax.generate` runs (its velocity, `generate.guided_velocity`, traced
  with the mesh in context, so that the platform's attention kernel runs on each device's samples; Dopri5 solves
  each sample on its own, vmapped over the devices)."""
  model = config_lib.build_model(cfg.model).clone(remat_policy="none")
  init = lambda m: _replicated(jax.eval_shape(lambda k: m.init(k, *m.dummy_inputs()), jax.random.key(0)), mesh)
  params, guide_model, guide_params = init(model), None, None
  if guidance == "autoguidance":
    guide_model = config_lib.build_model(config_lib.model_config(
        guide_preset, dtype=cfg.model.dtype, attention=cfg.model.attention,
        matmul_precision=cfg.model.matmul_precision))
    guide_params = init(guide_model)
  delta, c_sem = cfg.loss.delta_t, cfg.loss.semantic_channels
  scale = cfg.sample.cfg_scale if cfg.sample.cfg_scale > 1 else 1.5
  interval = cfg.sample.cfg_interval_start

  def field(variables, guide_variables, y):
    """dx/dτ in the middle phase (both streams move), where a solve takes most of its steps."""
    velocity = generate_lib.guided_velocity(model, variables, guide_model, guide_variables,
                                            1.0 if guidance == "none" else scale, scale, scale, interval, "both",
                                            c_sem)
    mask = sampler.channel_mask(True, True, model.in_channels, c_sem)

    def f(tau, x, args):
      t_tex, t_sem = sampler.model_times(jnp.full((x.shape[0],), tau, jnp.float32), delta)
      return mask * velocity(x, t_tex, t_sem, y)
    return f

  def dopri5_step(variables, guide_variables, x, y, tau, f0):
    """One step of each sample's solve: the field at the step's start comes from the last one (first-same-as-last)."""
    def one(x, y, f0):
      term = diffrax.ODETerm(field(variables, guide_variables, y[None]))
      x1, error, _, (_, f1), _ = diffrax.Dopri5().step(term, tau, tau + 0.01, x[None], None,
                                                       (jnp.array(False), f0[None]), made_jump=False)
      return x1[0], error[0], f1[0]
    return jax.vmap(one, spmd_axis_name=shd.BATCH_AXES)(x, y, f0)

  def euler_step(variables, guide_variables, x, y, tau, f0):
    del f0
    return x + 0.004 * field(variables, guide_variables, y)(tau, x, None)

  dopri5_step, euler_step = (jax.jit(shd.traced_with_mesh(mesh, step)) for step in (dopri5_step, euler_step))
  latent = jax.ShapeDtypeStruct((batch, model.input_size, model.input_size, model.in_channels), jnp.float32,
                                sharding=shd.batch_sharding(mesh, 4))
  args = (params, guide_params, latent, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding(mesh)),
          jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh)), latent)
  per_image = model.forward_flops(with_repa=False)
  if guidance == "cfg":
    per_image *= 2
  elif guidance == "autoguidance":
    per_image += guide_model.forward_flops(with_repa=False)
  what = {"cfg": f"CFG scale {scale} (the batch doubled)", "autoguidance": f"AutoGuidance by {guide_preset}",
          "none": "no guidance"}[guidance]
  euler_steps = cfg.sample.num_steps - 1
  return [
      Program("sample_step", dopri5_step, args, batch, 6 * per_image * batch, None, "",
              f"one Dopri5 step of a solve (6 field evaluations), {what}, {batch} images"),
      Program("sample_step_euler", euler_step, args, batch, per_image * batch, euler_steps * num_images / batch,
              f"{num_images:,} images × {euler_steps} Euler steps", f"one Euler step, {what}, {batch} images"),
  ]


def extract_program(mesh, batch: int, dtype: str = "float32", resolution: int = 256,
                    num_images: int = 1_281_167) -> Program:
  """The extraction step (`data.extract.encode_images`: texture VAE, DINOv2-B/14 with registers and SemVAE encoders
  on an image and its mirror image) on a batch split over every device, weights replicated."""
  texture_kwargs = {k: v for k, v in SD_VAE_F16D32.items() if k != "dropout"}
  texture_kwargs["ch_mult"] = tuple(texture_kwargs["ch_mult"])
  texture_kwargs["attn_resolutions"] = tuple(texture_kwargs["attn_resolutions"])
  compute = jnp.dtype(dtype)
  texture = AutoencoderKL(**texture_kwargs, embed_dim=32, dtype=compute)
  dino = dinov2("B", dtype=compute)
  grid = resolution // 16
  semvae = SemVAE(feature_dim=dino.hidden_size, grid_size=grid, dtype=compute)
  variables = {kind: _replicated(jax.eval_shape(lambda k, m=m: m.init(k, *m.dummy_inputs()), jax.random.key(0)),
                                 mesh)
               for kind, m in (("texture", texture), ("dino", dino), ("semvae", semvae))}
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8, sharding=shd.batch_sharding(mesh, 4))
  indices = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding(mesh, 1))
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
  fn = jax.jit(lambda v, x, i, s: extract_lib.encode_images(
      v, x, i, s, texture=texture, dino=dino, semvae=semvae, texture_mode="sample", semantic_mode="sample",
      dino_dtype=jnp.dtype(jnp.float16)))
  return Program("extract_step", fn, (variables, images, indices, seed), batch, 0.0, num_images / batch,
                 f"{num_images:,} images (ImageNet train)", f"texture VAE + DINOv2-B/14 + SemVAE encoders at "
                 f"{resolution} px, image and mirror image, {dtype}")


# --------------------------------------------------------------------------------------------------- the analysis

def _bytes_of(value: str, unit: str) -> float:
  return float(value) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit]


def executable(program: Program):
  """`program` compiled for the devices its arguments are sharded over, not into XLA's persistent cache: an
  executable built for a topology description cannot be loaded back without a TPU client (--search keeps its own
  results instead)."""
  with jax_config.enable_compilation_cache(False), jax_config.persistent_cache_min_compile_time_secs(1e12):
    return program.fn.lower(*program.args).compile()


def compile_program(program: Program, chip: Chip, chips: int, headroom: float = 0.1) -> dict:
  """Compiles `program` for the devices its arguments are sharded over and returns its plan (see module doc)."""
  usable = chip.hbm_bytes * (1.0 - headroom)
  start = time.perf_counter()
  try:
    compiled = executable(program)
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
      raise
    needed = (re.search(r"required[^(]*\(([\d.]+)([KMGT]?)", message)  # libtpu's two phrasings
              or re.search(r"Used ([\d.]+)([KMGT]?) of", message))
    return {"fits": False, "compiled": False, "compile_s": time.perf_counter() - start,
            "hbm_per_chip_bytes": _bytes_of(*needed.groups()) if needed else None, "hbm_capacity_bytes": chip.hbm_bytes,
            "hbm_usable_bytes": usable, "error": message.strip().splitlines()[0][:500], "note": program.note}
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = analyse_hlo(compiled.as_text(), _slices(program))
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
  xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  # The loops' other iterations in XLA's units: this module's count of them, scaled by XLA's cost over this
  # module's count of the program as XLA costs it (every loop once). FLOPs agree to within 1-2%; bytes are
  # counted differently (XLA's TPU model knows which buffers stay in on-chip memory), hence the scale.
  flops_scale = xla_flops / max(hlo.flops_estimate - hlo.flops_loop_extra, 1.0)
  bytes_scale = xla_bytes / max(hlo.bytes_estimate - hlo.bytes_loop_extra, 1.0)
  flops = xla_flops + flops_scale * hlo.flops_loop_extra
  traffic = xla_bytes + bytes_scale * hlo.bytes_loop_extra
  received = sum(c["received_bytes"] for c in hlo.collectives.values())
  dcn_received = sum(c["received_bytes"] for c in hlo.dcn.values())
  model_flops = program.model_flops / chips if program.model_flops else flops
  times = {"compute": flops / chip.peak_bf16_flops, "hbm": traffic / chip.hbm_bandwidth,
           "ici": received / (chip.ici_bandwidth / 2) if chip.ici_bandwidth else 0.0,
           "dcn": dcn_received / chip.dcn_bandwidth if dcn_received else 0.0}
  bound = max(times.values())
  plan = {
      "fits": peak <= usable, "compiled": True, "compile_s": compile_s,
      "hbm_per_chip_bytes": peak, "hbm_capacity_bytes": chip.hbm_bytes, "hbm_usable_bytes": usable,
      "hbm": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
              "aliases": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
              "code": memory.generated_code_size_in_bytes},
      "flops_per_chip": flops, "model_flops_per_chip": model_flops, "hbm_traffic_bytes_per_chip": traffic,
      "xla_cost_analysis": {"flops": xla_flops, "bytes_accessed": xla_bytes},
      "loops": {"trip_counts": hlo.loop_trip_counts, "flops_added": flops - xla_flops,
                "bytes_added": traffic - xla_bytes, "flops_scale": flops_scale, "bytes_scale": bytes_scale},
      "collectives": hlo.collectives, "collective_bytes_received_per_chip": received,
      "dcn": hlo.dcn, "dcn_bytes_received_per_chip": dcn_received,
      "time_s": times, "bound_by": max(times, key=times.get), "step_time_bound_s": bound,
      "mfu_bound": model_flops / (bound * chip.peak_bf16_flops) if bound else None,
      "images_per_step_per_chip": program.images_per_step / chips,
      "images_per_s_per_chip": program.images_per_step / chips / bound if bound else None,
      "note": program.note,
  }
  if program.full_run_steps:
    plan.update(full_run=program.full_run, full_run_s=program.full_run_steps * bound)
  return plan


def _slices(program: Program) -> int:
  """How many slices the devices of a program's arguments span."""
  devices = jax.tree.leaves(program.args)[0].sharding.device_set
  return len({getattr(d, "slice_index", 0) for d in devices})


def plan_summary(devices: Sequence, name: str) -> dict:
  kind = devices[0].device_kind
  chip = chip_of(kind)
  if chip is None:
    raise UserError(f"no peak FLOP/s, HBM bandwidth or capacity is known for device kind {kind!r}; plan for a TPU "
                    "topology with --topology (e.g. v5e-64)")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1 and chip.dcn_bandwidth is None:
    raise UserError(f"no per-chip data-center-network bandwidth is published for {kind}, so a step over {slices} "
                    "slices cannot be bounded; plan one slice (--num_slices=1)")
  return {"topology": name, "chips": len(devices), "slices": slices, "device_kind": kind,
          "chip": dataclasses.asdict(chip), "jax": jax.__version__, "libtpu": _libtpu_version()}


def _libtpu_version() -> str | None:
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # not installed: planning for the attached devices only
    return None


def plan(cfg, devices: Sequence, topology: str, *, programs: Sequence[str] = ("train_step", "sample_step",
         "extract_step"), sample_batch: int = 0, guidance: str = "cfg", extract_batch_per_chip: int = 8,
         extract_dtype: str = "float32", headroom: float = 0.1, log: Callable[[str], None] = lambda s: None) -> dict:
  """Compiles the chosen programs of `cfg` for `devices` and returns the whole plan (the JSON of cli.plan)."""
  result = plan_summary(devices, topology)
  chip, chips = chip_of(result["device_kind"]), result["chips"]
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
  layers.attention_kernel(cfg.model.attention, devices[0])  # a kernel the chips lack is a user error
  sample_batch = sample_batch or -(-cfg.sample.num_images // chips) * chips
  shd.check_batch_size(mesh, cfg.batch_size)
  result.update(mesh={"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]}, batch_size=cfg.batch_size,
                model=dict(cfg.model), remat_policy=cfg.model.remat_policy, dtype=cfg.model.dtype,
                grad_accum_steps=cfg.optim.grad_accum_steps, sample_batch=sample_batch,
                state_bytes=state_bytes(cfg, mesh)[0], state_bytes_per_chip=state_bytes(cfg, mesh)[1])
  todo = []
  if "train_step" in programs:
    todo.append(train_program(cfg, mesh))
  if "sample_step" in programs:
    data_mesh = shd.make_mesh(devices=devices)
    shd.check_batch_size(data_mesh, sample_batch, "--sample_batch")
    todo += sample_programs(cfg, data_mesh, sample_batch, guidance)
  if "extract_step" in programs:
    todo.append(extract_program(shd.make_mesh(devices=devices), extract_batch_per_chip * chips, extract_dtype))
  for program in todo:
    log(f"compiling {program.name} for {chips} × {result['device_kind']} ...")
    result[program.name] = compile_program(program, chip, chips, headroom)
    log(format_program(program.name, result[program.name]))
  return result


def state_bytes(cfg, mesh) -> tuple[float, float]:
  """(whole, one chip's shard) bytes of the train state (params, EMA, AdamW moments, step, rng), from its shardings."""
  model = config_lib.build_model(cfg.model)
  abstract, _ = state_lib.abstract_train_state(model, state_lib.make_optimizer(cfg.optim), mesh, cfg.sharding)
  leaves = jax.tree.leaves(abstract)
  return (float(sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)),
          float(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)))


# ------------------------------------------------------------------------------------------------------- the search

def search_candidates(cfg, chips: int, fsdp: Sequence[int] | None = None, remat: Sequence[str] | None = None,
                      accum: Sequence[int] | None = None, slices: int = 1) -> list[tuple[int, str, int]]:
  """(fsdp, remat policy, grad-accumulation steps) that can split the config's global batch over `chips` (in
  `slices` slices: by default fsdp within a slice)."""
  per_slice = chips // slices
  fsdp = fsdp or [2 ** k for k in range(int(math.log2(per_slice)) + 1) if per_slice % 2 ** k == 0]
  remat = remat or list(REMAT_POLICIES)
  per_chip = cfg.batch_size // chips if cfg.batch_size % chips == 0 else 0
  accum = accum or [a for a in range(1, per_chip + 1) if per_chip % a == 0]
  return [(f, r, a) for f, r, a in itertools.product(fsdp, remat, accum)
          if chips % f == 0 and cfg.batch_size % (chips * a) == 0]


def candidate_config(cfg, chips: int, fsdp: int, remat: str, accum: int):
  """`cfg` with mesh data × fsdp over `chips`, the remat policy and the grad-accumulation steps of a candidate."""
  c = cfg.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp = chips // fsdp, fsdp
  c.model.remat_policy = remat
  c.optim.grad_accum_steps = accum
  return c


def search(cfg, devices: Sequence, topology: str, *, fsdp=None, remat=None, accum=None, headroom: float = 0.1,
           cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """Compiles the train step for every (mesh, remat policy, grad-accumulation split) that could fit and ranks
  those that fit by step-time bound.

  Skipped without compiling: a mesh whose state shard alone leaves no room, and more accumulation steps once fewer
  fit (more micro-batches never lower the bound: the same FLOPs, the weights gathered more often). Results are
  cached in `cache_dir` by config, topology and jax/libtpu version.
  """
  summary = plan_summary(devices, topology)
  chip, chips = chip_of(summary["device_kind"]), summary["chips"]
  usable = chip.hbm_bytes * (1.0 - headroom)
  cache = Path(cache_dir) if cache_dir else None
  tried, fitting = [], []
  for f, r, a in search_candidates(cfg, chips, fsdp, remat, accum, summary["slices"]):
    if any(t["fsdp"] == f and t["remat_policy"] == r and t["fits"] and t["grad_accum_steps"] < a for t in tried):
      continue
    c = candidate_config(cfg, chips, f, r, a)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
    row = {"data": chips // f, "fsdp": f, "remat_policy": r, "grad_accum_steps": a}
    state = state_bytes(c, mesh)[1]
    if state >= usable:
      tried.append({**row, "fits": False, "compiled": False, "state_bytes_per_chip": state,
                    "skipped": "the state shard alone exceeds the usable HBM"})
      log(f"skip   data {chips // f:>3} × fsdp {f:<3} {r:<32} accum {a}: state {state / 1e9:.2f} GB per chip")
      continue
    key = _cache_key(c, summary, headroom)
    path = cache / f"{key}.json" if cache else None
    if path is not None and path.exists():
      result = json.loads(path.read_text())
    else:
      result = compile_program(train_program(c, mesh), chip, chips, headroom)
      if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    entry = {**row, "state_bytes_per_chip": state, **result}
    tried.append(entry)
    log(format_candidate(entry))
    if entry["fits"]:
      fitting.append(entry)
  fitting.sort(key=lambda e: (e["step_time_bound_s"], e.get("collective_bytes_received_per_chip", 0)))
  return {**summary, "batch_size": cfg.batch_size, "model": dict(cfg.model), "headroom": headroom,
          "ranked": fitting, "tried": tried}


def _cache_key(cfg, summary: dict, headroom: float) -> str:
  """What a compiled result depends on: the config, the slice, jax and libtpu, and sfd_jax's own source."""
  source = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.rglob("*.py"))))
  text = json.dumps([cfg.to_json_best_effort(sort_keys=True), summary["topology"], summary["chips"],
                     summary["slices"], summary["device_kind"], summary["jax"], summary["libtpu"], headroom,
                     source.hexdigest()])
  return hashlib.sha256(text.encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------------- reporting

def _gb(x) -> str:
  return "?" if x is None else f"{x / 1e9:.2f} GB"


def _duration(seconds: float) -> str:
  if seconds >= 86400:
    return f"{seconds / 86400:.1f} days"
  if seconds >= 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds:.0f} s"


def format_program(name: str, p: dict) -> str:
  """A few lines per program for the terminal."""
  if not p["compiled"]:
    return (f"{name}: does NOT fit ({_gb(p['hbm_per_chip_bytes'])} needed per chip, {_gb(p['hbm_usable_bytes'])} "
            f"usable) [compile {p['compile_s']:.0f} s]\n  {p['error']}")
  h = p["hbm"]
  lines = [
      f"{name}: {p['note']}" if p.get("note") else f"{name}:",
      f"  HBM per chip {_gb(p['hbm_per_chip_bytes'])} of {_gb(p['hbm_usable_bytes'])} usable: "
      f"{'fits' if p['fits'] else 'does NOT fit'} (arguments {_gb(h['arguments'])}, outputs {_gb(h['outputs'])}, "
      f"aliased {_gb(h['aliases'])}, temporaries {_gb(h['temporaries'])})",
      f"  per chip: {p['flops_per_chip'] / 1e12:.3f} TFLOP (model {p['model_flops_per_chip'] / 1e12:.3f}), "
      f"{p['hbm_traffic_bytes_per_chip'] / 1e9:.2f} GB HBM traffic, "
      f"{p['collective_bytes_received_per_chip'] / 1e9:.3f} GB received over ICI in "
      + (", ".join(f"{int(c['count'])} {k}" for k, c in sorted(p["collectives"].items())) or "no collectives")
      + (f", {p['dcn_bytes_received_per_chip'] / 1e9:.3f} GB over DCN in "
         + ", ".join(f"{int(c['count'])} {k}" for k, c in sorted(p["dcn"].items())) if p["dcn"] else ""),
      f"  bound {p['step_time_bound_s'] * 1e3:.2f} ms ({p['bound_by']}; compute {p['time_s']['compute'] * 1e3:.2f}, "
      f"HBM {p['time_s']['hbm'] * 1e3:.2f}, ICI {p['time_s']['ici'] * 1e3:.2f}"
      + (f", DCN {p['time_s']['dcn'] * 1e3:.2f}" if p["dcn"] else "")
      + f" ms): MFU ≤ {100 * p['mfu_bound']:.1f}%, "
      f"≤ {p['images_per_s_per_chip']:.1f} images/s per chip" + (
          f", {p['full_run']} ≥ {_duration(p['full_run_s'])}" if p.get("full_run_s") else "")
      + f" [compile {p['compile_s']:.0f} s]",
  ]
  return "\n".join(lines)


def format_candidate(e: dict) -> str:
  head = f"data {e['data']:>3} × fsdp {e['fsdp']:<3} {e['remat_policy']:<32} accum {e['grad_accum_steps']}"
  if not e["compiled"]:
    return f"{head}: does not fit ({_gb(e.get('hbm_per_chip_bytes'))}) [compile {e['compile_s']:.0f} s]"
  return (f"{head}: {_gb(e['hbm_per_chip_bytes'])} {'fits' if e['fits'] else 'does NOT fit'}, bound "
          f"{e['step_time_bound_s'] * 1e3:.1f} ms ({e['bound_by']}), MFU ≤ {100 * e['mfu_bound']:.1f}% "
          f"[compile {e['compile_s']:.0f} s]")
