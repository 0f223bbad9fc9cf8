"""Ahead-of-time compilation of an experiment's training step(s): `rlhf-jax compile experiments/NAME.py`.

The run config says everything the compile needs (model, mesh and strategy, batch size and row
length, optimizer, micro-batches); `rlhf_jax.compile.compile_training_step` lowers and compiles the
step on abstract arguments for this machine's devices or a TPU topology, and reports per-device
memory, FLOPs and whether it fits. A multi-stage experiment config (e.g. SFT then DPO) compiles
each stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax import sharding as sh
from rlhf_jax.compile import CompileReport, compile_training_step, tpu_topology_devices
from rlhf_jax.config import ConfigError
from rlhf_jax.train.common import RunConfig
from rlhf_jax.train.dpo import DPOConfig
from rlhf_jax.train.reward_model import RewardModelConfig
from rlhf_jax.train.sft import SFTConfig

__all__ = ["STEP_KINDS", "run_configs", "compile_run"]

# Run config type -> the step kind `compile_training_step` builds.
STEP_KINDS: dict[type, str] = {SFTConfig: "sft", RewardModelConfig: "reward_model", DPOConfig: "dpo"}


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
        raise ConfigError(f"{type(config).__name__} holds no training run config (SFTConfig, RewardModelConfig, "
                          "DPOConfig) to compile")
    return stages


def compile_run(config: RunConfig, *, devices: list | None = None, topology: str | None = None,
                device_memory_bytes: int | None = None,
                compiler_options: dict[str, Any] | None = None) -> CompileReport:
    """Compile `config`'s training step for its mesh on `devices` (default: this machine) or a TPU topology.

    Args:
      config: an `SFTConfig`, `RewardModelConfig` or `DPOConfig`.
      devices: the devices to lay the mesh over (default: `jax.devices()`).
      topology: a TPU topology such as "v5e:4x4" (compile-only devices from libtpu), instead of `devices`.
      device_memory_bytes: memory per device for the fit check (default: from the devices).
      compiler_options: XLA options, e.g. `{"xla_backend_optimization_level": 0}` for a faster CPU
        compile whose memory analysis is unchanged (buffers are assigned before code generation).
    Returns:
      The `CompileReport`.
    """
    kind = STEP_KINDS.get(type(config))
    if kind is None:
        raise ConfigError(f"cannot compile a {type(config).__name__}; known run configs: "
                          f"{[t.__name__ for t in STEP_KINDS]}")
    if topology is not None:
        devices = tpu_topology_devices(topology)
    mesh = sh.make_mesh(config.mesh.shape, devices=devices)
    return compile_training_step(config.model, step=kind, mesh=mesh, strategy=config.mesh.strategy,
                                 batch_size=config.data.batch_size, seq_len=config.data.row_len,
                                 optimizer=config.optim, micro_batches=config.train.micro_batches,
                                 target=topology, device_memory_bytes=device_memory_bytes,
                                 compiler_options=compiler_options)
