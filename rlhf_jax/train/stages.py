"""Multi-stage experiments: runs chained by their checkpoints (SFT -> reward model -> PPO, ...).

    stages = [Stage("sft", sft_config),
              Stage("reward_model", rm_config),
              Stage("ppo", ppo_config, init_from="sft", reward_model="reward_model")]
    summaries = run_stages("runs/quickstart", stages)

Each stage runs in `<workdir>/<name>` (its config's `workdir` is replaced); `init_from` names an
earlier stage whose final checkpoint the stage starts from, `reward_model` one whose checkpoint
scores it (`rewards.reward_model`, also PPO's critic initialization). Before the first stage
trains, every stage's config, data and paths are checked (`check_stages`), so a bad file of stage
3 is reported before stage 1 spends its minutes. Finished stages resume as no-ops; a stage stopped
by a signal stops the chain.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax.config import ConfigError
from rlhf_jax.train import recipe_for
from rlhf_jax.train.data import load_run_data
from rlhf_jax.train.recipe import run

__all__ = ["Stage", "resolve_stages", "check_stages", "run_stages", "checkpoints"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One run of a chain.

    Attributes:
      name: the stage's directory under the chain's workdir (and how later stages name it).
      config: its run config.
      init_from: an earlier stage whose final checkpoint the policy starts from.
      reward_model: an earlier stage whose checkpoint is `rewards.reward_model`.
      hooks: keyword arguments for the family's driver (e.g. `reward_sources`).
    """

    name: str
    config: Any
    init_from: str | None = None
    reward_model: str | None = None
    hooks: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def checkpoints(workdir: str, stage: str) -> str:
    """The checkpoint directory of `stage` in a chain's `workdir`."""
    return os.path.join(workdir, stage, "checkpoints")


def resolve_stages(workdir: str, stages: Sequence[Stage]) -> list[Stage]:
    """The stages with their configs' `workdir`, `checkpoint.init_from` and `rewards.reward_model` set.

    Raises:
      ConfigError: a duplicate stage name, or a reference to a stage that does not come earlier.
    """
    seen: list[str] = []
    out = []
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"stages: the name {stage.name!r} is used twice")
        for field in ("init_from", "reward_model"):
            ref = getattr(stage, field)
            if ref is not None and ref not in seen:
                raise ConfigError(f"stages: {stage.name}.{field}={ref!r} names no earlier stage; earlier: {seen}")
        config = dataclasses.replace(stage.config, workdir=os.path.join(workdir, stage.name))
        if stage.init_from is not None:
            config = dataclasses.replace(config, checkpoint=dataclasses.replace(
                config.checkpoint, init_from=checkpoints(workdir, stage.init_from)))
        if stage.reward_model is not None:
            config = dataclasses.replace(config, rewards=dataclasses.replace(
                config.rewards, reward_model=checkpoints(workdir, stage.reward_model)))
        out.append(dataclasses.replace(stage, config=config))
        seen.append(stage.name)
    return out


def check_stages(stages: Sequence[Stage]) -> None:
    """Check every stage's config, data and external paths before anything trains.

    Paths that an earlier stage of the chain writes are not required to exist yet.

    Raises:
      ConfigError / DataError / FileNotFoundError: naming the stage.
    """
    produced = set()
    for stage in stages:
        config = stage.config
        recipe = recipe_for(config)
        try:
            recipe.check(config, stage.hooks)
            for path, key in ((config.checkpoint.init_from, "checkpoint.init_from"),
                              (getattr(getattr(config, "rewards", None), "reward_model", None), "rewards.reward_model")):
                if path and path not in produced and not os.path.exists(path):
                    raise FileNotFoundError(f"{key}: {path} does not exist")
            if recipe.load_data is None:
                load_run_data(config, recipe.data_kind(config))
            else:
                recipe.load_data(config)
        except (ValueError, FileNotFoundError) as e:
            # Prefix the message in place: error classes such as DataError take other constructor args.
            e.args = (f"stage {stage.name!r}: {e}",)
            raise e from None
        produced.add(os.path.join(config.run_dir, "checkpoints"))


def run_stages(workdir: str, stages: Sequence[Stage], *,
               after: Callable[[Stage, dict[str, Any], float], None] | None = None) -> dict[str, dict[str, Any]]:
    """Check, then run the stages in order; return `{stage name: the driver's summary}`.

    Args:
      workdir: the chain's directory.
      stages: the stages (`Stage`).
      after: `(stage, summary, seconds)` called after each finished stage (reporting).

    Returns:
      The summaries of the stages that ran; when one was stopped by a signal (its summary's
      `stopped_by` is set), it is the last.
    """
    resolved = resolve_stages(workdir, stages)
    check_stages(resolved)
    summaries: dict[str, dict[str, Any]] = {}
    for stage in resolved:
        start = time.perf_counter()
        summary = run(recipe_for(stage.config), stage.config, **stage.hooks)
        summaries[stage.name] = summary
        if summary["stopped_by"]:
            break
        if after is not None:
            after(stage, summary, time.perf_counter() - start)
    return summaries
