"""Ahead-of-time compilation of a training step for a mesh here or a TPU topology, with a memory report.

Lower and compile any `Step` on abstract arguments (`jax.ShapeDtypeStruct`s with shardings), for
the devices of this machine or for the compile-only devices of a TPU topology described by libtpu
(`pip install rlhf_jax[tpu]`; no TPU needed), and report per-device memory (arguments, outputs,
temporaries, peak), FLOPs and whether the step fits in a device's memory (MaxText's
`train_compile.py`). A configuration that does not fit is a report, never a crash.

    rlhf-jax compile --model w1 --step sft --strategy fsdp --mesh fsdp=8 --batch 8 --seq 256 --cpu-devices 8
    rlhf-jax compile --model llama-3.1-8b --step dpo --strategy fsdp_tp --mesh fsdp=16,tensor=4 --topology v5p:4x4x4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rlhf_jax import sharding as sh
from rlhf_jax.targets import TARGET_FORMS, _device_memory, memory_gib, resolve_target, with_device_memory_gib
from rlhf_jax.sharding_lint import format_lint
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.presets import PRESETS, get_config
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.training_program import StepKind, step_flops, training_step_program

__all__ = [
    "CompileReport",
    "ProgramReport",
    "compile_program",
    "format_program",
    "bytes_per_device",
    "aot_compile",
    "compile_training_step",
    "format_report",
    "memory_verdict",
    "main",
]

EXIT_DOES_NOT_FIT = 3  # `rlhf-jax compile`: 0 fits, 3 does not fit, 2 bad input

def _size(n: float | None) -> str:
    """Bytes in the unit that shows them: GiB from 0.1 GiB, else MiB (tiny runs), else KiB."""
    if n is None:
        return "?"
    if abs(n) >= 0.1 * 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 0.1 * 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.3f} GiB"


def memory_verdict(peak: int, memory: int, source: str = "") -> str:
    """A peak against the memory per device, naming whose memory that is (`Target.memory_source`):
    "needs 15.90 GiB of the 15.75 GiB XLA:TPU can allocate on a v5e chip", or "15.20 GiB of the
    15.75 GiB ..., 97%" when it fits."""
    of = f"of the {_size(memory)}{' ' + source if source else ' per device'}"
    return f"{_size(peak)} {of}, {peak / memory:.0%}" if peak <= memory else f"needs {_size(peak)} {of}"


def format_report(report: CompileReport) -> str:
    """A human-readable multi-line summary."""
    xla = "" if report.xla_flops is None else f", XLA's count {report.xla_flops:.3e} (loop bodies once)"
    lines = [
        f"target: {report.target}  devices: {report.num_devices}  mesh: {report.mesh}  strategy: {report.strategy}",
        f"compiled: {'yes' if report.ok else 'no'} ({report.compile_seconds:.1f} s)",
        f"per device: arguments {_gib(report.argument_bytes)}, outputs {_gib(report.output_bytes)}, "
        f"aliased {_gib(report.alias_bytes)}, temporaries {_gib(report.temp_bytes)}, peak {_gib(report.peak_bytes)}",
        f"train state per device: {_gib(report.state_bytes)}",
        f"device memory: {_gib(report.device_memory_bytes)}"
        + (f" {report.memory_source}" if report.memory_source else "")
        + (f" ({report.memory_note})" if report.memory_note else ""),
        f"FLOPs per step: model {'?' if report.model_flops is None else f'{report.model_flops:.3e}'} (all devices), "
        f"program {'?' if report.flops is None else f'{report.flops:.3e}'} (per device{xla})",
        f"fits: {'yes' if report.fits else 'NO'} - {report.reason}",
    ]
    lines += [f"lint: {x}" for x in report.lint]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ programs


def bytes_per_device(tree) -> int:
    """Per-device bytes of a tree of arrays / ShapeDtypeStructs (each leaf's shard under its sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if hasattr(sharding, "shard_shape") else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def device_ids(tree) -> tuple[int, ...]:
    """The sorted ids of the devices a tree of arrays / ShapeDtypeStructs with shardings lies on."""
    ids = set()
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and hasattr(sharding, "device_set"):
            ids.update(d.id for d in sharding.device_set)
    return tuple(sorted(ids))


def largest_leaves(groups: Mapping[str, Any], top: int = 3) -> list[tuple[int, str, str]]:
    """The `top` largest per-device argument arrays: `(bytes, "group/path", "dtype[shard shape]")`."""
    out = []
    for group, tree in groups.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            sharding = getattr(leaf, "sharding", None)
            shape = sharding.shard_shape(leaf.shape) if sharding is not None and hasattr(sharding, "shard_shape") \
                else leaf.shape
            n = math.prod(shape) * np.dtype(leaf.dtype).itemsize
            out.append((n, f"{group}{jax.tree_util.keystr(path)}", f"{np.dtype(leaf.dtype).name}{list(shape)}"))
    out.sort(key=lambda x: -x[0])
    return out[:top]


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program of a run, per device.

    Attributes:
      name: e.g. "update", "reference log-probs", "sampler decode".
      ok: compiled; `error` holds the compiler's message when not (e.g. TPU RESOURCE_EXHAUSTED).
      arguments: per-device argument bytes by kind ("parameters", "optimizer state", "reference",
        "sampler weights", "KV cache", "batch", ...), from the arguments' shapes and shardings.
      argument_bytes, output_bytes, alias_bytes, temp_bytes, peak_bytes: XLA's memory analysis
        (peak: XLA's, or arguments + outputs - aliased + temporaries when larger).
      required_bytes: the compiler's own figure when it ran out of memory (else 0).
      flops: per-device FLOPs of one execution, loop bodies counted as often as they run
        (`hlo_analysis`); xla_flops: XLA's cost analysis (loop bodies once).
      collectives: per-device bytes by collective kind, and "total".
      largest: the largest buffers: `(bytes, what, where)`.
      compile_seconds: wall time of the compilation.
      note: e.g. "x 1024 decode steps" or "figures from a v5p:2x2x2 compile (same mesh)".
      devices: ids of the devices it runs on (its arguments'); an off-policy run's trainer and
        sampler programs run on devices of their own.
    """

    name: str
    ok: bool
    error: str = ""
    arguments: dict[str, int] = dataclasses.field(default_factory=dict)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    peak_bytes: int = 0
    required_bytes: int = 0
    flops: float | None = None
    xla_flops: float | None = None
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)
    largest: tuple = ()
    compile_seconds: float = 0.0
    note: str = ""
    devices: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileReport(ProgramReport):
    """One step compiled for a target (`aot_compile`): its `ProgramReport` (the figures `rlhf-jax
    compile` plans every program of a run with) and the verdict for that step alone.

    Byte counts are per device. `state_bytes` is the per-device size of the train state (parameters
    + optimizer state). `flops` counts loop bodies as often as they run (a scanned model's every
    layer), `xla_flops` is XLA's cost analysis (loop bodies once); `model_flops` is the analytic
    count of the whole step on all devices (`step_flops`: `6 N D` for the trained forward + backward
    plus attention, plus `2 N D` per frozen forward, DPO's reference). A step that did not compile
    has `ok=False`, `fits=False`, the compiler's message in `reason` and the bytes it said it
    needed as `peak_bytes` (and `required_bytes`). `memory_source` / `memory_note` say whose memory
    `device_memory_bytes` is and how it was found (`rlhf_jax.targets.Target`).
    """

    target: str = ""
    num_devices: int = 0
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    strategy: str = ""
    fits: bool = False
    reason: str = ""
    state_bytes: int = 0
    device_memory_bytes: int | None = None
    model_flops: float | None = None
    lint: tuple[str, ...] = ()
    memory_source: str = ""
    memory_note: str = ""


def _oom_required(message: str) -> int:
    """The bytes a TPU compiler said it needed ("... HLO temporaries (19.85G) exceeds ...")."""
    import re  # noqa: PLC0415

    m = re.search(r"(?:required|Used)[^()]*\(?\s*([\d.]+)\s*([KMGT])i?B?\)?", message)
    if not m:
        return 0
    return int(float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)])


def compile_program(name: str, lower: Any, groups: Mapping[str, Any], *,
                    compiler_options: Mapping[str, Any] | None = None, unknown_trip_count: int | None = None,
                    note: str = "", outputs: dict | None = None) -> ProgramReport:
    """Lower and compile one program; report its per-device memory split, FLOPs and collectives.

    Args:
      name: the program's name in the report.
      lower: `() -> jax.stages.Lowered` (e.g. `lambda: step.lower(*args)`).
      groups: the program's arguments by kind (`{"parameters": tree, "batch": tree, ...}`, trees of
        ShapeDtypeStructs with shardings): the argument split.
      compiler_options: XLA options for this compilation.
      unknown_trip_count: trips of loops XLA cannot count (a decode loop: max_new_tokens).
      note: carried into the report.
      outputs: when given with a "mesh", receives the compiled program's "shardings" (its outputs').

    Within `rlhf_jax.plan_cache.use_plan_cache`, a program whose lowered module, options, compiler
    and target are in the cache is not compiled: its figures come from the cache.

    Returns:
      A `ProgramReport`; a compilation failure (out of memory) is `ok=False` with the message and,
      when the compiler states it, the bytes it needed.
    """
    from rlhf_jax import plan_cache  # noqa: PLC0415

    arguments = {k: bytes_per_device(v) for k, v in groups.items()}
    devices = device_ids(list(groups.values()))
    largest = tuple((n, f"argument {path}", shape) for n, path, shape in largest_leaves(groups))
    t0 = time.perf_counter()
    cache, key, entry = plan_cache.active_cache(), None, None
    try:
        lowered = lower()
        if cache is not None:
            key = plan_cache.program_key(lowered.as_text(), target=cache.target,
                                         compiler_options=dict(compiler_options or {}))
            entry = cache.get(key)
        if entry is None:
            compiled = lowered.compile(compiler_options=dict(compiler_options or {}))
    except sh.ShardingError:
        raise
    except Exception as e:  # the compiler refusing (out of memory): a report, not a crash
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        entry = {"ok": False, "error": message, "required_bytes": _oom_required(message),
                 "compile_seconds": time.perf_counter() - t0}
        if key is not None:
            cache.put(key, entry)
    if entry is None:
        entry = _compiled_figures(compiled, unknown_trip_count, time.perf_counter() - t0)
        if key is not None:
            cache.put(key, entry)
        if outputs is not None:
            outputs["shardings"] = compiled.output_shardings
    elif outputs is not None and entry["ok"]:
        outputs["shardings"] = _shardings_from_specs(entry["output_specs"], outputs["mesh"])
    if not entry["ok"]:
        return ProgramReport(name, ok=False, error=entry["error"], arguments=arguments,
                             argument_bytes=sum(arguments.values()), required_bytes=entry["required_bytes"],
                             largest=largest, compile_seconds=entry["compile_seconds"], note=note, devices=devices)
    buffers = tuple((n, f"temporary {shape}", where) for n, shape, where in entry["buffers"])
    merged = tuple(sorted(largest + buffers, key=lambda b: -b[0])[:5])
    return ProgramReport(name, ok=True, arguments=arguments, argument_bytes=entry["argument_bytes"],
                         output_bytes=entry["output_bytes"], alias_bytes=entry["alias_bytes"],
                         temp_bytes=entry["temp_bytes"], peak_bytes=entry["peak_bytes"], flops=entry["flops"],
                         xla_flops=entry["xla_flops"], collectives=entry["collectives"], largest=merged,
                         compile_seconds=entry["compile_seconds"], note=note, devices=devices)


def _compiled_figures(compiled, unknown_trip_count: int | None, seconds: float) -> dict[str, Any]:
    """What a plan reads from a compiled program, as JSON-able data (what `plan_cache` stores)."""
    from rlhf_jax.hlo_analysis import analyze_hlo  # noqa: PLC0415

    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    peak = max(int(getattr(mem, "peak_memory_in_bytes", 0) or 0), arg + out - alias + temp)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost["flops"]) if cost and cost.get("flops") is not None else None
    except Exception:
        xla_flops = None
    stats = analyze_hlo(compiled.as_text(), xla_flops=xla_flops, unknown_trip_count=unknown_trip_count)
    specs = [_spec_of(s) for s in jax.tree.leaves(compiled.output_shardings)]
    return {"ok": True, "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "peak_bytes": peak, "flops": stats.flops, "xla_flops": xla_flops, "collectives": dict(stats.collectives),
            "buffers": [list(b) for b in stats.largest], "compile_seconds": seconds, "output_specs": specs}


def _spec_of(sharding) -> list | None:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    return [list(d) if isinstance(d, tuple) else d for d in spec]


def _shardings_from_specs(specs: list, mesh: Mesh) -> list:
    from jax.sharding import PartitionSpec  # noqa: PLC0415

    return [NamedSharding(mesh, PartitionSpec(*[tuple(d) if isinstance(d, list) else d for d in spec]))
            for spec in specs]


def format_program(p: ProgramReport, memory: int | None = None) -> str:
    """A program's lines in a plan: memory split, peak, FLOPs, collectives, largest buffers."""
    split = ", ".join(f"{k} {_size(v)}" for k, v in p.arguments.items() if v)
    lines = [f"-- {p.name}{'  (' + p.note + ')' if p.note else ''}",
             f"   arguments {_size(p.argument_bytes)}" + (f" = {split}" if split else "")]
    if p.ok or p.peak_bytes:  # an out-of-memory program may carry figures from a larger chip's compile
        share = f" ({p.peak_bytes / memory:.0%} of {_size(memory)})" if memory else ""
        lines.append(f"   outputs {_size(p.output_bytes)} (aliased {_size(p.alias_bytes)}), temporaries "
                     f"{_size(p.temp_bytes)}, peak {_size(p.peak_bytes)}{share}")
        flops = "?" if p.flops is None else f"{p.flops:.3e}"
        xla = "" if p.xla_flops is None or p.flops is None or abs(p.flops - p.xla_flops) < 1e-3 * max(p.flops, 1) \
            else f" (XLA's count, loop bodies once: {p.xla_flops:.3e})"
        lines.append(f"   FLOPs per device {flops}{xla}; compiled in {p.compile_seconds:.1f} s")
        coll = {k: v for k, v in p.collectives.items() if k != "total" and v}
        lines.append("   collectives per device: " + (", ".join(f"{k} {_size(v)}" for k, v in coll.items()) or "none"))
    if not p.ok:
        need = f"; the compiler needed {_size(p.required_bytes)}" if p.required_bytes else ""
        lines.append(f"   did not compile: {p.error}{need}")
    if p.largest:
        lines.append("   largest: " + "; ".join(f"{_size(n)} {what} ({where})" for n, what, where in p.largest[:3]))
    return "\n".join(lines)


def aot_compile(step, args: Sequence[Any], *, target: str, state_bytes: int = 0,
                device_memory_bytes: int | None = None, lint_lines: Sequence[str] = (),
                model_flops: float | None = None, compiler_options: Mapping[str, Any] | None = None,
                memory_source: str = "", memory_note: str = "") -> CompileReport:
    """Lower and compile `step` on (abstract) `args`; report memory, FLOPs and fit, never raise.

    Args:
      step: a `Step` (or anything with `.lower(*args)`).
      args: the step's arguments, concrete or `jax.ShapeDtypeStruct`s with shardings.
      target: a label for the report ("cpu x8", "v5e-16", ...).
      state_bytes: per-device train-state bytes, for the report.
      device_memory_bytes: memory per device; default from the devices (`rlhf_jax.targets.device_memory`:
        the allocator's limit here, what XLA:TPU can allocate on a TPU compile-only device, CPU RAM).
      lint_lines: sharding-lint findings to carry in the report.
      model_flops: the analytic FLOPs of one step, for the report.
      compiler_options: XLA options for this compilation (e.g. `{"xla_backend_optimization_level": 0}`).
      memory_source, memory_note: whose memory `device_memory_bytes` is, for the report (`Target`).

    Returns:
      A `CompileReport`: `compile_program`'s figures of the step (the same path, plan cache
      included, as every program of `rlhf-jax compile`'s run plans) with the fit verdict; a
      compilation failure (e.g. RESOURCE_EXHAUSTED on TPU) has `ok=False`, `fits=False` and the
      compiler's message as the reason.
    """
    mesh = step.mesh
    devices = list(mesh.devices.flat)
    if device_memory_bytes is None:
        device_memory_bytes, memory_source, memory_note = _device_memory(devices)
    memory = device_memory_bytes
    groups = {"train state": args[0], "batch": args[1:2]}
    if len(args) > 2:
        groups["frozen"] = list(args[2:])
    lowered = step.lower(*args)  # a batch the mesh cannot split: the step's ShardingError, before any sizes
    program = compile_program("update step", lambda: lowered, groups, compiler_options=compiler_options)
    base = {f.name: getattr(program, f.name) for f in dataclasses.fields(ProgramReport)}
    base.update(target=target, num_devices=len(devices), mesh=dict(mesh.shape), strategy=step.strategy.name,
                state_bytes=state_bytes, device_memory_bytes=memory, lint=tuple(lint_lines), model_flops=model_flops,
                memory_source=memory_source, memory_note=memory_note)
    if not program.ok:  # the compiler refusing (out of memory, unsupported): a report, not a crash
        need = program.required_bytes
        hint = (f"; the compiler needed {_gib(need)} per device (train state {_gib(state_bytes)}): use remat, "
                "micro-batches, more FSDP devices or shorter sequences" if need else "")
        base["peak_bytes"] = need
        return CompileReport(fits=False, reason=f"compilation failed: {program.error}{hint}", **base)
    peak, arg, temp = program.peak_bytes, program.argument_bytes, program.temp_bytes
    if memory is None:
        fits, reason = True, "device memory unknown; pass device_memory_bytes to check the fit"
    elif peak <= memory:
        fits, reason = True, f"peak {memory_verdict(peak, memory, memory_source)}"
    else:
        fits, reason = False, (
            f"the step {memory_verdict(peak, memory, memory_source)}: arguments {_gib(arg)} (train state "
            f"{_gib(state_bytes)}) + temporaries {_gib(temp)}; shard more (fsdp), use more devices, "
            "a smaller batch or micro-batches, or remat"
        )
    return CompileReport(fits=fits, reason=reason, **base)


def compile_training_step(config: ModelConfig, *, step: StepKind = "sft", mesh: Mesh,
                          strategy: str | sh.Strategy = "fsdp", batch_size: int, seq_len: int,
                          optimizer: OptimizerConfig | None = None, micro_batches: int = 1,
                          target: str | None = None, device_memory_bytes: int | None = None,
                          compiler_options: Mapping[str, Any] | None = None, memory_source: str = "",
                          memory_note: str = "") -> CompileReport:
    """Build the model's step of `kind` for `mesh` and compile it on abstract arguments only.

    Nothing of model size is allocated: the state's shapes come from `jax.eval_shape`.

    Args:
      config: the model's shapes.
      step: "sft", "reward_model" or "dpo" (sigmoid DPO with a reference model).
      mesh: the device mesh (this machine's devices or a TPU topology's).
      strategy: the sharding strategy.
      batch_size, seq_len: sequences (pairs for reward_model / dpo) per step and their length.
      optimizer: the optimizer config (default AdamW).
      micro_batches: gradient-accumulation micro-batches.
      target: report label (default from the devices).
      device_memory_bytes: memory per device (default from the devices).
      compiler_options: XLA options for this compilation.
      memory_source, memory_note: whose memory `device_memory_bytes` is (`rlhf_jax.targets.Target`).

    Returns:
      A `CompileReport`.

    Raises:
      ShardingError: an invalid mesh / strategy / batch combination, before compiling.
    """
    program = training_step_program(config, step=step, mesh=mesh, strategy=strategy, batch_size=batch_size,
                                    seq_len=seq_len, optimizer=optimizer, micro_batches=micro_batches,
                                    caller="compile_training_step")
    errors = [i for i in program.lint if i.severity == "error"]
    if errors:
        raise sh.ShardingError("sharding lint found errors:\n" + format_lint(errors))
    devices = list(mesh.devices.flat)
    label = target or f"{devices[0].platform} x{len(devices)}"
    return aot_compile(program.step, program.args, target=label,
                       state_bytes=bytes_per_device(program.args[0]),
                       device_memory_bytes=device_memory_bytes, lint_lines=[str(i) for i in program.lint],
                       model_flops=step_flops(config, step=step, batch_size=batch_size, seq_len=seq_len),
                       compiler_options=compiler_options, memory_source=memory_source, memory_note=memory_note)


# ---------------------------------------------------------------------------------------------- CLI


def _parse_mesh(text: str) -> dict[str, int]:
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if not name or not size.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--mesh expects name=size[,name=size...], got {text!r}")
        shape[name] = int(size)
    return shape


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            import difflib  # noqa: PLC0415

            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if sep and close else ""
            raise ValueError(f"--set {item!r}: expected a ModelConfig field=value{hint}; fields: {sorted(fields)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _positive_int(text: str) -> int:
    """An int >= 1 (argparse names the flag and exits with status 2 on anything else)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf-jax compile",
        description="Compile a training step ahead of time for a mesh of this machine or a TPU topology, "
                    "and report per-device memory, FLOPs and whether it fits.",
    )
    p.add_argument("--model", default="w1", help=f"model preset: {', '.join(sorted(PRESETS))} (default w1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --set num_layers=2 --set dtype=bfloat16")
    p.add_argument("--step", default="sft", choices=["sft", "reward_model", "dpo"])
    p.add_argument("--strategy", default="fsdp", help=f"sharding strategy: {sh.strategy_names()}")
    p.add_argument("--mesh", type=_parse_mesh, default=None, help="mesh shape, e.g. data=2,fsdp=4 (default: data=all)")
    p.add_argument("--batch", type=_positive_int, default=8, help="sequences (or pairs) per step")
    p.add_argument("--seq", type=_positive_int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batches", type=_positive_int, default=1)
    p.add_argument("--topology", default=None, help=f"target to compile for: {TARGET_FORMS}")
    p.add_argument("--cpu-devices", type=_positive_int, default=None,
                   help="simulate this many CPU devices (must come before JAX starts its backend)")
    p.add_argument("--device-memory-gib", type=memory_gib, default=None,
                   help="memory per device for the fit check (GiB; default: what XLA can allocate on the target: "
                        "a TPU's HBM less what XLA:TPU reserves, a GPU's XLA_CLIENT_MEM_FRACTION, 0.75 unless set)")
    p.add_argument("--compiler-option", dest="compiler_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA compiler option, e.g. xla_backend_optimization_level=0 (faster CPU compiles)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`rlhf-jax compile ...`: print the compile report; exit 0 if it fits, 3 if not, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    else:  # a GPU plan compiles for as many local devices (as `rlhf-jax compile EXPERIMENT` does)
        from jax._src import xla_bridge  # noqa: PLC0415

        from rlhf_jax.targets import gpu_device_count  # noqa: PLC0415

        gpus = gpu_device_count(args.topology)
        if gpus and not xla_bridge.backends_are_initialized() and jax.config.jax_num_cpu_devices < gpus:
            jax.config.update("jax_num_cpu_devices", gpus)
    if args.model not in PRESETS:
        print(f"unknown --model {args.model!r}; presets: {', '.join(sorted(PRESETS))}", file=sys.stderr)
        return 2
    try:  # a bad --set (unknown field, or a value the ModelConfig refuses): one line, exit status 2
        config = get_config(args.model, **_parse_overrides(args.overrides))
    except (TypeError, ValueError) as e:
        print(f"rlhf-jax compile: {e}", file=sys.stderr)
        return 2
    try:
        resolved = with_device_memory_gib(resolve_target(args.topology), args.device_memory_gib)
        devices = list(resolved.devices)
        target = resolved.label if args.topology else None
        mesh = sh.make_mesh(args.mesh, devices=devices)
        options = {}
        for item in args.compiler_options:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--compiler-option expects KEY=VALUE, got {item!r}")
            options[key] = value
        report = compile_training_step(config, step=args.step, mesh=mesh, strategy=args.strategy,
                                       batch_size=args.batch, seq_len=args.seq, micro_batches=args.micro_batches,
                                       target=target, device_memory_bytes=resolved.memory_bytes,
                                       compiler_options=options, memory_source=resolved.memory_source,
                                       memory_note=resolved.memory_note)
    except (sh.ShardingError, RuntimeError, ValueError) as e:
        print(f"rlhf-jax compile: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
