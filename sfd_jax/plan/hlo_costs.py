"""The cost rules applied to an optimised HLO module: the trip count of each counted while loop, FLOPs (as XLA
counts them) and bytes of HBM traffic of every instruction, and the collectives (over ICI) and data-center-network
transfers (between slices) a step makes.

XLA's cost model counts the body of a while loop once; `analyse_hlo` counts the iterations it leaves out. A loop
whose trip count the HLO does not show (not a counter stepped by a constant towards a constant bound: a data-
dependent `lax.while_loop`) cannot be counted: it is named in `HloCosts.loops_not_counted`, and whoever reports the
costs must say they cover one iteration of it.
"""
from __future__ import annotations

import dataclasses
import math
import re

from sfd_jax.plan.hlo import ARRAY, Instruction, array_bytes, attribute, callees, dims, first_array_bytes, parse_hlo

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "abs", "negate", "compare", "select",
                "and", "or", "xor", "not", "remainder", "clamp", "sign", "floor", "ceil", "round-nearest-even",
                "round-nearest-afz", "convert", "is-finite"}
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def trip_count(loop: Instruction, computations, by_name, limit: int = 1 << 20) -> int | None:
  """The trip count of a counted while loop (every `lax.scan` and `fori_loop`), None where the HLO does not show it.

  XLA's own analysis, where it annotated the loop (`known_trip_count`); otherwise the loop's condition evaluated
  for each value of its counter, where the condition is a function of one integer tuple element that starts at a
  constant and that the body steps by a constant."""
  known = _KNOWN_TRIP_COUNT.search(loop.attrs)
  if known:
    return int(known.group(1))
  roles = dict(callees(loop))
  cond = {i.name: i for i in computations.get(roles.get("condition"), [])}
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

  def through_copies(instruction, table):
    while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
      instruction = table.get(instruction.operands[0])
    return instruction

  def constant_of(instruction, table):
    instruction = through_copies(instruction, table)
    if instruction is not None and instruction.opcode == "constant" and instruction.operands[0].lstrip("-").isdigit():
      return int(instruction.operands[0])
    return None

  body = {i.name: i for i in computations.get(roles.get("body"), [])}
  body_root = next((i for i in body.values() if i.root), None)
  init = by_name.get(loop.operands[0]) if loop.operands else None
  if (body_root is None or body_root.opcode != "tuple" or index >= len(body_root.operands)
      or init is None or init.opcode != "tuple" or index >= len(init.operands)):
    return None
  update = through_copies(body.get(body_root.operands[index]), body)
  step = None
  if update is not None and update.opcode == "add" and len(update.operands) == 2:
    for this, other in (update.operands, update.operands[::-1]):
      counter = through_copies(body.get(other), body)
      if (counter is not None and counter.opcode == "get-tuple-element"
          and re.search(rf"index={index}\b", counter.attrs)):
        step = constant_of(body.get(this), body)
  start = constant_of(by_name.get(init.operands[index]), by_name)
  if step is None or step <= 0 or start is None:
    return None
  try:
    trips, counter = 0, start
    while value(root.name, counter) and trips < limit:
      trips, counter = trips + 1, counter + step
  except (KeyError, AttributeError, IndexError, ValueError):
    return None
  return trips if trips < limit else None


@dataclasses.dataclass
class HloCosts:
  """What the optimised HLO of one chip's program shows."""
  loop_trip_counts: list[int]                  # per while loop whose trip count the HLO shows
  loops_not_counted: list[str]                 # the others, by name: their bodies are costed for one iteration
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
  trips, not_counted = [], []
  for caller, body in computations.items():
    for instruction in body:
      trip = None
      if instruction.opcode == "while":
        trip = trip_count(instruction, computations, by_name)
        if trip is None:
          not_counted.append(loop_name(instruction))
        else:
          trips.append(trip)
      for role, callee in callees(instruction):
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
    body_flops = sum(flops(i, local, by_name, computations) for i in body)
    body_bytes = 0.0 if name in fused_computations else sum(traffic(i, local, by_name, computations) for i in body)
    flops_total += real * body_flops
    bytes_total += real * body_bytes
    flops_extra += (real - once) * body_flops
    bytes_extra += (real - once) * body_bytes
    for i in body:
      kind = i.opcode.removesuffix("-start")
      if kind in ("send", "recv") and "xla_megascale_runtime" in i.attrs:
        transfer = transfers.setdefault((name, attribute(i.attrs, "_xla_host_transfer_rendezvous")), {
            "type": attribute(i.attrs, "_xla_megascale_transfer_type"), "times": real, "bytes": 0.0})
        transfer["bytes"] = max(transfer["bytes"], first_array_bytes(i.type))
        continue
      if kind not in COLLECTIVES:
        continue
      channel = re.search(r"channel_id=(\d+)", i.attrs)
      key = channel.group(1) if channel else f"{name}/{i.name}"
      if key in seen_channels:  # one async collective is spread over start / update / done computations
        continue
      seen_channels.add(key)
      size = max([array_bytes(i.type)] + [array_bytes(by_name[o].type) for o in i.operands if o in by_name])
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
  return HloCosts(trips, not_counted, flops_extra, bytes_extra, flops_total, bytes_total, collectives, dcn)


def loop_name(instruction: Instruction) -> str:
  """A while loop as a reader finds it: its HLO name and the JAX operation it came from."""
  op_name = attribute(instruction.attrs, "op_name")
  return instruction.name if op_name == "?" else f"{instruction.name} ({op_name})"


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


def flops(i: Instruction, local, by_name, computations) -> float:
  """XLA's counting: 2 per multiply-add of a dot or convolution, 1 per element of other arithmetic."""
  out = math.prod(dims(i.type)) if ARRAY.search(i.type) else 0
  if i.opcode == "dot":
    lhs = dims(_operand_type(i.operands[0], local, by_name))
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * out * k
  if i.opcode == "convolution":
    return _convolution_flops(i, out, local, by_name)
  if i.opcode in _ELEMENTWISE:
    return float(out)
  if i.opcode in ("reduce", "reduce-window"):
    return float(sum(math.prod(dims(_operand_type(o, local, by_name)) or [0]) for o in i.operands[:1]))
  return 0.0


def _convolution_flops(i: Instruction, out: int, local, by_name) -> float:
  """2 × outputs × input features × the window taps that land on input elements (not on padding or dilation holes):
  TPU HLO writes every dot as a convolution, its batch and head dimensions as padded or dilated windows."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attrs)
  lhs = dims(_operand_type(i.operands[0], local, by_name))
  kernel = dims(_operand_type(i.operands[1], local, by_name))
  if not labels or not kernel or "i" not in labels.group(2):
    return 0.0
  lhs_labels, out_labels, out_dims = labels.group(1), labels.group(3), dims(i.type)
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


def _fused_read(fused: list[Instruction], index: int, size: float, computations) -> float:
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
      read += array_bytes(u.type)
    elif u.opcode == "fusion" and u.operands.count(param.name) == 1:
      read += _fused_read(computations.get(dict(callees(u)).get("calls"), []), u.operands.index(param.name), size,
                          computations)
    else:
      return size
  return min(read, size)


def traffic(i: Instruction, local, by_name, computations) -> float:
  """HBM bytes of one top-level instruction: its operands read and its result written, where an in-place update
  (dynamic-update-slice) writes only the update and a sliced read reads only the slice."""
  if i.opcode in _NO_TRAFFIC or i.opcode.endswith("-done"):
    return 0.0
  operand_bytes = [array_bytes(_operand_type(o, local, by_name)) for o in i.operands]
  if i.opcode == "dynamic-update-slice":
    return 2.0 * (operand_bytes[1] if len(operand_bytes) > 1 else 0.0)
  if i.opcode in ("dynamic-slice", "slice"):
    return 2.0 * array_bytes(i.type)
  if i.opcode != "fusion":
    return sum(operand_bytes) + array_bytes(i.type)
  fused = computations.get(dict(callees(i)).get("calls"), [])
  read = sum(_fused_read(fused, index, size, computations) for index, size in enumerate(operand_bytes))
  root = next((f for f in fused if f.root), None)
  names = {f.name: f for f in fused}
  outputs = [names.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
  written = 0.0
  for out in outputs:
    if out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
      written += array_bytes(_operand_type(out.operands[1], names, by_name))
    elif out is not None:
      written += array_bytes(out.type)
  return read + written
