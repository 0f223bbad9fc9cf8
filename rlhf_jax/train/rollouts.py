"""Rollouts: completions sampled for a batch of prompts and scored by the reward sources.

`RolloutConfig` is the `rollout` section of the RL and best-of-n configs; `RolloutCollector`
samples a prompt batch with the `Sampler` (G completions per prompt), decodes and scores them
(`rlhf_jax.rewards.combine_rewards`), and with DAPO's dynamic sampling draws more prompt batches
until enough groups carry a learning signal. With a greedy baseline (ReMax) it also decodes every
prompt greedily once and puts that completion's score on the prompt's rows (`baseline_scores`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from rlhf_jax.config import ConfigError, check_choice, check_unused
from rlhf_jax.rewards import OnError, RewardInputs, combine_rewards, reward_metrics
from rlhf_jax.sampling import Sampler, SamplingConfig, make_method
from rlhf_jax.distributed import gather_rows, max_over_processes, sum_over_processes
from rlhf_jax.models.hf_config import as_ids
from rlhf_jax.sharding import local_rows

__all__ = ["RolloutConfig", "RolloutCollector", "DEVICE_KEYS", "global_prompt_index"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How completions are sampled for training and evaluation.

    The sampling temperature is the algorithm's (`algorithm.temperature`), so the trainer's
    log-probs are computed at the temperature the tokens were drawn at.

    Prompts per step are `data.batch_size`; the training batch is that times the group size.

    Attributes:
      max_new_tokens: completion tokens at most (a completion stops at EOS).
      min_new_tokens: no completion stops before this many tokens (<= max_new_tokens; 0 = off): the
        EOS ids' logits are -inf until then (Hugging Face's `min_new_tokens`, vLLM's `min_tokens`;
        keeps a policy from collapsing to empty answers). `sampler_logps` stay the unmasked
        policy's log-probs, the ones the trainer recomputes (`SamplingConfig.min_new_tokens`).
        Refused with `ignore_eos` (nothing stops early there).
      top_k, top_p, min_p: truncation of the sampling distribution (0 / 1.0 / 0.0 = off); combined,
        they apply in transformers' order (top-k, then top-p, then min-p: `make_method`).
      sampler_dtype: run the sampler in "float32" or "bfloat16" (None: the model's dtype).
      dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards are all equal and sample
        more prompts until `data.batch_size` groups with a learning signal are collected.
      max_sampling_rounds: generation rounds per step at most with dynamic sampling (then the batch
        is completed with zero-signal groups); another value without `dynamic_sampling` is refused.
      dynamic_sampling_metric: which score a group must vary in to carry a signal: "reward" (the
        combined, weighted reward) or one of `rewards.functions` (that source's own, unweighted
        score; verl's `algorithm.filter_groups.metric`, e.g. "acc"). DAPO filters on accuracy: with
        a format or overlong reward in the mix, a group whose answers are all right (or all wrong)
        still varies in the combined reward, and only the accuracy source's filter drops it. The
        metrics keep their names: `dynamic_sampling/filled_with_zero_std` counts groups without a
        signal in this metric, `frac_reward_zero_std` stays the combined reward's. Another value
        without `dynamic_sampling` is refused; a name not among the run's reward sources too.
      eval_greedy: evaluate with greedy decoding (else with the training sampler and a fixed seed).
      ignore_eos: do not stop at the tokenizer's EOS: every completion has `max_new_tokens` tokens
        (benchmarks; vLLM's `ignore_eos`).
      continuous_slots: 0 = the static batched call (`Sampler.generate`); N > 0 = continuous batching
        over a paged KV cache with N decode slots (`Sampler.generate_requests`: a slot takes the next
        prompt's sample as soon as one ends, for ragged completion lengths; on a multi-device sampler
        mesh, N slots per data-parallel group, one engine each, fed from one arrival-order queue).
        Greedy rollouts are the static call's; sampled ones are keyed per prompt instead of per row.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    sampler_dtype: Literal["float32", "bfloat16"] | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    dynamic_sampling_metric: str = "reward"
    eval_greedy: bool = False
    ignore_eos: bool = False
    continuous_slots: int = 0

    def __post_init__(self):
        if not isinstance(self.continuous_slots, int) or isinstance(self.continuous_slots, bool) or \
                self.continuous_slots < 0:
            raise ConfigError(f"rollout.continuous_slots must be an int >= 0, got {self.continuous_slots!r}")
        for name in ("max_new_tokens", "max_sampling_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"rollout.{name} must be a positive int, got {value!r}")
        check_unused("rollout", self, "max_sampling_rounds", used=self.dynamic_sampling,
                     needs="rollout.dynamic_sampling is true")
        if not isinstance(self.dynamic_sampling_metric, str) or not self.dynamic_sampling_metric:
            raise ConfigError(f"rollout.dynamic_sampling_metric must be \"reward\" or the name of one of "
                              f"rewards.functions, got {self.dynamic_sampling_metric!r}")
        check_unused("rollout", self, "dynamic_sampling_metric", used=self.dynamic_sampling,
                     needs="rollout.dynamic_sampling is true")
        if self.sampler_dtype is not None:
            check_choice("rollout", "sampler_dtype", self.sampler_dtype, Literal["float32", "bfloat16"])
        try:  # its own checks, naming the keys of this section
            make_method(top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, keys="rollout.")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(self.min_new_tokens, int) or isinstance(self.min_new_tokens, bool) or \
                not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"rollout.min_new_tokens must be an int in [0, rollout.max_new_tokens="
                              f"{self.max_new_tokens}], got {self.min_new_tokens!r}")
        check_unused("rollout", self, "min_new_tokens", used=not self.ignore_eos,
                     needs="rollout.ignore_eos is false (with ignore_eos no completion stops early)")


DEVICE_KEYS = ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask", "sampler_logps")


def _pad_width(x: np.ndarray, width: int, value: int = 0) -> np.ndarray:
    return x if x.shape[1] == width else np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def _concat_rows(parts: Sequence[dict[str, Any]], rows: Sequence[tuple[int, np.ndarray]], *,
                 width: int) -> dict[str, Any]:
    """Rows `idx` of part `k` for each `(k, idx)`, concatenated (prompts padded to `width` tokens)."""
    out: dict[str, Any] = {}
    for key in parts[0]:
        if key == "columns":
            out[key] = {c: [parts[k][key][c][i] for k, idx in rows for i in idx] for c in parts[0][key]}
        elif key == "prompt_tokens":
            out[key] = np.concatenate([_pad_width(parts[k][key][idx], width) for k, idx in rows])
        else:
            out[key] = np.concatenate([parts[k][key][idx] for k, idx in rows])
    return out


def global_prompt_index(batch: Mapping[str, Any], rows: np.ndarray) -> np.ndarray:
    """Index in the whole (all processes') prompt batch of this process's local `rows`: process p
    holds rows `[p * B, (p + 1) * B)` (the data iterator's layout). Keys draws by prompt, so that N
    processes sample what one process samples for the same batch."""
    return jax.process_index() * len(batch["example_mask"]) + np.asarray(rows)


def _exchange_chosen(parts, results, chosen, *, group: int, width: int):
    """Multi-process dynamic sampling: this process's `chosen` groups `(round, global group)`, from any process.

    Every process receives every round's rows (prompts padded to `width`), then keeps its chosen
    ones; returns `(merged arrays, rows, results)` with `rows` indexing the gathered results
    (columns only for the rows sampled here, None for the others).
    """
    mine = jax.process_index()
    every_part, every_result = [], []
    for part, result in zip(parts, results):
        local = len(part["scores"])
        gathered = {}
        for key, value in part.items():
            if key == "columns":
                gathered[key] = {c: [None] * (local * mine) + list(v) + [None] * (local * (jax.process_count() - mine - 1))
                                 for c, v in value.items()}
            else:
                value = _pad_width(value, width) if key == "prompt_tokens" else value
                gathered[key] = np.asarray(gather_rows(value)).astype(np.asarray(value).dtype)
        every_part.append(gathered)
        every_result.append(type(result)(gathered["scores"], {k: gather_rows(v) for k, v in result.per_source.items()},
                                         result.num_errors, result.counts))
    rows = [(k, np.arange(i * group, (i + 1) * group)) for k, i in chosen]
    return _concat_rows(every_part, rows, width=width), rows, every_result


def model_stop_ids(config) -> tuple[int, ...]:
    """The EOS ids a model config carries (config.json's, with generation_config.json's folded in by
    `import_hf` / the presets: Qwen2.5-Instruct's <|im_end|> and <|endoftext|>, Llama 3.1 Instruct's
    three) inside its vocabulary. A sample ends at any of them besides the tokenizer's EOS, as
    transformers' `generate` and vLLM end it."""
    return tuple(i for i in as_ids(config.eos_token_id) if i < config.vocab_size)


def _checked_eos(tokenizer, vocab_size: int) -> int:
    """The tokenizer's EOS id, refused when the sampler could never draw it (no completion would stop)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id, so no completion would ever end: use a tokenizer "
                          "with an EOS token, or set rollout.ignore_eos=true to sample max_new_tokens every time")
    if isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or not 0 <= eos < vocab_size:
        raise ConfigError(f"the tokenizer's eos_token_id {eos!r} is outside the model's vocabulary "
                          f"[0, model.vocab_size={vocab_size}): no completion would ever end; use a model whose "
                          "vocabulary covers the tokenizer, or set rollout.ignore_eos=true")
    return int(eos)


def dynamic_sampling_source(metric: str, functions: Sequence[str], sources: Sequence) -> str | None:
    """The reward source that `rollout.dynamic_sampling_metric` names: None for "reward" (the combined
    reward), else the source of that name, else the one built from that entry of `rewards.functions`
    (a source's name may differ from its entry: "even_fraction" is "even_fraction_reward", an import
    path's source is named after its function)."""
    if metric == "reward":
        return None
    names = [s.name for s in sources]
    if metric in names:
        return metric
    if metric in functions and len(sources) == len(functions):
        return names[list(functions).index(metric)]
    raise ConfigError(f"rollout.dynamic_sampling_metric={metric!r} is neither \"reward\" nor one of this run's "
                      f"reward sources (rewards.functions {list(functions)}; sources {names})")


def _varies(scores: np.ndarray, group: int) -> np.ndarray:
    """Per group of `group` contiguous scores: whether they are not all equal (std > 1e-6), i.e. the
    group carries a learning signal (always, for groups of one)."""
    groups = len(scores) // group
    return scores.reshape(groups, group).std(axis=1) > 1e-6 if group > 1 else np.ones(groups, bool)


class RolloutCollector:
    """Sampling and scoring of prompt batches on the host side of a run (RL, best-of-n, evaluations).

    Args:
      sampler: the `Sampler` (its parameters are given per call, in its layout).
      tokenizer: decodes prompts and completions for the reward functions.
      sources, weights: the reward sources and their weights (None: all 1).
      train_sampling: how training completions are drawn (`num_samples` = the group size).
      eval_sampling: how evaluation completions are drawn (one per prompt).
      on_error, error_penalty: what a failing reward function does (`combine_rewards`).
      dynamic_sampling, max_sampling_rounds: DAPO's dynamic sampling (`collect`).
      filter_source: with dynamic sampling, the name of the source whose own score a group must vary
        in (`RolloutConfig.dynamic_sampling_metric`); None: the combined reward.
      continuous_slots: > 0: sample through continuous batching with this many slots (`RolloutConfig`).
      greedy_baseline: also decode each prompt greedily in `collect` (one completion, the training
        sampling's length and stop ids) and give its score on the prompt's rows, `baseline_scores`
        (ReMax: `GRPOConfig.greedy_baseline`).
    """

    def __init__(self, *, sampler: Sampler, tokenizer, sources, weights, train_sampling: SamplingConfig,
                 eval_sampling: SamplingConfig, on_error: OnError = "raise", error_penalty: float = 0.0,
                 dynamic_sampling: bool = False, max_sampling_rounds: int = 1, continuous_slots: int = 0,
                 greedy_baseline: bool = False, filter_source: str | None = None):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.sources = list(sources)
        self.weights = weights
        self.group = train_sampling.num_samples
        self.train_sampling = train_sampling
        self.eval_sampling = eval_sampling
        self.on_error, self.error_penalty = on_error, error_penalty
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, max_sampling_rounds
        names = [s.name for s in self.sources]
        if filter_source is not None and filter_source not in names:
            raise ValueError(f"RolloutCollector: filter_source {filter_source!r} is none of the reward sources {names}")
        self.filter_source = filter_source
        self.continuous_slots = continuous_slots
        self.baseline_sampling = dataclasses.replace(train_sampling, num_samples=1, method=make_method(greedy=True)) \
            if greedy_baseline else None

    @classmethod
    def from_config(cls, config, *, sampler: Sampler, tokenizer, sources, weights, group: int,
                    temperature: float, greedy_baseline: bool = False) -> "RolloutCollector":
        """The collector of a run config with `rollout` (`RolloutConfig`) and `rewards` sections
        (`greedy_baseline`: the algorithm's, see `RolloutCollector`)."""
        rollout = config.rollout
        eos_id = None if rollout.ignore_eos else _checked_eos(tokenizer, sampler.model.config.vocab_size)
        train = SamplingConfig(
            max_new_tokens=rollout.max_new_tokens, num_samples=group,
            eos_id=eos_id, stop_ids=() if rollout.ignore_eos else model_stop_ids(sampler.model.config),
            min_new_tokens=rollout.min_new_tokens,
            method=make_method(temperature=temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                               min_p=rollout.min_p),
        )
        method = make_method(greedy=True) if rollout.eval_greedy else train.method
        return cls(sampler=sampler, tokenizer=tokenizer, sources=sources, weights=weights, train_sampling=train,
                   eval_sampling=dataclasses.replace(train, num_samples=1, method=method),
                   on_error=config.rewards.on_error, error_penalty=config.rewards.error_penalty,
                   dynamic_sampling=rollout.dynamic_sampling, max_sampling_rounds=rollout.max_sampling_rounds,
                   continuous_slots=rollout.continuous_slots, greedy_baseline=greedy_baseline,
                   filter_source=None if rollout.dynamic_sampling_metric == "reward" else dynamic_sampling_source(
                       rollout.dynamic_sampling_metric, config.rewards.functions, sources))

    def sample(self, params, batch: Mapping[str, Any], sampling: SamplingConfig, rng) -> dict[str, Any]:
        """Completions of the batch's real prompts, as host arrays, with columns repeated per sample."""
        valid = np.flatnonzero(np.asarray(batch["example_mask"]))
        if self.continuous_slots:
            out = self._sample_continuous(params, np.asarray(batch["prompt_tokens"])[valid],
                                          np.asarray(batch["prompt_lengths"])[valid], sampling, rng,
                                          global_prompt_index(batch, valid))
        else:
            out = self.sampler.generate(params, np.asarray(batch["prompt_tokens"])[valid], sampling,
                                        prompt_lengths=np.asarray(batch["prompt_lengths"])[valid], rng=rng)
        rows = len(valid) * sampling.num_samples  # this process's samples (padding rows dropped)
        arrays = {k: local_rows(v)[:rows] for k, v in out._asdict().items()}
        arrays["sampler_logps"] = arrays.pop("logprobs")
        n = sampling.num_samples
        arrays["columns"] = {k: [v[i] for i in valid for _ in range(n)] for k, v in batch.get("columns", {}).items()}
        return arrays

    def _sample_continuous(self, params, prompts: np.ndarray, lengths: np.ndarray, sampling: SamplingConfig, rng,
                           index: np.ndarray):
        """`Sampler.generate`'s `SampleOutput` (numpy, same widths) from continuous batching: a request
        per prompt (its group of `num_samples`, prompt blocks shared), keyed `fold_in(rng, index[i])` by
        its global prompt index, so that N processes draw what one process draws for the same batch
        (and no two processes' prompts share a key)."""
        from rlhf_jax.sampling.requests import Request, to_sample_output
        from rlhf_jax.sampling.arguments import _as_key

        key = _as_key(rng)
        requests = [Request(prompt=row[:k], max_new_tokens=sampling.max_new_tokens, method=sampling.method,
                            num_samples=sampling.num_samples, stop_ids=sampling.all_stop_ids,
                            min_new_tokens=sampling.min_new_tokens,
                            seed=jax.random.fold_in(key, int(i)))
                    for row, k, i in zip(prompts, lengths, index)]
        outs = self.sampler.generate_requests(params, requests, num_slots=self.continuous_slots, rng=rng)
        out = to_sample_output(requests, outs, pad_id=self.sampler.pad_id, max_new_tokens=sampling.max_new_tokens)
        width = self.sampler.bucket_for(int(np.max(lengths)), sampling.max_new_tokens)   # the static call's
        padded = np.full((len(out.prompt_tokens), width), self.sampler.pad_id, np.int32)
        padded[:, : out.prompt_tokens.shape[1]] = out.prompt_tokens
        return out._replace(prompt_tokens=padded)

    def reward_inputs(self, arrays: Mapping[str, Any]) -> RewardInputs:
        decode = lambda tokens, lengths: self.tokenizer.batch_decode(  # noqa: E731
            [row[:k].tolist() for row, k in zip(tokens, lengths)], skip_special_tokens=True)
        return RewardInputs(
            prompt_tokens=arrays["prompt_tokens"], prompt_lengths=arrays["prompt_lengths"],
            completion_tokens=arrays["completion_tokens"], completion_mask=arrays["completion_mask"],
            truncated=arrays["truncated"],
            prompts=decode(arrays["prompt_tokens"], arrays["prompt_lengths"]),
            completions=decode(arrays["completion_tokens"], arrays["lengths"]),
            columns=arrays["columns"],
        )

    def score(self, arrays: Mapping[str, Any], sources=None):
        """The rewards of sampled `arrays` under `sources` (default: the training rewards, weighted)."""
        sources = self.sources if sources is None else sources
        weights = self.weights if sources is self.sources else None
        return combine_rewards(sources, self.reward_inputs(arrays), weights=weights, on_error=self.on_error,
                               error_penalty=self.error_penalty)

    def collect(self, params, first_batch, more_batches: Iterator, *, rng) -> tuple[dict[str, Any], Any, dict]:
        """One training batch of rollouts with rewards; DAPO dynamic sampling when configured.

        Dynamic sampling chooses groups over the global batch, as one process would: the first
        groups with a learning signal (scores not all equal: the combined reward's, or with
        `filter_source` that source's) in (round, global prompt) order, then zero-signal ones; in a
        multi-process run each process then takes its block of the chosen groups (rows sampled
        on another process are exchanged; their `columns` are None here).

        With a greedy baseline each round also decodes its real prompts greedily (one `generate`
        call, on the process that holds them) and scores those completions with the training
        rewards: `baseline_scores` gives each row its prompt's greedy score, travelling with the
        row wherever dynamic sampling takes it; greedy rows are never training rows. Their tokens
        count in `completions/generated_tokens`; `remax/baseline_reward_mean` is their mean score.

        Returns `(arrays with "scores" [and "baseline_scores"], RewardResult of the batch, host metrics)`.
        """
        g, dynamic = self.group, self.dynamic_sampling
        want = int(np.sum(np.asarray(first_batch["example_mask"])))
        wants = gather_rows(np.asarray([want], np.int32)).tolist()  # every process's want, in process order
        first = int(sum(wants[:jax.process_index()]))  # this process's first group of the chosen ones
        parts, results, kept, spare = [], [], [], []
        timings = {"generate": 0.0, "reward": 0.0}
        generated_groups = zero_std_groups = greedy_tokens = 0
        batch = first_batch
        for r in range(self.max_sampling_rounds if dynamic else 1):
            if r:
                batch = next(more_batches)
            start = time.perf_counter()
            arrays = self.sample(params, batch, self.train_sampling, jax.random.fold_in(rng, r))
            timings["generate"] += time.perf_counter() - start
            start = time.perf_counter()
            result = self.score(arrays)
            timings["reward"] += time.perf_counter() - start
            arrays["scores"] = result.total
            if self.baseline_sampling is not None:  # ReMax: each prompt's greedy completion, scored alike
                start = time.perf_counter()
                greedy = self.sample(params, batch, self.baseline_sampling, jax.random.fold_in(rng, r))
                timings["generate"] += time.perf_counter() - start
                start = time.perf_counter()
                baseline = self.score(greedy).total
                timings["reward"] += time.perf_counter() - start
                arrays["baseline_scores"] = np.repeat(np.asarray(baseline, np.float32), g)
                greedy_tokens += int(np.sum(greedy["lengths"]))
            parts.append(arrays)
            results.append(result)
            groups = len(result.total) // g
            generated_groups += groups
            zero_std_groups += int(np.sum(~_varies(result.total, g)))
            signal = _varies(result.total if self.filter_source is None else result.per_source[self.filter_source], g)
            # Global group i of round r: process i // groups, its group i % groups.
            every = gather_rows(signal.astype(np.int32)).astype(bool) if dynamic else signal
            kept += [(r, i) for i in np.flatnonzero(every)] if dynamic else [(r, i) for i in range(groups)]
            spare += [(r, i) for i in np.flatnonzero(~every)] if dynamic else []
            if not dynamic or len(kept) >= sum(wants):  # the same decision on every process
                break
        width = int(max_over_processes([p["prompt_tokens"].shape[1] for p in parts]).max())
        pool = results  # the results `rows` index
        if not dynamic or jax.process_count() == 1:
            chosen = (kept + spare)[:want]
            rows = [(k, np.arange(i * g, (i + 1) * g)) for k, i in chosen]
            merged = _concat_rows(parts, rows, width=width)
        else:
            chosen = (kept + spare)[first:first + want]
            merged, rows, pool = _exchange_chosen(parts, results, chosen, group=g, width=width)
        total = merged["scores"]
        per_source = {name: np.concatenate([pool[k].per_source[name][idx] for k, idx in rows])
                      for name in results[0].per_source}
        errors = {name: sum(res.num_errors[name] for res in results) for name in results[0].num_errors}
        reported = {k: sum(res.counts.get(k, 0) for res in results)  # sources' own counters (ScoredRewards)
                    for k in sorted({k for res in results for k in res.counts})}
        result = type(results[0])(total.astype(np.float32), per_source, errors, reported)
        # The logged metrics are the global batch's (each process scored its own prompts' groups).
        counts = sum_over_processes([zero_std_groups, generated_groups, *errors.values(), *reported.values(),
                                     sum(np.sum(p["lengths"]) for p in parts) + greedy_tokens])
        summed = [int(c) for c in counts[2:-1]]
        everywhere = type(result)(gather_rows(result.total), {k: gather_rows(v) for k, v in per_source.items()},
                                  dict(zip(errors, summed[:len(errors)])), dict(zip(reported, summed[len(errors):])))
        metrics = reward_metrics(everywhere, group_size=g)
        metrics["frac_reward_zero_std"] = float(counts[0]) / max(float(counts[1]), 1.0)
        metrics["completions/mean_length"] = float(np.mean(gather_rows(merged["lengths"])))
        metrics["completions/clipped_ratio"] = float(np.mean(gather_rows(merged["truncated"])))
        metrics["completions/generated_tokens"] = float(counts[-1])
        if self.baseline_sampling is not None:
            metrics["remax/baseline_reward_mean"] = float(np.mean(gather_rows(merged["baseline_scores"])))
        if dynamic:
            metrics["dynamic_sampling/rounds"] = float(len(parts))
            metrics["dynamic_sampling/filled_with_zero_std"] = float(max(0, sum(wants) - len(kept)))
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        return merged, result, metrics
