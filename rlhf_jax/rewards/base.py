"""Reward sources and their weighted combination, with per-sample failure handling.

A *reward source* maps one batch of rollouts (`RewardInputs`) to one float per completion. Two kinds
exist and share that interface:

- `PythonReward` wraps a host-side Python function written the way TRL users write them:
  `fn(prompts, completions, completion_ids, prompt_ids, truncated, **columns) -> list[float]`, where
  `columns` are the prompt's extra dataset columns (e.g. the reference `answer`), repeated per sample.
  Every function must accept `**kwargs`, so it can ignore what it does not need.
- `rlhf_jax.rewards.model.RewardModelReward` scores prompt + completion with a jitted, sharded reward
  model.

`combine_rewards(sources, inputs, weights=...)` calls each source, checks its output, and returns the
weighted sum `r = sum_k w_k r_k` together with every source's own rewards (logged as
`rewards/{name}/mean`, TRL's name). A source that raises, returns the wrong length or returns a
non-finite value either stops the run with an error naming the source and the sample, or, with
`on_error="penalty"`, gives the offending samples `error_penalty` and counts them
(`rewards/{name}/num_errors`). When a batched call raises in penalty mode, the source is re-run one
sample at a time to find the samples at fault.

A source that guards its own samples (e.g. `rlhf_jax.rewards.math_answers.MathReward`, whose
checker can raise or time out on one completion) scores those samples as failures itself and returns
`ScoredRewards(rewards, counts)`; its counts are logged as `rewards/{name}/{key}` (e.g.
`rewards/math/failures`, `rewards/math/timeouts`) and never stop the run.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, get_args

import numpy as np

__all__ = [
    "RewardInputs",
    "RewardSource",
    "PythonReward",
    "RewardResult",
    "ScoredRewards",
    "RewardFunctionError",
    "OnError",
    "combine_rewards",
    "reward_metrics",
]

OnError = Literal["raise", "penalty"]


class RewardFunctionError(RuntimeError):
    """A reward source failed (raised, wrong output length, or a non-finite value)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardInputs:
    """One batch of `N` rollouts as reward sources see them (host side).

    Attributes:
      prompt_tokens: int32 `[N, P]` right-padded prompt ids (one row per completion: a prompt sampled
        `n` times appears `n` times, contiguously).
      prompt_lengths: int32 `[N]` real prompt lengths.
      completion_tokens: int32 `[N, C]` completion ids, right-padded after the first EOS.
      completion_mask: bool `[N, C]`, True up to and including the first EOS.
      truncated: bool `[N]`, True where the completion hit `max_new_tokens` without an EOS.
      prompts: decoded prompt texts, or None when no tokenizer is at hand.
      completions: decoded completion texts (without padding), or None.
      columns: the prompts' extra dataset columns, each a length-`N` sequence.
    """

    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    completion_tokens: np.ndarray
    completion_mask: np.ndarray
    truncated: np.ndarray
    prompts: Sequence[str] | None = None
    completions: Sequence[str] | None = None
    columns: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.prompt_tokens)
        sized = dict(
            prompt_lengths=self.prompt_lengths,
            completion_tokens=self.completion_tokens,
            completion_mask=self.completion_mask,
            truncated=self.truncated,
            prompts=self.prompts,
            completions=self.completions,
            **{f"columns[{k!r}]": v for k, v in self.columns.items()},
        )
        for name, value in sized.items():
            if value is not None and len(value) != n:
                raise ValueError(
                    f"RewardInputs.{name} has {len(value)} rows but prompt_tokens has {n}"
                )
        if np.shape(self.completion_mask) != np.shape(self.completion_tokens):
            raise ValueError(
                f"RewardInputs.completion_mask shape {np.shape(self.completion_mask)} != "
                f"completion_tokens shape {np.shape(self.completion_tokens)}"
            )
        reserved = {"prompts", "completions", "completion_ids", "prompt_ids", "truncated"}
        clash = reserved & set(self.columns)
        if clash:
            raise ValueError(f"RewardInputs.columns uses reserved keyword names {sorted(clash)}")

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def completion_lengths(self) -> np.ndarray:
        """int32 `[N]` number of completion tokens (EOS included)."""
        return np.asarray(self.completion_mask).sum(axis=1).astype(np.int32)

    def prompt_ids(self) -> list[list[int]]:
        """Each prompt's real token ids, as Python lists."""
        return [row[:n].tolist() for row, n in zip(np.asarray(self.prompt_tokens), self.prompt_lengths)]

    def completion_ids(self) -> list[list[int]]:
        """Each completion's token ids up to and including the first EOS, as Python lists."""
        return [row[:n].tolist() for row, n in zip(np.asarray(self.completion_tokens), self.completion_lengths)]

    def select(self, index: Sequence[int] | np.ndarray) -> "RewardInputs":
        """The rows `index`, in that order (every field, columns included)."""
        idx = np.asarray(index, dtype=np.int64)
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return RewardInputs(
            prompt_tokens=np.asarray(self.prompt_tokens)[idx],
            prompt_lengths=np.asarray(self.prompt_lengths)[idx],
            completion_tokens=np.asarray(self.completion_tokens)[idx],
            completion_mask=np.asarray(self.completion_mask)[idx],
            truncated=np.asarray(self.truncated)[idx],
            prompts=pick(self.prompts),
            completions=pick(self.completions),
            columns={k: pick(v) for k, v in self.columns.items()},
        )


class RewardSource(Protocol):
    """Anything with a `name` that maps `RewardInputs` of N rows to N floats."""

    name: str

    def __call__(self, inputs: RewardInputs) -> Sequence[float] | np.ndarray: ...


_KEYWORDS = ("prompts", "completions", "completion_ids", "prompt_ids", "truncated")  # what `__call__` passes


@dataclasses.dataclass(frozen=True)
class PythonReward:
    """A host-side reward function with TRL's calling convention.

    The function is called as
    `fn(prompts=..., completions=..., completion_ids=..., prompt_ids=..., truncated=..., **columns)`
    and returns one float per completion. Texts are None when the driver has no tokenizer.

    Example:
      >>> def exact(completions, answer, **kwargs):
      ...     return [float(c.strip() == a) for c, a in zip(completions, answer)]
      >>> source = PythonReward(exact)            # name "exact"
    """

    fn: Callable[..., Sequence[float]]
    name: str = ""

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"PythonReward.fn must be callable, got {type(self.fn).__name__}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: checked when called
            return
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            missing = [k for k in _KEYWORDS if k not in named]
            if missing:  # every call would raise TypeError (in penalty mode: every sample penalized)
                raise TypeError(f"reward function {self.name!r} must accept **kwargs: it is called with the keywords "
                                f"{list(_KEYWORDS)} and the prompts' extra columns, and takes no {missing}")

    def __call__(self, inputs: RewardInputs) -> Sequence[float]:
        return self.fn(
            prompts=None if inputs.prompts is None else list(inputs.prompts),
            completions=None if inputs.completions is None else list(inputs.completions),
            completion_ids=inputs.completion_ids(),
            prompt_ids=inputs.prompt_ids(),
            truncated=np.asarray(inputs.truncated, bool).tolist(),
            **{k: list(v) for k, v in inputs.columns.items()},
        )


class ScoredRewards(NamedTuple):
    """What a self-guarding source returns: its rewards and the counts it reports for this batch.

    Attributes:
      rewards: one float per completion.
      counts: counter name -> count (e.g. `{"failures": 2, "timeouts": 1}`), logged as
        `rewards/{source name}/{counter name}`, summed over sampling rounds and processes.
    """

    rewards: Sequence[float] | np.ndarray
    counts: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Rewards of one batch.

    Attributes:
      total: float32 `[N]` weighted sum over sources.
      per_source: name -> float32 `[N]` unweighted rewards of that source (penalties included).
      num_errors: name -> number of samples that got `error_penalty` from that source.
      counts: metric name (`rewards/{name}/{counter}`) -> count, from sources returning
        `ScoredRewards`.
    """

    total: np.ndarray
    per_source: dict[str, np.ndarray]
    num_errors: dict[str, int]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def _counted(name: str, raw: Any, counts: dict[str, int]) -> Any:
    """The rewards of a source's output; a `ScoredRewards`' counts are added to `counts`."""
    if isinstance(raw, ScoredRewards):
        for key, value in raw.counts.items():
            metric = f"rewards/{name}/{key}"
            counts[metric] = counts.get(metric, 0) + int(value)
        return raw.rewards
    return raw


_F32_MAX = float(np.finfo(np.float32).max)


def _as_rewards(name: str, raw: Any, n: int) -> np.ndarray:
    """Check a source's output: `n` numbers in a list, tuple or 1-D array (jax/torch arrays included;
    None becomes NaN). Strings are refused, not parsed."""
    if not isinstance(raw, (list, tuple, np.ndarray, str, bytes)) and hasattr(raw, "__array__"):
        raw = np.asarray(raw)  # a jax (or CPU torch) array
    values = np.asarray(raw, dtype=object) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if values is None or values.ndim != 1:
        shape = "" if values is None else f" of shape {values.shape}"
        raise RewardFunctionError(
            f"reward source {name!r} must return a list or 1-D array of {n} floats, "
            f"got {type(raw).__name__}{shape}"
        )
    if len(values) != n:
        raise RewardFunctionError(f"reward source {name!r} returned {len(values)} rewards for {n} completions")
    out = np.empty(n, np.float64)
    for i, value in enumerate(values):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError("a string is not a reward")
            out[i] = np.nan if value is None else float(value)
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(
                f"reward source {name!r} returned a non-numeric reward {value!r} for sample {i}"
            ) from e
    return out


def _call_source(source: RewardSource, inputs: RewardInputs, on_error: OnError,
                 counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of one source and a bool mask of samples at fault (NaN where at fault)."""
    n = len(inputs)
    try:
        rewards = _as_rewards(source.name, _counted(source.name, source(inputs), counts), n)
    except RewardFunctionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its name.
        if on_error == "raise":
            raise RewardFunctionError(
                f"reward source {source.name!r} raised {type(e).__name__}: {e}"
            ) from e
        # Penalty mode: a one-sample batch is that sample's fault; a larger one is re-run per sample.
        rewards = np.full(n, np.nan) if n == 1 else np.array([_call_one(source, inputs, i, counts) for i in range(n)])
    # Non-finite, or finite in float64 but not in float32 (the dtype rewards are trained in).
    bad = ~(np.abs(rewards) <= _F32_MAX)
    if bad.any() and on_error == "raise":
        i = int(np.flatnonzero(bad)[0])
        snippet = "" if inputs.completions is None else f" (completion {inputs.completions[i][:80]!r})"
        raise RewardFunctionError(
            f"reward source {source.name!r} returned {rewards[i]} for sample {i}{snippet}; "
            f"{int(bad.sum())} of {n} rewards are not finite float32 numbers (None is read as nan: every "
            "completion needs a score; rewards.on_error='penalty' gives such samples rewards.error_penalty instead)"
        )
    return rewards, bad


def _call_one(source: RewardSource, inputs: RewardInputs, i: int, counts: dict[str, int]) -> float:
    """Re-run a source on sample `i` alone; NaN where it raises or returns a bad value."""
    try:
        return float(_as_rewards(source.name, _counted(source.name, source(inputs.select([i])), counts), 1)[0])
    except Exception:  # noqa: BLE001 - the sample is at fault; it gets the penalty.
        return np.nan


def combine_rewards(
    sources: Sequence[RewardSource],
    inputs: RewardInputs,
    *,
    weights: Sequence[float] | None = None,
    on_error: OnError = "raise",
    error_penalty: float = 0.0,
) -> RewardResult:
    """Weighted sum of several reward sources over one batch.

    `r_i = sum_k w_k r_{k,i}`, where a failing sample's `r_{k,i}` is `error_penalty` in penalty mode.

    Args:
      sources: reward sources (`PythonReward`, `RewardModelReward`, ...), names unique.
      inputs: the rollouts.
      weights: one weight per source (default all 1).
      on_error: "raise" stops on the first failure with an error naming the source and sample;
        "penalty" assigns `error_penalty` to failing samples and counts them.
      error_penalty: the reward of a failing sample in penalty mode.

    Returns:
      `RewardResult(total, per_source, num_errors)`.

    Raises:
      RewardFunctionError: a source failed (always for a wrong output length on a full batch).
    """
    if on_error not in get_args(OnError):
        raise ValueError(f"combine_rewards: on_error must be one of {get_args(OnError)}, got {on_error!r}")
    if not sources:
        raise ValueError("combine_rewards: sources is empty; give at least one reward source")
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"combine_rewards: reward source names must be unique, repeated: {dupes}")
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"combine_rewards: {len(weights)} weights for {len(sources)} sources {names}")
    for name, weight in zip(names, weights):
        if isinstance(weight, (str, bytes, bool)) or not isinstance(weight, (int, float, np.number)) \
                or not abs(weight) <= _F32_MAX:
            raise ValueError(f"combine_rewards: the weight of reward source {name!r} must be a finite number, "
                             f"got {weight!r}")
    if not np.isfinite(error_penalty):
        raise ValueError(f"combine_rewards: error_penalty must be finite, got {error_penalty}")
    total = np.zeros(len(inputs), np.float64)
    per_source, num_errors, counts = {}, {}, {}
    for source, weight in zip(sources, weights):
        rewards, bad = _call_source(source, inputs, on_error, counts)
        rewards = np.where(bad, error_penalty, rewards)
        per_source[source.name] = rewards.astype(np.float32)
        num_errors[source.name] = int(bad.sum())
        total += float(weight) * rewards
    if not (np.abs(total) <= _F32_MAX).all():
        i = int(np.flatnonzero(~(np.abs(total) <= _F32_MAX))[0])
        raise RewardFunctionError(
            f"combine_rewards: the weighted reward of sample {i} overflows float32 "
            f"({', '.join(f'{w!r} x {per_source[n][i]!r}' for n, w in zip(names, weights))})")
    return RewardResult(total.astype(np.float32), per_source, num_errors, counts)


def reward_metrics(result: RewardResult, *, group_size: int = 1) -> dict[str, float]:
    """Reward metrics of one batch with TRL's names.

    `reward` is the mean total reward; with groups (`group_size > 1`, groups contiguous)
    `reward_std` is the mean within-group standard deviation (the unbiased one, as TRL logs it and
    as GRPO's advantages divide by) and `frac_reward_zero_std` the fraction of groups whose rewards
    are all equal (no learning signal for group estimators); with `group_size == 1`, `reward_std`
    is the batch's (unbiased; 0 for one reward). Per source:
    `rewards/{name}/mean`, `rewards/{name}/std`, `rewards/{name}/num_errors`, and the counts of
    sources returning `ScoredRewards` (`rewards/{name}/{counter}`).
    """
    total = result.total.astype(np.float64)
    metrics = {"reward": float(total.mean())}
    if group_size > 1:
        if len(total) % group_size:
            raise ValueError(f"reward_metrics: {len(total)} rewards do not split into groups of {group_size}")
        std = total.reshape(-1, group_size).std(axis=1, ddof=1)
        metrics["reward_std"] = float(std.mean())
        metrics["frac_reward_zero_std"] = float(np.mean(std < 1e-6))
    else:
        metrics["reward_std"] = float(total.std(ddof=1)) if len(total) > 1 else 0.0
    for name, r in result.per_source.items():
        metrics[f"rewards/{name}/mean"] = float(r.mean())
        metrics[f"rewards/{name}/std"] = float(r.std())
        metrics[f"rewards/{name}/num_errors"] = float(result.num_errors[name])
    metrics.update({key: float(value) for key, value in result.counts.items()})
    return metrics
