"""LLM judges (generative reward models) on our own `CausalLM`: pairwise and pointwise, read from the
next-token logits of a prompted model (Zheng et al. 2023, "Judging LLM-as-a-Judge"; Guo et al. 2024,
"Direct Language Model Alignment from Online AI Feedback"; Lee et al. 2023, "RLAIF").

A judge renders a configurable prompt template, runs the model once (batched, jitted, no sampling)
and reads the logits of a few answer tokens at the position after the prompt:

- **pairwise** (`PairwiseTemplate`, placeholders `{prompt}`, `{response_a}`, `{response_b}`,
  optional `{principle}`): `P(A) = sigmoid(l_A - l_B)`, the probability of "A" over "B". Each pair
  is judged in both orders and the two probabilities that the *first* response is better are
  averaged, which cancels a constant position bias (`debiased_preference`); the share of pairs
  whose two orders agree is the position-swap consistency.
- **pointwise** (`PointwiseTemplate`, placeholders `{prompt}`, `{response}`, optional
  `{principle}`): the expected rating `E[s] = sum_k softmax(l)_k v_k` over the rating tokens
  ("1".."9" by default, with values 1..9; `expected_rating`).

With several principles (Constitutional AI / RLAIF), every principle is a rendering of the template
and the probabilities (or ratings) are averaged over them.

A judge is usable as the labeller of preference data (`rlhf_jax.train.rlaif.label_pairs`), as the
ranker of online DPO (`PairwiseJudge.prefer`), and as a reward source in PPO / GRPO
(`PointwiseJudge` is a `RewardSource`; `PairwiseJudgeReward` turns the pairwise judge into the
round-robin win rate of each completion within its group).

Example:
  >>> judge = PairwiseJudge(JudgeModel(CausalLM(cfg), params, tokenizer), PairwiseTemplate())
  >>> verdict = judge.prefer(["2+2="], ["4"], ["5"])
  >>> verdict.prob_first, verdict.consistent        # [0.93], [True]
"""

from __future__ import annotations

import dataclasses
import string
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError
from rlhf_jax.data.formats import Chat, Plain
from rlhf_jax.data.tokenize import TokenizeConfig, tokenize_sequences
from rlhf_jax.rewards.base import RewardInputs

__all__ = ["PairwiseTemplate", "PointwiseTemplate", "check_template", "choice_probability", "debiased_preference",
           "expected_rating", "JudgeModel", "PairwiseVerdict", "PairwiseJudge", "PointwiseJudge",
           "PairwiseJudgeReward", "round_robin_win_rate"]

DEFAULT_PAIRWISE = ("Which response to the prompt is better{principle_clause}?\n"
                    "Prompt: {prompt}\nResponse A: {response_a}\nResponse B: {response_b}\n"
                    "Answer with A or B. Answer:")
DEFAULT_POINTWISE = ("Rate the response to the prompt from 1 to 9{principle_clause}.\n"
                     "Prompt: {prompt}\nResponse: {response}\nRating:")


# ------------------------------------------------------------------------------------- templates

def check_template(key: str, text: str, *, required: Sequence[str], optional: Sequence[str] = (),
                   principles: Sequence[str] = ()) -> None:
    """Raise a one-line `ConfigError` naming `key` when `text` lacks a required `{placeholder}`, has an
    unknown one, or is not a valid format string."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{key}: not a valid template ({e}): {text[:60]!r}") from None
    missing = [f for f in required if f not in fields]
    if missing:
        raise ConfigError(f"{key}: the template lacks the placeholder {{{missing[0]}}} (it needs "
                          f"{', '.join('{' + f + '}' for f in required)}): {text[:60]!r}")
    unknown = sorted(fields - set(required) - set(optional))
    if isinstance(principles, str) or not all(isinstance(p, str) and p.strip() for p in principles):
        # a plain string would be judged character by character, one "principle" per letter
        raise ConfigError(f"{key}: principles must be a list of non-empty principle texts, got {principles!r}")
    if principles and not fields & {"principle", "principle_clause"}:
        raise ConfigError(f"{key}: principles are set but the template has no {{principle}} or {{principle_clause}}")
    if unknown:
        raise ConfigError(f"{key}: unknown placeholder {{{unknown[0]}}}; allowed: "
                          f"{', '.join('{' + f + '}' for f in (*required, *optional))}")


def _render(text: str, principle: str | None, **fields: str) -> str:
    clause = "" if not principle else f", judged by this principle: {principle}"
    return text.format(principle=principle or "", principle_clause=clause, **fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairwiseTemplate:
    """A pairwise judge prompt and its two answer tokens.

    Attributes:
      text: the prompt; needs `{prompt}`, `{response_a}`, `{response_b}`; may use `{principle}` (the
        principle's text) or `{principle_clause}` (", judged by this principle: ..." or "").
      choices: the answer strings for "A is better" and "B is better", each one token.
      principles: principles to judge by; probabilities are averaged over them (empty: none).
      chat: render `text` as a user message with the tokenizer's chat template (generation prompt
        added) instead of plain text.
    """

    text: str = DEFAULT_PAIRWISE
    choices: tuple[str, str] = ("A", "B")
    principles: tuple[str, ...] = ()
    chat: bool = False

    def __post_init__(self):
        check_template("judge.template.text", self.text, required=("prompt", "response_a", "response_b"),
                       optional=("principle", "principle_clause"), principles=self.principles)
        if len(self.choices) != 2 or len(set(self.choices)) != 2:
            raise ConfigError(f"judge.template.choices must be two different strings, got {self.choices!r}")

    def render(self, prompt: str, a: str, b: str, principle: str | None = None) -> str:
        return _render(self.text, principle, prompt=prompt, response_a=a, response_b=b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PointwiseTemplate:
    """A pointwise (rating) judge prompt and its rating tokens.

    Attributes:
      text: the prompt; needs `{prompt}` and `{response}`; may use `{principle}` / `{principle_clause}`.
      ratings: the rating strings, each one token (default "1".."9").
      values: the score of each rating (default: `float(rating)`).
      principles: principles to rate by; ratings are averaged over them.
      chat: render with the chat template (see `PairwiseTemplate`).
    """

    text: str = DEFAULT_POINTWISE
    ratings: tuple[str, ...] = tuple(str(i) for i in range(1, 10))
    values: tuple[float, ...] | None = None
    principles: tuple[str, ...] = ()
    chat: bool = False

    def __post_init__(self):
        check_template("judge.template.text", self.text, required=("prompt", "response"),
                       optional=("principle", "principle_clause"), principles=self.principles)
        if len(self.ratings) < 2 or len(set(self.ratings)) != len(self.ratings):
            raise ConfigError(f"judge.template.ratings must be >= 2 different strings, got {self.ratings!r}")
        if self.values is None:
            try:
                object.__setattr__(self, "values", tuple(float(r) for r in self.ratings))
            except ValueError:
                raise ConfigError(f"judge.template.values: ratings {self.ratings!r} are not numbers; give values "
                                  "explicitly") from None
        if len(self.values) != len(self.ratings):
            raise ConfigError(f"judge.template.values has {len(self.values)} entries for {len(self.ratings)} ratings")

    def render(self, prompt: str, response: str, principle: str | None = None) -> str:
        return _render(self.text, principle, prompt=prompt, response=response)


# ------------------------------------------------------------------------------------- the math

def choice_probability(logit_a: jax.Array, logit_b: jax.Array) -> jax.Array:
    """`P(A) = exp(l_A) / (exp(l_A) + exp(l_B)) = sigmoid(l_A - l_B)`: the judge's probability of
    answer A, renormalised over the two answer tokens. float32, elementwise."""
    return jax.nn.sigmoid(jnp.asarray(logit_a, jnp.float32) - jnp.asarray(logit_b, jnp.float32))


def debiased_preference(logits_ab: jax.Array, logits_ba: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The probability that the first response is better, averaged over both presentation orders.

    With `x` shown as A and `y` as B, `p_1 = sigmoid(l_A - l_B)`; with `y` shown as A and `x` as B,
    `p_2 = sigmoid(l'_B - l'_A)`. The preference is `p = (p_1 + p_2) / 2`: a judge with a constant
    position bias `c` (`l_A - l_B = s + c`, `l'_A - l'_B = -s + c`) gives `p_1 + p_2` symmetric in
    `c` around the unbiased `sigmoid(s)`, and exactly 1/2 for equal responses whatever `c`. The
    orders are *consistent* when both prefer the same response: `(p_1 > 1/2) == (p_2 > 1/2)`.

    Args:
      logits_ab: `[N, 2]` logits of (A, B) with the first response in slot A.
      logits_ba: `[N, 2]` logits of (A, B) with the first response in slot B.

    Returns:
      `(p [N] float32, consistent [N] bool)`.
    """
    ab, ba = jnp.asarray(logits_ab, jnp.float32), jnp.asarray(logits_ba, jnp.float32)
    p1 = choice_probability(ab[:, 0], ab[:, 1])
    p2 = choice_probability(ba[:, 1], ba[:, 0])
    return (p1 + p2) / 2, (p1 > 0.5) == (p2 > 0.5)


def expected_rating(rating_logits: jax.Array, values: jax.Array) -> jax.Array:
    """`E[s] = sum_k softmax(l)_k v_k` over the rating tokens' logits `[N, K]` and their values `[K]` -> `[N]`."""
    probs = jax.nn.softmax(jnp.asarray(rating_logits, jnp.float32), axis=-1)
    return probs @ jnp.asarray(values, jnp.float32)


def round_robin_win_rate(pref: np.ndarray, group_size: int) -> np.ndarray:
    """Each completion's mean probability of beating the others of its group: `w_i = mean_{j != i} P(i > j)`.

    Args:
      pref: `[N / G, G, G]` with `pref[g, i, j] = P(i beats j)` for `i < j` (the rest is ignored;
        `P(j > i) = 1 - P(i > j)`).
      group_size: G.

    Returns:
      float32 `[N]`, groups contiguous.
    """
    g = group_size
    upper = np.triu(np.ones((g, g), bool), 1)
    full = np.where(upper, pref, 0.0) + np.where(upper.T, 1.0 - np.swapaxes(pref, 1, 2), 0.0)
    return (full.sum(axis=2) / max(g - 1, 1)).reshape(-1).astype(np.float32)


# ------------------------------------------------------------------------------------- the model

class JudgeModel:
    """A `CausalLM` read at its next-token logits for a few answer tokens, in fixed-size jitted chunks.

    Prompts are tokenized as the SFT data pipeline tokenizes a prompt (`Plain`: BOS + text; `chat`:
    a user message with the generation prompt), truncated from the left to `max_len` tokens (the
    answer cue is at the end), right-padded to a multiple of `pad_to` and run `batch_size` at a
    time, so a few programs serve any number of calls. Only the logits of the requested ids are
    computed: `h[len - 1] . W[:, ids]` from the last real token's hidden state.

    Args:
      model: a `CausalLM` with an LM head.
      params: its parameters.
      tokenizer: its Hugging Face (fast) tokenizer.
      batch_size: rows per call of the jitted program.
      max_len: the most prompt tokens (default: the model's `max_position_embeddings`).
      pad_to: prompt widths are rounded up to a multiple of this.
    """

    def __init__(self, model, params, tokenizer, *, batch_size: int = 32, max_len: int | None = None,
                 pad_to: int = 32):
        if getattr(model, "head", None) != "lm":
            raise ValueError(f"JudgeModel: the judge needs an LM head, got head={getattr(model, 'head', None)!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"JudgeModel: batch_size must be a positive int, got {batch_size!r}")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.pad_to = batch_size, pad_to
        self.max_len = max_len or model.config.max_position_embeddings

        def logits_at(params, tokens, lengths, ids):
            hidden = model.forward(params, tokens).hidden
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            w = model.lm_head_weight(params)[:, ids]
            return jnp.dot(last.astype(jnp.float32), w.astype(jnp.float32))

        self._logits_at = jax.jit(logits_at)

    def token_id(self, text: str, *, key: str) -> int:
        """The id of `text`, which must encode to exactly one token (ConfigError naming `key` otherwise)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"{key}: {text!r} is {len(ids)} tokens {ids} for this tokenizer; an answer must be one "
                              "token (try a leading space, e.g. ' A')")
        return int(ids[0])

    def encode(self, texts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
        """Token ids of judge prompts, as the data pipeline encodes a prompt (left-truncated to `max_len`)."""
        specs = [Chat(({"role": "user", "content": t},), 1) if chat else Plain(t, None) for t in texts]
        out = tokenize_sequences(specs, self.tokenizer, TokenizeConfig(max_len=1 << 30))
        rows, cut = [], []
        for i, (text, seq) in enumerate(zip(texts, out)):
            if isinstance(seq, str):
                raise ValueError(f"JudgeModel: cannot tokenize the judge prompt {text[:60]!r}: {seq}")
            if len(seq.ids) > self.max_len:
                cut.append(i)
            rows.append(seq.ids[-self.max_len:])
        if cut:  # the judge then sees the end of the prompt only (its instructions and first response cut)
            warnings.warn(f"JudgeModel: {len(cut)} of {len(texts)} judge prompts are longer than max_len={self.max_len} "
                          f"tokens and lose their beginning (the first is prompt {cut[0]}); raise max_len or shorten "
                          "the template / responses", stacklevel=2)
        return rows

    def choice_logits(self, texts: Sequence[str], ids: Sequence[int], *, chat: bool = False) -> np.ndarray:
        """float32 `[N, K]`: the next-token logits of `ids` after each prompt of `texts`."""
        rows = self.encode(texts, chat=chat)
        n = len(rows)
        if n == 0:
            return np.zeros((0, len(ids)), np.float32)
        width = -(-max(len(r) for r in rows) // self.pad_to) * self.pad_to
        pad = self.tokenizer.pad_token_id or 0
        tokens = np.full((n + (-n) % self.batch_size, width), pad, np.int32)
        lengths = np.ones(len(tokens), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
            lengths[i] = len(r)
        ids = jnp.asarray(ids, jnp.int32)
        out = [self._logits_at(self.params, tokens[s:s + self.batch_size], lengths[s:s + self.batch_size], ids)
               for s in range(0, len(tokens), self.batch_size)]
        return np.asarray(jnp.concatenate(out))[:n]


# ------------------------------------------------------------------------------------- the judges

class PairwiseVerdict(NamedTuple):
    """A pairwise judgement of N pairs.

    prob_first: float32 `[N]` probability that the first response is better (both orders averaged,
      and over the principles); consistent: bool `[N]`, both orders prefer the same response (under
      the principles' mean); prob_first_ab / prob_first_ba: the two orders' probabilities.
    """

    prob_first: np.ndarray
    consistent: np.ndarray
    prob_first_ab: np.ndarray
    prob_first_ba: np.ndarray

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        """`judge/position_consistency`, `judge/prob_first_mean`, `judge/position_bias` (mean P(slot A wins) - 1/2)."""
        bias = float(np.mean((self.prob_first_ab + (1.0 - self.prob_first_ba)) / 2) - 0.5) if len(self.prob_first) else 0.0
        return {f"{prefix}position_consistency": float(np.mean(self.consistent)) if len(self.consistent) else 1.0,
                f"{prefix}prob_first_mean": float(np.mean(self.prob_first)) if len(self.prob_first) else 0.5,
                f"{prefix}position_bias": bias}


class PairwiseJudge:
    """Which of two responses is better, from the judge model's logits of the two answer tokens.

    `prefer(prompts, first, second)` renders each pair in both orders (and per principle), reads the
    answer logits (`JudgeModel.choice_logits`) and returns `debiased_preference`'s probability that
    the first response is better, averaged over the principles, and the position-swap consistency.
    """

    def __init__(self, judge: JudgeModel, template: PairwiseTemplate = PairwiseTemplate()):
        self.judge, self.template = judge, template
        self.ids = [judge.token_id(c, key=f"judge.template.choices[{i}]") for i, c in enumerate(template.choices)]

    def prefer(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> PairwiseVerdict:
        n = len(prompts)
        if not len(first) == len(second) == n:
            raise ValueError(f"PairwiseJudge.prefer: {n} prompts, {len(first)} first and {len(second)} second responses")
        principles = self.template.principles or (None,)
        texts = [self.template.render(p, a, b, principle)
                 for principle in principles for order in (0, 1)
                 for p, x, y in zip(prompts, first, second) for a, b in [(x, y) if order == 0 else (y, x)]]
        logits = self.judge.choice_logits(texts, self.ids, chat=self.template.chat).reshape(len(principles), 2, n, 2)
        bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=(0, 1, 3)))
        if bad.size:  # a NaN probability would read as "the second is better"
            raise ValueError(f"PairwiseJudge.prefer: the judge's answer logits are not finite for {bad.size} of {n} "
                             f"pairs (the first is pair {int(bad[0])}); check the judge's parameters")
        p1 = np.asarray(choice_probability(logits[:, 0, :, 0], logits[:, 0, :, 1])).mean(axis=0)
        p2 = np.asarray(choice_probability(logits[:, 1, :, 1], logits[:, 1, :, 0])).mean(axis=0)
        return PairwiseVerdict((p1 + p2) / 2, (p1 > 0.5) == (p2 > 0.5), p1, p2)


class PointwiseJudge:
    """A rating judge and a reward source: `E[rating]` of each prompt + response (`expected_rating`).

    As a `RewardSource` (PPO, GRPO, best-of-n) it reads the decoded `prompts` and `completions` of
    the rollouts; averaged over the template's principles.
    """

    def __init__(self, judge: JudgeModel, template: PointwiseTemplate = PointwiseTemplate(), *,
                 name: str = "judge"):
        self.judge, self.template, self.name = judge, template, name
        self.ids = [judge.token_id(r, key=f"judge.template.ratings[{i}]") for i, r in enumerate(template.ratings)]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """float32 `[N]` expected ratings."""
        if len(prompts) != len(responses):
            raise ValueError(f"PointwiseJudge.score: {len(prompts)} prompts but {len(responses)} responses")
        principles = self.template.principles or (None,)
        texts = [self.template.render(p, r, principle) for principle in principles
                 for p, r in zip(prompts, responses)]
        logits = self.judge.choice_logits(texts, self.ids, chat=self.template.chat)
        scores = np.asarray(expected_rating(logits, np.asarray(self.template.values)))
        return scores.reshape(len(principles), len(prompts)).mean(axis=0).astype(np.float32)

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        return self.score(_texts(inputs, "prompts"), _texts(inputs, "completions"))


class PairwiseJudgeReward:
    """A pairwise judge as a reward source for groups (GRPO): each completion's round-robin win rate.

    Every pair `(i, j)`, `i < j`, of a group of `group_size` contiguous completions is judged
    (both orders), and completion i's reward is `mean_{j != i} P(i > j)` (`round_robin_win_rate`):
    G (G - 1) judge prompts per group.
    """

    def __init__(self, judge: PairwiseJudge, group_size: int, *, name: str = "pairwise_judge"):
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"PairwiseJudgeReward: group_size must be an int >= 2, got {group_size!r}")
        self.judge, self.group_size, self.name = judge, group_size, name

    def __call__(self, inputs: RewardInputs) -> np.ndarray:
        prompts, completions = _texts(inputs, "prompts"), _texts(inputs, "completions")
        g, n = self.group_size, len(completions)
        if n % g:
            raise ValueError(f"PairwiseJudgeReward: {n} completions do not split into groups of {g}")
        pairs = [(k * g + i, k * g + j) for k in range(n // g) for i in range(g) for j in range(i + 1, g)]
        verdict = self.judge.prefer([prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs],
                                    [completions[j] for _, j in pairs])
        pref = np.zeros((n // g, g, g), np.float32)
        for (i, j), p in zip(pairs, verdict.prob_first):
            pref[i // g, i % g, j % g] = p
        return round_robin_win_rate(pref, g)


def _texts(inputs: RewardInputs, field: str) -> list[str]:
    value: Any = getattr(inputs, field)
    if value is None:
        raise ValueError(f"a judge reads the decoded {field}; the rollouts have no texts (no tokenizer)")
    return list(value)
