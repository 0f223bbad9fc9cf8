"""What a compiled XLA program does per step, read from its HLO text: FLOPs, collectives, largest buffers.

XLA's own cost analysis (`compiled.cost_analysis()["flops"]`) visits a `while` loop's body once, so a
model whose layers run under `lax.scan` is counted as if it had one layer (and a sampler's decode
loop as one token). Here every computation of the module gets a *multiplier*: how many times one
execution of the program runs it, the product of the known trip counts (`known_trip_count` in the
compiled while loop's backend config) on the call path from the entry computation. Then

    flops = XLA's flops * sum_c multiplier(c) * own_flops(c) / sum_c own_flops(c)

(XLA's figure scaled by how much the repeats add to a count of the same ops; the count alone without
`xla_flops`), where `own_flops(c)` counts c's instructions as XLA's `HloCostAnalysis` does: a dot
is `2 * output elements * contracted size`, an elementwise op one flop per output element, a reduce
one per input element; fusions count the instructions they fuse; transcendentals are not flops.
A loop whose trip count XLA does not know (a decode loop that stops at EOS) can be given one
(`loop_trips`); otherwise it counts once.

Collective bytes are the bytes each collective instruction produces per device (its result shape),
times its computation's multiplier (every branch of a `conditional` counts, as if taken), by kind:
`all-reduce`, `all-gather`, `reduce-scatter`, `all-to-all`, `collective-permute`. Asynchronous pairs
(`-start` / `-done`) count once; TPU's fused forms (a fusion or async computation whose body holds
the collective, e.g. `reduce-scatter` fused with its producer) count under the collective's kind;
a `call`'s computation (XLA:CPU wraps its scatter loops in them) counts as where it is called.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Collective", "HloStats", "analyze_hlo", "shape_bytes"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$|^(?:ENTRY\s+)?%?([\w.\-]+)\s*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|async_execution_thread"
                      r")=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CALLS_LIST = re.compile(r"\bcalls=\{([^}]*)\}")
_TRIP = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_OPNAME = re.compile(r'op_name="([^"]*)"')

# Opcodes XLA's HloCostAnalysis counts as one flop per output element.
_ELEMENTWISE = frozenset("""add subtract multiply divide maximum minimum power remainder and or xor not negate abs sign
compare select clamp floor ceil round-nearest-afz round-nearest-even convert atan2 shift-left shift-right-arithmetic
shift-right-logical popcnt clz real imag is-finite""".split())
# Shape-only and data-movement opcodes: no flops, and their results alias or are not separate buffers.
_ALIASING = frozenset("get-tuple-element tuple bitcast parameter constant after-all partition-id replica-id".split())


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO shape text (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
    return total


def _dims(text: str) -> list[int]:
    m = _SHAPE.search(text)
    return [] if m is None else [int(d) for d in m.group(2).split(",") if d]


def _elements(text: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(text))


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    attrs_raw: str = ""
    root: bool = False


def _split_instruction(rhs: str) -> tuple[str, str, str] | None:
    """`(result shape, opcode, rest)` of an instruction's right-hand side, e.g. `f32[8]{0} all-reduce(...)`.

    A tuple result is matched to its closing parenthesis: TPU layouts hold parentheses themselves
    (`{1,0:T(8,128)}`).
    """
    rhs = rhs.lstrip()
    if rhs.startswith("("):
        depth = 0
        for end, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        shape, rest = rhs[: end + 1], rhs[end + 1:]
    else:
        shape, _, rest = rhs.partition(" ")
    m = re.match(r"\s*([\w\-]+)\(", rest)
    if m is None:
        return None
    return shape, m.group(1), rest[m.end():]


def _operands(rest: str) -> tuple[list[str], str]:
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
    inside, attrs = rest[:end], rest[end + 1:]
    return re.findall(r"%([\w.\-]+)", inside), attrs


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    computations: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _HEADER.match(line.strip())
            if m:
                current = m.group(1) or m.group(2)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is None or line.strip() == "}":
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parts = _split_instruction(m.group(2))
        if parts is None:
            continue
        shape, opcode, rest = parts
        ops, attrs = _operands(rest)
        computations[current].append(_Instr(m.group(1), shape, opcode, ops, attrs, rest,
                                            root=line.lstrip().startswith("ROOT ")))
    return computations, entry


def _conv_macs(instr: _Instr, shapes: Mapping[str, str]) -> float:
    """Multiply-adds per output element of a convolution (TPU writes matmuls as convolutions).

    Along each spatial dimension every (input, kernel) position pair with stride 1 meets at most one
    output position, so the valid pairs per output are `min(window, input * window / output)`:
    the window for an unpadded convolution, one position for a fully padded diagonal (TPU's way of
    keeping a matmul's batch dimension).
    """
    m = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", instr.attrs)
    lhs, rhs = _dims(shapes.get(instr.operands[0], "")), _dims(shapes.get(instr.operands[1], ""))
    out = _dims(instr.shape)
    if m is None or len(rhs) != len(m.group(2)):
        return float(math.prod(rhs)) if rhs else 1.0
    lhs_l, rhs_l, out_l = m.groups()
    macs = 1.0
    for k, label in enumerate(rhs_l):
        if label == "o":
            continue
        if label == "i":
            macs *= rhs[k]
            continue
        w = rhs[k]
        li, oi = lhs_l.find(label), out_l.find(label)
        if 0 <= li < len(lhs) and 0 <= oi < len(out) and out[oi]:
            macs *= min(w, lhs[li] * w / out[oi])
        else:
            macs *= w
    return macs


_WINDOWED = {"rs": "reduce-scatter", "ag": "all-gather"}


def _windowed_kind(comp: str) -> str | None:
    m = re.search(r"windowed_dot_general_body_(rs|ag)", comp)
    return None if m is None else m.group(1)


def _constants(instrs) -> dict[str, int]:
    out = {}
    for i in instrs:
        if i.opcode == "constant":
            m = re.match(r"\s*(-?\d+)\)", i.attrs_raw)
            if m:
                out[i.name] = int(m.group(1))
    return out


def _tuple_index(instr) -> int | None:
    m = re.search(r"\bindex=(\d+)", instr.attrs)
    return None if m is None else int(m.group(1))


def _trip_from_condition(cond, body=()) -> int | None:
    """The trip count of `for (i = 0; i < N; i += s)` from its condition (`compare(i, N), LT`) and body.

    The step `s` is the constant the body adds to the counter it carries to the next trip (1 when none
    is found): the body's root tuple holds `add(i, s)` at the counter's index, through copies. (TPU's
    windowed-einsum loops also add other constants to the counter, e.g. `i + 1` for the next shard's
    index, and step by 2.)
    """
    constants = _constants(cond)
    by_name = {i.name: i for i in cond}
    for i in reversed(list(cond)):
        if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2 and i.operands[1] in constants:
            n = constants[i.operands[1]]
            if n <= 0:
                return None
            counter = by_name.get(i.operands[0])
            k = _tuple_index(counter) if counter is not None and counter.opcode == "get-tuple-element" else None
            return -(-n // (_loop_step(body, k) if k is not None else 1))
    return None


def _loop_step(body, k: int) -> int:
    """What a loop body adds to tuple element `k` per trip: the constant `s` of the root tuple's element
    `k = add(element k, s)`, looking through copies and bitcasts; 1 when the body has no such add."""
    by_name = {b.name: b for b in body}
    constants = _constants(body)

    def source(name):
        instr = by_name.get(name)
        while instr is not None and instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
            instr = by_name.get(instr.operands[0])
        return instr

    root = next((b for b in body if b.root), None)
    if root is None or root.opcode != "tuple" or k >= len(root.operands):
        return 1
    nxt = source(root.operands[k])
    if nxt is None or nxt.opcode != "add" or len(nxt.operands) != 2:
        return 1
    for x, c in (nxt.operands, nxt.operands[::-1]):
        g = source(x)
        if g is not None and g.opcode == "get-tuple-element" and _tuple_index(g) == k and constants.get(c, 0) > 0:
            return constants[c]
    return 1


def _callees(instr: _Instr) -> list[tuple[str, str]]:
    out = [(kind, name) for kind, name in _CALLEES.findall(instr.attrs)]
    for m in _BRANCHES.finditer(instr.attrs):
        out += [("branch", n.strip().lstrip("%")) for n in m.group(1).split(",") if n.strip()]
    for m in _CALLS_LIST.finditer(instr.attrs):
        out += [("calls", n.strip().lstrip("%")) for n in m.group(1).split(",") if n.strip()]
    return out


class Collective(NamedTuple):
    """One collective instruction: its kind, result shape text, bytes per run and runs per execution."""

    kind: str
    shape: str
    bytes: int
    times: int


@dataclasses.dataclass(frozen=True)
class HloStats:
    """Per-device figures of one compiled program.

    Attributes:
      flops: FLOPs of one execution, scanned and looped bodies counted as often as they run
        (None when XLA gave no cost analysis).
      xla_flops: XLA's own figure (loop bodies once).
      loop_trips: the trip count of each while loop found (`{body computation: trips}`; None =
        unknown, counted once).
      collectives: bytes per collective kind (`bytes x times` summed over `collective_ops`), plus "total".
      collective_ops: every collective instruction, in program order of the computations reached.
      largest: the largest buffers the program creates, `(bytes, shape, op name)` largest first.
    """

    flops: float | None
    xla_flops: float | None
    loop_trips: dict[str, int | None]
    collectives: dict[str, int]
    largest: tuple[tuple[int, str, str], ...]
    collective_ops: tuple[Collective, ...]


def analyze_hlo(text: str, *, xla_flops: float | None = None, loop_trips: Mapping[str, int] | None = None,
                unknown_trip_count: int | None = None, top: int = 5) -> HloStats:
    """FLOPs with loop bodies multiplied by their trip counts, collective bytes by kind, largest buffers.

    Args:
      text: `compiled.as_text()` (the optimized, partitioned HLO of one device).
      xla_flops: `compiled.cost_analysis()["flops"]` (loop bodies once); None: count every
        computation from the HLO alone.
      loop_trips: trip counts for loops XLA does not know, by body computation name.
      unknown_trip_count: the trip count to assume for every loop without a known one (e.g. a
        decode loop's `max_new_tokens`); None counts them once.
      top: how many of the largest buffers to return.
    """
    computations, entry = _parse(text)
    shapes = {i.name: i.shape for instrs in computations.values() for i in instrs}
    loop_trips = dict(loop_trips or {})
    trips: dict[str, int | None] = {}
    # Edges caller -> (callee, factor). Fusions / async / calls inherit the caller's multiplier.
    edges: dict[str, list[tuple[str, int, str]]] = {c: [] for c in computations}
    for c, instrs in computations.items():
        for instr in instrs:
            for kind, callee in _callees(instr):
                if callee not in computations:
                    continue
                if kind == "body":
                    m = _TRIP.search(instr.attrs)
                    cond = next((n for k, n in _callees(instr) if k == "condition"), None)
                    n = (int(m.group(1)) if m else loop_trips.get(callee)
                         or _trip_from_condition(computations.get(cond, ()), computations.get(callee, ()))
                         or unknown_trip_count)
                    trips[callee] = n
                    edges[c].append((callee, n or 1, "body"))
                elif kind == "condition":
                    edges[c].append((callee, 1, "condition"))
                elif kind == "to_apply":
                    # `call` runs its computation once per call (XLA:CPU wraps loops in them); every
                    # other `to_apply` (reduce, all-reduce, scatter, sort, map) is an elementwise reducer.
                    edges[c].append((callee, 1, "call" if instr.opcode == "call" else "reducer"))
                else:
                    edges[c].append((callee, 1, kind))
    fused = {callee for es in edges.values() for callee, _, kind in es if kind in ("calls", "async_execution_thread")}
    reducers = {callee for es in edges.values() for callee, _, kind in es if kind == "reducer"}

    # Multipliers of the control-flow computations (entry, loop bodies, branches, called computations).
    mult: dict[str, int] = {}
    if entry is not None:
        stack = [(entry, 1)]
        while stack:
            comp, m = stack.pop()
            if mult.get(comp, 0) >= m and comp != entry:
                continue
            mult[comp] = max(mult.get(comp, 0), m)
            for callee, factor, kind in edges.get(comp, ()):
                if kind != "reducer":
                    stack.append((callee, m * factor))

    def reducer_ops(name: str) -> int:
        return max(1, sum(1 for i in computations.get(name, ()) if i.opcode in _ELEMENTWISE))

    own_cache: dict[str, float] = {}

    def own_flops(comp: str) -> float:
        if comp in own_cache:
            return own_cache[comp]
        own_cache[comp] = 0.0
        total = 0.0
        for i in computations.get(comp, ()):
            if i.opcode == "dot":
                lhs = _dims(shapes.get(i.operands[0], "")) if i.operands else []
                m = _CONTRACT.search(i.attrs)
                dims = [int(d) for d in m.group(1).split(",") if d] if m else []
                contracted = math.prod(lhs[d] for d in dims if d < len(lhs))
                total += 2.0 * _elements(i.shape) * contracted
            elif i.opcode == "convolution" and len(i.operands) == 2:
                total += 2.0 * _elements(i.shape) * _conv_macs(i, shapes)
            elif i.opcode in _ELEMENTWISE:
                total += _elements(i.shape)
            elif i.opcode in ("reduce", "reduce-window"):
                inputs = i.operands[: max(1, len(i.operands) // 2)]
                n_in = sum(_elements(shapes.get(o, "")) for o in inputs)
                callee = next((n for k, n in _callees(i) if k == "to_apply"), None)
                total += n_in * (reducer_ops(callee) if callee else 1) / max(1, len(inputs))
            elif i.opcode in ("fusion", "async-start"):
                for kind, callee in _callees(i):
                    if kind in ("calls", "async_execution_thread"):
                        total += own_flops(callee)
        own_cache[comp] = total
        return total

    control = [c for c in mult if c not in fused and c not in reducers]
    counted = float(sum(mult[c] * own_flops(c) for c in control))
    once = float(sum(own_flops(c) for c in control))
    if xla_flops is None:
        flops = counted if entry else None
    else:
        # XLA's figure scaled by how much the loops add to this count (the same op counts cancel).
        flops = float(xla_flops) * (counted / once if once else 1.0)

    # Collectives: in any computation reached from a control-flow one (fused forms included).
    ops: list[Collective] = []

    def visit_collectives(comp: str, m: int, seen: set) -> None:
        if comp in seen:
            return
        seen.add(comp)
        for i in computations.get(comp, ()):
            kind = i.opcode.removesuffix("-start")
            if kind == "collective-permute":
                # TPU's collective matmuls: a reduce-scatter (all-gather) fused with the matmul
                # as a loop of permutes over the shards ("windowed einsum").
                kind = _WINDOWED.get(_windowed_kind(comp), kind)
            if kind in COLLECTIVES and not i.opcode.endswith("-done"):
                shape = i.shape
                if i.opcode.endswith("-start") and shape.startswith("("):
                    # async start: `(operand, result, context...)`: count the result
                    inner = re.findall(r"(?:pred|[suf]\d+|bf16|c64|c128)\[[\d,]*\]", shape)
                    shape = inner[1] if len(inner) > 1 else shape
                ops.append(Collective(kind, shape, shape_bytes(shape), m))
            for k, callee in _callees(i):
                if k in ("calls", "async_execution_thread") and callee in computations:
                    visit_collectives(callee, m, seen)

    for c in control:
        visit_collectives(c, mult[c], set())
    coll: dict[str, int] = {}
    for op in ops:
        coll[op.kind] = coll.get(op.kind, 0) + op.bytes * op.times
    coll["total"] = sum(coll.values())

    # Largest buffers: results of instructions in control-flow computations (fused internals are
    # not materialised; tuples, bitcasts and parameters alias other buffers).
    buffers = []
    for c in control:
        for i in computations[c]:
            if i.opcode in _ALIASING or i.opcode.endswith("-done") or i.opcode in ("while", "conditional", "call"):
                continue
            if i.shape.startswith("("):
                continue
            n = shape_bytes(i.shape)
            op = _OPNAME.search(i.attrs)
            buffers.append((n, re.sub(r"\{[^}]*\}", "", i.shape), op.group(1) if op else f"{i.opcode} {i.name}"))
    buffers.sort(key=lambda b: -b[0])
    unique, seen_names = [], set()
    for b in buffers:
        if (b[1], b[2]) in seen_names:
            continue
        seen_names.add((b[1], b[2]))
        unique.append(b)
        if len(unique) == top:
            break
    return HloStats(flops=flops, xla_flops=xla_flops, loop_trips=trips, collectives=coll, largest=tuple(unique),
                    collective_ops=tuple(ops))

