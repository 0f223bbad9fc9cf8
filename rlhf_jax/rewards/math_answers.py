"""Verifiable math rewards: final-answer extraction and equivalence with `math-verify`, format rewards.

The math checker (reward name "math" in `rewards.functions`) scores a completion 1 when its final
answer is mathematically equal to the reference answer, else 0:

    r = 1[ verify( parse(gold_answer(ref)), parse(final_answer(completion)) ) ]

- `gold_answer(ref)`: the reference column may be a bare answer ("42", "\\frac{1}{2}"), a GSM8K
  solution (the text after its last "#### ", thousands separators removed) or a MATH solution (the
  content of its last `\\boxed{...}`).
- `final_answer(completion)`: the content of the last `<answer>...</answer>` if there is one (the
  R1 format; a number right before `</answer>` is otherwise invisible to `math-verify`), then the
  text after a GSM8K "####" if there is one, else the whole completion; then the last `\\boxed{}`
  (or `\\fbox{}`) alone if there is one (math-verify would read all boxes as one set); `math-verify`
  then takes that box, else "the (final) answer is ...", else the last number or LaTeX expression
  (its `LatexExtractionConfig` / `ExprExtractionConfig`). Unlike TRL's `reasoning_accuracy_reward`,
  text inside `<think>` is not dropped.
- Scientific notation ("1.5e3", "2E-4") is expanded to a decimal on both sides before parsing
  (`math-verify` would read "1.5e3" as 1.5); an exponent beyond +-1000 counts as a failure.
- `verify`: string, numeric (6 decimal places) and symbolic (`sympy`) equality, units and `\\text{}`
  stripped, `\\frac`, `\\dfrac`, percentages, sets and intervals (Hugging Face's `math-verify`,
  the checker of open-r1 and TRL's examples).

A completion whose checking raises or exceeds `timeout_s` (math-verify's own signal-based timeout,
main thread only: elsewhere there is no limit) scores 0 and is counted: `MathReward` returns
`ScoredRewards` with counts `failures` and `timeouts` (logged as `rewards/math/failures`,
`rewards/math/timeouts`); a bad sample never stops the run. A reference that is None or has no
parsable answer (a data problem, not the model's) also scores 0, counted as `bad_references`
(TRL's `accuracy_reward` gives such rows None instead). A completion that is not a string (None,
a chat message list) is a caller error: TypeError naming the sample. `math_reward` is the same
checker as a plain TRL-style function (for an import path `rlhf_jax.rewards.math_answers:math_reward`).

`math-verify` is a dependency of the package, imported on first use (an environment without it, such as
a bare accelerator image, runs everything else).
"""

from __future__ import annotations

import dataclasses
import decimal
import re
import threading
from collections.abc import Sequence
from typing import Any

from rlhf_jax.rewards.base import RewardInputs, ScoredRewards
from rlhf_jax.rewards.verifiable import checked_texts

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
    "tag_count",
    "verdicts",
    "reference_column",
    "ANSWER_COLUMNS",
    "BadReference",
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
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if none.

    The unbraced form `\\boxed 5` gives the one token after it (up to a space or "$", trailing "." and ","
    dropped).
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    rest = text[i:].lstrip()
    if not rest.startswith("{"):
        if i == len(text) or not text[i].isspace():
            return None
        token = re.match(r"[^\s$]*", rest).group(0).rstrip(".,")
        return token or None
    i = len(text) - len(rest)
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


# A GSM8K answer that is a number followed by a unit word ("72 clips", "$18 dollars").
_NUMBER_THEN_WORDS = re.compile(r"(\$?\s*-?\$?[\d,]*\.?\d+)\s+[A-Za-z][A-Za-z .]*")


def gold_answer(reference: Any) -> str:
    """The answer in a reference: after GSM8K's last "####" (commas and a trailing unit word dropped,
    "#### 1,000 clips" -> "1000"), a MATH solution's last `\\boxed{}`, or the reference itself (stripped)."""
    text = str(reference).strip()
    if _GSM8K_MARK in text:
        answer = _after_gsm8k_mark(text).replace(",", "")
        unit = _NUMBER_THEN_WORDS.fullmatch(answer)
        return unit.group(1) if unit else answer
    boxed = last_boxed(text)
    return text if boxed is None else boxed


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def final_answer(completion: str) -> str:
    """The part of a completion that holds its final answer: the content of its last `<answer>...</answer>`
    if any, then after a GSM8K "####" if present, else all of it."""
    tagged = _ANSWER_TAG.findall(completion)
    text = tagged[-1] if tagged else completion
    return _after_gsm8k_mark(text) if _GSM8K_MARK in text else text


# A decimal in scientific notation, not part of a word or a longer number ("0x1e3", "v1e3" stay).
_SCIENTIFIC = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?!\w)(?!\.\d)")
_MAX_EXPONENT = 1000


def _expand_scientific(text: str) -> str:
    def expand(m: re.Match) -> str:
        if abs(int(m.group(2))) > _MAX_EXPONENT:
            raise ValueError(f"math reward: exponent of {m.group(0)[:40]!r} beyond +-{_MAX_EXPONENT}")
        return format(decimal.Decimal(m.group(0)), "f")

    return _SCIENTIFIC.sub(expand, text)


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?([^\n$]+?)\$?\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(completion: str) -> str | None:
    """A cheap final-answer string without parsing (format checks): the last `\\boxed{}`, the text after
    "####", the content of the last `<answer>...</answer>`, or the text after "the answer is"; None when
    the completion states no final answer."""
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    if _GSM8K_MARK in completion:
        return _after_gsm8k_mark(completion) or None
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip() or None
    found = _ANSWER_IS.findall(completion)
    return found[-1].strip() if found else None


def _gold_forms(answer: str) -> tuple[str, ...]:
    # A bare LaTeX answer ("x+1", "\\frac{\\sqrt2}{2}") parses only inside math delimiters; "\\$18"
    # only inside a box.
    return (answer,) if "$" in answer.replace("\\$", "") or "\\boxed" in answer else \
        (f"${answer}$", f"\\boxed{{{answer}}}", answer)


class BadReference(ValueError):
    """The reference answer has no parsable answer (a data problem; `MathReward` counts it)."""


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
        for form in _gold_forms(_expand_scientific(gold)):
            gold_parsed = self.parse(form, mv)
            if gold_parsed:
                break
        if not gold_parsed:
            raise BadReference(f"math reward: cannot parse the reference answer {gold!r}")
        answer = _expand_scientific(final_answer(prediction))
        # The last box alone, as for the reference (math-verify would read every `\\boxed` of the text
        # as one set, so "\\boxed{7} ... no, \\boxed{8}" matched neither 7 nor 8; it ignores `\\fbox`).
        boxed = last_boxed(answer)
        if boxed is not None:
            answer = f"\\boxed{{{boxed}}}"
        pred_parsed = self.parse(answer, mv)
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


def reference_column(columns: dict[str, Sequence[Any]], column: str | None, name: str) -> Sequence[Any]:
    """The reference answers: `columns[column]`, or the first of `ANSWER_COLUMNS` present (None);
    KeyError naming the reward `name` and the columns when absent."""
    if column is not None:
        if column not in columns:
            raise KeyError(f"{name}: the prompts have no column {column!r}; columns: {sorted(columns)}")
        return columns[column]
    for candidate in ANSWER_COLUMNS:
        if candidate in columns:
            return columns[candidate]
    raise KeyError(f"{name}: the prompts have none of the answer columns {list(ANSWER_COLUMNS)}; "
                   f"columns: {sorted(columns)}")


def verdicts(completions, references, *, timeout_s: int | None = 5, float_rounding: int = 6,
             name: str = "math") -> tuple[list[bool | None], dict[str, int]]:
    """The math checker's verdict on each completion and the counts of what went wrong.

    A verdict is True (equal final answers), False (not equal, or the checker failed or timed out on
    the completion: counted as `failures` / `timeouts`) or None (the reference has no parsable answer:
    counted as `bad_references`). Every reward built on the checker ("math", "cosine_length") reads
    correctness from here.
    """
    mv = _math_verify()
    completions = checked_texts(completions, name)
    if len(completions) != len(references):
        raise ValueError(f"{name}: {len(completions)} completions but {len(references)} reference answers")
    checker = _Checker(_timeout(timeout_s), float_rounding)
    out, counts = [], {"failures": 0, "timeouts": 0, "bad_references": 0}
    for text, ref in zip(completions, references):
        try:
            if ref is None:
                raise BadReference("math reward: the reference answer is None")
            out.append(checker.equal(gold_answer(ref), text))
        except BadReference:
            counts["bad_references"] += 1
            out.append(None)
        except mv.errors.TimeoutException:
            counts["timeouts"] += 1
            out.append(False)
        except Exception:  # noqa: BLE001 - one sample the checker cannot handle is wrong and counted.
            counts["failures"] += 1
            out.append(False)
    return out, counts


def _score(completions, references, *, timeout_s, float_rounding,
           name: str = "math") -> tuple[list[float], dict[str, int]]:
    found, counts = verdicts(completions, references, timeout_s=timeout_s, float_rounding=float_rounding, name=name)
    return [float(v is True) for v in found], counts


@dataclasses.dataclass(frozen=True)
class MathReward:
    """The math checker as a reward source: 1 for an equivalent final answer, 0 otherwise.

    Attributes:
      column: the reference column (None: the first of `ANSWER_COLUMNS` present).
      timeout_s: seconds per parse / comparison (math-verify's timeout), None for no limit.
      float_rounding: decimal places of numeric comparison.
      name: the metric name (`rewards/{name}/mean`, `/failures`, `/timeouts`, `/bad_references`).
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
        refs = reference_column(dict(inputs.columns), self.column, self.name)
        rewards, counts = _score(inputs.completions, refs, timeout_s=self.timeout_s,
                                 float_rounding=self.float_rounding, name=self.name)
        return ScoredRewards(rewards, counts)


def math_reward(completions, answer=None, solution=None, **kwargs) -> list[float]:
    """TRL-style math reward: `1[final answer of completion == answer in answer/solution]` per row.

    A sample the checker cannot handle, or whose reference has no parsable answer, scores 0 (use
    `MathReward` to also count such samples).
    """
    refs = answer if answer is not None else solution
    if refs is None:
        raise KeyError(f"math_reward: the prompts have none of the answer columns {list(ANSWER_COLUMNS)}")
    return _score(completions, refs, timeout_s=5, float_rounding=6, name="math_reward")[0]


# Tag contents may not hold the tags again: "<think>a</think><answer>1</answer><answer>2</answer>" is no match.
_THINK_ANSWER = re.compile(r"<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>", re.DOTALL)


def think_answer_format(completions, **kwargs) -> list[float]:
    """1 when a completion is `<think>...</think>` then `<answer>...</answer>` (nothing else), else 0.

    `r = 1[completion.strip() is "<think>" T "</think>" whitespace "<answer>" A "</answer>"]`, T and A
    any text (newlines included) without the tags themselves, so a repeated or nested block scores 0
    (DeepSeek-R1's template "<think> reasoning </think> <answer> answer </answer>", Guo et al. 2025;
    TRL's `think_format_reward` likewise refuses a second `<think>`).

    Against open-r1's `format_reward` (exactly "<think>\\n T \\n</think>\\n<answer>\\n A \\n</answer>",
    matched from the start with DOTALL | MULTILINE): open-r1 demands those newlines where this accepts
    any whitespace (as open-r1 did before its PR #418); and its MULTILINE end anchor matches at any line
    end, so it accepts text after "</answer>\\n" and a repeated `<answer>` block, which this refuses.
    "tag_count" (`tag_count`) gives open-r1's newline-exact tags partial credit.
    """
    return [float(_THINK_ANSWER.fullmatch(text.strip()) is not None)
            for text in checked_texts(completions, "think_format")]


def answer_format(completions, **kwargs) -> list[float]:
    """1 when a completion states a final answer (`\\boxed{}`, "#### x", `<answer>x</answer>` or "the
    answer is x"), else 0."""
    return [float(extract_answer(text) is not None) for text in checked_texts(completions, "answer_format")]


# The four newline-exact tags of open-r1's format ("<think>\n...\n</think>\n<answer>\n...\n</answer>").
_R1_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def tag_count(completions, **kwargs) -> list[float]:
    """Partial credit for the think/answer tags: 0.25 for each of `"<think>\\n"`, `"\\n</think>\\n"`,
    `"\\n<answer>\\n"`, `"\\n</answer>"` that occurs in the completion exactly once.

    `r = 0.25 * sum_tag 1[count(completion, tag) == 1]` (substring counts, no stripping), in [0, 1]: a
    companion of "think_format" that rewards a format half learned. Reference: open-r1's
    `tag_count_reward` (huggingface/open-r1, `src/open_r1/rewards.py`, after willccbb's GRPO demo).
    """
    return [0.25 * sum(text.count(tag) == 1 for tag in _R1_TAGS) for text in checked_texts(completions, "tag_count")]
