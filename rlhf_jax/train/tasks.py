"""The built-in synthetic tasks, seen through one small protocol (no `isinstance` switches).

A `data.train` / `data.eval` source `synthetic:NAME` names an entry of `SYNTHETIC_TASKS`: how the
task's object (a field of `DataConfig`, e.g. `data.vowel`) generates rows of each data kind, its
reward function (the RL grader, also the gold metric of evaluations) and that metric's name.
Unpaired (KTO) rows are the preference pairs split into a desirable and an undesirable row, as
TRL's `unpair_preference_dataset` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SyntheticTask", "SYNTHETIC_TASKS", "BoundTask"]

Rows = Callable[[Any, int, int, float], list[dict]]  # (task object, n, seed, label_noise) -> rows


def _unpaired(task, n: int, seed: int, noise: float) -> list[dict]:
    rows = []
    for pair in task.preference_rows((n + 1) // 2, seed=seed, label_noise=noise):
        extra = {k: v for k, v in pair.items() if k not in ("prompt", "chosen", "rejected")}
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, **extra})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, **extra})
    return rows[:n]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """A built-in task.

    Attributes:
      field: the `DataConfig` field holding the task's object (its knobs).
      rows: data kind -> row generator.
      reward: task object -> its grader `(completions, **columns) -> list[float]` (TRL convention).
      gold_metric: the evaluation metric its grader gives (`eval/accuracy`, `eval/gold_reward`).
    """

    field: str
    rows: Mapping[str, Rows]
    reward: Callable[[Any], Callable[..., list[float]]]
    gold_metric: str


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    "vowel": SyntheticTask(
        field="vowel",
        rows={"sft": lambda t, n, seed, noise: t.sft_rows(n, seed=seed),
              "preference": lambda t, n, seed, noise: t.preference_rows(n, seed=seed, label_noise=noise),
              "unpaired": _unpaired,
              "prompt": lambda t, n, seed, noise: t.prompt_rows(n, seed=seed)},
        reward=lambda t: t.gold_reward,
        gold_metric="eval/gold_reward",
    ),
    "arithmetic": SyntheticTask(
        field="arithmetic",
        rows={"sft": lambda t, n, seed, noise: t.sft_rows(n, seed=seed),
              "prompt": lambda t, n, seed, noise: t.prompt_rows(n, seed=seed)},
        reward=lambda t: t.reward,
        gold_metric="eval/accuracy",
    ),
}


@dataclasses.dataclass(frozen=True)
class BoundTask:
    """A synthetic task with its object from a `DataConfig`: what evaluations and rewards use."""

    name: str
    spec: SyntheticTask
    obj: Any

    def rows(self, kind: str, n: int, *, seed: int, label_noise: float = 0.0) -> list[dict] | None:
        """`n` rows of `kind`, or None when the task has no such data."""
        make = self.spec.rows.get(kind)
        return None if make is None else make(self.obj, n, seed, label_noise)

    @property
    def reward(self) -> Callable[..., list[float]]:
        return self.spec.reward(self.obj)

    @property
    def gold_metric(self) -> str:
        return self.spec.gold_metric
