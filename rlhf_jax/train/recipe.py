"""One loop, many recipes: how every algorithm family trains, and the single driver that runs them.

A *recipe* is a small frozen set of functions describing one family (SFT, reward model, DPO family,
online RL, best-of-n): the kind of data it reads, how it builds its model(s), state and jitted
update step for a config and mesh (`build`, which reads no data), and how the host side feeds that
step (`trainer`: batches in, evaluations, what else a checkpoint keeps). `run(recipe, config)` does
the rest for every family alike:

    recipe.check(config, hooks)                           # config errors before any data is read
    data    = load_run_data(config, recipe.data_kind)     # data errors before anything compiles
    program = recipe.build(config, mesh)                  # the model, state layout and jitted step
    state   = restored or program.state.fresh()
    trainer = recipe.trainer(Context(...))                # host side around program.step
    fit(...)                                              # step, log, evaluate, checkpoint, signals

`rlhf-jax compile` calls the same `recipe.build` and lowers `program.step` on
`program.abstract_args()`, so it plans exactly the program a run executes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.distributed import is_main
from rlhf_jax.steps.common import Step
from rlhf_jax.train.data import HeldOut, RunData, load_run_data
from rlhf_jax.train.loop import RunDir, fit, open_run

__all__ = ["StateSpec", "Program", "Context", "Trainer", "Recipe", "run", "with_shardings"]


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (what `lower` and orbax's restore take)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class StateSpec(Protocol):
    """How a family's training state is made, laid out, saved and read back."""

    def abstract(self) -> Any:
        """The state's shapes and dtypes (`jax.eval_shape`), nothing allocated."""

    def shardings(self) -> Any:
        """The state's `NamedSharding` tree on the run's mesh."""

    def fresh(self) -> Any:
        """A new state, every array created in its sharding."""

    def save_items(self, state: Any) -> dict[str, Any]:
        """Checkpoint items (`params` alone loads as the policy's weights)."""

    def from_items(self, items: Mapping[str, Any]) -> Any:
        """The state from restored checkpoint items."""


@dataclasses.dataclass(frozen=True)
class Program:
    """What a recipe builds for a config and a mesh before any data is read.

    Attributes:
      step: the jitted update (`steps.common.jit_step`); `run` calls it, `compile` lowers it.
      state: the state's spec.
      batch: the abstract device batch the step takes (ShapeDtypeStructs with shardings).
      frozen: abstract frozen arguments after the batch (e.g. reference parameters).
      parts: what the trainer reuses (models, optimizers, ...), by name.
    """

    step: Step
    state: StateSpec
    batch: Mapping[str, jax.ShapeDtypeStruct]
    frozen: tuple = ()
    parts: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def abstract_args(self) -> tuple:
        """`(state, batch, *frozen)` as sharded ShapeDtypeStructs: what `compile` lowers."""
        return (with_shardings(self.state.abstract(), self.state.shardings()), dict(self.batch), *self.frozen)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a recipe's trainer is built from.

    Attributes:
      config: the run config.
      program: the recipe's `build` result.
      data: tokenizer and tokenized splits.
      mesh: the device mesh.
      run: the run directory (checkpointer, files).
      extras: host state restored with the checkpoint (empty for a fresh run).
      hooks: the keyword arguments given to `run` (e.g. `reward_sources`).
    """

    config: Any
    program: Program
    data: RunData
    mesh: Mesh
    run: RunDir
    extras: Mapping[str, Any]
    hooks: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The host side of a run around the jitted step.

    Attributes:
      step: `(state, host batch) -> (state, metrics)`.
      batches: host batches, positioned after the restored step.
      extras: `() -> JSON host state` saved with each checkpoint (iterator positions).
      evaluate: `state -> "eval/..." metrics`, or None.
      held_out: what `evaluate` reads of the held-out set (`rlhf_jax.train.data.HeldOut`, shown in
        the console's eval lines), or None.
    """

    step: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]]
    batches: Iterator
    extras: Callable[[], Mapping[str, Any]]
    evaluate: Callable[[Any], Mapping[str, float]] | None = None
    held_out: HeldOut | None = None


def _no_check(config, hooks) -> None:
    del config, hooks


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """One algorithm family as the functions `run` and `compile` call.

    Attributes:
      name: the family's name (reports, errors).
      data_kind: `config -> "sft" | "preference" | "unpaired" | "prompt"`, the kind of `data.train`
        and `data.eval` (the PRM's "steps", read by its own `load_data`).
      build: `(config, mesh) -> Program`: models, state spec and jitted step; reads no data.
      trainer: `Context -> Trainer`: the host side (data to device, sampling, evaluation).
      progress_keys: metrics shown on the progress bar.
      check: `(config, hooks) -> None`, raising `ConfigError` for a combination the family cannot
        run, before any data is read.
      mesh: `config -> Mesh` of the trainer (None: `config.mesh` over all devices); online RL
        leaves the sampler's own devices out (`off_policy.sampler_devices`).
      load_data: `config -> RunData` for a family whose data is none of the four kinds (e.g. the
        step-labelled rows of process reward models) or is tokenized its own way (agentic chat runs'
        prompts carry the tools); None: `load_run_data(config, data_kind)`.
    """

    name: str
    data_kind: Callable[[Any], str]
    build: Callable[[Any, Mesh], Program]
    trainer: Callable[[Context], Trainer]
    progress_keys: tuple[str, ...] = ("loss",)
    check: Callable[[Any, Mapping[str, Any]], None] = _no_check
    mesh: Callable[[Any], Mesh] | None = None
    load_data: Callable[[Any], RunData] | None = None


def _check_run_dir(path: str) -> None:
    """Raise ConfigError naming `workdir` when the run directory `path` cannot be created: it, or the
    nearest of its parents that exists, is not a directory."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"workdir: the run directory {path} {where}; choose another workdir (--set workdir=...)")


def run(recipe: Recipe, config, **hooks) -> dict[str, Any]:
    """Run (or resume) `config` with `recipe`; return a summary.

    Config, data, vocabulary and the checkpoint to resume from are checked before anything is
    compiled; a restarted run continues from its latest checkpoint bit for bit.

    Args:
      recipe: the family's recipe (e.g. `rlhf_jax.train.sft.RECIPE`).
      config: its run config.
      **hooks: extras for the recipe's trainer (e.g. `reward_sources` for online RL).

    Returns:
      `{"run_dir", "step", "stopped_by", "eval": last eval metrics, "train": last train metrics}`.
    """
    recipe.check(config, hooks)
    _check_run_dir(config.run_dir)
    data = load_run_data(config, recipe.data_kind(config)) if recipe.load_data is None else recipe.load_data(config)
    mesh = config.mesh.make_mesh() if recipe.mesh is None else recipe.mesh(config)
    program = recipe.build(config, mesh)
    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run_dir:
        if run_dir.restore_step is not None:
            target = with_shardings(program.state.abstract(), program.state.shardings())
            items, extras = run_dir.checkpointer.restore(program.state.save_items(target), step=run_dir.restore_step)
            state, start = program.state.from_items(items), int(run_dir.restore_step)
        else:
            state, start, extras = program.state.fresh(), 0, {}
        if is_main():  # after the restore: a refused rerun leaves the run's tokenizer as it was
            data.tokenizer.save_pretrained(run_dir.file("tokenizer"))
        trainer = recipe.trainer(Context(config, program, data, mesh, run_dir, extras, hooks))
        result = fit(state=state, step_fn=trainer.step, batches=trainer.batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run_dir,
                     save_items=program.state.save_items, extras=trainer.extras, evaluate=trainer.evaluate,
                     progress_keys=recipe.progress_keys, run_config=to_dict(config), held_out=trainer.held_out)
    return {"run_dir": run_dir.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
