"""What one training step costs under a sharding strategy: per-device memory and collective bytes.

The one measurement behind `benchmarks/bench_sharding.py` and `notebooks/03_sharding_strategies.ipynb`,
so the two always report the same figures. `compile_strategy` builds the step a recipe builds
(`steps.make_*_step` jitted by `jit_model_step` for a strategy and a mesh), compiles it on abstract
arguments (nothing of model size is allocated, so the devices may be a TPU topology's compile-only
devices) and reads

- per-device argument / temporary / peak memory from XLA's memory analysis of the compiled program;
- the bytes each collective kind produces, from the compiled (partitioned) HLO text.

Collective bytes count each collective instruction once as it appears in the program text; a
collective inside a scanned layer loop runs once per layer, so those are multiplied by the loop's
trip count when XLA states it (`known_trip_count`), else counted once.

    row = measure_strategy(get_config("tiny"), step="dpo", strategy="fsdp", mesh_shape={"fsdp": 8},
                           batch_size=8, seq_len=64)          # a dict: memory MiB, collective bytes, ...
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.compile import abstract_batch, step_flops
from rlhf_jax.hlo_analysis import shape_bytes, split_instruction
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.sharding_lint import lint
from rlhf_jax.state import abstract_train_state, create_train_state

__all__ = [
    "COLLECTIVES",
    "Collective",
    "CompiledStrategy",
    "collective_instructions",
    "collective_bytes",
    "memory_mib",
    "compile_strategy",
    "time_steps",
    "measure_strategy",
]

StepKind = Literal["sft", "reward_model", "dpo"]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class Collective(NamedTuple):
    """One collective instruction of an HLO module: its kind, result shape text, bytes and runs per step."""

    kind: str
    shape: str
    bytes: int
    times: int


def collective_instructions(hlo_text: str) -> list[Collective]:
    r"""The collective instructions of an HLO module's text, in program order.

    An asynchronous pair (`all-gather-start` / `-done`) counts once, under its base kind. `times`
    is the trip count of the while loop whose body holds the instruction (1 outside loops).

    Args:
      hlo_text: `compiled.as_text()`.

    Example (a TPU layout holds parentheses inside a tuple result):
      >>> collective_instructions("ENTRY %main (p: f32[8]) -> f32[8] {\n"
      ...     "  %ar = (f32[2,64]{1,0:T(8,128)}, f32[64]{0}) all-reduce(%a, %b), to_apply=%add\n}")
      [Collective(kind='all-reduce', shape='(f32[2,64]{1,0:T(8,128)}, f32[64]{0})', bytes=768, times=1)]
    """
    # Map computation name -> trip count of the while loops that call it as their body.
    trips = {}
    for m in re.finditer(r"while\(.*?body=%?([\w.\-]+).*?known_trip_count[^0-9]*(\d+)", hlo_text):
        trips[m.group(1)] = int(m.group(2))
    out = []
    factor = 1
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            factor = trips.get(header.group(1), 1)
            continue
        if "=" not in line:
            continue
        parsed = split_instruction(line.split("=", 1)[1])
        if parsed is None:
            continue
        shape, opcode, _ = parsed
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES and not opcode.endswith("-done"):
            out.append(Collective(kind, shape, shape_bytes(shape), factor))
    return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes produced per collective kind in an HLO module's text (loop bodies x trip count).

    Args:
      hlo_text: `compiled.as_text()`.

    Returns:
      `{kind: bytes}` for the kinds present (in order of first appearance), plus `"total"`.
    """
    out: dict[str, int] = {}
    for c in collective_instructions(hlo_text):
        out[c.kind] = out.get(c.kind, 0) + c.bytes * c.times
    out["total"] = sum(out.values())
    return out


def memory_mib(compiled) -> dict[str, float]:
    """Per-device `argument_mib`, `temp_mib` and `peak_mib` of a compiled program (XLA's memory analysis).

    The peak is XLA's when it reports one and at least the live sum `arguments + outputs - aliased
    + temporaries` (XLA:CPU's own peak can be below its temporaries), as in `rlhf_jax.compile`.
    """
    mem = compiled.memory_analysis()
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"argument_mib": mem.argument_size_in_bytes / 2**20, "temp_mib": mem.temp_size_in_bytes / 2**20,
            "peak_mib": max(getattr(mem, "peak_memory_in_bytes", 0) or 0, live) / 2**20}


@dataclasses.dataclass(frozen=True)
class CompiledStrategy:
    """A step compiled for one strategy and mesh, with what was measured (`row`).

    Attributes:
      row: `strategy`, `mesh`, `lint`, `compile_s`, `argument_mib`, `temp_mib`, `peak_mib`,
        `collective_bytes` (`collective_bytes` of the compiled HLO) and `model_flops`.
      compiled: the `jax.stages.Compiled` program (`as_text()` is its partitioned HLO).
      step: the jitted `Step`, to build concrete arguments for.
      model: the model; optimizer: its optax transform; kind: the step kind.
      batch_size, seq_len: the batch the program was compiled for.
    """

    row: dict[str, Any]
    compiled: Any
    step: Any
    model: CausalLM
    optimizer: Any
    kind: StepKind
    batch_size: int
    seq_len: int


def compile_strategy(config: ModelConfig, *, step: StepKind = "dpo", strategy: str, mesh_shape: Mapping[str, int] | None,
                     batch_size: int, seq_len: int, devices: Sequence[Any] | None = None,
                     learning_rate: float = 1e-5) -> CompiledStrategy:
    """Build the `step` of `config` for `strategy` on a mesh and compile it on abstract arguments.

    Args:
      config: the model's shapes.
      step: "sft", "reward_model" or "dpo" (sigmoid DPO with a reference model, `update(state,
        batch, reference_params)`).
      strategy: a registered strategy name (`dp`, `fsdp`, `tp`, `fsdp_tp`, ...).
      mesh_shape: mesh axis sizes, e.g. `{"fsdp": 4, "tensor": 2}` (None: all devices on `data`).
      batch_size, seq_len: sequences (pairs for reward_model / dpo) per step and their length.
      devices: the devices to lay the mesh over (default all of this process's; a TPU topology's
        compile-only devices from `rlhf_jax.targets.tpu_topology_devices` work too).
      learning_rate: AdamW's learning rate (its state is part of the per-device memory).

    Returns:
      A `CompiledStrategy`.
    """
    from rlhf_jax.steps import (  # noqa: PLC0415 - steps import this package's model code
        PAIR_KEYS,
        SFT_KEYS,
        dpo_batch_keys,
        jit_model_step,
        make_dpo_step,
        make_reward_model_step,
        make_sft_step,
    )

    makers = {"sft": make_sft_step, "reward_model": make_reward_model_step, "dpo": make_dpo_step}
    if step not in makers:
        raise ValueError(f"compile_strategy: step must be one of {sorted(makers)}, got {step!r}")
    model = CausalLM(config, head="scalar" if step == "reward_model" else "lm")
    opt = OptimizerConfig(learning_rate=learning_rate)
    tx = make_optimizer(opt)
    mesh = sh.make_mesh(mesh_shape, devices=devices)
    issues = lint(model.abstract_params(), model.logical_axes, mesh=mesh, strategy=strategy)
    keys = {"sft": SFT_KEYS, "reward_model": PAIR_KEYS, "dpo": dpo_batch_keys()}[step]
    built = jit_model_step(makers[step](model, opt), model, opt, mesh=mesh, strategy=strategy, batch_keys=keys,
                           frozen_params=int(step == "dpo"), name=f"{step}_step")
    abstract = abstract_train_state(model.init, tx)
    as_struct = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    args = [as_struct(abstract, built.state_shardings),
            abstract_batch("sft" if step == "sft" else "pairs", batch_size=batch_size, seq_len=seq_len, mesh=mesh,
                           strategy=strategy)]
    if step == "dpo":
        args.append(as_struct(abstract.params, built.state_shardings.params))
    start = time.perf_counter()
    compiled = built.lower(*args).compile()
    row = {"strategy": strategy, "mesh": dict(mesh.shape), "lint": [str(i) for i in issues],
           "compile_s": time.perf_counter() - start, **memory_mib(compiled),
           "collective_bytes": collective_bytes(compiled.as_text()),
           "model_flops": step_flops(config, step=step, batch_size=batch_size, seq_len=seq_len)}
    return CompiledStrategy(row, compiled, built, model, tx, step, batch_size, seq_len)


def time_steps(compiled: CompiledStrategy, *, steps: int, seed: int = 0) -> dict[str, float]:
    """Run the compiled step `steps` times on random tokens; `step_s` (median, the first dropped) and `loss`.

    Needs devices that can run (not a TPU topology's compile-only ones).
    """
    if steps < 1:
        return {}
    c = compiled
    mesh, strategy = c.step.mesh, c.step.strategy
    state = create_train_state(c.model.init, c.optimizer, rng=seed, logical_axes=c.model.logical_axes, mesh=mesh,
                               strategy=strategy)
    frozen = (jax.tree.map(lambda x: x.copy(), state.params),) if c.kind == "dpo" else ()
    rng = np.random.default_rng(seed)
    data = sh.batch_sharding(mesh, strategy)
    vocab, shape = c.model.config.vocab_size, (c.batch_size, c.seq_len)

    def batch():
        tok = lambda: rng.integers(4, vocab, shape).astype(np.int32)  # noqa: E731
        mask = np.ones(shape, np.int32)
        host = ({"tokens": tok(), "loss_mask": mask} if c.kind == "sft" else
                {"chosen_tokens": tok(), "chosen_loss_mask": mask, "rejected_tokens": tok(), "rejected_loss_mask": mask})
        return jax.device_put(host, data)

    times, metrics = [], None
    for _ in range(steps):
        b = batch()
        start = time.perf_counter()
        state, metrics = c.compiled(state, b, *frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:] if len(times) > 1 else times), "loss": float(metrics["loss"])}


def measure_strategy(config: ModelConfig, *, step: StepKind = "dpo", strategy: str,
                     mesh_shape: Mapping[str, int] | None, batch_size: int, seq_len: int,
                     devices: Sequence[Any] | None = None, timed_steps: int = 0) -> dict[str, Any]:
    """`compile_strategy(...).row`, plus `step_s` and `loss` from `timed_steps` runs when > 0."""
    compiled = compile_strategy(config, step=step, strategy=strategy, mesh_shape=mesh_shape, batch_size=batch_size,
                                seq_len=seq_len, devices=devices)
    return {**compiled.row, **time_steps(compiled, steps=timed_steps)}
