"""The two evaluations every family builds from: a weighted loss over held-out batches, and the
policy's samples on held-out prompts.

- `make_weighted_eval`: a family's own training loss function on fixed held-out batches, every
  metric averaged with the batch's weight (target tokens for SFT, pairs for reward models and the
  DPO family), so the result is the held-out set's mean however it is batched.
- `make_policy_eval`: one completion per held-out prompt (fixed key, so changes between
  evaluations come from the policy alone), scored by the training rewards (`eval/reward`), the
  synthetic task's grader (its gold metric), the KL to a reference (`eval/kl`, summed log-ratio per
  completion) and the win rate of the gold reward against a baseline policy's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import _checks, sharding as sh
from rlhf_jax.sampling import Greedy
from rlhf_jax.steps import common
from rlhf_jax.distributed import sum_over_processes
from rlhf_jax.train.data import device_batch
from rlhf_jax.train.loop import InFlight
from rlhf_jax.train.rollouts import RolloutCollector

__all__ = ["make_weighted_eval", "make_policy_eval"]


def _check_some(batches, fn: str) -> None:
    if not len(batches):  # else an IndexError at the first evaluation, or silently no metrics
        raise ValueError(f"{fn}: batches is empty; an evaluation needs at least one held-out batch")


def make_weighted_eval(loss_fn, batches: Sequence[Mapping[str, Any]], *,
                       weight: Callable[[Mapping], tuple] | None = None, mesh, strategy: str,
                       keys: Sequence[str] | None = None, frozen: tuple = (),
                       prepare: Callable[[dict], dict] | None = None, micro_batches: int = 1,
                       weights: Callable[[Any, Mapping], tuple] | None = None) -> Callable[[Any], dict[str, float]]:
    """`params -> {"eval/loss", "eval/<metric>", ...}`: weighted means of a loss function's outputs.

    `eval/m = sum_b w_b m_b / sum_b w_b` over the held-out batches, where `m_b` is the loss (or a
    metric) the training loss function reports for batch `b` when its global normalisers are that
    batch's own counts, and `w_b` that count.

    With `micro_batches` n > 1 a batch runs in the update step's n interleaved micro-batches, one
    after another under `lax.map` inside the one program (one micro-batch's activations live at a
    time, as in the step), combined as `common.accumulate_gradients` combines them: the losses
    (normalised by the whole batch's counts in `context`) summed, the metrics (micro-batch shares)
    averaged (`common.reduce_micro_metrics`); the same values as one piece.

    Args:
      loss_fn: `loss_fn(params, batch, context, rng) -> (loss, metrics)` (`steps.make_*_loss`), built
        with the same `micro_batches` (its metrics are micro-batch shares).
      batches: fixed host batches.
      weight: `device batch -> (context, w)`: the loss function's normalisers and the batch's weight.
      mesh, strategy: where the batches go.
      keys: the metrics reported besides `loss` (None: all of them).
      frozen: extra arguments `prepare` needs (e.g. reference parameters), passed through jit.
      prepare: `(device batch, *frozen) -> device batch` run once per batch before any evaluation
        (e.g. adding reference log-probs).
      micro_batches: pieces per batch (the run's `train.micro_batches`); rows must divide evenly.
      weights: instead of `weight`, `(params, device batch) -> (context, {name: w})`, run on the
        whole batch before its micro-batch split (a normaliser that depends on the parameters, e.g.
        KTO's z0, is the whole batch's, as in the step), each reported name averaged with its own
        weight (`w["loss"]` for a name it lacks), e.g. KTO's `rewards/chosen` over desirable
        examples only: `eval/m = sum_b w_b(m) m_b / sum_b w_b(m)`; a name whose weights sum to 0 (a
        held-out set without desirable examples) is left out, as the training logs leave out a mean
        over an empty class (`rlhf_jax.metrics.without_empty_means`), not reported as 0.
    """
    if (weight is None) == (weights is None):
        raise TypeError("make_weighted_eval: pass exactly one of weight and weights")
    _checks.check_micro_split(None, micro_batches, "make_weighted_eval")
    for b in batches:
        _checks.check_micro_split({k: v for k, v in b.items() if hasattr(v, "shape")}, micro_batches,
                                 "make_weighted_eval")
    device_batches = [device_batch(b, mesh, strategy) for b in batches]
    if prepare is not None:
        prepared, in_flight = [], InFlight()
        for b in device_batches:
            prepared.append(prepare(b, *frozen))
            in_flight.add(prepared[-1])
        device_batches = prepared
    key = None   # no key: a held-out loss runs without dropout (LoRA's `lora.dropout` is for training)

    @jax.jit
    def totals(params, batch):
        # Traced in the activation-sharding context, as the training step is (activations split
        # like the batch): without it GSPMD may replicate a layer's activations on every device.
        with sh.activation_sharding(mesh, strategy):
            if weights is None:
                context, w = weight(batch)
            else:
                context, named = weights(params, batch)
                w = named["loss"]
            if micro_batches == 1:
                loss, metrics = loss_fn(params, batch, context, key)
            else:
                _checks.check_micro_split(batch, micro_batches, "make_weighted_eval")
                pieces = common.split_micro_batches(batch, micro_batches)
                losses, metrics = jax.lax.map(lambda mb: loss_fn(params, mb, context, key), pieces)
                loss = jnp.sum(losses.astype(jnp.float32))
                metrics = common.reduce_micro_metrics(metrics)
        chosen = {k: v for k, v in metrics.items() if keys is None or k in keys}
        if weights is not None:  # each name with its own weight: `({name: w m}, {name: w})`
            out = {"loss": loss, **chosen}
            return {k: v * named.get(k, w) for k, v in out.items()}, {k: named.get(k, w) for k in out}
        return {"loss": loss * w, **{k: v * w for k, v in chosen.items()}}, w

    def evaluate(params) -> dict[str, float]:
        _check_some(device_batches, "make_weighted_eval")  # `batches=[]` builds `program` alone (`rlhf-jax compile`)
        results, in_flight = [], InFlight()
        for b in device_batches:
            results.append(totals(params, b))
            in_flight.add(results[-1])  # a bounded dispatch window, as in training (see `InFlight`)
        results = jax.device_get(results)
        if weights is not None:  # a name whose examples the held-out set lacks (weight 0) has no mean: left out
            total = {k: sum(float(w[k]) for _, w in results) for k in results[0][0]}
            return {f"eval/{k}": sum(float(t[k]) for t, _ in results) / n for k, n in total.items() if n > 0}
        n = max(sum(float(w) for _, w in results), 1.0)
        return {f"eval/{k}": sum(float(t[k]) for t, _ in results) / n for k in results[0][0]}

    evaluate.program = totals  # the jitted `(params, device batch)` program (`rlhf-jax compile` lowers it)
    evaluate.batches = device_batches
    return evaluate


def make_policy_eval(collector: RolloutCollector, batches: Sequence[Mapping[str, Any]], *, key: jax.Array,
                     gold: tuple[str, Any] | None = None, ref_logps: Callable | None = None,
                     policy_logps: Callable | None = None,
                     baseline: Any | None = None) -> Callable[[Any, Any], dict[str, float]]:
    """`(policy params, reference params or None) -> eval metrics` from samples on held-out prompts.

    Batch `k` is sampled with `collector.eval_sampling` and key `fold_in(key, 0x7FFFFFFF - k)`.
    Metrics, means over completions: `eval/reward` (the collector's training rewards, when it has
    any), the gold metric `gold[0]` (scored by the reward source `gold[1]`),
    `eval/completions/mean_length`, `eval/kl` (with a reference and `ref_logps(reference, prompt
    tokens, prompt lengths, completion tokens) -> [N, C]`; not under greedy decoding), and with a
    `baseline` policy `eval/gold_win_rate`: the share of prompts whose sample has a higher gold
    reward than the baseline's sample for the same prompt and key (ties count half).

    Args:
      collector: samples and scores (its sampler takes parameters in the sampler's layout).
      batches: fixed held-out prompt batches.
      key: the evaluation key.
      gold: `(metric name, reward source)` of the task's grader, or None.
      ref_logps: the reference's completion log-probs, for `eval/kl`, at the temperature of
        `collector.eval_sampling` (the sampler's log-probs are `log softmax(logits / T)`; a
        reference at another temperature gives a wrong KL). `eval/kl` is k1, `sum_t (log pi -
        log ref)` over each completion's tokens, averaged over completions.
      policy_logps: the policy's own completion log-probs, called as `ref_logps` with the policy's
        parameters, for `eval/kl`'s `log pi` where the sampler's would not match the reference pass's
        numerics (a bfloat16 sampler of a float32 model: a policy against itself is not 0 then);
        None takes the sampler's log-probs.
      baseline: parameters of a baseline policy (e.g. the reference) for the win rate; its samples
        are drawn once.
    """
    _check_some(batches, "make_policy_eval")
    greedy = isinstance(collector.eval_sampling.method, Greedy)  # greedy samples have no KL estimate

    def samples(policy_params) -> list[dict[str, Any]]:
        params = collector.sampler.load_params(policy_params)
        return [collector.sample(params, batch, collector.eval_sampling, jax.random.fold_in(key, 0x7FFFFFFF - k))
                for k, batch in enumerate(batches)]

    def gold_scores(arrays) -> np.ndarray:
        return np.asarray(collector.score(arrays, sources=[gold[1]]).total)

    baseline_gold = None
    if baseline is not None and gold is not None:
        baseline_gold = [gold_scores(a) for a in samples(baseline)]

    def evaluate(policy_params, reference) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        for k, arrays in enumerate(samples(policy_params)):
            parts = {"eval/completions/mean_length": arrays["lengths"]}
            if collector.sources:
                parts["eval/reward"] = collector.score(arrays).total
            if gold is not None:
                parts[gold[0]] = scores = gold_scores(arrays)
                if baseline_gold is not None:
                    theirs = baseline_gold[k]
                    parts["eval/gold_win_rate"] = np.where(scores > theirs, 1.0, np.where(scores == theirs, 0.5, 0.0))
            if reference is not None and ref_logps is not None and not greedy:
                ref = np.asarray(ref_logps(reference, arrays["prompt_tokens"], arrays["prompt_lengths"],
                                           arrays["completion_tokens"]))
                mine = arrays["sampler_logps"] if policy_logps is None else np.asarray(policy_logps(
                    policy_params, arrays["prompt_tokens"], arrays["prompt_lengths"], arrays["completion_tokens"]))
                parts["eval/kl"] = np.where(arrays["completion_mask"], mine - ref, 0.0).sum(axis=1)
            for name, values in parts.items():
                sums[name] = sums.get(name, 0.0) + float(np.sum(values))
            count += len(arrays["lengths"])
        names = sorted(sums)  # each process scored its own prompts: the means are over all of them
        totals = sum_over_processes([sums[name] for name in names] + [count])
        return {name: float(v) / max(float(totals[-1]), 1.0) for name, v in zip(names, totals)}

    return evaluate
