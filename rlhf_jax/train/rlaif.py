"""AI feedback: sampling completions from a policy, labelling pairs with a judge into a preference file
(RLAIF, Lee et al. 2023; Bai et al. 2022, "Constitutional AI"), and the critique-and-revise loop.

    judge = load_judge(JudgeConfig(model="runs/judge/checkpoints", template=PairwiseTemplate(...)))
    rows = sample_completions(policy_config, "runs/sft/checkpoints", num_samples=2)   # or pairs from a file
    labelled, metrics = label_pairs(judge, rows)          # TRL rows: prompt / chosen / rejected (+ columns)
    write_preferences("data/rlaif.jsonl", labelled)       # then DPO (`train.dpo`) or a reward model + PPO

`label_pairs` asks the pairwise judge (`rlhf_jax.rewards.judges.PairwiseJudge`, both orders averaged,
principles averaged) which completion is better and writes the winner as `chosen`; the judge's
probability (`judge_prob`) and position-swap consistency come with each row, and the batch's
agreement and consistency metrics are returned.

Constitutional AI's supervised phase (`critique_and_revise`): for each prompt, an initial response,
then per round a critique of the response against a principle and a revision that addresses the
critique; the final revisions are SFT rows (`write_sft_rows`, then `train.sft`). Generation is any
`texts -> texts` function; `TextGenerator` is one from a `CausalLM` checkpoint and our sampler.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax.checkpoint import is_checkpoint_dir, read_model_config
from rlhf_jax.config import ConfigError, from_dict
from rlhf_jax.metrics import write_jsonl
from rlhf_jax.models import CausalLM, ModelConfig
from rlhf_jax.models.hf import config_from_hf
from rlhf_jax.rewards import RewardSource
from rlhf_jax.rewards.judges import (
    JudgeModel,
    PairwiseJudge,
    PairwiseTemplate,
    PointwiseJudge,
    PointwiseTemplate,
    check_template,
)
from rlhf_jax.sampling import Categorical, Sampler, SamplingConfig, default_prompt_buckets
from rlhf_jax.train.data import load_split, make_tokenizer, one_pass, saved_tokenizer
from rlhf_jax.train.rollouts import RolloutCollector, model_stop_ids
from rlhf_jax.train.weights import initial_params

__all__ = ["JudgeConfig", "check_judge", "load_judge", "load_pointwise_judge", "load_policy", "tokenizer_of",
           "sample_completions", "label_pairs", "write_preferences", "CritiqueTemplates", "TextGenerator",
           "critique_and_revise", "write_sft_rows"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """A pairwise judge: its model, tokenizer and prompt template.

    Attributes:
      model: an rlhf-jax checkpoint (`runs/<judge>/checkpoints`) or a Hugging Face model directory
        (required; `--set judge.model=PATH` turns the judge on in an online DPO run).
      tokenizer: a tokenizer directory or "offline"; None = the model's own (the Hugging Face
        directory's, or the run's `tokenizer/` beside its `checkpoints/`), else "offline".
      template: the prompt, answer tokens and principles (`PairwiseTemplate`).
      batch_size: judge prompts per forward.
      max_len: prompt tokens kept (from the end); None = the model's context.
    """

    model: str = ""
    tokenizer: str | None = None
    template: PairwiseTemplate = PairwiseTemplate()
    batch_size: int = 32
    max_len: int | None = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"judge.batch_size must be a positive int, got {self.batch_size!r}")


def _model_config(path: str, fallback: ModelConfig | None) -> ModelConfig:
    saved = read_model_config(path) if is_checkpoint_dir(path) else None
    if saved is not None:
        return from_dict(ModelConfig, saved)
    if os.path.isfile(os.path.join(path, "config.json")):
        return config_from_hf(path)
    if fallback is None:
        raise ConfigError(f"{path}: no model config saved with it; give the model config")
    return fallback


def tokenizer_of(path: str, spec: str | None = None):
    """`spec`'s tokenizer when given; else the one saved in `path` or in a `tokenizer/` beside it; else "offline"."""
    if spec is not None:
        return make_tokenizer(spec)
    saved = saved_tokenizer(path)
    return make_tokenizer("offline") if saved is None else saved


def load_policy(path: str, model_config: ModelConfig | None = None, *, key: str = "policy") -> tuple[CausalLM, Any]:
    """An LM-head `CausalLM` and its parameters from a checkpoint or Hugging Face directory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: {path} does not exist")
    model = CausalLM(_model_config(path, model_config))
    return model, initial_params(model, path, rng=jax.random.key(0))


def check_judge(config: JudgeConfig) -> None:
    """Raise ConfigError when `judge.model` is empty or names no file (before a run builds anything)."""
    if not config.model:
        raise ConfigError("judge.model must name a checkpoint or Hugging Face directory (--set judge.model=PATH)")
    if not os.path.exists(config.model):
        raise ConfigError(f"judge.model: {config.model} does not exist")


def load_judge(config: JudgeConfig, model_config: ModelConfig | None = None) -> PairwiseJudge:
    """The `PairwiseJudge` of `config` (its model read from `config.model`, architecture from there)."""
    check_judge(config)
    model, params = load_policy(config.model, model_config, key="judge.model")
    judge = JudgeModel(model, params, tokenizer_of(config.model, config.tokenizer), batch_size=config.batch_size,
                       max_len=config.max_len)
    return PairwiseJudge(judge, config.template)


def load_pointwise_judge(path: str, template: PointwiseTemplate = PointwiseTemplate(), *, tokenizer: str | None = None,
                         batch_size: int = 32, max_len: int | None = None, name: str = "judge") -> PointwiseJudge:
    """A `PointwiseJudge` (a reward source: expected rating) with its model read from `path`."""
    model, params = load_policy(path, key="rewards.judge")
    return PointwiseJudge(JudgeModel(model, params, tokenizer_of(path, tokenizer), batch_size=batch_size,
                                     max_len=max_len), template, name=name)


# ------------------------------------------------------------------------------ sampling

def sample_completions(config, policy: str | Mapping | None, *, num_samples: int, source: str | None = None,
                       max_new_tokens: int = 24, temperature: float = 1.0, seed: int = 0,
                       sources: Sequence[RewardSource] = (), max_prompts: int | None = None) -> list[dict[str, Any]]:
    """`num_samples` completions of every prompt of a prompt source, sampled from a policy.

    Args:
      config: a run config (its `model`, `data`: tokenizer, lengths, batch size; `mesh`).
      policy: a checkpoint or Hugging Face directory, or a parameter tree; None = `config.checkpoint.init_from`.
      num_samples: completions per prompt.
      source: the prompt source (a file or `synthetic:NAME`); default `config.data.train`.
      max_new_tokens, temperature: sampling.
      seed: the sampling key.
      sources: reward sources to score the completions with (their total goes to `scores`).
      max_prompts: use only the first prompts.

    Returns:
      One row per prompt: `{"prompt": text, "completions": [...], "scores": [...] (with sources),
      **the prompt's extra columns}`.
    """
    if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                    or max_prompts < 1):
        # rows[:max_prompts] kept all but the last |max_prompts| rows of the first batch for a negative value
        raise ConfigError(f"sample_completions: max_prompts must be a positive int or None (all prompts), got "
                          f"{max_prompts!r}")
    data = dataclasses.replace(config.data, train=source or config.data.train)
    if max_prompts is not None and data.task("train") is not None:
        data = dataclasses.replace(data, num_train=max_prompts)
    tokenizer = make_tokenizer(data.tokenizer)
    prompts = load_split(data, kind="prompt", which="train", tokenizer=tokenizer)
    policy = policy if policy is not None else config.checkpoint.init_from
    model = CausalLM(config.model)
    params = policy if isinstance(policy, Mapping) else initial_params(model, policy, rng=jax.random.key(seed))
    prompt_len = data.max_prompt_len or data.row_len
    mesh = config.mesh.make_mesh()
    sampler = Sampler(model, max_len=prompt_len + max_new_tokens, prompt_buckets=default_prompt_buckets(prompt_len),
                      mesh=mesh, strategy=config.mesh.strategy)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=num_samples,
                              method=Categorical(temperature=temperature), eos_id=tokenizer.eos_token_id,
                              stop_ids=model_stop_ids(model.config))
    collector = RolloutCollector(sampler=sampler, tokenizer=tokenizer, sources=list(sources), weights=None,
                                 train_sampling=sampling, eval_sampling=sampling)
    loaded = sampler.load_params(params)
    rows: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    for k, batch in enumerate(one_pass(prompts, data)):
        arrays = collector.sample(loaded, batch, sampling, jax.random.fold_in(key, k))
        inputs = collector.reward_inputs(arrays)
        scores = collector.score(arrays).total if sources else None
        for i in range(len(inputs) // num_samples):
            block = slice(i * num_samples, (i + 1) * num_samples)
            row = {"prompt": inputs.prompts[i * num_samples], "completions": list(inputs.completions[block]),
                   **{c: v[i * num_samples] for c, v in inputs.columns.items()}}
            if scores is not None:
                row["scores"] = [float(s) for s in scores[block]]
            rows.append(row)
        if max_prompts is not None and len(rows) >= max_prompts:
            return rows[:max_prompts]
    return rows


# ------------------------------------------------------------------------------ labelling

def label_pairs(judge: PairwiseJudge, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 256,
                gold: Callable[[Mapping[str, Any], str], float] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Preference rows (TRL's `prompt` / `chosen` / `rejected`) labelled by a pairwise judge.

    Each input row has a `prompt` and either `completions` (the first two are compared) or a
    `chosen` / `rejected` pair (re-judged; the given order is treated as unlabelled). The judge's
    `P(first better)` (both orders, principles averaged) decides: `chosen` = first when `p >= 1/2`.

    Args:
      judge: the pairwise judge.
      rows: the pairs; other columns are carried over.
      batch_size: pairs per judge call.
      gold: `(row, completion) -> gold reward`, to report agreement with gold labels.

    Returns:
      `(rows, metrics)`: each row gains `judge_prob` (the winner's probability) and
      `judge_consistent`; metrics `judge/position_consistency`, `judge/prob_first_mean`,
      `judge/position_bias`, `judge/ties`, and with `gold` `judge/gold_agreement` (ties in gold or
      in the judge left out).

    Ties have no winner and are left out of the returned rows, counted in `judge/ties`: a pair of
    identical texts, or a judge probability of exactly 1/2. A judge whose verdict is not one
    probability in [0, 1] per pair raises ValueError naming the row.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"label_pairs: batch_size must be a positive int, got {batch_size!r}")
    pairs = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "prompt" not in row:
            raise ValueError(f"label_pairs: row {i} has no 'prompt' "
                             f"({'keys ' + str(sorted(row)) if isinstance(row, Mapping) else type(row).__name__})")
        if "completions" in row:
            if len(row["completions"]) < 2:
                raise ValueError(f"label_pairs: row {i} has {len(row['completions'])} completions; need 2")
            a, b = row["completions"][0], row["completions"][1]
        elif "chosen" in row and "rejected" in row:
            a, b = row["chosen"], row["rejected"]
        else:
            raise ValueError(f"label_pairs: row {i} has neither 'completions' nor 'chosen'/'rejected' (keys {sorted(row)})")
        pairs.append((row, str(row["prompt"]), a, b))
    probs, consistent, ab, ba = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        verdict = judge.prefer([p for _, p, _, _ in chunk], [a for _, _, a, _ in chunk], [b for _, _, _, b in chunk])
        prob = np.asarray(verdict.prob_first, np.float64)
        if prob.shape != (len(chunk),):
            raise ValueError(f"label_pairs: the judge returned prob_first of shape {prob.shape} for rows "
                             f"{start}..{start + len(chunk) - 1}; need one probability per pair ({len(chunk)})")
        bad = np.flatnonzero(~((prob >= 0) & (prob <= 1)))  # NaN included
        if bad.size:
            raise ValueError(f"label_pairs: row {start + int(bad[0])}: the judge's probability is {float(prob[bad[0]])}, "
                             "not a number in [0, 1]")
        probs.append(verdict.prob_first)
        consistent.append(verdict.consistent)
        ab.append(verdict.prob_first_ab)
        ba.append(verdict.prob_first_ba)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    probs, consistent = cat(probs), cat(consistent).astype(bool)
    from rlhf_jax.rewards.judges import PairwiseVerdict  # noqa: PLC0415

    metrics = PairwiseVerdict(probs, consistent, cat(ab), cat(ba)).metrics()
    out, agree, ties = [], [], 0
    skip = {"completions", "chosen", "rejected", "scores", "gold_chosen", "gold_rejected"}
    for (row, prompt, a, b), p, c in zip(pairs, probs, consistent):
        if a == b or p == 0.5:  # no winner: not a preference pair
            ties += 1
            continue
        first = bool(p > 0.5)
        chosen, rejected = (a, b) if first else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    **{k: v for k, v in row.items() if k not in skip and k != "prompt"},
                    "judge_prob": float(p if first else 1 - p), "judge_consistent": bool(c)})
        if gold is not None:
            ga, gb = gold(row, a), gold(row, b)
            if ga != gb:
                agree.append(first == (ga > gb))
    metrics["judge/ties"] = float(ties)
    if gold is not None:
        metrics["judge/gold_agreement"] = float(np.mean(agree)) if agree else float("nan")
    return out, metrics


def write_preferences(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write preference rows as JSONL (TRL's standard preference format: `prompt`, `chosen`, `rejected`)."""
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise ValueError(f"write_preferences: row {i} lacks {missing}")
    return write_jsonl(path, rows)


def write_sft_rows(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write SFT rows (`prompt`, `completion`, ...) as JSONL."""
    for i, row in enumerate(rows):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"write_sft_rows: row {i} lacks 'prompt' or 'completion'")
    return write_jsonl(path, rows)


# ------------------------------------------------------------------------------ Constitutional AI

@dataclasses.dataclass(frozen=True, kw_only=True)
class CritiqueTemplates:
    """The prompts of the critique-and-revise loop (Bai et al. 2022, Constitutional AI, SL phase).

    Attributes:
      critique: needs `{prompt}`, `{response}`, `{principle}`: asks for a critique of the response.
      revision: needs `{prompt}`, `{response}`, `{critique}`, `{principle}`: asks for a revised response.
    """

    critique: str = ("Prompt: {prompt}\nResponse: {response}\n"
                     "Critique the response according to this principle: {principle}\nCritique:")
    revision: str = ("Prompt: {prompt}\nResponse: {response}\nCritique: {critique}\n"
                     "Rewrite the response to follow the principle ({principle}) and address the critique.\n"
                     "Revision:")

    def __post_init__(self):
        check_template("cai.templates.critique", self.critique, required=("prompt", "response", "principle"))
        check_template("cai.templates.revision", self.revision,
                       required=("prompt", "response", "critique", "principle"))


class TextGenerator:
    """`texts -> completions` from a `CausalLM` and its parameters with our sampler (plain-text prompts).

    Args:
      model, params, tokenizer: the generating model.
      max_new_tokens: the completion budget.
      max_prompt_len: prompt tokens kept (from the end).
      temperature: sampling temperature (0 = greedy).
      seed: the first call's key; each call folds in a counter.
    """

    def __init__(self, model: CausalLM, params, tokenizer, *, max_new_tokens: int = 32, max_prompt_len: int = 128,
                 temperature: float = 1.0, seed: int = 0):
        from rlhf_jax.sampling import make_method  # noqa: PLC0415

        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
        self.sampler = Sampler(model, max_len=max_prompt_len + max_new_tokens,
                               prompt_buckets=default_prompt_buckets(max_prompt_len))
        self.params = self.sampler.load_params(params)
        self.config = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                     stop_ids=model_stop_ids(model.config),
                                     method=make_method(greedy=True) if temperature == 0 else
                                     make_method(temperature=temperature))
        self.key, self.calls = jax.random.key(seed), 0

    def __call__(self, texts: Sequence[str]) -> list[str]:
        self.calls += 1
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][-self.max_prompt_len:] or
               [self.tokenizer.bos_token_id or 0] for t in texts]
        out = self.sampler.generate(self.params, ids, self.config, rng=jax.random.fold_in(self.key, self.calls))
        tokens, lengths = np.asarray(out.completion_tokens), np.asarray(out.lengths)
        return self.tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)],
                                           skip_special_tokens=True)


def critique_and_revise(generate: Callable[[Sequence[str]], Sequence[str]], prompts: Sequence[str],
                        principles: Sequence[str], *, rounds: int = 1, templates: CritiqueTemplates = CritiqueTemplates(),
                        seed: int = 0, initial: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Constitutional AI's supervised loop: respond, then `rounds` x (critique by a principle, revise).

    Round `r` of prompt `i` uses principle `principles[(seed + i + r) % len(principles)]` (the paper
    samples one per round). All prompts of a round go to `generate` in one call.

    Args:
      generate: `texts -> completions`, e.g. `TextGenerator`.
      prompts: the prompts (plain text).
      principles: the constitution.
      rounds: critique-revision rounds.
      templates: the critique and revision prompts.
      seed: offsets the principle choice.
      initial: the initial responses (default: generated from the prompts).

    Returns:
      One row per prompt, an SFT row: `{"prompt", "completion": the final revision, "initial",
      "critiques": [...], "revisions": [...], "principles": [...]}`.
    """
    if not principles:
        raise ValueError("critique_and_revise: principles is empty")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"critique_and_revise: rounds must be a positive int, got {rounds!r}")
    prompts = list(prompts)
    responses = list(initial) if initial is not None else list(generate(prompts))
    if len(responses) != len(prompts):
        raise ValueError(f"critique_and_revise: {len(responses)} responses for {len(prompts)} prompts")
    rows = [{"prompt": p, "initial": r, "critiques": [], "revisions": [], "principles": []}
            for p, r in zip(prompts, responses)]
    for r in range(rounds):
        chosen = [principles[(seed + i + r) % len(principles)] for i in range(len(prompts))]
        critiques = list(generate([templates.critique.format(prompt=p, response=x, principle=c)
                                   for p, x, c in zip(prompts, responses, chosen)]))
        responses = list(generate([templates.revision.format(prompt=p, response=x, critique=k, principle=c)
                                   for p, x, k, c in zip(prompts, responses, critiques, chosen)]))
        for row, c, k, x in zip(rows, chosen, critiques, responses):
            row["principles"].append(c)
            row["critiques"].append(k)
            row["revisions"].append(x)
    for row, x in zip(rows, responses):
        row["completion"] = x
    return rows
