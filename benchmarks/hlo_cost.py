"""Per-execution collective bytes and matmul FLOPs, read from optimized HLO text.

``compiled.cost_analysis()`` counts a while loop's body once; an optimizer whose
Newton-Schulz runs in a ``fori_loop`` needs the body counted as many times as the
loop runs. This module walks the HLO module from its entry computation and
multiplies everything inside a ``while`` by the loop's ``known_trip_count``
(XLA records it in the instruction's ``backend_config``); a ``conditional``
counts its most expensive branch (each device runs one branch: the figure is
the busiest device's).

What one device receives, by collective (the convention of issue 16):

* ``all-gather``, ``all-to-all``, ``collective-permute``: the result's bytes;
* ``all-reduce``: twice the result's bytes (a ring all-reduce is a
  reduce-scatter and an all-gather);
* ``reduce-scatter``: the input's bytes.

FLOPs are those of ``dot`` instructions, ``2 · prod(result) · prod(contracted)``;
elementwise work is left out.

Example:
  >>> trips = 'backend_config={"known_trip_count":{"n":"3"}}'
  >>> text = f'''
  ... %body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {{
  ...   %p = (s32[], f32[4,4]{{1,0}}) parameter(0)
  ...   %x = f32[4,4]{{1,0}} get-tuple-element(%p), index=1
  ...   %s = f32[4,4]{{1,0}} all-reduce(%x), replica_groups={{{{0,1}}}}, to_apply=%add
  ...   ROOT %t = (s32[], f32[4,4]{{1,0}}) tuple(%i, %s)
  ... }}
  ... ENTRY %main (a: f32[4,4]) -> f32[4,4] {{
  ...   %w = (s32[], f32[4,4]{{1,0}}) while(%t0), condition=%c, body=%body, {trips}
  ... }}
  ... '''
  >>> cost = hlo_cost(text)
  >>> cost.collective_bytes, cost.collective_count, cost.collectives_in_loops
  (384, 3, 1)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
COLLECTIVES = {
    "all-gather": "result",
    "all-to-all": "result",
    "collective-permute": "result",
    "ragged-all-to-all": "result",
    "all-reduce": "twice",
    "reduce-scatter": "input",
}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(calls|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(shape_text: str) -> list[int]:
    match = _ARRAY.search(shape_text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    op: str
    rest: str

    def operands(self) -> list[str]:
        depth = 1
        for end, char in enumerate(self.rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return re.findall(r"%?([\w.\-]+)", self.rest[:end])
        return re.findall(r"%?([\w.\-]+)", self.rest)


@dataclasses.dataclass
class HloCost:
    """Counts per execution of an HLO module (see the module's docstring)."""

    collective_bytes: int = 0  # bytes one device receives
    collective_count: int = 0  # collectives executed (a loop's counted per trip)
    collectives_in_loops: int = 0  # collective instructions inside a while body
    flops: int = 0
    by_op: dict = dataclasses.field(default_factory=dict)  # op -> [count, bytes]
    unknown_trip_counts: int = 0  # while loops without a known trip count (counted once)

    def add(self, other: HloCost, times: int = 1) -> None:
        self.collective_bytes += times * other.collective_bytes
        self.collective_count += times * other.collective_count
        self.collectives_in_loops += other.collectives_in_loops
        self.flops += times * other.flops
        self.unknown_trip_counts += other.unknown_trip_counts
        for op, (count, size) in other.by_op.items():
            entry = self.by_op.setdefault(op, [0, 0])
            entry[0] += times * count
            entry[1] += times * size


def parse(text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """The computations of an HLO module (name -> instructions) and the entry's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                computations[current].append(_Instruction(*match.groups()))
    if entry is None:
        raise ValueError("the HLO text has no ENTRY computation")
    return computations, entry


def hlo_cost(text: str) -> HloCost:
    """Collective bytes per device, collective count and dot FLOPs per execution."""
    computations, entry = parse(text)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    memo: dict[tuple[str, bool], HloCost] = {}

    def visit(name: str, in_loop: bool) -> HloCost:
        if (name, in_loop) in memo:
            return memo[(name, in_loop)]
        cost = HloCost()
        for instruction in computations.get(name, []):
            op = instruction.op.removesuffix("-start")
            if op in COLLECTIVES and not instruction.op.endswith("-done"):
                if COLLECTIVES[op] == "input":
                    size = sum(array_bytes(shapes.get(o, "")) for o in instruction.operands())
                elif instruction.op.endswith("-start"):
                    # An async start's shape holds its operands and its result.
                    size = max(array_bytes(t) for t in _tuple_elements(instruction.shape))
                else:
                    size = array_bytes(instruction.shape)
                size *= 2 if COLLECTIVES[op] == "twice" else 1
                cost.collective_bytes += size
                cost.collective_count += 1
                cost.collectives_in_loops += int(in_loop)
                entry_ = cost.by_op.setdefault(op, [0, 0])
                entry_[0] += 1
                entry_[1] += size
            elif instruction.op == "dot":
                lhs = shapes.get(instruction.operands()[0], "")
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.rest)
                dims = _dims(lhs)
                contracted = (
                    math.prod(dims[int(d)] for d in contracting.group(1).split(",") if d)
                    if contracting
                    else 1
                )
                cost.flops += 2 * math.prod(_dims(instruction.shape)) * contracted
            if instruction.op == "while":
                callees = dict(_CALLEES.findall(instruction.rest))
                trip = _TRIP.search(instruction.rest)
                if trip is None:
                    cost.unknown_trip_counts += 1
                times = int(trip.group(1)) if trip else 1
                cost.add(visit(callees["body"], True), times)
                cost.add(visit(callees["condition"], True), times + 1)
                continue
            branches = _BRANCHES.search(instruction.rest)
            if instruction.op == "conditional":
                names = (
                    re.findall(r"%?([\w.\-]+)", branches.group(1))
                    if branches
                    else [n for k, n in _CALLEES.findall(instruction.rest) if "computation" in k]
                )
                costs = [visit(n, in_loop) for n in names]
                heaviest = max(costs, key=lambda c: (c.flops, c.collective_bytes))
                cost.add(heaviest)
                cost.collectives_in_loops += sum(c.collectives_in_loops for c in costs) - (
                    heaviest.collectives_in_loops
                )
                continue
            for kind, callee in _CALLEES.findall(instruction.rest):
                if kind == "calls":
                    cost.add(visit(callee, in_loop))
        memo[(name, in_loop)] = cost
        return cost

    return visit(entry, False)


def _tuple_elements(shape: str) -> list[str]:
    inner = shape.strip()
    if not inner.startswith("("):
        return [inner]
    return [part for part in re.split(r",\s(?![^\[]*\])", inner[1:-1]) if part]


def compiled_cost(compiled) -> HloCost:
    """:func:`hlo_cost` of a ``jax.jit(...).lower(...).compile()`` result."""
    return hlo_cost(compiled.as_text())


def to_json(cost: HloCost) -> str:
    return json.dumps(dataclasses.asdict(cost))
