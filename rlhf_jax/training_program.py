"""The SFT, reward-model or DPO step of a model's shapes, jitted for a mesh on abstract arguments.

What `rlhf-jax compile --model ...` (`rlhf_jax.compile.compile_training_step`) and the sharding
measurement (`rlhf_jax.sharding_report.compile_strategy`, behind `benchmarks/bench_sharding.py` and
notebook 03) compile: the step a recipe builds (`steps.make_*_step` jitted by `jit_model_step` with
the strategy's shardings and donation), on `jax.ShapeDtypeStruct`s with shardings, so nothing of
model size is allocated; and the step's analytic FLOPs (`step_flops`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import sharding as sh
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.optim import OptimizerConfig, make_optimizer
from rlhf_jax.sharding_lint import lint
from rlhf_jax.state import abstract_train_state

__all__ = ["StepKind", "abstract_batch", "TrainingStepProgram", "training_step_program", "step_flops"]

StepKind = Literal["sft", "reward_model", "dpo"]


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(kind: Literal["sft", "pairs"], *, batch_size: int, seq_len: int, mesh: Mesh,
                   strategy: str | sh.Strategy) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch of `kind`, placed over the strategy's batch axes."""
    data = sh.batch_sharding(mesh, strategy)
    tok = lambda: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data)  # noqa: E731
    if kind == "sft":
        return {"tokens": tok(), "loss_mask": tok()}
    return {f"{p}_{k}": tok() for p in ("chosen", "rejected") for k in ("tokens", "loss_mask")}


class TrainingStepProgram(NamedTuple):
    """A model's SFT, reward-model or DPO step jitted for a mesh, and the abstract arguments to lower it on.

    Attributes:
      model: the `CausalLM` (a scalar head for the reward model).
      optimizer: its optax transform.
      step: the jitted step (`rlhf_jax.steps.jit_model_step`).
      args: `[state, batch]` (and the reference parameters for DPO) as ShapeDtypeStructs carrying the
        step's shardings; nothing of model size is allocated.
      lint: the sharding lint's issues for the model's parameters on this mesh and strategy.
    """

    model: CausalLM
    optimizer: Any
    step: Any
    args: list
    lint: list


def training_step_program(config: ModelConfig, *, step: StepKind, mesh: Mesh, strategy: str | sh.Strategy,
                          batch_size: int, seq_len: int, optimizer: OptimizerConfig | None = None,
                          micro_batches: int = 1, caller: str = "training_step_program") -> TrainingStepProgram:
    """Build the `step` a recipe builds for `config` on `mesh` (`compile_training_step`,
    `rlhf_jax.sharding_report.compile_strategy`): AdamW by default, the batch placed over the
    strategy's batch axes, DPO's reference parameters laid out as the policy's.

    Raises:
      ValueError: `step` is not "sft", "reward_model" or "dpo" (the message names `caller`).
      ShardingError: the strategy does not fit the mesh.
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
        raise ValueError(f"{caller}: step must be one of {sorted(makers)}, got {step!r}")
    optimizer = OptimizerConfig(name="adamw", learning_rate=1e-5) if optimizer is None else optimizer
    strategy = sh.check_strategy(strategy, mesh)
    model = CausalLM(config, head="scalar" if step == "reward_model" else "lm")
    issues = lint(model.abstract_params(), model.logical_axes, mesh=mesh, strategy=strategy)
    keys = {"sft": SFT_KEYS, "reward_model": PAIR_KEYS, "dpo": dpo_batch_keys()}[step]
    built = jit_model_step(makers[step](model, optimizer, micro_batches=micro_batches), model, optimizer, mesh=mesh,
                           strategy=strategy, micro_batches=micro_batches, batch_keys=keys,
                           frozen_params=int(step == "dpo"), name=f"{step}_step")
    tx = make_optimizer(optimizer)
    abstract = abstract_train_state(model.init, tx)
    args = [_abstract(abstract, built.state_shardings),
            abstract_batch("sft" if step == "sft" else "pairs", batch_size=batch_size, seq_len=seq_len,
                           mesh=mesh, strategy=strategy)]
    if step == "dpo":
        args.append(_abstract(abstract.params, built.state_shardings.params))
    return TrainingStepProgram(model, tx, built, args, issues)


def step_flops(config: ModelConfig, *, step: StepKind, batch_size: int, seq_len: int) -> float:
    """Analytic FLOPs of one training step (Kaplan et al. 2020's `6 N D`, plus attention).

    Per token: `2 N` forward and `4 N` backward for the `N` non-embedding parameters (layers and LM
    head; the embedding lookup is a gather), and `4 L T H d` forward attention FLOPs per token
    (scores and weighted values over the `T` positions), times 3 with the backward pass. Pair steps
    run `2 x batch_size` sequences; DPO adds a reference forward (one third of the trained cost).
    """
    c = config
    layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
    layer += 3 * c.hidden_size * c.intermediate_size
    head = c.hidden_size * (1 if step == "reward_model" else c.vocab_size)
    n = c.num_layers * layer + head
    sequences = batch_size * (1 if step == "sft" else 2)
    tokens = sequences * seq_len
    attention = 4 * c.num_layers * seq_len * c.num_heads * c.head_dim * tokens
    trained = 3 * (2 * n * tokens + attention)
    frozen = (2 * n * tokens + attention) if step == "dpo" else 0
    return float(trained + frozen)
