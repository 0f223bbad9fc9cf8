"""Verifiable math rewards: final-answer extraction and equivalence with `math-verify`, format rewards.

The math checker (reward name "math" in `rewards.functions`) scores a completion 1 when its final
answer is mathematically equal to the reference answer, else 0:

    r = 1[ verify( parse(gold_answer(ref)), parse(final_answer(completion)) ) ]

- `gold_answer(ref)`: the reference column may be a bare answer ("42", "\\frac{1}{2}"), a GSM8K
  solution (the text after its last "#### ", thousands separators removed) or a MATH solution (the
  content of its last `\\boxed{...}`).
- `final_answer(completion)`: the text after a GSM8K "####" if there is one, else the whole
  completion; `math-verify` then takes the last `\\boxed{}` first, then "the (final) answer is ...",
  then the last number or LaTeX expression (its `LatexExtractionConfig` / `ExprExtractionConfig`).
- `verify`: string, numeric (6 decimal places) and symbolic (`sympy`) equality, units and `\\text{}`
  stripped, `\\frac`, `\\dfrac`, percentages, sets and intervals (Hugging Face's `math-verify`,
  the checker of open-r1 and TRL's examples).

A completion whose checking raises or exceeds `timeout_s` (math-verify's own signal-based timeout,
main thread only) scores 0 and is counted: `MathReward` returns `ScoredRewards` with counts
`failures` and `timeouts` (logged as `rewards/math/failures`, `rewards/math/timeouts`); a bad
sample never stops the run. `math_reward` is the same checker as a plain TRL-style function (for an
import path `rlhf_jax.rewards.math_answers:math_reward`).

`math-verify` is a dependency of the package, imported on first use (an environment without it, such as
a bare accelerator image, runs everything else).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Sequence
from typing import Any

from rlhf_jax.rewards.base import RewardInputs, ScoredRewards

__all__ = [
    "MathReward",
    "math_reward",
    "math_equal",
    "gold_answer",
    "last_boxed",
    "final_answer",
    "extract_answer",
    "think_answer_format",
    "answer_format",
    "ANSWER_COLUMNS",
]

# Columns a reference answer is read from, in order: our/TRL's "answer" (also GSM8K's solution
# column), MATH's "solution".
ANSWER_COLUMNS = ("answer", "solution")
_GSM8K_MARK = "####"


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("the 'math' reward needs the math-verify package: pip install math-verify") from e
    return math_verify


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


def _after_gsm8k_mark(text: str) -> str:
    tail = text.rsplit(_GSM8K_MARK, 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def gold_answer(reference: Any) -> str:
    """The answer in a reference: after GSM8K's last "####" (commas dropped), a MATH solution's last
    `\\boxed{}`, or the reference itself (stripped)."""
    text = str(reference).strip()
    if _GSM8K_MARK in text:
        return _after_gsm8k_mark(text).replace(",", "")
    boxed = last_boxed(text)
    return text if boxed is None else boxed


def final_answer(completion: str) -> str:
    """The part of a completion that holds its final answer: after a GSM8K "####" if present, else all of it."""
    return _after_gsm8k_mark(completion) if _GSM8K_MARK in completion else completion


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?([^\n$]+?)\$?\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(completion: str) -> str | None:
    """A cheap final-answer string without parsing (format checks): the last `\\boxed{}`, the text after
    "####", or after "the answer is"; None when the completion states no final answer."""
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    if _GSM8K_MARK in completion:
        return _after_gsm8k_mark(completion) or None
    found = _ANSWER_IS.findall(completion)
    return found[-1].strip() if found else None


def _gold_forms(answer: str) -> tuple[str, ...]:
    # A bare LaTeX answer ("x+1", "\\frac{\\sqrt2}{2}") parses only inside math delimiters; "\\$18"
    # only inside a box.
    return (answer,) if "$" in answer.replace("\\$", "") or "\\boxed" in answer else \
        (f"${answer}$", f"\\boxed{{{answer}}}", answer)


@dataclasses.dataclass(frozen=True)
class _Checker:
    timeout_s: int | None
    float_rounding: int

    def parse(self, text: str, mv) -> list:
        configs = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
        return mv.parse(text, extraction_config=configs, parsing_timeout=self.timeout_s, raise_on_error=True)

    def equal(self, gold: str, prediction: str) -> bool:
        mv = _math_verify()
        gold_parsed = []
        for form in _gold_forms(gold):
            gold_parsed = self.parse(form, mv)
            if gold_parsed:
                break
        if not gold_parsed:
            raise ValueError(f"math reward: cannot parse the reference answer {gold!r}")
        pred_parsed = self.parse(final_answer(prediction), mv)
        if not pred_parsed:
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, float_rounding=self.float_rounding,
                              timeout_seconds=self.timeout_s, raise_on_error=True))


def _timeout(seconds: int | None) -> int | None:
    # math-verify's timeout is signal.alarm: only on the main thread; elsewhere it would raise.
    return seconds if threading.current_thread() is threading.main_thread() else None


def math_equal(gold: Any, prediction: str, *, timeout_s: int | None = 5, float_rounding: int = 6) -> bool:
    """Whether the final answer of `prediction` equals the answer in `gold` (see the module docstring).

    Raises math-verify's `TimeoutException` past `timeout_s` seconds (None: no limit) and any parsing
    or comparison error (`MathReward` turns both into a counted failure).
    """
    return _Checker(_timeout(timeout_s), float_rounding).equal(gold_answer(gold), prediction)


def _reference_column(columns: dict[str, Sequence[Any]], column: str | None, name: str) -> Sequence[Any]:
    if column is not None:
        if column not in columns:
            raise KeyError(f"{name}: the prompts have no column {column!r}; columns: {sorted(columns)}")
        return columns[column]
    for candidate in ANSWER_COLUMNS:
        if candidate in columns:
            return columns[candidate]
    raise KeyError(f"{name}: the prompts have none of the answer columns {list(ANSWER_COLUMNS)}; "
                   f"columns: {sorted(columns)}")


def _score(completions, references, *, timeout_s, float_rounding) -> tuple[list[float], dict[str, int]]:
    mv = _math_verify()
    checker = _Checker(_timeout(timeout_s), float_rounding)
    out, counts = [], {"failures": 0, "timeouts": 0}
    for text, ref in zip(completions, references):
        try:
            out.append(float(ref is not None and checker.equal(gold_answer(ref), text)))
        except mv.errors.TimeoutException:
            counts["timeouts"] += 1
            out.append(0.0)
        except Exception:  # noqa: BLE001 - one sample the checker cannot handle scores 0 and is counted.
            counts["failures"] += 1
            out.append(0.0)
    return out, counts


@dataclasses.dataclass(frozen=True)
class MathReward:
    """The math checker as a reward source: 1 for an equivalent final answer, 0 otherwise.

    Attributes:
      column: the reference column (None: the first of `ANSWER_COLUMNS` present).
      timeout_s: seconds per parse / comparison (math-verify's timeout), None for no limit.
      float_rounding: decimal places of numeric comparison.
      name: the metric name (`rewards/{name}/mean`, `/failures`, `/timeouts`).
    """

    column: str | None = None
    timeout_s: int | None = 5
    float_rounding: int = 6
    name: str = "math"

    def __post_init__(self):
        if self.timeout_s is not None and (not isinstance(self.timeout_s, int) or self.timeout_s < 1):
            raise ValueError(f"MathReward.timeout_s must be a positive int (whole seconds) or None, "
                             f"got {self.timeout_s!r}")

    def __call__(self, inputs: RewardInputs) -> ScoredRewards:
        if inputs.completions is None:
            raise ValueError(f"{self.name}: needs decoded completions (give the driver a tokenizer)")
        refs = _reference_column(dict(inputs.columns), self.column, self.name)
        rewards, counts = _score(inputs.completions, refs, timeout_s=self.timeout_s,
                                 float_rounding=self.float_rounding)
        return ScoredRewards(rewards, counts)


def math_reward(completions, answer=None, solution=None, **kwargs) -> list[float]:
    """TRL-style math reward: `1[final answer of completion == answer in answer/solution]` per row.

    A sample the checker cannot handle scores 0 (use `MathReward` to also count such samples).
    """
    refs = answer if answer is not None else solution
    if refs is None:
        raise KeyError(f"math_reward: the prompts have none of the answer columns {list(ANSWER_COLUMNS)}")
    return _score(completions, refs, timeout_s=5, float_rounding=6)[0]


_THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def think_answer_format(completions, **kwargs) -> list[float]:
    """1 when a completion is `<think>...</think>` then `<answer>...</answer>` (nothing else), else 0.

    `r = 1[re.fullmatch("<think>.*?</think>\\s*<answer>.*?</answer>", completion.strip())]` (the
    reasoning-format reward of DeepSeek-R1 / open-r1).
    """
    return [float(_THINK_ANSWER.fullmatch(text.strip()) is not None) for text in completions]


def answer_format(completions, **kwargs) -> list[float]:
    """1 when a completion states a final answer (`\\boxed{}`, "#### x" or "the answer is x"), else 0."""
    return [float(extract_answer(text) is not None) for text in completions]
