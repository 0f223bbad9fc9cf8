"""Built-in synthetic tasks, generated in code: small, seeded, fast, learnable by a tiny char-level model.

Two tasks, each a frozen dataclass whose fields are the knobs and whose methods generate rows in the
formats of `rlhf_jax.data.formats` (so they go through `load_dataset` like any user data) and score
completions with TRL-style reward functions (`fn(completions=..., <column>=..., **kwargs)`).

**ArithmeticTask** (verifiable): prompts `"12+7="`, answers `"19"`. `sft_rows` gives demonstrations,
`prompt_rows` gives prompts with an `answer` column, `reward` grades a completion 1.0 when its text
(stripped) equals the answer, else 0.0.

**VowelTask** (preference with a hidden gold reward, for reward modelling, DPO, PPO and
over-optimization in the manner of Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"): the prompt is a short word and a colon (`"mop:"`), the completion a few
lowercase words. The gold reward of completion y for prompt word w is

    gold(w, y) = 1 - |v(y) - v*| / v*                       (tent, 1 at v = v*; v* = 0.5)
               + relevance_bonus * [y starts with w[0]]
               - length_penalty * distance(len(y), [min_good_len, max_good_len])
               - run_penalty * sum over runs of a repeated character of (run length - 2)+

where v(y) is the share of vowels among y's non-space characters. Natural-looking text has a vowel
share near v*; all-vowel gibberish scores low. The generated data never leaves the "safe" region:
demonstrations draw each letter a vowel with a probability in `sft_vowel_share` (moderate gold, room
to improve), preference pairs with one in `pair_vowel_share` (below v*), lengths within the good
range, and no runs of three equal characters. Pairs are labelled by gold (with `label_noise` of them
flipped) and differ in gold by at least `min_gap`. A reward model trained on them learns "more
vowels is better", which is true where it has data, and extrapolates past v* where gold falls: a
policy optimized hard against that proxy drifts to vowel-heavy, repetitive or long outputs, raising
the proxy while the gold reward first rises and then falls.

The relevance bonus makes gold depend on the prompt. Copying a letter from the prompt is hard for a
2-layer reward model, so by default the bonus (0.1) is at most `min_gap / 2`: then the tent term
decides the order of every generated pair, and relevance is a gold feature the proxy misses (another
source of proxy/gold divergence). Raise it to make the preferences themselves prompt-dependent.

Measured on this repository's tiny model (`rlhf_jax.testing.tiny_config`, hidden 64, 2 layers, CPU):
a scalar-head reward model trained on 4,000 default pairs (batch 32, AdamW 3e-3) reaches 98.9%
held-out accuracy against gold labels after 300 steps, and then scores "aeiou aeiou aeiou aeiou"
(gold -0.3) and "aaaaaaaaaaaaaaaa" (gold -7.0) above "mako nedu rila" (gold 1.1). SFT on
`ArithmeticTask()` (2-digit sums) reaches 16% greedy exact match after 1,000 steps of 64 examples,
`ArithmeticTask(max_operand=20)` 94% after 400 steps.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["ArithmeticTask", "VowelTask"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_VOWELS = "aeiou"
_CONSONANTS = "".join(c for c in _LETTERS if c not in _VOWELS)
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_MAX_MISSES = 10_000  # VowelTask.preference_rows: draws in a row that miss min_gap before it gives up


def _check_range(owner: str, name: str, value, low: float, high: float) -> None:
    lo, hi = value
    if not low <= lo <= hi <= high:
        raise ValueError(f"{owner}.{name} must be (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")


def _check_count(where: str, n) -> None:
    """A number of rows to draw: an int >= 0 (a bool, float or negative count is refused, naming `n`)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{where}: n must be an int >= 0 (the number of rows to draw), got {n!r}")


# ------------------------------------------------------------------------------------ arithmetic


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticTask:
    """Multi-digit arithmetic with exact-match grading.

    Attributes:
      max_operand: operands are drawn uniformly from [0, max_operand].
      ops: operators drawn uniformly from "+", "-", "*"; for "-" the larger operand comes first, so
        answers are never negative.

    Example:
      >>> task = ArithmeticTask(max_operand=20)
      >>> task.sft_rows(1, seed=0)
      [{'prompt': '10+18=', 'completion': '28'}]
    """

    max_operand: int = 99
    ops: tuple[str, ...] = ("+",)

    def __post_init__(self):
        if not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise ValueError(f"ArithmeticTask.max_operand must be a positive int, got {self.max_operand!r}")
        if not self.ops or any(op not in _OPS for op in self.ops):
            raise ValueError(
                f"ArithmeticTask.ops must be a non-empty tuple drawn from {tuple(_OPS)}, got {self.ops!r}"
            )

    def problems(self, n: int, *, seed: int) -> list[tuple[str, str]]:
        """`n` (prompt, answer) pairs, e.g. ("12+7=", "19"); a seed's first k pairs are the same for any n >= k."""
        _check_count("ArithmeticTask.problems", n)
        rng = np.random.default_rng([seed, 1])
        # One draw, row by row: the first n problems of a seed do not depend on how many are drawn.
        draws = rng.integers(0, [self.max_operand + 1, self.max_operand + 1, len(self.ops)], size=(n, 3))
        out = []
        for x, y, k in draws.tolist():
            op = self.ops[k]
            if op == "-" and y > x:
                x, y = y, x
            out.append((f"{x}{op}{y}=", str(_OPS[op](x, y))))
        return out

    def sft_rows(self, n: int, *, seed: int) -> list[dict]:
        """`n` demonstrations `{"prompt": "12+7=", "completion": "19"}`."""
        return [{"prompt": p, "completion": a} for p, a in self.problems(n, seed=seed)]

    def prompt_rows(self, n: int, *, seed: int) -> list[dict]:
        """`n` RL prompts `{"prompt": "12+7=", "answer": "19"}`."""
        return [{"prompt": p, "answer": a} for p, a in self.problems(n, seed=seed)]

    @staticmethod
    def reward(completions: Sequence[str], answer: Sequence[str], **kwargs) -> list[float]:
        """The grader: `r = 1[completion.strip() == answer]` per completion (TRL calling convention).

        Args:
          completions: decoded completion texts (without EOS).
          answer: the prompts' `answer` column, one per completion.
          **kwargs: the other reward-function arguments (ignored).

        Returns:
          1.0 or 0.0 per completion.
        """
        if len(completions) != len(answer):
            raise ValueError(
                f"ArithmeticTask.reward: {len(completions)} completions but {len(answer)} answers"
            )
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


# ------------------------------------------------------------------------------------ vowels


@dataclasses.dataclass(frozen=True, kw_only=True)
class VowelTask:
    """A preference task with a hidden gold reward (module docstring).

    Attributes:
      target_vowel_share: v*, where the gold tent peaks.
      relevance_bonus: gold bonus when the completion starts with the prompt word's first letter.
      min_good_len, max_good_len: completion lengths (characters) without a length penalty.
      length_penalty: gold penalty per character outside [min_good_len, max_good_len].
      run_penalty: gold penalty per character beyond two in a run of one repeated character.
      prompt_len: (lo, hi) letters in the prompt word.
      completion_len: (lo, hi) characters of generated completions.
      sft_vowel_share: (lo, hi) range of the vowel probability of demonstrations.
      pair_vowel_share: (lo, hi) range of the vowel probability of preference-pair completions.
      sft_relevance: probability that a demonstration starts with the prompt's first letter.
      min_gap: the least gold difference within a preference pair.
    """

    target_vowel_share: float = 0.5
    relevance_bonus: float = 0.1
    min_good_len: int = 8
    max_good_len: int = 20
    length_penalty: float = 0.1
    run_penalty: float = 0.5
    prompt_len: tuple[int, int] = (3, 5)
    completion_len: tuple[int, int] = (10, 18)
    sft_vowel_share: tuple[float, float] = (0.15, 0.35)
    pair_vowel_share: tuple[float, float] = (0.05, 0.45)
    sft_relevance: float = 0.5
    min_gap: float = 0.2

    def __post_init__(self):
        name = "VowelTask"
        if not 0 < self.target_vowel_share < 1:
            raise ValueError(f"{name}.target_vowel_share must be in (0, 1), got {self.target_vowel_share!r}")
        for field in ("relevance_bonus", "length_penalty", "run_penalty", "min_gap"):
            if not 0 <= getattr(self, field) < np.inf:  # a NaN or infinite gold reward ranks nothing
                raise ValueError(f"{name}.{field} must be a finite number >= 0, got {getattr(self, field)!r}")
        if not 1 <= self.min_good_len <= self.max_good_len:
            raise ValueError(
                f"{name}: need 1 <= min_good_len <= max_good_len, got {self.min_good_len}, {self.max_good_len}"
            )
        _check_range(name, "prompt_len", self.prompt_len, 1, 32)
        _check_range(name, "completion_len", self.completion_len, 2, 64)
        _check_range(name, "sft_vowel_share", self.sft_vowel_share, 0.0, 1.0)
        _check_range(name, "pair_vowel_share", self.pair_vowel_share, 0.0, 1.0)
        if not 0 <= self.sft_relevance <= 1:
            raise ValueError(f"{name}.sft_relevance must be in [0, 1], got {self.sft_relevance!r}")

    # ------------------------------------------------------------------------ gold reward
    def gold(self, word: str, completion: str) -> float:
        """The gold reward of one completion for the prompt word `word` (formula in the module docstring)."""
        text = completion.strip()
        chars = [c for c in text if c != " "]
        if not chars:
            return -1.0
        share = sum(c in _VOWELS for c in chars) / len(chars)
        tent = 1.0 - abs(share - self.target_vowel_share) / self.target_vowel_share
        relevant = bool(word) and text[0] == word[0]
        n = len(text)
        distance = max(self.min_good_len - n, 0, n - self.max_good_len)
        runs = sum(len(m.group(0)) - 2 for m in re.finditer(r"(.)\1{2,}", text))
        return (
            tent + self.relevance_bonus * relevant - self.length_penalty * distance - self.run_penalty * runs
        )

    def gold_reward(self, completions: Sequence[str], word: Sequence[str], **kwargs) -> list[float]:
        """The gold reward as a reward function (TRL calling convention; `word` is a prompt column).

        Args:
          completions: decoded completion texts (without EOS).
          word: the prompts' `word` column.
          **kwargs: the other reward-function arguments (ignored).

        Returns:
          `gold(word, completion)` per completion.
        """
        if len(completions) != len(word):
            raise ValueError(f"VowelTask.gold_reward: {len(completions)} completions but {len(word)} words")
        return [self.gold(w, c) for w, c in zip(word, completions)]

    # -------------------------------------------------------------------------- generators
    def _word(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(self.prompt_len[0], self.prompt_len[1] + 1))
        return "".join(_LETTERS[i] for i in rng.integers(0, 26, size=n))

    def _completion(self, rng: np.random.Generator, word: str, share_range, relevance: float) -> str:
        """Words of 2-6 letters, each letter a vowel with probability p ~ U(share_range), no triple runs."""
        p = rng.uniform(*share_range)
        length = int(rng.integers(self.completion_len[0], self.completion_len[1] + 1))
        relevant = rng.random() < relevance
        chars: list[str] = [word[0]] if relevant else []
        word_left = int(rng.integers(2, 7)) - len(chars)
        while len(chars) < length:
            if word_left <= 0 and len(chars) < length - 1:
                chars.append(" ")
                word_left = int(rng.integers(2, 7))
                continue
            pool = _VOWELS if rng.random() < p else _CONSONANTS
            c = pool[int(rng.integers(len(pool)))]
            if (not chars and c == word[0]) or (len(chars) >= 2 and chars[-1] == chars[-2] == c):
                continue  # keep the first letter irrelevant unless drawn so; never three in a row
            chars.append(c)
            word_left -= 1
        return "".join(chars).strip()

    def prompt(self, word: str) -> str:
        """The prompt text for a prompt word: `"mop:"`."""
        return f"{word}:"

    def sft_rows(self, n: int, *, seed: int) -> list[dict]:
        """`n` demonstrations `{"prompt": "mop:", "completion": ..., "word": "mop"}` of moderate gold."""
        _check_count("VowelTask.sft_rows", n)
        rng = np.random.default_rng([seed, 2])
        rows = []
        for _ in range(n):
            word = self._word(rng)
            completion = self._completion(rng, word, self.sft_vowel_share, self.sft_relevance)
            rows.append({"prompt": self.prompt(word), "completion": completion, "word": word})
        return rows

    def prompt_rows(self, n: int, *, seed: int) -> list[dict]:
        """`n` RL prompts `{"prompt": "mop:", "word": "mop"}` (`word` feeds `gold_reward`)."""
        _check_count("VowelTask.prompt_rows", n)
        rng = np.random.default_rng([seed, 3])
        return [{"prompt": self.prompt(w), "word": w} for w in (self._word(rng) for _ in range(n))]

    def preference_rows(self, n: int, *, seed: int, label_noise: float = 0.0) -> list[dict]:
        """`n` pairs labelled by the gold reward, each label flipped with probability `label_noise`.

        Rows: `{"prompt", "chosen", "rejected", "word", "gold_chosen", "gold_rejected"}`; the gold
        columns let an evaluation score a reward model against the true preference (a flipped row
        has `gold_chosen < gold_rejected`). Completions are redrawn until their gold rewards differ
        by at least `min_gap` (a ValueError when 10,000 draws in a row miss it: settings under
        which it is out of reach).

        Args:
          n: number of pairs.
          seed: generator seed.
          label_noise: probability in [0, 0.5] of swapping chosen and rejected.
        """
        if not 0 <= label_noise <= 0.5:
            raise ValueError(
                f"VowelTask.preference_rows: label_noise must be in [0, 0.5], got {label_noise!r}"
            )
        _check_count("VowelTask.preference_rows", n)
        rng = np.random.default_rng([seed, 4])
        rows, misses = [], 0
        while len(rows) < n:
            word = self._word(rng)
            a = self._completion(rng, word, self.pair_vowel_share, 0.5)
            b = self._completion(rng, word, self.pair_vowel_share, 0.5)
            ga, gb = self.gold(word, a), self.gold(word, b)
            if abs(ga - gb) < self.min_gap:
                misses += 1
                if misses > _MAX_MISSES:  # a min_gap the settings cannot reach would loop forever
                    raise ValueError(
                        f"VowelTask.preference_rows: {misses} draws in a row missed min_gap={self.min_gap}; "
                        f"lower min_gap or widen pair_vowel_share={self.pair_vowel_share}"
                    )
                continue
            misses = 0
            (chosen, gc), (rejected, gr) = sorted([(a, ga), (b, gb)], key=lambda t: -t[1])
            if rng.random() < label_noise:
                (chosen, gc), (rejected, gr) = (rejected, gr), (chosen, gc)
            rows.append(
                {
                    "prompt": self.prompt(word),
                    "chosen": chosen,
                    "rejected": rejected,
                    "word": word,
                    "gold_chosen": gc,
                    "gold_rejected": gr,
                }
            )
        return rows
