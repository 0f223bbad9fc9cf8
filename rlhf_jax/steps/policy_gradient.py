"""What the online policy-gradient steps (`grpo`, `ppo`) share: config fields, batch, update loop.

One call of an RL step consumes one rollout batch (a dict, keys in `RL_BATCH_KEYS`: prompts,
completions, scores, the sampler's and the reference's log-probs) and runs
`num_epochs x num_minibatches` optimizer updates inside one jitted program: an outer `lax.scan`
over epochs (each with a fresh permutation, keyed by `fold_in(rng, step)`) around an inner
`lax.scan` over minibatches (`run_updates`).

Old log-probs (`old_logprobs`): "sampler" uses the sampler's (the same numerics, see
`rlhf_jax.rollout`); "recompute" runs one forward pass of the current policy before the updates;
"auto" recomputes only when needed: with a single update and the KL not in the reward, the
current log-probs under `stop_gradient` are the old ones (the ratio is exactly 1, as on-policy).

Every per-token loss term is reduced by `aggregate_loss` in the configured `loss_aggregation`,
normalised by minibatch-wide counts (`normalisers`), so micro-batches add up to the minibatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks
from rlhf_jax.config import ConfigError
from rlhf_jax.logprobs import DEFAULT_CHUNK_SIZE
from rlhf_jax.losses import (
    AggregateMode,
    KLEstimator,
    aggregate,
    cispo_loss,
    count_sequences,
    count_tokens,
    kl_divergence,
    ppo_policy_loss,
)
from rlhf_jax.rollout import check_group_prompts, check_prompt_lengths, completion_logprobs
from rlhf_jax.sampling.metrics import logprob_mismatch
from rlhf_jax.steps.batch_checks import check_token_ids
from rlhf_jax.steps.common import micro_share, reduce_micro_metrics

__all__ = [
    "KLMode",
    "OldLogprobs",
    "PolicyGradientConfig",
    "RL_BATCH_KEYS",
    "OPTIONAL_RL_BATCH_KEYS",
    "check_rl_batch",
    "rollout_host_check",
    "old_logprobs_source",
    "run_updates",
    "reduce_update_metrics",
    "normalisers",
    "micro_batch_metrics",
    "rollout_logprobs",
    "rollout_stats",
    "sampler_diff",
    "policy_loss_terms",
    "truncated_importance_weights",
    "aggregate_loss",
    "reference_and_entropy_terms",
    "sequence_kl",
]

KLMode = Literal["loss", "reward", "none"]
OldLogprobs = Literal["auto", "sampler", "recompute"]
Metrics = dict[str, jax.Array]

# The keys of an RL batch (a dict of arrays sharing the leading dimension N, like every batch of
# `rlhf_jax.steps`). Required: the rollout and its scores.
#   prompt_tokens      int32 [N, P]  right-padded prompts (a prompt sampled G times fills G
#                                    contiguous rows)
#   prompt_lengths     int32 [N]     real prompt lengths (>= 1)
#   completion_tokens  int32 [N, C]  completions
#   completion_mask    bool  [N, C]  True up to and including the first EOS
#   scores             f32   [N]     sequence rewards (verifiers, reward model, penalties, combined)
# Optional:
#   sampler_logps      f32   [N, C]  the sampler's log-probs (old log-probs in "sampler" mode, and
#                                    the sampler/trainer log-prob difference metric)
#   ref_logps          f32   [N, C]  the reference policy's log-probs (any KL term)
#   ptx_tokens         int32 [N, L]  PPO-ptx pretraining sequences (as many rows as the rollout)
#   ptx_mask           [N, L]        their loss mask: 1 on the tokens that are language-modelling
#                                    targets (an SFT batch's `loss_mask`; all real tokens but the first
#                                    for plain text)
#   token_rewards      f32   [N, C]  rewards placed on tokens by the rollout (multi-turn: each turn's
#                                    reward at its last action token); PPO uses them in place of the
#                                    score at the last token (`ppo_token_rewards`)
#   baseline_scores    f32   [N]     the score of the greedy completion of each row's prompt (the same
#                                    on every row of a prompt): ReMax's baseline, read by (and only
#                                    accepted with) a config whose `greedy_baseline` is true
RL_BATCH_KEYS = ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask", "scores")
OPTIONAL_RL_BATCH_KEYS = ("sampler_logps", "ref_logps", "ptx_tokens", "ptx_mask", "token_rewards", "baseline_scores")


# ------------------------------------------------------------------------------------------ config


def fail(field: str, message: str):
    """Raise `ConfigError("algorithm.<field> <message>")`."""
    raise ConfigError(f"algorithm.{field} {message}")


def check_literal(field: str, value: Any, literal: Any) -> None:
    if value not in get_args(literal):
        fail(field, f"must be one of {get_args(literal)}, got {value!r}")


def check_int(field: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(field, f"must be an int >= {low}, got {value!r}")


def check_nonnegative(field: str, value: Any) -> None:
    """A coefficient: a finite number >= 0 (an infinite one turns every loss non-finite, and the
    NaN/Inf guard would then skip every update)."""
    if not (_checks.is_finite_number(value) and value >= 0):
        fail(field, f"must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyGradientConfig:
    """The fields every clipped policy-gradient objective has (GRPO family and PPO).

    The defaults are PPO's; `GRPOConfig` redeclares the fields whose default differs.

    Attributes:
      clip_eps, clip_eps_high, dual_clip: the trust region (`clip_eps_high` > `clip_eps` is DAPO's
        clip-higher; `dual_clip` bounds the loss of negative advantages, Ye et al. 2020).
      kl_mode: the KL to the reference in the `loss`, in the `reward`, or `none`.
      kl_coef: `beta`.
      kl_estimator: `k1`, `k2` or `k3` (Schulman's estimators), in the reward and in the loss. None
        (default) takes the usual one for `kl_mode` (`kl_estimator_used`): `k1` in the reward
        (Ziegler et al. 2019; TRL's PPO and verl's `kl_penalty` default), `k3` in the loss (GRPO's).
      entropy_coef: weight of an entropy bonus (0 = none).
      loss_aggregation: how per-token losses become a scalar (`rlhf_jax.losses.aggregate`).
      num_epochs: passes over each rollout batch (TRL's `num_iterations`).
      num_minibatches: optimizer updates per pass (the batch must divide evenly).
      micro_batches: gradient-accumulation micro-batches per minibatch (memory, not math: the
        losses are normalised by minibatch-wide counts, so the update is the same).
      temperature: the sampling temperature (log-probs are computed at it).
      old_logprobs: `auto`, `sampler` or `recompute` (see the module docstring).
      chunk_size: tokens per LM-head chunk (within a row).
      tis_cap: truncated importance sampling against the sampler's log-probs (`C` of
        `truncated_importance_weights`; verl's `tis_imp_ratio_cap`, 2.0 there): every token's policy
        loss is weighted by `min(pi_old / pi_sampler, C)`, correcting for rollouts drawn by another
        policy (one-step off-policy RL, or a sampler of other numerics). None = no weights (default).
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    kl_mode: KLMode = "reward"
    kl_coef: float = 0.05
    kl_estimator: KLEstimator | None = None
    entropy_coef: float = 0.0
    loss_aggregation: AggregateMode = "token_mean"
    num_epochs: int = 4
    num_minibatches: int = 1
    micro_batches: int = 1
    temperature: float = 1.0
    old_logprobs: OldLogprobs = "auto"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    tis_cap: float | None = None

    def __post_init__(self):
        if not 0 < self.clip_eps <= 1:
            fail("clip_eps", f"must be in (0, 1], got {self.clip_eps!r}")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            fail("clip_eps_high", f"must be > 0 or None, got {self.clip_eps_high!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            fail("dual_clip", f"must be > 1 or None, got {self.dual_clip!r}")
        check_literal("kl_mode", self.kl_mode, KLMode)
        check_nonnegative("kl_coef", self.kl_coef)
        if self.kl_estimator is not None:
            check_literal("kl_estimator", self.kl_estimator, KLEstimator)
        check_nonnegative("entropy_coef", self.entropy_coef)
        check_literal("loss_aggregation", self.loss_aggregation, AggregateMode)
        check_int("num_epochs", self.num_epochs, 1)
        check_int("num_minibatches", self.num_minibatches, 1)
        check_int("micro_batches", self.micro_batches, 1)
        if not (_checks.is_finite_number(self.temperature) and self.temperature > 0):
            fail("temperature", f"must be a finite number > 0, got {self.temperature!r}")
        check_literal("old_logprobs", self.old_logprobs, OldLogprobs)
        check_int("chunk_size", self.chunk_size, 1)
        if self.tis_cap is not None:
            if isinstance(self.tis_cap, bool) or not isinstance(self.tis_cap, (int, float)) or not self.tis_cap > 0:
                fail("tis_cap", f"must be a number > 0 or None, got {self.tis_cap!r}")
            if self.old_logprobs == "sampler":
                fail("tis_cap", "needs the trainer's old log-probs (old_logprobs 'auto' or 'recompute'); with "
                     "old_logprobs='sampler' every weight would be 1")

    @property
    def num_updates(self) -> int:
        """Optimizer updates per rollout batch."""
        return self.num_epochs * self.num_minibatches

    @property
    def uses_reference(self) -> bool:
        """Whether the step needs the reference's log-probs."""
        return self.kl_mode != "none" and self.kl_coef > 0

    @property
    def kl_estimator_used(self) -> KLEstimator:
        """The KL estimator of the penalty and the `kl` metric: `kl_estimator`, or for None `k1` in the
        reward and `k3` in the loss (and for `kl_mode="none"`, where only the metric uses it)."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_mode == "reward" else "k3"

    @property
    def greedy_baseline(self) -> bool:
        """Whether the advantages need each prompt's greedy-completion score (`baseline_scores`, ReMax):
        the driver then also decodes every prompt greedily and scores it. False here; `GRPOConfig`
        says True for `advantage="remax"`."""
        return False

    @property
    def kl_in_reward(self) -> bool:
        """Whether the KL penalty enters the reward (and so the advantages)."""
        return self.kl_mode == "reward" and self.kl_coef > 0

    def replace(self, **changes):
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------- batch


def rollout_host_check(vocab_size: int, prompt_group=None):
    """The `Step` host check of an RL step's rollout batches (`jit_step` runs it before every call).

    Token ids (`prompt_tokens`, `completion_tokens`, `ptx_tokens`) within `[0, vocab_size)`,
    `prompt_lengths` within `[1, P]`, and with `prompt_group` (`rows -> group size`) the rows of each
    group sharing one prompt; on host values only (`_checks.host_values`). Missing keys and bad ranks
    are left to the traced `check_rl_batch`, which names them.
    """
    def check(batch, name: str) -> None:
        check_token_ids(batch, ("prompt_tokens", "completion_tokens", "ptx_tokens"), vocab_size, name=name)
        if not all(k in batch for k in ("prompt_tokens", "prompt_lengths")):
            return
        tokens, lengths = batch["prompt_tokens"], batch["prompt_lengths"]
        if len(jnp.shape(tokens)) != 2 or len(jnp.shape(lengths)) != 1:
            return
        check_prompt_lengths(name, tokens, lengths)
        if prompt_group is not None:
            check_group_prompts(name, tokens, lengths, prompt_group(jnp.shape(tokens)[0]))

    return check


def check_rl_batch(batch, config: PolicyGradientConfig, *, group_size: int, name: str) -> int:
    """Raise a clear error for an RL batch the step cannot take (before compiling); return N.

    Checks the required keys, ranks, matching rows and widths, divisibility by `group_size` and by
    `num_minibatches x micro_batches`, and the presence of `ref_logps` / `sampler_logps` /
    `baseline_scores` when the configuration needs them (and of `baseline_scores` only then).

    Args:
      batch: the rollout batch (`RL_BATCH_KEYS`, optionally `OPTIONAL_RL_BATCH_KEYS`).
      config: the step's configuration.
      group_size: completions per prompt (1 = no groups).
      name: the step's name, for the messages.
    """
    missing = [k for k in RL_BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"{name}: batch lacks keys {missing}; it has {sorted(batch)}")
    unknown = sorted(set(batch) - set(RL_BATCH_KEYS) - set(OPTIONAL_RL_BATCH_KEYS))
    if unknown:
        raise KeyError(f"{name}: unknown batch keys {unknown}; known: {list(RL_BATCH_KEYS + OPTIONAL_RL_BATCH_KEYS)}")
    shape = {k: tuple(jnp.shape(v)) for k, v in batch.items()}
    n, c = shape["completion_tokens"] if len(shape["completion_tokens"]) == 2 else (None, None)
    if n is None:
        raise ValueError(f"{name}: batch['completion_tokens'] must be [N, C], got {shape['completion_tokens']}")
    want = {"prompt_lengths": (n,), "completion_mask": (n, c), "scores": (n,), "baseline_scores": (n,),
            "sampler_logps": (n, c), "ref_logps": (n, c), "token_rewards": (n, c)}
    for key, expected in want.items():
        if key in shape and shape[key] != expected:
            raise ValueError(f"{name}: batch[{key!r}] must have shape {list(expected)}, got {list(shape[key])}")
    if len(shape["prompt_tokens"]) != 2 or shape["prompt_tokens"][0] != n:
        raise ValueError(f"{name}: batch['prompt_tokens'] must be [N={n}, P], got {list(shape['prompt_tokens'])}")
    if ("ptx_tokens" in batch) != ("ptx_mask" in batch):
        raise KeyError(f"{name}: give both ptx_tokens and ptx_mask, or neither")
    if "ptx_tokens" in batch and (shape["ptx_tokens"][0] != n or shape["ptx_mask"] != shape["ptx_tokens"]):
        raise ValueError(f"{name}: ptx_tokens {list(shape['ptx_tokens'])} and ptx_mask {list(shape['ptx_mask'])} "
                         f"must both be [N={n}, L]")
    if n % group_size:
        raise ValueError(f"{name}: batch of {n} completions does not split into groups of group_size={group_size}")
    split = config.num_minibatches * config.micro_batches
    if n % split:
        raise ValueError(f"{name}: batch of {n} completions does not split into num_minibatches="
                         f"{config.num_minibatches} x micro_batches={config.micro_batches}")
    if config.uses_reference and "ref_logps" not in batch:
        raise KeyError(f"{name}: kl_mode={config.kl_mode!r} with kl_coef={config.kl_coef} needs batch['ref_logps']")
    if config.greedy_baseline and "baseline_scores" not in batch:
        raise KeyError(f"{name}: advantage='remax' needs batch['baseline_scores'], the score of each row's prompt's "
                       "greedy completion (the RL driver adds it; RL_BATCH_KEYS documents it)")
    if "baseline_scores" in batch and not config.greedy_baseline:
        raise KeyError(f"{name}: batch['baseline_scores'] (ReMax's greedy baseline) is read only with "
                       "advantage='remax'; this configuration would ignore it")
    if config.old_logprobs == "sampler" and "sampler_logps" not in batch:
        raise KeyError(f"{name}: old_logprobs='sampler' needs batch['sampler_logps']")
    if config.tis_cap is not None and "sampler_logps" not in batch:
        raise KeyError(f"{name}: tis_cap={config.tis_cap} (truncated importance weights) needs batch['sampler_logps']")
    return n


def old_logprobs_source(config: PolicyGradientConfig) -> Literal["current", "sampler", "recompute"]:
    """Where the old log-probs come from: `current` means `stop_gradient` of the training forward."""
    if config.old_logprobs != "auto":
        return config.old_logprobs
    return "recompute" if config.num_updates > 1 or config.kl_in_reward else "current"


def rollout_logprobs(model, params, mb, config: PolicyGradientConfig, *, with_entropy: bool, group_size: int = 1,
                     rng=None):
    """`(logps, entropy)` `[N, C]` of a (mini)batch's completions under `params` (entropy None unless asked);
    `rng` keys the training pass's stochastic layers (LoRA dropout)."""
    return completion_logprobs(
        model, params, mb["prompt_tokens"], mb["prompt_lengths"], mb["completion_tokens"],
        temperature=config.temperature, with_entropy=with_entropy, chunk_size=config.chunk_size,
        group_size=group_size, rng=rng,
    )


def normalisers(mask: jax.Array) -> dict[str, jax.Array]:
    """Minibatch-wide `num_tokens` and `num_sequences` of a completion mask (for `aggregate_loss`)."""
    return {"num_tokens": count_tokens(mask), "num_sequences": count_sequences(mask)}


# Metrics that are masked means over a (micro-)batch's completion tokens, and loss terms already
# normalised by the minibatch's counts (`normalisers`): `micro_batch_metrics` rescales both.
TOKEN_MEAN_METRICS = frozenset({
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/dual_mean", "approx_kl",
    "kl", "entropy", "tis/weight_mean", "tis/clip_frac", "sampler_logprob_diff/mean", "value_clipfrac"})
MINIBATCH_NORMALISED_METRICS = frozenset({"loss/policy", "value_loss", "loss/ptx"})


def micro_batch_metrics(metrics: Metrics, mask: jax.Array, context: dict[str, jax.Array],
                        micro_batches: int) -> Metrics:
    """One micro-batch's metrics as shares that `accumulate_gradients`' mean over micro-batches turns
    into the minibatch's values (the same numbers as with `micro_batches=1`).

    Token means (`TOKEN_MEAN_METRICS`) are re-weighted by the micro-batch's share of the minibatch's
    tokens (`context["num_tokens"]`); loss terms normalised by the minibatch's counts
    (`MINIBATCH_NORMALISED_METRICS`, e.g. `loss/policy`) add up over micro-batches, so they are
    scaled by `micro_batches`; the rest (maxima, per-row means) pass through. A no-op for 1.
    """
    if micro_batches == 1:
        return metrics
    out = dict(metrics)
    tokens = count_tokens(mask)
    for key, value in metrics.items():
        if key in TOKEN_MEAN_METRICS:
            out[key] = micro_share(value * tokens, context["num_tokens"], micro_batches)
        elif key in MINIBATCH_NORMALISED_METRICS:
            out[key] = value * micro_batches
    return out


def rollout_stats(batch) -> Metrics:
    """`completions/mean_length`: mean completion tokens per row."""
    mask = _checks.mask_f32(batch["completion_mask"])
    return {"completions/mean_length": jnp.mean(jnp.sum(mask, axis=1))}


def sampler_diff(logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array) -> Metrics:
    """`sampler_logprob_diff/mean|max` between the sampler's and the trainer's log-probs."""
    return logprob_mismatch(sampler_logps, jax.lax.stop_gradient(logps), mask)


# --------------------------------------------------------------------------------------- updates


def run_updates(update, carry, data: dict, *, rng: jax.Array, num_epochs: int, num_minibatches: int, group: int = 1):
    """`num_epochs` passes of `lax.scan(update)` over `num_minibatches` shuffled minibatches.

    Rows are shuffled in blocks of `group` contiguous rows (whole prompt groups stay together).
    Returns the final carry and every update's metrics stacked on a leading `[U]` axis.
    """
    n = data["completion_tokens"].shape[0]
    size = n // num_minibatches
    if num_epochs == 1 and num_minibatches == 1:  # one update: no loop (and no loop-carried state copies)
        carry, metrics = update(carry, data)
        return carry, jax.tree.map(lambda m: m[None], metrics)

    def epoch(carry, key):
        if num_minibatches > 1:
            blocks = jax.random.permutation(key, n // group)
            perm = (blocks[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
            shuffled = jax.tree.map(lambda x: x[perm], data)
        else:
            shuffled = data
        minibatches = jax.tree.map(lambda x: x.reshape((num_minibatches, size) + x.shape[1:]), shuffled)
        return jax.lax.scan(update, carry, minibatches)

    carry, metrics = jax.lax.scan(epoch, carry, jax.random.split(rng, num_epochs))
    return carry, jax.tree.map(lambda m: m.reshape((-1,) + m.shape[2:]), metrics)


# Reductions of per-update metrics: first update only (while the policy still is the sampler's),
# sum, max; everything else as micro-batches' metrics combine (`reduce_micro_metrics`).
_FIRST = ("sampler_logprob_diff/mean", "sampler_logprob_diff/max")


def reduce_update_metrics(stacked: Metrics) -> Metrics:
    """One value per metric from `[U]` per-update values: the first update's sampler difference, the
    sum of `nonfinite` (updates skipped), the max of `halt`, and otherwise `reduce_micro_metrics`'s:
    the largest (smallest) of maxima (minima) such as `tis/ratio_max` (minibatches hold different
    rows), the mean of the rest."""
    out = {}
    for key, value in stacked.items():
        if key in _FIRST:
            out[key] = value[0]
        elif key == "nonfinite":
            out[key] = jnp.sum(value)
        elif key == "halt":
            out[key] = jnp.max(value)
    reduced = reduce_micro_metrics({key: value for key, value in stacked.items() if key not in out})
    return {key: out[key] if key in out else reduced[key] for key in stacked}


# ------------------------------------------------------------------------------------ loss terms


def sequence_kl(kl_tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """`[N]` per-sequence sum of per-token KL terms over the mask."""
    return _checks.masked_sum(kl_tokens, mask, axis=-1)


def truncated_importance_weights(old_logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array, *,
                                 cap: float) -> tuple[jax.Array, Metrics]:
    """Truncated importance sampling (TIS) weights of rollout tokens drawn by another policy.

        w_t = min( exp(logp_old,t - logp_sampler,t), C )   on the mask, 0 elsewhere (no gradient)

    `logp_old` is the trainer's log-prob of the token under the policy the update starts from (the
    proximal policy of decoupled PPO), `logp_sampler` the log-prob the sampler drew it with: an older
    policy (one-step off-policy RL: the rollouts of step t+1 come from the weights of step t) and/or
    other numerics (a bf16 sampler). Each token's policy-gradient loss is multiplied by `w_t`, so

        grad = E_{a ~ pi_sampler}[ min(pi_old(a) / pi_sampler(a), C) * grad l_PPO(pi_theta / pi_old, A) ],

    the PPO objective under `pi_old` again, with the importance ratio truncated at `C` to bound the
    variance (as verl's `tis_imp_ratio_cap`, token level, truncate mode).

    Reference: Yao, Liu, Zhang, Lu, Wang, Gao, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training" (2025, fengyao.notion.site/off-policy-rl); Ionides 2008, "Truncated
    Importance Sampling".

    Args:
      old_logps: `[N, C]` the trainer's old log-probs.
      sampler_logps: `[N, C]` the sampler's log-probs of the same tokens.
      mask: `[N, C]` completion mask.
      cap: the truncation `C > 0`.

    Returns:
      `(weights f32 [N, C], metrics)`: `tis/weight_mean` (masked mean of the truncated weights),
      `tis/clip_frac` (fraction of tokens whose ratio exceeded `C`), `tis/ratio_max` (untruncated).

    Example:
      >>> w, m = truncated_importance_weights(jnp.log(jnp.array([[0.5, 0.9, 0.2]])),
      ...                                     jnp.log(jnp.array([[0.25, 0.9, 0.4]])),
      ...                                     jnp.array([[True, True, False]]), cap=1.5)
      >>> [round(float(x), 4) for x in w[0]], round(float(m["tis/clip_frac"]), 4)
      ([1.5, 1.0, 0.0], 0.5)
    """
    _checks.check_rank("truncated_importance_weights", "old_logps", old_logps, 2)
    ratio = jnp.exp(_checks.f32(jax.lax.stop_gradient(old_logps)) - _checks.f32(sampler_logps))
    m = _checks.mask_f32(mask)
    weights = jnp.minimum(ratio, jnp.float32(cap)) * m
    metrics = {"tis/weight_mean": _checks.masked_mean(weights, mask),
               "tis/clip_frac": _checks.masked_mean((ratio > cap).astype(jnp.float32), mask),
               "tis/ratio_max": jnp.max(ratio * m)}
    return jax.lax.stop_gradient(weights), metrics


def policy_loss_terms(name: str, config: PolicyGradientConfig, logps, old_logps, advantages, mask,
                      sampler_logps=None) -> tuple[jax.Array, Metrics]:
    """Per-token policy loss `[N, C]` and its metrics: `ppo` (token ratio), `gspo` (sequence
    ratio) or `cispo` (clipped stop-gradient weights, bound `1 + (clip_eps_high or clip_eps)`);
    with `config.tis_cap` weighted per token by `truncated_importance_weights(old_logps,
    sampler_logps)`."""
    if name == "cispo":
        high = config.clip_eps if config.clip_eps_high is None else config.clip_eps_high
        per_token, metrics = cispo_loss(logps, old_logps, advantages, mask, clip_eps_high=high)
    else:
        per_token, metrics = ppo_policy_loss(
            logps, old_logps, advantages, mask,
            clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip,
            ratio_level="sequence" if name == "gspo" else "token",
        )
    if config.tis_cap is None:
        return per_token, metrics
    if sampler_logps is None:
        raise ValueError(f"policy loss: tis_cap={config.tis_cap} needs the sampler's log-probs (sampler_logps)")
    weights, tis_metrics = truncated_importance_weights(old_logps, sampler_logps, mask, cap=config.tis_cap)
    return per_token * weights, {**metrics, **tis_metrics}


def aggregate_loss(per_token: jax.Array, mask: jax.Array, *, mode: AggregateMode,
                   max_completion_length: int | None = None, num_tokens=None, num_sequences=None) -> jax.Array:
    """`aggregate` in `mode`, normalised by minibatch-wide counts when given.

    `seq_mean_token_sum_norm` (Dr.GRPO) divides by `max_completion_length`, default the batch's
    completion width `C`.
    """
    if mode == "token_mean":
        return aggregate(per_token, mask, mode=mode, num_tokens=num_tokens)
    max_len = None
    if mode == "seq_mean_token_sum_norm":
        max_len = max_completion_length or per_token.shape[1]
    return aggregate(per_token, mask, mode=mode, num_sequences=num_sequences, max_len=max_len)


def reference_and_entropy_terms(config: PolicyGradientConfig, logps, ref_logps, entropy, mask, metrics: Metrics,
                                kl_coef=None) -> jax.Array:
    """Per-token KL-in-loss and entropy-bonus terms `[N, C]` (0 where unused); fills `metrics`.

    `+ beta k(logps, ref_logps)` when `kl_mode == "loss"` (`beta` = `kl_coef`, default
    `config.kl_coef`), `- c_H H` when `entropy_coef > 0`. Metrics: `kl` (token mean of the
    configured estimator) and `kl/sequence` (mean over sequences of the summed k1) when `ref_logps`
    is given, `entropy` when `entropy` is. A configured term whose input is None is a ValueError
    (the loss would silently lack it).
    """
    if ref_logps is None and config.kl_mode == "loss" and config.kl_coef > 0:
        raise ValueError(f"policy loss: kl_mode='loss' with kl_coef={config.kl_coef} needs ref_logps (the "
                         "reference policy's log-probs); got None")
    if entropy is None and config.entropy_coef > 0:
        raise ValueError(f"policy loss: entropy_coef={config.entropy_coef} needs the per-token entropy; got None")
    extra = jnp.zeros(jnp.shape(logps), jnp.float32)
    if ref_logps is not None:
        kl_tokens = kl_divergence(logps, ref_logps, estimator=config.kl_estimator_used)
        metrics["kl"] = jax.lax.stop_gradient(_checks.masked_mean(kl_tokens, mask))
        k1 = jax.lax.stop_gradient(_checks.f32(logps) - _checks.f32(ref_logps))
        metrics["kl/sequence"] = jnp.mean(sequence_kl(k1, mask))
        if config.kl_mode == "loss" and config.kl_coef > 0:
            beta = config.kl_coef if kl_coef is None else kl_coef
            extra = extra + beta * _checks.apply_mask(kl_tokens, mask)
    if entropy is not None:
        metrics["entropy"] = jax.lax.stop_gradient(_checks.masked_mean(entropy, mask))
        if config.entropy_coef > 0:
            extra = extra - config.entropy_coef * _checks.apply_mask(entropy, mask)
    return extra
