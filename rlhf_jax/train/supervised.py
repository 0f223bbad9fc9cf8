"""What the offline families (SFT, reward model, DPO family) share: one model's `TrainState` as a
`StateSpec`, the `Program` around a pure update, and the trainer that feeds it host batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as sh
from rlhf_jax.data.batches import batch_spec
from rlhf_jax.models import CausalLM, LoraLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.state import TrainState, abstract_train_state, create_train_state, train_state_from_params
from rlhf_jax.steps.common import jit_step, model_state_shardings
from rlhf_jax.train.data import HeldOut, batches_from, device_batch, train_batches
from rlhf_jax.train.recipe import Context, Program, Trainer
from rlhf_jax.train.adapters import params_from_items, params_items
from rlhf_jax.train.weights import starting_params

__all__ = ["ModelState", "model_program", "abstract_batch", "num_segments", "supervised_trainer"]


@dataclasses.dataclass(frozen=True)
class ModelState:
    """The `StateSpec` of one model trained with one optimizer (`TrainState`).

    A fresh state starts from `checkpoint.init_from` when set (a Hugging Face directory or an
    rlhf-jax checkpoint), else from the random initialization of `seed`; both are created
    directly in the strategy's shardings. A `LoraLM` starts from that base with fresh adapters,
    and its checkpoints keep the base as `params` and the adapters as `lora` (`train.adapters`).
    """

    model: CausalLM | LoraLM
    tx: optax.GradientTransformation
    mesh: Mesh
    strategy: str
    seed: int
    init_from: str | None

    def abstract(self) -> TrainState:
        return abstract_train_state(self.model.init, self.tx)

    def shardings(self) -> TrainState:
        return model_state_shardings(self.model, self.tx, mesh=self.mesh, strategy=self.strategy)

    def fresh(self) -> TrainState:
        place = dict(logical_axes=self.model.logical_axes, mesh=self.mesh, strategy=self.strategy)
        if self.init_from:
            params = starting_params(self.model, self.init_from, rng=jax.random.key(self.seed), mesh=self.mesh,
                                     strategy=self.strategy)
            return train_state_from_params(params, self.tx, rng=self.seed, **place)
        return create_train_state(self.model.init, self.tx, rng=self.seed, **place)

    def save_items(self, state: TrainState) -> dict[str, Any]:
        """`params` apart (they load alone, e.g. as the next stage's initial weights) and the rest."""
        return {**params_items(self.model, state.params),
                "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}}

    def from_items(self, items: Mapping[str, Any]) -> TrainState:
        train = items["train"]
        return TrainState(train["step"], params_from_items(self.model, items), train["opt_state"], train["rng"])


def num_segments(config) -> int:
    """Examples per packed row (1 when `data.pack` is off)."""
    return config.data.max_segments if config.data.pack else 1


def abstract_batch(kind: str, config, mesh: Mesh, *, keys: Sequence[str] | None = None) -> dict:
    """The device batch of `kind` a run's step takes: `batch_spec` split over the strategy's batch axes."""
    data = sh.batch_sharding(mesh, config.mesh.strategy)
    spec = batch_spec(kind, batch_size=config.data.batch_size, seq_len=config.data.row_len,
                      num_segments=num_segments(config))
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in spec.items()
            if keys is None or k in keys}


def model_program(config, mesh: Mesh, *, model: CausalLM | LoraLM, update: Callable, kind: str, batch_keys: Sequence[str],
                  name: str, frozen_params: int = 0, batch_extra: Mapping[str, jax.ShapeDtypeStruct] | None = None
                  ) -> Program:
    """The `Program` of a one-model family: its state spec and `update` jitted for the run's mesh.

    Args:
      config: the run config (model, data, mesh, optim, train, checkpoint sections).
      mesh: the device mesh.
      model: the trained model.
      update: the pure `update(state, batch, *frozen) -> (state, metrics)`.
      kind: the data kind of its batches.
      batch_keys: keys every batch must have.
      name: the step's name (errors, reports).
      frozen_params: how many frozen parameter trees (laid out like the model's) follow the batch.
      batch_extra: abstract arrays added to the data kind's batch (e.g. precomputed log-probs).
    """
    tx = make_optimizer(config.optim)
    state = ModelState(model, tx, mesh, config.mesh.strategy, config.seed, config.checkpoint.init_from)
    shardings = state.shardings()
    frozen_shardings = (shardings.params,) * frozen_params
    step = jit_step(update, mesh=mesh, strategy=config.mesh.strategy, state_shardings=shardings,
                    frozen_shardings=frozen_shardings, micro_batches=config.train.micro_batches,
                    batch_keys=batch_keys, name=name)
    batch = {**abstract_batch(kind, config, mesh), **(batch_extra or {})}
    abstract_params = state.abstract().params
    frozen = tuple(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                                shardings.params) for _ in range(frozen_params))
    return Program(step, state, batch, frozen, parts={"model": model})


def supervised_trainer(ctx: Context, *, evaluate: Callable[[Any], Mapping[str, float]] | None = None,
                       frozen: tuple = (), prepare: Callable[[dict, Any], dict] | None = None,
                       held_out: HeldOut | None = None) -> Trainer:
    """The trainer of a one-model family: host batch -> device -> `program.step(state, batch, *frozen)`.

    Args:
      ctx: the run context.
      evaluate: `params -> eval metrics`, or None.
      frozen: concrete frozen arguments of the step (e.g. reference parameters).
      prepare: `(host batch, iterator) -> host batch`, run before the transfer (e.g. adding
        precomputed per-example arrays; the iterator's `last_rows` name the batch's examples).
      held_out: what `evaluate` reads of the held-out set (shown in the console's eval lines).
    """
    config, mesh, strategy = ctx.config, ctx.mesh, ctx.config.mesh.strategy
    batches = batches_from(train_batches(ctx.data.train, config.data), ctx.extras)
    step = ctx.program.step

    def step_fn(state, batch):
        if prepare is not None:
            batch = prepare(batch, batches)
        return step(state, device_batch(batch, mesh, strategy), *frozen)

    return Trainer(step=step_fn, batches=batches, extras=lambda: {"data": batches.get_state()},
                   evaluate=None if evaluate is None else (lambda state: evaluate(state.params)), held_out=held_out)
