"""Multi-stage experiments: runs chained by their checkpoints (SFT -> reward model -> PPO, ...).

    stages = [Stage("sft", sft_config),
              Stage("reward_model", rm_config),
              Stage("ppo", ppo_config, init_from="sft", reward_model="reward_model")]
    summaries = run_stages("runs/quickstart", stages)

Each stage runs in `<workdir>/<name>` (its config's `workdir` is replaced); `init_from` names an
earlier stage whose final checkpoint the stage starts from (its latest step, not the best one
under `checkpoint.keep_best`), `reward_model` an earlier reward-model stage whose checkpoint scores
it (`rewards.reward_model`, also PPO's critic initialization). Before the first stage trains, every
stage's config, data and paths are checked (`check_stages`), so a bad file of stage 3 is reported
before stage 1 spends its minutes. Finished stages resume as no-ops; a stage stopped by a signal
stops the chain, and the next run resumes it before any later stage starts.

A stage records the checkpoints it started from (`stage_inputs.json` in its directory). When an
earlier stage's checkpoint has changed since (re-trained, trained further, deleted and run again),
the later stage keeps its own checkpoints, which came from the old weights, and `run_stages` warns
naming both stages (`StaleStageWarning`): delete the later stage's directory to run it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax.checkpoint import is_checkpoint_dir
from rlhf_jax.checkpoint_manifest import MANIFEST_NAME
from rlhf_jax.config import ConfigError
from rlhf_jax.distributed import is_main
from rlhf_jax.train import recipe_for
from rlhf_jax.train.data import load_run_data
from rlhf_jax.train.recipe import run

__all__ = ["Stage", "StaleStageWarning", "resolve_stages", "check_stages", "run_stages", "checkpoints"]

INPUTS_FILE = "stage_inputs.json"  # in a stage's directory: the earlier checkpoints it started from


class StaleStageWarning(UserWarning):
    """A stage's checkpoints come from an earlier stage's weights that have changed since."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One run of a chain.

    Attributes:
      name: the stage's directory under the chain's workdir (and how later stages name it).
      config: its run config.
      init_from: an earlier stage whose final checkpoint (latest step) the policy starts from.
      reward_model: an earlier reward-model stage whose checkpoint is `rewards.reward_model`.
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
      ConfigError: a duplicate stage name, a reference to a stage that does not come earlier, or a
        `reward_model` that names a stage of another recipe than "reward_model".
    """
    seen: list[str] = []
    recipes: dict[str, str] = {}
    out = []
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"stages: the name {stage.name!r} is used twice")
        for field in ("init_from", "reward_model"):
            ref = getattr(stage, field)
            if ref is not None and ref not in seen:
                raise ConfigError(f"stages: {stage.name}.{field}={ref!r} names no earlier stage; earlier: {seen}")
        if stage.reward_model is not None and recipes[stage.reward_model] != "reward_model":
            # Its checkpoint would be a language model: refused only once the chain got there.
            raise ConfigError(f"stages: {stage.name}.reward_model={stage.reward_model!r} names a "
                              f"{recipes[stage.reward_model]} stage, not a reward_model stage")
        given = {"init_from": stage.config.checkpoint.init_from,
                 "reward_model": getattr(getattr(stage.config, "rewards", None), "reward_model", None)}
        for field, setting in (("init_from", "checkpoint.init_from"), ("reward_model", "rewards.reward_model")):
            if getattr(stage, field) is not None and given[field] \
                    and given[field] != checkpoints(workdir, getattr(stage, field)):  # one would be ignored
                raise ConfigError(f"stages: {stage.name} sets both {field}={getattr(stage, field)!r} and "
                                  f"{setting}={given[field]}; give one")
        config = dataclasses.replace(stage.config, workdir=os.path.join(workdir, stage.name))
        if stage.init_from is not None:
            config = dataclasses.replace(config, checkpoint=dataclasses.replace(
                config.checkpoint, init_from=checkpoints(workdir, stage.init_from)))
        if stage.reward_model is not None:
            config = dataclasses.replace(config, rewards=dataclasses.replace(
                config.rewards, reward_model=checkpoints(workdir, stage.reward_model)))
        out.append(dataclasses.replace(stage, config=config))
        seen.append(stage.name)
        recipes[stage.name] = recipe_for(stage.config).name
    return out


def _checkpoint_id(root: str) -> dict[str, Any] | None:
    """The latest step of the checkpoint directory `root` and a digest that changes whenever that
    step is written again (its integrity manifest; else the step directory's time), or None."""
    steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
    if not steps:
        return None
    step_dir = os.path.join(root, str(max(steps)))
    manifest = os.path.join(step_dir, MANIFEST_NAME)
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    else:
        digest = f"mtime:{os.stat(step_dir).st_mtime_ns}"
    return {"step": max(steps), "digest": digest}


def _inputs(workdir: str, stage: Stage) -> dict[str, Any]:
    """`{"init_from" / "reward_model": {"stage", "step", "digest"}}` of the earlier stages `stage` reads."""
    out = {}
    for field in ("init_from", "reward_model"):
        ref = getattr(stage, field)
        if ref is not None:
            out[field] = {"stage": ref, **(_checkpoint_id(checkpoints(workdir, ref)) or {})}
    return out


def _check_inputs(workdir: str, stage: Stage) -> None:
    """Record what `stage` starts from (a fresh start), or warn when its checkpoints came from
    earlier checkpoints that have changed since."""
    record = os.path.join(stage.config.run_dir, INPUTS_FILE)
    now = _inputs(workdir, stage)
    if not is_checkpoint_dir(os.path.join(stage.config.run_dir, "checkpoints")) or not os.path.isfile(record):
        if now and is_main():  # one process writes files
            os.makedirs(stage.config.run_dir, exist_ok=True)
            tmp = record + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(now, f, indent=1)
            os.replace(tmp, record)
        return
    with open(record, encoding="utf-8") as f:
        then = json.load(f)
    for field, used in then.items():
        current = now.get(field)
        if current != used:
            was = f"stage {used['stage']!r} at step {used.get('step')}"
            is_now = "gone" if current is None else (f"stage {current['stage']!r}" if current["stage"] != used["stage"]
                                                     else "re-written") + f" at step {current.get('step')}"
            warnings.warn(f"stage {stage.name!r}: its checkpoints started from {was} ({field}), which is now "
                          f"{is_now}; they are kept as they are (stale). Delete {stage.config.run_dir} to run "
                          f"{stage.name!r} again from the new weights.", StaleStageWarning, stacklevel=3)


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
        _check_inputs(workdir, stage)
        start = time.perf_counter()
        summary = run(recipe_for(stage.config), stage.config, **stage.hooks)
        summaries[stage.name] = summary
        if summary["stopped_by"]:
            break
        if after is not None:
            after(stage, summary, time.perf_counter() - start)
    return summaries
