"""What one training step costs under a sharding strategy: per-device memory and collective bytes.

The one measurement behind `benchmarks/bench_sharding.py` and `notebooks/03_sharding_strategies.ipynb`,
so the two always report the same figures. `compile_strategy` builds the step a recipe builds
(`steps.make_*_step` jitted by `jit_model_step` for a strategy and a mesh), compiles it on abstract
arguments (nothing of model size is allocated, so the devices may be a TPU topology's compile-only
devices) and reads

- per-device argument / temporary / peak memory from XLA's memory analysis of the compiled program;
- the bytes each collective kind produces per step, from the compiled (partitioned) HLO text, as
  `rlhf-jax compile` counts them (`rlhf_jax.hlo_analysis`: a collective inside the scanned layer
  loop counts once per layer; `analyze_hlo(text).collective_ops` lists the instructions).

    row = measure_strategy(get_config("tiny"), step="dpo", strategy="fsdp", mesh_shape={"fsdp": 8},
                           batch_size=8, seq_len=64)          # a dict: memory MiB, collective bytes, ...
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.training_program import StepKind, step_flops, training_step_program
from rlhf_jax.hlo_analysis import analyze_hlo
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.state import create_train_state

__all__ = [
    "CompiledStrategy",
    "memory_mib",
    "compile_strategy",
    "time_steps",
    "measure_strategy",
]


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
        `collective_bytes` (`analyze_hlo(...).collectives` of the compiled HLO) and `model_flops`.
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


def compile_strategy(config: ModelConfig, *, step: StepKind = "dpo", strategy: str | sh.Strategy,
                     mesh_shape: Mapping[str, int] | None, batch_size: int, seq_len: int,
                     devices: Sequence[Any] | None = None, learning_rate: float = 1e-5) -> CompiledStrategy:
    """Build the `step` of `config` for `strategy` on a mesh and compile it on abstract arguments.

    Args:
      config: the model's shapes.
      step: "sft", "reward_model" or "dpo" (sigmoid DPO with a reference model, `update(state,
        batch, reference_params)`).
      strategy: a registered strategy name (`dp`, `fsdp`, `tp`, `fsdp_tp`, ...) or a `Strategy` (the row
        names it).
      mesh_shape: mesh axis sizes, e.g. `{"fsdp": 4, "tensor": 2}` (None: all devices on `data`).
      batch_size, seq_len: sequences (pairs for reward_model / dpo) per step and their length.
      devices: the devices to lay the mesh over (default all of this process's; a TPU topology's
        compile-only devices from `rlhf_jax.targets.tpu_topology_devices` work too).
      learning_rate: AdamW's learning rate (its state is part of the per-device memory).

    Returns:
      A `CompiledStrategy`.
    """
    mesh = sh.make_mesh(mesh_shape, devices=devices)
    program = training_step_program(config, step=step, mesh=mesh, strategy=strategy, batch_size=batch_size,
                                    seq_len=seq_len, optimizer=OptimizerConfig(learning_rate=learning_rate),
                                    caller="compile_strategy")
    start = time.perf_counter()
    compiled = program.step.lower(*program.args).compile()
    row = {"strategy": program.step.strategy.name, "mesh": dict(mesh.shape),
           "lint": [str(i) for i in program.lint], "compile_s": time.perf_counter() - start, **memory_mib(compiled),
           "collective_bytes": analyze_hlo(compiled.as_text()).collectives,
           "model_flops": step_flops(config, step=step, batch_size=batch_size, seq_len=seq_len)}
    return CompiledStrategy(row, compiled, program.step, program.model, program.optimizer, step, batch_size,
                            seq_len)


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


def measure_strategy(config: ModelConfig, *, step: StepKind = "dpo", strategy: str | sh.Strategy,
                     mesh_shape: Mapping[str, int] | None, batch_size: int, seq_len: int,
                     devices: Sequence[Any] | None = None, timed_steps: int = 0) -> dict[str, Any]:
    """`compile_strategy(...).row`, plus `step_s` and `loss` from `timed_steps` runs when > 0."""
    compiled = compile_strategy(config, step=step, strategy=strategy, mesh_shape=mesh_shape, batch_size=batch_size,
                                seq_len=seq_len, devices=devices)
    return {**compiled.row, **time_steps(compiled, steps=timed_steps)}
