"""Built-in host-side reward functions: exact answers, format checks, EOS and length shaping.

Each factory returns a `PythonReward` (TRL calling convention, see `rlhf_jax.rewards.base`); the
plain functions can also be wrapped by users. All are deterministic and cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from rlhf_jax.rewards.base import PythonReward

_STANDARD_KEYWORDS = frozenset({"prompts", "completion_ids", "prompt_ids", "truncated"})

__all__ = [
    "even_fraction_reward",
    "exact_match",
    "format_reward",
    "missing_eos_penalty",
    "overlong_penalty",
]


def checked_texts(completions: Sequence, name: str) -> Sequence[str]:
    """`completions`, after checking each is a string (TypeError naming the reward and the sample)."""
    if completions is None:
        raise ValueError(f"{name}: needs decoded completions (give the driver a tokenizer)")
    for i, text in enumerate(completions):
        if not isinstance(text, str):
            raise TypeError(f"{name}: completion {i} is a {type(text).__name__}, not a string (the decoded "
                            f"completion text; a chat message list must be reduced to its content first)")
    return completions


def even_fraction_reward(completion_ids: Sequence[Sequence[int]], **kwargs) -> list[float]:
    """Fraction of completion token ids that are even (the W4 benchmark reward).

    `r = |{t : id_t mod 2 = 0}| / |completion|`; an empty completion scores 0.
    """
    return [float(np.mean(np.asarray(ids) % 2 == 0)) if len(ids) else 0.0 for ids in completion_ids]


def exact_match(
    *,
    column: str = "answer",
    extract: Callable[[str], str | None] | None = None,
    name: str = "exact_match",
) -> PythonReward:
    """1 when the answer extracted from the completion equals the prompt's `column`, else 0.

    `r = 1[extract(completion) == str(column).strip()]`. The default `extract` takes the text after
    the last "=" if there is one, else the whole completion, stripped.

    Args:
      column: the extra dataset column holding the reference answer.
      extract: completion text -> answer string, or None when no answer can be found (scores 0).
      name: the metric name.

    Returns:
      A `PythonReward`; it raises a KeyError naming `column` when the prompts lack it.
    """
    extract = _after_last_equals if extract is None else extract

    def score(completions, **kwargs):
        if column not in kwargs:
            columns = sorted(set(kwargs) - _STANDARD_KEYWORDS)
            raise KeyError(f"{name}: the prompts have no column {column!r}; columns: {columns}")
        out = []
        for text, ref in zip(checked_texts(completions, name), kwargs[column]):
            got = extract(text)
            out.append(float(got is not None and got == str(ref).strip()))
        return out

    return PythonReward(score, name)


def _after_last_equals(text: str) -> str:
    return text.rsplit("=", 1)[-1].strip()


def format_reward(pattern: str, *, name: str = "format", flags: int = re.DOTALL) -> PythonReward:
    """1 when the whole completion text matches the regular expression `pattern`, else 0.

    `r = 1[re.fullmatch(pattern, completion.strip())]`, e.g. `r"<think>.*</think>\\s*<answer>.*</answer>"`.

    Args:
      pattern: a Python regular expression (checked here, not at the first call).
      name: the metric name.
      flags: `re` flags (DOTALL by default so `.` crosses newlines).

    Returns:
      A `PythonReward`.
    """
    try:
        compiled = re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"format_reward: invalid pattern {pattern!r}: {e}") from e

    def score(completions, **kwargs):
        return [float(compiled.fullmatch(text.strip()) is not None) for text in checked_texts(completions, name)]

    return PythonReward(score, name)


def missing_eos_penalty(penalty: float = 1.0, *, name: str = "missing_eos") -> PythonReward:
    """`-penalty` for a completion that hit the length limit without EOS, 0 otherwise.

    `r = -penalty * 1[truncated]` (TRL's `missing_eos_penalty`, added to the reward-model score).

    Args:
      penalty: the (non-negative) amount subtracted.
      name: the metric name.
    """
    if not penalty >= 0:
        raise ValueError(f"missing_eos_penalty: penalty must be >= 0, got {penalty}")

    def score(truncated, **kwargs):
        return [-float(penalty) if t else 0.0 for t in truncated]

    return PythonReward(score, name)


def overlong_penalty(*, max_length: int, buffer_length: int, name: str = "overlong") -> PythonReward:
    """DAPO's soft overlong punishment on the completion length `L` (in tokens).

    `r = 0` if `L <= L_max - L_buf`; `((L_max - L_buf) - L) / L_buf` if `L_max - L_buf < L <= L_max`;
    `-1` if `L > L_max`. Added to the task reward, it discourages running into the length limit
    smoothly instead of with a cliff. Reference: Yu et al. 2025, "DAPO", Eq. 13.

    Args:
      max_length: `L_max`, usually the sampler's `max_new_tokens`.
      buffer_length: `L_buf`, the length of the linear-penalty zone (0 < L_buf <= L_max).
      name: the metric name.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"overlong_penalty: need 0 < buffer_length <= max_length, got {buffer_length} and {max_length}"
        )
    start = max_length - buffer_length

    def score(completion_ids, **kwargs):
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else (-1.0 if n > max_length else (start - n) / buffer_length))
        return out

    return PythonReward(score, name)
