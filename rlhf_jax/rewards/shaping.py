"""Shaping rewards of long chain-of-thought RL: cosine length scaling and the n-gram repetition penalty.

Both are from Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs" (arXiv
2502.03373, Sec. 4.2 and App. C.2), in the form open-r1 gives them (`get_cosine_scaled_reward`,
`get_repetition_penalty_reward` in huggingface/open-r1 `src/open_r1/rewards.py`):

- "cosine_length" (`CosineLengthReward`, `cosine_scaled`): the math checker's verdict ("math",
  `rlhf_jax.rewards.math_answers.verdicts`) scaled by the completion's length on a half cosine, so
  that among correct answers the short ones earn more and among wrong ones the long ones lose less.
- "repetition" (`repetition_penalty`, `ngram_repetition`): minus the fraction of repeated word
  n-grams, times `max_penalty`.

Departures from open-r1, each deliberate:
- Length is counted in **tokens** (the completion's ids, EOS included, as "overlong" counts it), not
  in characters of the text: the paper's reference implementation (eddycmu/demystify-long-cot,
  `CosineScaledSparseReward`) scales by the generated token count over the generation budget; the
  budget here is `rollout.max_new_tokens` tokens, so `max_len` = that budget puts the cosine's end at
  the longest possible completion; and characters per token vary with the tokenizer and the text
  (digits, LaTeX), so a character `max_len` means a different budget on every prompt.
- A length past `max_len` gets the value at `max_len` (progress clipped at 1); open-r1's cosine turns
  back up there (a wrong answer at 2 x `max_len` got its shortest-answer penalty again).
- `max_penalty` is the amount subtracted (>= 0), as `missing_eos_penalty` is; open-r1 takes it
  negative (its -1.0 is 1.0 here).
- A reference with no parsable answer scores 0 and is counted (`rewards/cosine_length/bad_references`),
  as for "math"; open-r1 gives 1.0. Either way the group gets no length signal from it.

The paper also gives a completion that reaches the budget a fixed "exceed length" reward instead of
the cosine; here that is "missing_eos" (or "overlong") added beside "cosine_length".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from rlhf_jax._checks import is_finite_number
from rlhf_jax.rewards.base import PythonReward, RewardInputs, ScoredRewards
from rlhf_jax.rewards.math_answers import reference_column, verdicts
from rlhf_jax.rewards.verifiable import checked_texts

__all__ = ["cosine_scaled", "CosineLengthReward", "COSINE_VALUES", "check_cosine_values", "ngram_repetition",
           "repetition_penalty", "check_repetition"]


def cosine_scaled(length: int, max_len: int, correct: bool, *, min_value_wrong: float = -1.0,
                  max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                  max_value_correct: float = 1.0) -> float:
    """The cosine-scaled reward of one completion of `length` tokens.

    With `p = min(length / max_len, 1)` and `(r_0, r_L)` = `(max_value_correct, min_value_correct)` for
    a correct answer, `(min_value_wrong, max_value_wrong)` for a wrong one:

        r = r_L + (r_0 - r_L) * (1 + cos(pi * p)) / 2

    so `r = r_0` at length 0 and `r_L` at `max_len` (and beyond). Reference: Yeo et al. 2025, Sec. 4.2
    (`CosFn`; their runs: r_0 = 2, r_L = 1 correct, r_0 = -10, r_L = 0 wrong); open-r1's
    `get_cosine_scaled_reward` (which does not clip `p`).
    """
    start, end = (max_value_correct, min_value_correct) if correct else (min_value_wrong, max_value_wrong)
    progress = min(length / max_len, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


COSINE_VALUES = ("min_value_wrong", "max_value_wrong", "min_value_correct", "max_value_correct")


def check_cosine_values(*, owner: str, error: type[Exception] = ValueError, **values: Any) -> None:
    """Raise `error` naming `{owner}{key}` unless the four `COSINE_VALUES` are finite and
    `min_value_wrong <= max_value_wrong`, `min_value_correct <= max_value_correct` (correct answers
    earn less the longer they are, wrong ones lose less: the paper's shape; swapped values invert it)."""
    for key, value in values.items():
        if not is_finite_number(value):
            raise error(f"{owner}{key} must be a finite number, got {value!r}")
    for kind in ("wrong", "correct"):
        low, high = values[f"min_value_{kind}"], values[f"max_value_{kind}"]
        if low > high:
            raise error(f"{owner}min_value_{kind} {low!r} > {owner}max_value_{kind} {high!r}: min_value_{kind} "
                        f"must be <= max_value_{kind} (the reward of a {kind} answer at "
                        f"{'length 0' if kind == 'wrong' else 'max_len'} is its minimum)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CosineLengthReward:
    """The "cosine_length" reward source: `cosine_scaled(length, max_len, correct)` per completion.

    `correct` is the "math" checker's verdict (`rlhf_jax.rewards.math_answers.verdicts`: the same
    final-answer extraction, math-verify equivalence and timeouts); `length` the completion's tokens,
    EOS included. A completion the checker fails or times out on is wrong and counted
    (`rewards/{name}/failures`, `/timeouts`); a reference with no parsable answer scores 0
    (`/bad_references`).

    Attributes:
      max_len: tokens at which the cosine ends (usually `rollout.max_new_tokens`).
      min_value_wrong, max_value_wrong: a wrong answer's reward at length 0 and at `max_len`.
      min_value_correct, max_value_correct: a correct answer's reward at `max_len` and at length 0.
      column: the reference column (None: the first of "answer", "solution" present).
      timeout_s: the checker's seconds per parse / comparison (None: no limit).
      float_rounding: decimal places of numeric comparison.
      name: the metric name.

    Example:
      >>> reward = CosineLengthReward(max_len=512)   # open-r1's defaults for the four values
    """

    max_len: int
    min_value_wrong: float = -1.0
    max_value_wrong: float = -0.5
    min_value_correct: float = 0.5
    max_value_correct: float = 1.0
    column: str | None = None
    timeout_s: int | None = 5
    float_rounding: int = 6
    name: str = "cosine_length"

    def __post_init__(self):
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1:
            raise ValueError(f"CosineLengthReward.max_len must be a positive int (tokens), got {self.max_len!r}")
        check_cosine_values(owner="CosineLengthReward.", **{k: getattr(self, k) for k in COSINE_VALUES})

    def rewards(self, completions: Sequence[str], lengths: Sequence[int],
                references: Sequence[Any]) -> ScoredRewards:
        """The rewards of `completions` of `lengths` tokens against `references`, and the checker's counts."""
        if len(lengths) != len(checked_texts(completions, self.name)):
            raise ValueError(f"{self.name}: {len(completions)} completions but {len(lengths)} lengths")
        found, counts = verdicts(completions, references, timeout_s=self.timeout_s,
                                 float_rounding=self.float_rounding, name=self.name)
        values = {k: getattr(self, k) for k in COSINE_VALUES}
        return ScoredRewards([0.0 if ok is None else cosine_scaled(int(n), self.max_len, ok, **values)
                              for ok, n in zip(found, lengths)], counts)

    def __call__(self, inputs: RewardInputs) -> ScoredRewards:
        if inputs.completions is None:
            raise ValueError(f"{self.name}: needs decoded completions (give the driver a tokenizer)")
        refs = reference_column(dict(inputs.columns), self.column, self.name)
        return self.rewards(inputs.completions, inputs.completion_lengths.tolist(), refs)

    def function(self):
        """This reward as a TRL reward function `fn(completions, completion_ids, **columns) -> list[float]`
        (the checker's counts dropped), e.g. for `trl.GRPOTrainer(reward_funcs=[...])`."""
        def cosine_length(completions, completion_ids, **columns):
            refs = reference_column(columns, self.column, self.name)
            return list(self.rewards(completions, [len(ids) for ids in completion_ids], refs).rewards)

        return cosine_length


def ngram_repetition(text: str, n: int) -> float:
    """The fraction of repeated word n-grams in `text`: `1 - |unique n-grams| / |n-grams|`, in [0, 1).

    Words are the lowercased text split on whitespace; a text of fewer than `n` words has no n-gram and
    gives 0. Reference: Yeo et al. 2025, App. C.2; open-r1's `get_repetition_penalty_reward` (language
    "en").
    """
    words = text.lower().split()
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def check_repetition(*, owner: str, error: type[Exception] = ValueError, n_grams: Any, max_penalty: Any) -> None:
    """Raise `error` naming `{owner}{key}` unless `n_grams` is a positive int and `max_penalty` a finite
    number >= 0 (the amount subtracted; open-r1 writes it negative)."""
    if not isinstance(n_grams, int) or isinstance(n_grams, bool) or n_grams < 1:
        raise error(f"{owner}n_grams must be a positive int (words per n-gram), got {n_grams!r}")
    if not is_finite_number(max_penalty):
        raise error(f"{owner}max_penalty must be a finite number >= 0, got {max_penalty!r}")
    if max_penalty < 0:
        raise error(f"{owner}max_penalty must be >= 0 (the amount subtracted, as missing_eos_penalty), got "
                    f"{max_penalty!r}: open-r1's repetition_max_penalty={max_penalty!r} is {-max_penalty!r} here")


def repetition_penalty(*, n_grams: int = 3, max_penalty: float = 1.0, name: str = "repetition") -> PythonReward:
    """open-r1's n-gram repetition penalty: `r = -max_penalty * ngram_repetition(completion, n_grams)`.

    In `[-max_penalty, 0]`: 0 for a completion without a repeated n-gram (or shorter than `n_grams`
    words, or empty), `-max_penalty` approached as one n-gram fills it. Reference: Yeo et al. 2025,
    App. C.2 (there a per-token penalty); open-r1's sequence-level `get_repetition_penalty_reward`.

    Args:
      n_grams: words per n-gram (open-r1's `repetition_n_grams`, default 3).
      max_penalty: the amount subtracted for a fully repeated completion (>= 0).
      name: the metric name.
    """
    check_repetition(owner="repetition_penalty: ", n_grams=n_grams, max_penalty=max_penalty)

    def score(completions, **kwargs):
        return [0.0 - max_penalty * ngram_repetition(text, n_grams) for text in checked_texts(completions, name)]

    return PythonReward(score, name)
