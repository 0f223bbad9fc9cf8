"""The environment protocol of multi-turn rollouts, tool use as one kind of environment, and the
built-in environments.

    env = make_environment("calculator")            # ToolEnvironment with the "calc" tool
    first = env.reset({"prompt": "347*59=", "answer": "20473"})
    result = env.step("<calc(347*59)>")             # StepResult(observation=ToolResult("calc", "20473", "ok"),
                                                    #            reward=0.0, done=False, info={...})
    result = env.step("20473")                      # a final answer: reward 1.0, done

An `Environment` is plain Python: `reset(task) -> observation` and `step(action_text) ->
StepResult(observation, reward, done, info)`; the rollout (`rlhf_jax.agents.rollout`) decodes the
policy's turn, calls `step` on the host, renders the observation into tokens and continues.
Observations are text, or a `ToolResult` (rendered through the chat template's tool role when a
template is used). One environment object serves one trajectory; `make_environment(name)` gives a
fresh one per trajectory.

Built-ins (`ENVIRONMENTS`):

- `calculator`: the `calc` tool (`rlhf_jax.agents.tools.calculator_tool`); a turn without a call is
  the final answer, graded by exact match against the task's `answer` (reward 1 or 0).
- `arithmetic`: the same task and grader with no tools at all (a call gets an "unknown tool" error
  observation): the ablation of `experiments/agentic_tiny.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from rlhf_jax.agents.tools import CallFormat, TagCallFormat, Tool, ToolResult, ToolRunner, calculator_tool

__all__ = [
    "Environment",
    "StepResult",
    "ToolEnvironment",
    "ArithmeticTools",
    "exact_answer",
    "ENVIRONMENTS",
    "register_environment",
    "make_environment",
    "UnknownEnvironment",
]


class StepResult(NamedTuple):
    """One environment step.

    Attributes:
      observation: what the model sees next (text or a `ToolResult`); None when `done`.
      reward: the reward of this turn.
      done: the episode ended (no further turn).
      info: host-side details (e.g. `{"tool_status": "timeout"}`), counted by the rollout.

    The rollout checks each step's result: a reward that is not a finite real number, a `done` that
    is not a bool, an observation that is not text, a `ToolResult` or None, or `info` that is not a
    mapping ends the episode like a step that raises (reward 0, `env/errors`, the message in
    `Trajectory.errors` and the log).
    """

    observation: str | ToolResult | None
    reward: float
    done: bool
    info: Mapping[str, Any] = {}


class Environment(Protocol):
    """A multi-turn environment: plain Python, one object per trajectory."""

    def reset(self, task: Mapping[str, Any]) -> str:
        """Start an episode on `task` (a data row: `prompt` and any columns); the first observation."""

    def step(self, action: str) -> StepResult:
        """The policy's turn `action` (decoded text) -> the next observation, reward, done."""


def exact_answer(answer: str, task: Mapping[str, Any]) -> float:
    """1.0 when the final answer equals the task's `answer` column (both stripped), else 0.0."""
    if "answer" not in task:
        raise KeyError(f"exact_answer: the task has no 'answer' column (columns: {sorted(task)})")
    return float(answer.strip() == str(task["answer"]).strip())


class ToolEnvironment:
    """Tool use as an environment: a turn ending in a call runs the tool; a turn without one is final.

    Args:
      tools: the callable tools (by name; may be empty).
      call_format: how calls are written (`TagCallFormat`, `HermesCallFormat`, `JsonCallFormat`).
      grader: `(final answer text, task) -> reward` of the final turn.
      runner: time limit and output cap of the calls.
      call_reward: reward of a turn with a call (0 by default; a shaping term if set).
    """

    def __init__(self, tools: Sequence[Tool] = (), *, call_format: CallFormat = TagCallFormat(),
                 grader: Callable[[str, Mapping[str, Any]], float] = exact_answer,
                 runner: ToolRunner = ToolRunner(), call_reward: float = 0.0):
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"ToolEnvironment: duplicate tool names {names}")
        self.tools = {t.name: t for t in tools}
        self.call_format, self.grader, self.runner, self.call_reward = call_format, grader, runner, call_reward
        self.task: Mapping[str, Any] | None = None

    def reset(self, task: Mapping[str, Any]) -> str:
        self.task = dict(task)
        return str(self.task.get("prompt", ""))

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("ToolEnvironment.step before reset")
        call = self.call_format.parse(action)
        if call is None:
            return StepResult(None, float(self.grader(action, self.task)), True, {})
        result = self.runner.run(self.tools, call)
        return StepResult(result, self.call_reward, False, {"tool_status": result.status})


# ----------------------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticTools:
    """Multiplications too long for a tiny model to compute, easy to copy from the calculator.

    Prompts `"347*59="`, answers `"20473"`; a demonstration calls the calculator with the prompt's
    expression and copies its result:

        347*59=<calc(347*59)>[20473]20473<eos>
        ^prompt ^action      ^obs.  ^action

    Attributes:
      digits: digits of each operand (first, second).
      call_format: how the demonstrations write the call and its result.
      tool: the calculator's name.
    """

    digits: tuple[int, int] = (3, 2)
    call_format: TagCallFormat = TagCallFormat(open="<", close=">", result_open="[", result_close="]")
    tool: str = "calc"

    def problems(self, n: int, *, seed: int) -> list[dict[str, str]]:
        """`n` rows `{"prompt": "347*59=", "answer": "20473", "expression": "347*59"}` (seeded)."""
        rng = np.random.default_rng([seed, 24])
        lo = [10 ** (d - 1) for d in self.digits]
        hi = [10 ** d for d in self.digits]
        a = rng.integers(lo[0], hi[0], size=n)
        b = rng.integers(lo[1], hi[1], size=n)
        return [{"prompt": f"{x}*{y}=", "answer": str(x * y), "expression": f"{x}*{y}"}
                for x, y in zip(a.tolist(), b.tolist())]

    def demonstration_rows(self, n: int, *, seed: int) -> list[dict[str, str]]:
        """SFT rows of `n` tool-use demonstrations: two rows each, so the tool's result is never trained.

        `{"prompt": "347*59=", "completion": "<calc(347*59)>"}` (the call; decoding stops at its close)
        and `{"prompt": "347*59=<calc(347*59)>[20473]", "completion": "20473"}` (the copied answer).
        """
        rows = []
        for p in self.problems(n, seed=seed):
            call = self.call_format.render_call(self.tool, p["expression"])
            rows.append({"prompt": p["prompt"], "completion": call})
            rows.append({"prompt": p["prompt"] + call + self.call_format.render_result(p["answer"]),
                         "completion": p["answer"]})
        return rows


# ------------------------------------------------------------------------------------------ registry


class UnknownEnvironment(ValueError):
    """A config names an environment that is not registered."""


# name -> builder(**options) -> Environment (one per trajectory)
ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    "calculator": lambda *, call_format=TagCallFormat(), runner=ToolRunner(): ToolEnvironment(
        [calculator_tool()], call_format=call_format, runner=runner),
    "arithmetic": lambda *, call_format=TagCallFormat(), runner=ToolRunner(): ToolEnvironment(
        [], call_format=call_format, runner=runner),
}


def register_environment(name: str, builder: Callable[..., Environment]) -> None:
    """Add a named environment builder (`builder(call_format=..., runner=...)`); a taken name is refused."""
    if name in ENVIRONMENTS:
        raise ValueError(f"register_environment: {name!r} is already registered")
    ENVIRONMENTS[name] = builder


def check_environment(name: str, *, key: str = "environment.name") -> None:
    """Raise `UnknownEnvironment` (one line, naming it and the available ones) for an unknown name."""
    if name not in ENVIRONMENTS:
        raise UnknownEnvironment(f"{key}: unknown environment {name!r}; available: {sorted(ENVIRONMENTS)}")


def make_environment(name: str, **options) -> Environment:
    """A fresh environment `name` of `ENVIRONMENTS` (options: `call_format`, `runner`)."""
    check_environment(name)
    return ENVIRONMENTS[name](**options)
