"""The text of an optimised HLO module read into computations of instructions: names, result types, opcodes,
operands and the attributes that name called computations. No cost rule lives here (see `hlo_costs`)."""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
ARRAY = re.compile(r"\b(pred|[su]\d+|bf16|f16|f32|f64|c64|c128|f8e\w+?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool


def array_bytes(type_text: str) -> float:
  """Bytes of every array in an HLO type ('f32[8,128]{1,0}' or a tuple of them)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 1)
             for dtype, dims in ARRAY.findall(type_text))


def first_array_bytes(type_text: str) -> float:
  """Bytes of the first array of an HLO type: the buffer of a (buffer, u32[], token[]) send or recv."""
  match = ARRAY.search(type_text)
  return array_bytes(match.group(0)) if match else 0.0


def dims(type_text: str) -> list[int]:
  """The dimensions of the first array of an HLO type."""
  match = ARRAY.search(type_text)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def attribute(attrs: str, key: str) -> str:
  """The value of a quoted attribute (`key="value"`), '?' where absent."""
  match = re.search(rf'{key}="([^"]*)"', attrs)
  return match.group(1) if match else "?"


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


def _parse_instruction(line: str) -> Instruction | None:
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
  return Instruction(name, type_text, opcode, operands, rest[close:], root)


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
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


def callees(instruction: Instruction) -> list[tuple[str, str]]:
  """(role, computation) of every computation an instruction calls."""
  found = [(role, name) for role, name in _CALLEES.findall(instruction.attrs)]
  for role, names in _CALLEE_LISTS.findall(instruction.attrs):
    found += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
  return found
