"""Reward sources by name: the `rewards` section of an RL config and the registry it selects from.

`rewards.functions` lists built-in names (`REWARD_FUNCTIONS`) or import paths `module:function`
of a function with TRL's reward-function signature (`fn(completions, **columns) -> list[float]`),
combined by `rewards.weights` (`rlhf_jax.rewards.combine_rewards`). A builder gets a
`RewardContext` (the section, the completion budget, the synthetic task's grader and a loader of
the reward model), so a registry entry never reaches into the run's config.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax._checks import is_finite_number
from rlhf_jax.config import ConfigError, _check_positive_int, check_choice, check_unused
from rlhf_jax.losses.process_reward import StepAggregation
from rlhf_jax.rewards.base import OnError, PythonReward, RewardSource
from rlhf_jax.rewards.judges import PointwiseTemplate
from rlhf_jax.rewards.math_answers import ANSWER_COLUMNS, MathReward, answer_format, tag_count, think_answer_format
from rlhf_jax.rewards.shaping import (
    COSINE_VALUES,
    CosineLengthReward,
    check_cosine_values,
    check_repetition,
    repetition_penalty,
)
from rlhf_jax.rewards.verifiable import even_fraction_reward, missing_eos_penalty, overlong_penalty

__all__ = ["RewardConfig", "RewardContext", "REWARD_FUNCTIONS", "register_reward", "resolve_import",
           "build_rewards"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Which rewards train the policy, and what a failing reward function does.

    Attributes:
      functions: reward sources, each a built-in name of `REWARD_FUNCTIONS` — "task" (the synthetic
        task's grader: arithmetic exact match, or the vowel task's gold reward), "reward_model"
        (the scalar-head model at `reward_model`), "missing_eos" (`-missing_eos_penalty` without
        EOS), "overlong" (DAPO's soft overlong punishment, buffer `overlong_buffer`),
        "even_fraction" (the W4 benchmark reward), "math" (final-answer equivalence with math-verify
        against the prompts' `answer` or `solution` column: bare, GSM8K "#### x" or MATH `\\boxed{}`;
        see `rlhf_jax.rewards.math_answers`), "think_format" (`<think>...</think><answer>...</answer>`),
        "answer_format" (states a final answer), "judge" (an LLM judge's expected rating of each
        completion, `rlhf_jax.rewards.judges.PointwiseJudge`, model at `judge`), "prm" (a process
        reward model's aggregated step scores, `rlhf_jax.train.prm.PRMScorer`, model at
        `process_reward_model`; completions split into steps at `prm_step_separator`), and the shaping
        rewards of long chain-of-thought RL (Yeo et al. 2025, as open-r1 gives them;
        `rlhf_jax.rewards.shaping`): "cosine_length" (the "math" verdict scaled by the completion's
        token length on a half cosine, settings `cosine_*`), "repetition" (minus `repetition_max_penalty`
        times the fraction of repeated word `repetition_n_grams`-grams), "tag_count" (0.25 for each of
        open-r1's newline-exact think/answer tags present once) — or an import path
        `package.module:function`.
        Ignored when the driver is given `reward_sources`.
      weights: one weight per function (empty: all 1).
      reward_model: a reward-model checkpoint (`runs/<rm>/checkpoints`) or Hugging Face directory.
      reward_model_batch_size: rows scored per reward-model call.
      missing_eos_penalty: the "missing_eos" amount (another value without that function is refused).
      overlong_buffer: the "overlong" linear zone `L_buf` (`L_max` = `rollout.max_new_tokens`).
      cosine_max_len: the "cosine_length" length in tokens where the cosine ends (None:
        `rollout.max_new_tokens`, the longest completion); longer completions get its end value.
      cosine_min_value_wrong, cosine_max_value_wrong: a wrong answer's "cosine_length" reward at length
        0 and at `cosine_max_len` (min <= max).
      cosine_min_value_correct, cosine_max_value_correct: a correct answer's at `cosine_max_len` and at
        length 0 (min <= max). A reference with no parsable answer scores 0.
      repetition_n_grams: the "repetition" n-gram size in words (>= 1).
      repetition_max_penalty: the "repetition" amount subtracted for a fully repeated completion
        (>= 0; open-r1's negative value with the sign flipped).
      on_error: "raise" on a failing reward function, or "penalty" (give `error_penalty`, count).
      error_penalty: the reward of a failing sample in penalty mode.
      math_timeout_s: the "math" checker's seconds per parse / comparison; a sample past it scores 0
        and is counted (`rewards/math/timeouts`).
      judge: the "judge" reward's model: a checkpoint or Hugging Face directory with an LM head.
      judge_tokenizer: its tokenizer directory or "offline" (None: the model's own).
      judge_template: its rating prompt and rating tokens (`PointwiseTemplate`).
      process_reward_model: the "prm" reward's model: a checkpoint of `rlhf_jax.train.prm` (its
        tokenizer is read from beside it, as the judge's is).
      prm_aggregation: how step probabilities become one score: "min", "prod", "last" or "mean".
      prm_step_separator: the text between steps (the PRM's `algorithm.step_separator`).
      prm_max_len: tokens of prompt + completion the PRM reads; a completion whose steps do not all
        fit raises ValueError naming it (a score of its first steps would hide a wrong later one).
    """

    functions: tuple[str, ...] = ("task",)
    weights: tuple[float, ...] = ()
    reward_model: str | None = None
    reward_model_batch_size: int = 64
    missing_eos_penalty: float = 1.0
    overlong_buffer: int = 4
    cosine_max_len: int | None = None
    cosine_min_value_wrong: float = -1.0
    cosine_max_value_wrong: float = -0.5
    cosine_min_value_correct: float = 0.5
    cosine_max_value_correct: float = 1.0
    repetition_n_grams: int = 3
    repetition_max_penalty: float = 1.0
    on_error: OnError = "raise"
    error_penalty: float = 0.0
    judge: str | None = None
    judge_tokenizer: str | None = None
    judge_template: PointwiseTemplate = PointwiseTemplate()
    math_timeout_s: int = 5
    process_reward_model: str | None = None
    prm_aggregation: StepAggregation = "min"
    prm_step_separator: str = "\n"
    prm_max_len: int = 512

    def __post_init__(self):
        if not self.functions:
            raise ConfigError(f"rewards.functions is empty: give at least one reward function (built-in: "
                              f"{sorted(REWARD_FUNCTIONS)}, or an import path 'package.module:function')")
        unknown = [f for f in self.functions if f not in REWARD_FUNCTIONS and ":" not in f]
        if unknown:
            raise ConfigError(f"rewards.functions: unknown {unknown}; built-in: {sorted(REWARD_FUNCTIONS)}, "
                              "or an import path 'package.module:function'")
        if self.weights and len(self.weights) != len(self.functions):
            raise ConfigError(f"rewards.weights has {len(self.weights)} entries for {len(self.functions)} "
                              f"functions {list(self.functions)}")
        for i, weight in enumerate(self.weights):
            if not is_finite_number(weight):
                raise ConfigError(f"rewards.weights[{i}] (of {self.functions[i]!r}) must be a finite number, "
                                  f"got {weight!r}")
        if not (is_finite_number(self.missing_eos_penalty) and self.missing_eos_penalty >= 0):
            raise ConfigError(f"rewards.missing_eos_penalty must be a finite number >= 0, got "
                              f"{self.missing_eos_penalty!r}")
        check_unused("rewards", self, "missing_eos_penalty", used="missing_eos" in self.functions,
                     needs='rewards.functions holds "missing_eos"')
        _check_positive_int("rewards", "overlong_buffer", self.overlong_buffer)
        _check_positive_int("rewards", "cosine_max_len", self.cosine_max_len, allow_none=True)
        check_cosine_values(owner="rewards.cosine_", error=ConfigError,
                            **{k: getattr(self, f"cosine_{k}") for k in COSINE_VALUES})
        check_repetition(owner="rewards.repetition_", error=ConfigError, n_grams=self.repetition_n_grams,
                         max_penalty=self.repetition_max_penalty)
        for setting in _SETTINGS_OF:
            function = _SETTINGS_OF[setting]
            check_unused("rewards", self, setting, used=function in self.functions,
                         needs=f'rewards.functions holds "{function}"')
        if not is_finite_number(self.error_penalty):
            raise ConfigError(f"rewards.error_penalty must be a finite number, got {self.error_penalty!r}")
        check_choice("rewards", "on_error", self.on_error, OnError)
        if not isinstance(self.reward_model_batch_size, int) or self.reward_model_batch_size < 1:
            raise ConfigError(f"rewards.reward_model_batch_size must be a positive int, got "
                              f"{self.reward_model_batch_size!r}")
        if not isinstance(self.math_timeout_s, int) or isinstance(self.math_timeout_s, bool) \
                or self.math_timeout_s < 1:
            raise ConfigError(f"rewards.math_timeout_s must be a positive int (seconds), got {self.math_timeout_s!r}")
        check_choice("rewards", "prm_aggregation", self.prm_aggregation, StepAggregation)
        if not isinstance(self.prm_step_separator, str) or not self.prm_step_separator:
            raise ConfigError(f"rewards.prm_step_separator must be a non-empty string, got {self.prm_step_separator!r}")
        if not isinstance(self.prm_max_len, int) or isinstance(self.prm_max_len, bool) or self.prm_max_len < 2:
            raise ConfigError(f"rewards.prm_max_len must be an int >= 2, got {self.prm_max_len!r}")


# The settings of one reward function each (a value other than the default without it is refused).
_SETTINGS_OF = {**{f"cosine_{k}": "cosine_length" for k in ("max_len", *COSINE_VALUES)},
                "repetition_n_grams": "repetition", "repetition_max_penalty": "repetition"}


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """What a reward builder may use.

    Attributes:
      rewards: the `rewards` section.
      max_new_tokens: the completion budget (`rollout.max_new_tokens`).
      task_reward: the synthetic task's grader, or None for file prompts.
      load_reward_model: `() -> RewardSource` scoring with `rewards.reward_model`.
      prompt_columns: the extra columns of each prompt source, by the source's description (e.g.
        "data.train prompts.jsonl"), for the builders to check before any step; None: not checked.
    """

    rewards: RewardConfig
    max_new_tokens: int
    task_reward: Callable[..., list[float]] | None = None
    load_reward_model: Callable[[], RewardSource] | None = None
    prompt_columns: Mapping[str, Sequence[str]] | None = None


def _task(ctx: RewardContext) -> RewardSource:
    if ctx.task_reward is None:
        raise ConfigError("rewards.functions 'task' needs a synthetic prompt source (data.train=synthetic:...)")
    return PythonReward(ctx.task_reward, "task")


def _check_answer_column(ctx: RewardContext, name: str) -> None:
    for source, columns in (ctx.prompt_columns or {}).items():
        if not set(ANSWER_COLUMNS) & set(columns):
            raise ConfigError(f"rewards.functions {name!r} needs a reference answer column, one of "
                              f"{list(ANSWER_COLUMNS)}, in the prompts: {source} has none (columns besides "
                              f"the prompt: {list(columns)})")


def _math(ctx: RewardContext) -> RewardSource:
    _check_answer_column(ctx, "math")
    return MathReward(timeout_s=ctx.rewards.math_timeout_s)


def _cosine_length(ctx: RewardContext) -> RewardSource:
    _check_answer_column(ctx, "cosine_length")
    r = ctx.rewards
    return CosineLengthReward(max_len=r.cosine_max_len or ctx.max_new_tokens, timeout_s=r.math_timeout_s,
                              **{k: getattr(r, f"cosine_{k}") for k in COSINE_VALUES})


def _reward_model(ctx: RewardContext) -> RewardSource:
    if not ctx.rewards.reward_model:
        raise ConfigError("rewards.functions includes 'reward_model' but rewards.reward_model is not set")
    if ctx.load_reward_model is None:
        raise ConfigError("rewards.functions 'reward_model' is not available in this run")
    return ctx.load_reward_model()


def _judge(ctx: RewardContext) -> RewardSource:
    if not ctx.rewards.judge:
        raise ConfigError("rewards.functions includes 'judge' but rewards.judge is not set")
    from rlhf_jax.train.rlaif import load_pointwise_judge  # noqa: PLC0415 -- loads a checkpoint

    return load_pointwise_judge(ctx.rewards.judge, ctx.rewards.judge_template, tokenizer=ctx.rewards.judge_tokenizer,
                                batch_size=ctx.rewards.reward_model_batch_size)


def _process_reward_model(ctx: RewardContext) -> RewardSource:
    r = ctx.rewards
    if not r.process_reward_model:
        raise ConfigError("rewards.functions includes 'prm' but rewards.process_reward_model is not set")
    from rlhf_jax.train.prm import load_prm_scorer  # noqa: PLC0415 -- loads a checkpoint

    scorer = load_prm_scorer(r.process_reward_model, max_len=r.prm_max_len, step_separator=r.prm_step_separator,
                             batch_size=r.reward_model_batch_size, key="rewards.process_reward_model")
    return scorer.reward(mode=r.prm_aggregation)


REWARD_FUNCTIONS: dict[str, Callable[[RewardContext], RewardSource]] = {
    "task": _task,
    "reward_model": _reward_model,
    "missing_eos": lambda ctx: missing_eos_penalty(ctx.rewards.missing_eos_penalty),
    "overlong": lambda ctx: overlong_penalty(max_length=ctx.max_new_tokens, buffer_length=ctx.rewards.overlong_buffer),
    "even_fraction": lambda ctx: PythonReward(even_fraction_reward),
    "math": _math,
    "think_format": lambda ctx: PythonReward(think_answer_format, "think_format"),
    "answer_format": lambda ctx: PythonReward(answer_format, "answer_format"),
    "cosine_length": _cosine_length,
    "repetition": lambda ctx: repetition_penalty(n_grams=ctx.rewards.repetition_n_grams,
                                                 max_penalty=ctx.rewards.repetition_max_penalty),
    "tag_count": lambda ctx: PythonReward(tag_count, "tag_count"),
    "judge": _judge,
    "prm": _process_reward_model,
}


def register_reward(name: str, builder: Callable[[RewardContext], RewardSource]) -> None:
    """Add a named reward builder; a name already taken is refused (no silent replacement)."""
    if name in REWARD_FUNCTIONS:
        raise ValueError(f"register_reward: {name!r} is already registered")
    if ":" in name:
        raise ValueError(f"register_reward: {name!r} contains ':' (reserved for import paths)")
    REWARD_FUNCTIONS[name] = builder


def resolve_import(path: str, *, key: str = "rewards.functions") -> Callable[..., Any]:
    """The function named by `package.module:function` (ConfigError naming the key when it does not resolve)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is not an import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ImportError, or the module's own error on import
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {path!r}: {reason}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {module_name!r} has no function {attr!r} (from {path!r})")
    return fn


def build_rewards(ctx: RewardContext) -> tuple[list[RewardSource], Sequence[float] | None]:
    """The configured reward sources and their weights (None: all 1)."""
    sources = []
    for name in ctx.rewards.functions:
        if name in REWARD_FUNCTIONS:
            sources.append(REWARD_FUNCTIONS[name](ctx))
        else:
            sources.append(PythonReward(resolve_import(name), name.partition(":")[2]))
    return sources, (ctx.rewards.weights or None)

