"""Ahead-of-time compilation of what a run executes: `rlhf-jax compile experiments/NAME.py`.

For each run config of an experiment, the family's recipe builds the same `Program` that
`rlhf-jax run` would run (`recipe.build(config, mesh)`: model, state shardings, jitted update with
its donation), and `rlhf_jax.compile.aot_compile` lowers and compiles `program.step` on
`program.abstract_args()` for this machine's devices or a TPU topology, reporting per-device
memory, FLOPs and whether it fits. A multi-stage experiment compiles each stage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.compile import CompileReport, aot_compile, tpu_topology_devices
from rlhf_jax.config import ConfigError
from rlhf_jax.train import recipe_for
from rlhf_jax.train.recipe import Program
from rlhf_jax.train.run_config import RunConfig

__all__ = ["run_configs", "build_program", "compile_run"]


def run_configs(config: Any) -> dict[str, RunConfig]:
    """The training runs of an experiment config: itself, or each `RunConfig` field of a multi-stage one.

    Raises:
      ConfigError: the config holds no run config.
    """
    if isinstance(config, RunConfig):
        return {config.name: config}
    stages = {}
    if dataclasses.is_dataclass(config):
        stages = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                  if isinstance(getattr(config, f.name), RunConfig)}
    if not stages:
        raise ConfigError(f"{type(config).__name__} holds no training run config to compile")
    return stages


def build_program(config: RunConfig, *, devices: list | None = None, topology: str | None = None) -> Program:
    """The `Program` a run of `config` executes, for its mesh over `devices` or a TPU topology's."""
    if topology is not None:
        devices = tpu_topology_devices(topology)
    mesh = sh.make_mesh(config.mesh.shape, devices=devices)
    return recipe_for(config).build(config, mesh)


def compile_run(config: RunConfig, *, devices: list | None = None, topology: str | None = None,
                device_memory_bytes: int | None = None,
                compiler_options: dict[str, Any] | None = None) -> CompileReport:
    """Compile `config`'s update step exactly as `rlhf-jax run` builds it, for its mesh.

    Args:
      config: any run config with a recipe (`rlhf_jax.train.recipe_for`).
      devices: the devices to lay the mesh over (default: `jax.devices()`).
      topology: a TPU topology such as "v5e:4x4" (compile-only devices from libtpu), instead of `devices`.
      device_memory_bytes: memory per device for the fit check (default: from the devices).
      compiler_options: XLA options, e.g. `{"xla_backend_optimization_level": 0}` for a faster CPU
        compile whose memory analysis is unchanged (buffers are assigned before code generation).
    Returns:
      The `CompileReport`.
    """
    program = build_program(config, devices=devices, topology=topology)
    state = program.abstract_args()[0]
    devices_used = list(program.step.mesh.devices.flat)
    label = topology or f"{devices_used[0].platform} x{len(devices_used)}"
    return aot_compile(program.step, program.abstract_args(), target=label, state_bytes=_bytes_per_device(state),
                       device_memory_bytes=device_memory_bytes, compiler_options=compiler_options)


def _bytes_per_device(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
