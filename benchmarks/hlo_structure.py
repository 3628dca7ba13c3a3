"""Reads the structure of a compiled XLA program from its optimized HLO text.

What a device would run, counted without one (see ``compiled.py``):

* **kernels**: each ``fusion``, each ``custom-call`` that computes (not the TPU's
  ``ConcatBitcast`` data movement), each collective (``all-reduce`` and friends, the ``-start``
  half of async pairs), ``sort``, ``while`` and ``conditional``. Pure data movement
  (``parameter``, ``constant``, ``bitcast``, ``get-tuple-element``, ``tuple``, the async
  ``copy-start``/``copy-done`` into TPU VMEM, ``opt-barrier``) is not a kernel. A ``call`` (the
  GPU's command buffers) is looked into: its kernels count as the entry's.
* **copies** and **other** instructions are counted apart: an unfused ``copy`` (a device memcpy
  into an output or donated buffer) and the unfused scalar arithmetic a TPU runs on its scalar
  unit.
* **reads of an input**: the kernels whose operands come from that entry parameter through data
  movement only (tuple elements followed by index).
* **reduction kernels**: kernels whose computation contains a ``reduce`` (or that are one).
* **conditionals**: ``conditional`` instructions anywhere (on a GPU each one is a host sync);
  ``while`` loops are counted apart.

The parser knows the text format of the XLA inside jaxlib 0.10.x; ``tests/test_compiled_structure``
checks it on programs whose structure is known.
"""

from __future__ import annotations

import collections
import dataclasses
import re

# Instructions that move or rename data without a kernel of their own.
DATA_MOVEMENT = frozenset({
    "parameter", "constant", "bitcast", "get-tuple-element", "tuple", "copy-start", "copy-done",
    "opt-barrier", "slice-start", "slice-done", "partition-id", "replica-id", "after-all",
    "add-dependency",
})
# custom-call targets that only move data (the TPU packs buffers with ConcatBitcast).
DATA_MOVEMENT_CUSTOM_CALLS = frozenset({"ConcatBitcast", "AllocateBuffer", "Sharding",
                                        "SPMDFullToShardShape", "SPMDShardToFullShape"})
# The ``-done`` half of an async pair waits; the ``-start`` half is the kernel.
_DONE = re.compile(r".*-done$")

_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  shape: str
  operands: list[str]
  attrs: str
  root: bool
  args: str = ""

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  def called(self) -> list[str]:
    names = []
    for key in ("calls", "to_apply", "body", "condition"):
      m = re.search(rf"\b{key}=\{{?([^}},]*(?:,\s*%[\w.\-]+)*)\}}?", self.attrs)
      if m:
        names += _NAME.findall(m.group(1))
    m = re.search(r"branch_computations=\{([^}]*)\}", self.attrs)
    if m:
      names += _NAME.findall(m.group(1))
    return names


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c in "({[":
      depth += 1
    elif c in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index("(")
  opcode = rest[:paren]
  close = _balanced(rest, paren)
  operands = _NAME.findall(rest[paren + 1:close - 1])
  return Instr(name, opcode, shape, operands, rest[close:], root, rest[paren + 1:close - 1])


def parse(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
  """``({computation: {instruction: Instr}}, entry name)`` of an HLO module's text."""
  comps: dict[str, dict[str, Instr]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(2)
        comps[current] = {}
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = _parse_instr(line)
    if instr is not None:
      comps[current][instr.name] = instr
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


# Instructions that launch a kernel of their own (besides computing custom-calls).
KERNEL_OPCODES = frozenset({
    "fusion", "all-reduce", "all-reduce-start", "all-gather", "all-gather-start",
    "reduce-scatter", "all-to-all", "collective-permute", "collective-permute-start",
    "async-start", "sort", "while", "conditional",
})


def _is_moving(instr: Instr) -> bool:
  if instr.opcode in DATA_MOVEMENT or _DONE.match(instr.opcode):
    return True
  return instr.opcode == "custom-call" and any(
      f'custom_call_target="{t}"' in instr.attrs for t in DATA_MOVEMENT_CUSTOM_CALLS)


def _is_kernel(instr: Instr) -> bool:
  return not _is_moving(instr) and (
      instr.opcode in KERNEL_OPCODES or instr.opcode == "custom-call")


@dataclasses.dataclass
class Structure:
  kernels: int
  reduction_kernels: int
  conditionals: int
  whiles: int
  reads: dict[int, int]  # entry parameter number -> kernels reading it
  kernel_opcodes: dict[str, int]
  copies: int = 0
  other: int = 0

  def reads_of(self, params: range | list[int]) -> list[int]:
    return [self.reads.get(p, 0) for p in params]


def _contains(comps, name: str, opcodes: set[str], seen: set[str] | None = None) -> bool:
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return False
  seen.add(name)
  for instr in comps[name].values():
    if instr.opcode in opcodes:
      return True
    if any(_contains(comps, c, opcodes, seen) for c in instr.called()):
      return True
  return False


def analyze(text: str) -> Structure:
  """The kernel, read, reduction and conditional counts of a compiled program's HLO text."""
  comps, entry = parse(text)
  kernels = reductions = copies = other = 0
  opcodes: collections.Counter[str] = collections.Counter()
  reads: collections.Counter[int] = collections.Counter()

  def sources(comp: str, name: str, index: int | None, bind) -> set[int]:
    """The entry parameters that value ``name`` (element ``index`` if a tuple) of ``comp`` is
    made of by data movement alone; ``bind(k)`` gives the sources of the computation's k-th
    parameter."""
    instr = comps[comp][name]
    op = instr.opcode
    if op == "parameter":
      return bind(int(instr.args), index)
    if op == "get-tuple-element":
      return sources(comp, instr.operands[0], int(instr.attr("index")), bind)
    if op == "tuple":
      picks = instr.operands if index is None else [instr.operands[index]]
      return set().union(*(sources(comp, o, None, bind) for o in picks)) if picks else set()
    if op == "call":
      callee = instr.called()[0]
      outer = [sources(comp, o, None, bind) for o in instr.operands]
      root = next(i for i in comps[callee].values() if i.root)
      return sources(callee, root.name, index, lambda k, idx: outer[k])
    if _is_moving(instr):
      return set().union(*(sources(comp, o, None, bind) for o in instr.operands)) \
          if instr.operands else set()
    return set()  # computed by a kernel

  def walk(comp: str, bind) -> None:
    nonlocal kernels, reductions, copies, other
    for instr in comps[comp].values():
      if instr.opcode == "call":
        outer = [sources(comp, o, None, bind) for o in instr.operands]
        walk(instr.called()[0], lambda k, idx, outer=outer: outer[k])
        continue
      if _is_moving(instr):
        continue
      if not _is_kernel(instr):
        if instr.opcode == "copy":
          copies += 1
        else:
          other += 1
        continue
      kernels += 1
      opcodes[instr.opcode] += 1
      if instr.opcode in ("reduce", "reduce-window", "all-reduce", "all-reduce-start") or any(
          _contains(comps, c, {"reduce"}) for c in instr.called()):
        reductions += 1
      read = set().union(*(sources(comp, o, None, bind) for o in instr.operands)) \
          if instr.operands else set()
      for p in read:
        reads[p] += 1

  walk(entry, lambda k, idx: {k})
  conditionals = sum(i.opcode == "conditional" for c in comps.values() for i in c.values())
  whiles = sum(i.opcode == "while" for c in comps.values() for i in c.values())
  return Structure(kernels, reductions, conditionals, whiles, dict(reads), dict(opcodes), copies,
                   other)

