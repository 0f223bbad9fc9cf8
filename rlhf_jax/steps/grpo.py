"""The GRPO family: critic-free policy gradient on group-relative rewards, from the pure core.

The family is *configurations* of one objective, not subclasses (see `GRPO_PRESETS`):

    advantages  = estimator(scores [- beta * KL if kl_mode == "reward"])    # grpo, dr_grpo, rloo, remax, ...
    per_token   = policy_loss(logps, old_logps, advantages, mask)          # ppo clip, gspo, cispo
                  [+ beta * kl_divergence(logps, ref_logps) if kl_mode == "loss"]
                  [- entropy_coef * entropy]
    loss        = aggregate(per_token, mask, mode=loss_aggregation)

`grpo_advantages` is the first line, `grpo_objective` the rest; `make_grpo_step` runs them over
epochs and minibatches of one rollout batch (`rlhf_jax.steps.policy_gradient`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import _checks
from rlhf_jax.advantages import group_normalized, leave_one_out, reinforce_plus_plus, remax
from rlhf_jax.losses import AggregateMode, kl_divergence
from rlhf_jax.state import RLState, TrainState
from rlhf_jax.steps.common import NonFinitePolicy, accumulate_gradients, apply_gradients, step_key
from rlhf_jax.steps.policy_gradient import (
    KLMode,
    PolicyGradientConfig,
    aggregate_loss,
    check_int,
    check_literal,
    check_rl_batch,
    fail,
    micro_batch_metrics,
    normalisers,
    old_logprobs_source,
    policy_loss_terms,
    reduce_update_metrics,
    reference_and_entropy_terms,
    rollout_host_check,
    rollout_logprobs,
    rollout_stats,
    run_updates,
    sampler_diff,
    sequence_kl,
)

__all__ = [
    "AdvantageName",
    "PolicyLossName",
    "GROUP_ADVANTAGES",
    "GRPOConfig",
    "GRPO_PRESETS",
    "grpo_config",
    "grpo_advantages",
    "grpo_objective",
    "make_grpo_step",
]

AdvantageName = Literal["grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"]
PolicyLossName = Literal["ppo", "gspo", "cispo"]
Metrics = dict[str, jax.Array]

# Estimators that compare the samples of one prompt and so need groups of >= 2.
GROUP_ADVANTAGES = frozenset({"grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp_baseline"})
# Estimators that take the KL penalty per token (REINFORCE++); the others subtract its sum.
_TOKEN_KL_ADVANTAGES = frozenset({"reinforce_pp", "reinforce_pp_baseline"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(PolicyGradientConfig):
    """The objective of the GRPO family (critic-free policy gradient on group-relative rewards).

    The shared fields (trust region, KL, entropy, epochs, minibatches, ...) are those of
    `PolicyGradientConfig`; GRPO's defaults put a `k3` KL in the loss (`kl_coef=0.04`), reduce
    per sequence (`seq_mean_token_mean`) and take one epoch.

    Attributes:
      advantage: `grpo` (group mean and std), `dr_grpo` (group mean only), `batch_std` (group
        mean, batch std), `rloo` (leave-one-out mean), `reinforce_pp` (batch-whitened reward-to-go,
        token-level KL), `reinforce_pp_baseline` (group mean first, then as `reinforce_pp`),
        `remax` (minus the score of the prompt's greedy completion, the batch's `baseline_scores`:
        the RL driver decodes each prompt greedily once more; any `group_size`, 1 included).
      policy_loss: `ppo` (token-ratio clip), `gspo` (sequence-ratio clip), `cispo` (clipped
        stop-gradient weights; bound `1 + (clip_eps_high or clip_eps)`, no lower bound).
      group_size: completions per prompt `G` (>= 2 for the group estimators; ReMax's paper samples 1).
      adv_eps: added to the std of `grpo`/`batch_std`.
      max_completion_length: Dr.GRPO's constant normaliser `L` for `seq_mean_token_sum_norm`
        (default: the batch's completion width).
      share_prompt: run each group's prompt through the model once and its completions on top of
        the shared KV cache (`rlhf_jax.rollout.completion_hidden`): same losses, fewer FLOPs.
        Applies when each minibatch holds whole groups and `micro_batches` is 1 (minibatches are
        shuffled by whole groups whenever a minibatch holds whole groups); the rows of a group must
        share their prompt, as the sampler's do.
    """

    advantage: AdvantageName = "grpo"
    policy_loss: PolicyLossName = "ppo"
    group_size: int = 8
    adv_eps: float = 1e-4
    max_completion_length: int | None = None
    share_prompt: bool = True
    # Shared fields whose GRPO default differs from `PolicyGradientConfig`'s.
    loss_aggregation: AggregateMode = "seq_mean_token_mean"
    kl_mode: KLMode = "loss"
    kl_coef: float = 0.04
    num_epochs: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_literal("advantage", self.advantage, AdvantageName)
        check_literal("policy_loss", self.policy_loss, PolicyLossName)
        check_int("group_size", self.group_size, 1)
        if self.advantage in GROUP_ADVANTAGES and self.group_size < 2:
            fail("group_size", f"must be >= 2 for advantage {self.advantage!r} (a group baseline "
                 f"compares the samples of one prompt), got {self.group_size}")
        if not self.adv_eps >= 0:
            fail("adv_eps", f"must be >= 0, got {self.adv_eps!r}")
        if self.kl_mode == "none" and self.kl_coef > 0:
            fail("kl_coef", f"is {self.kl_coef}, but kl_mode='none' applies no KL penalty: set kl_mode 'loss' "
                 "(GRPO) or 'reward' (RLOO, REINFORCE++) for the penalty, or kl_coef 0")
        if self.max_completion_length is not None:
            check_int("max_completion_length", self.max_completion_length, 1)
            if self.loss_aggregation != "seq_mean_token_sum_norm":
                fail("max_completion_length", f"is Dr.GRPO's normaliser of loss_aggregation "
                     f"'seq_mean_token_sum_norm'; loss_aggregation {self.loss_aggregation!r} does not use it")
        if self.policy_loss == "cispo" and self.dual_clip is not None:
            fail("dual_clip", f"bounds the PPO clip's loss (policy_loss 'ppo' or 'gspo'); policy_loss 'cispo' has "
                 f"no such term, got dual_clip={self.dual_clip}")
        if not isinstance(self.share_prompt, bool):
            fail("share_prompt", f"must be a bool, got {self.share_prompt!r}")

    @property
    def greedy_baseline(self) -> bool:
        """Whether the advantages need `baseline_scores` (each prompt's greedy-completion score): ReMax."""
        return self.advantage == "remax"

    def shuffle_group(self, batch_size: int) -> int:
        """Rows kept together when minibatches are shuffled: whole prompt groups when they fit."""
        minibatch = batch_size // self.num_minibatches
        return self.group_size if minibatch % self.group_size == 0 else 1

    def prompt_group(self, batch_size: int) -> int:
        """Rows per shared prompt forward for a batch of `batch_size` rows (1 = no sharing)."""
        if self.share_prompt and self.micro_batches == 1:
            return self.shuffle_group(batch_size)
        return 1


# Named configurations of the family. DAPO's dynamic sampling and overlong shaping live in the
# driver (`train.rl`) and the rewards (`rewards.overlong_penalty`); the rest is here.
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    # Shao et al. 2024 (DeepSeekMath), as TRL runs it: k3 penalty in the loss, sequence-mean loss.
    "grpo": dict(advantage="grpo", policy_loss="ppo", loss_aggregation="seq_mean_token_mean",
                 kl_mode="loss", kl_coef=0.04, kl_estimator="k3"),
    # Liu et al. 2025: no std scaling, no length normalisation (constant L), no KL.
    "dr_grpo": dict(advantage="dr_grpo", policy_loss="ppo", loss_aggregation="seq_mean_token_sum_norm",
                    kl_mode="none", kl_coef=0.0),
    # Yu et al. 2025: clip-higher, token-level loss, no KL.
    "dapo": dict(advantage="grpo", policy_loss="ppo", loss_aggregation="token_mean", clip_eps=0.2,
                 clip_eps_high=0.28, kl_mode="none", kl_coef=0.0),
    # Zheng et al. 2025: sequence-level ratio with a tiny clip range.
    "gspo": dict(advantage="grpo", policy_loss="gspo", loss_aggregation="seq_mean_token_mean",
                 clip_eps=3e-4, clip_eps_high=4e-4, kl_mode="none", kl_coef=0.0),
    # MiniMax 2025: clipped stop-gradient importance weights, token-level loss.
    "cispo": dict(advantage="grpo", policy_loss="cispo", loss_aggregation="token_mean", clip_eps_high=0.28,
                  kl_mode="none", kl_coef=0.0),
    # Ahmadian et al. 2024: leave-one-out baseline, sequence KL in the reward.
    "rloo": dict(advantage="rloo", policy_loss="ppo", loss_aggregation="seq_mean_token_mean",
                 kl_mode="reward", kl_coef=0.05, kl_estimator="k1"),
    # Hu 2025: token-level KL in the reward, batch-whitened reward-to-go.
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="ppo", loss_aggregation="token_mean",
                         kl_mode="reward", kl_coef=0.01, kl_estimator="k1"),
    # Hu 2025, with a per-prompt group mean subtracted first and the KL in the loss (k2).
    "reinforce_pp_baseline": dict(advantage="reinforce_pp_baseline", policy_loss="ppo",
                                  loss_aggregation="token_mean", kl_mode="loss", kl_coef=0.01,
                                  kl_estimator="k2"),
    # Li et al. 2023: REINFORCE (one update, ratio 1) on r(x, y) - r(x, y_greedy), one sample per prompt.
    # The authors' trainer (github.com/liziniu/ReMax, remax_trainer.py) puts -beta * k1_t of token t
    # alone (not summed over later tokens) into token t's return and averages over tokens; at ratio 1
    # its gradient is exactly that of beta * k2 in a token-mean loss, which is how it is written here
    # (no extra forward for old log-probs). Their gamma = 0.99 discount and +-5 clip of r - b are not.
    "remax": dict(advantage="remax", policy_loss="ppo", loss_aggregation="token_mean", kl_mode="loss",
                  kl_coef=0.05, kl_estimator="k2", group_size=1, num_epochs=1),
}


def grpo_config(preset: str = "grpo", **overrides) -> GRPOConfig:
    """A `GRPOConfig` from a named preset of `GRPO_PRESETS`, with field overrides.

    Example:
      >>> config = grpo_config("dapo", group_size=16, num_minibatches=4)
      >>> config.clip_eps_high, config.loss_aggregation, config.num_updates
      (0.28, 'token_mean', 4)
    """
    if preset not in GRPO_PRESETS:
        raise ValueError(f"grpo_config: unknown preset {preset!r}; presets: {sorted(GRPO_PRESETS)}")
    return GRPOConfig(**{**GRPO_PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------- pure objective


def grpo_advantages(
    scores: jax.Array,
    mask: jax.Array,
    *,
    config: GRPOConfig,
    old_logps: jax.Array | None = None,
    ref_logps: jax.Array | None = None,
    baseline_scores: jax.Array | None = None,
) -> jax.Array:
    """The GRPO family's advantages of one rollout batch.

    With `kl_mode="reward"`: `k_t = kl_divergence(old_logps, ref_logps)` (configured estimator)
    enters REINFORCE++ per token, and the other estimators as `score - beta * sum_t k_t`.

    Args:
      scores: `[N]` sequence rewards, groups of `config.group_size` contiguous.
      mask: `[N, C]` completion mask.
      config: the family configuration.
      old_logps, ref_logps: `[N, C]`, needed only for the KL in the reward.
      baseline_scores: `[N]` the score of each row's prompt's greedy completion; needed by (and only
        by) `advantage="remax"`, whose KL in the reward, like RLOO's, is subtracted from `scores` only.

    Returns:
      float32 `[N]` (group estimators) or `[N, C]` (REINFORCE++).
    """
    fn = "grpo_advantages"
    _checks.check_rank(fn, "scores", scores, 1)
    if config.greedy_baseline != (baseline_scores is not None):
        raise ValueError(f"{fn}: advantage={config.advantage!r} " + (
            "needs baseline_scores (the score of each row's prompt's greedy completion)" if config.greedy_baseline
            else "takes no baseline_scores (only 'remax' reads them)"))
    in_reward = config.kl_in_reward
    kl_tokens = None
    if in_reward:
        if old_logps is None or ref_logps is None:
            raise ValueError(f"{fn}: kl_mode='reward' needs old_logps and ref_logps")
        kl_tokens = kl_divergence(old_logps, ref_logps, estimator=config.kl_estimator_used)
    if config.advantage in _TOKEN_KL_ADVANTAGES:
        group = config.group_size if config.advantage == "reinforce_pp_baseline" else None
        return reinforce_plus_plus(scores, mask, kl=kl_tokens, kl_coef=config.kl_coef if in_reward else 0.0,
                                   group_size=group)
    s = _checks.f32(scores)
    if in_reward:
        s = s - config.kl_coef * sequence_kl(kl_tokens, mask)
    if config.advantage == "remax":
        return remax(s, baseline_scores)
    return _SEQUENCE_ADVANTAGES[config.advantage](s, config)


_SEQUENCE_ADVANTAGES: dict[str, Callable[[jax.Array, GRPOConfig], jax.Array]] = {
    "grpo": lambda s, c: group_normalized(s, c.group_size, scale="group", eps=c.adv_eps),
    "dr_grpo": lambda s, c: group_normalized(s, c.group_size, scale="none"),
    "batch_std": lambda s, c: group_normalized(s, c.group_size, scale="batch", eps=c.adv_eps),
    "rloo": lambda s, c: leave_one_out(s, c.group_size),
}


def grpo_objective(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    config: GRPOConfig,
    ref_logps: jax.Array | None = None,
    entropy: jax.Array | None = None,
    num_tokens: jax.Array | None = None,
    num_sequences: jax.Array | None = None,
    sampler_logps: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The scalar loss of the GRPO family on one minibatch, from per-token arrays.

    `L = aggregate(w * policy_loss(logps, old, A, m) + beta k(logps, ref) [loss mode] - c_H H, m)`,
    `w = 1`, or with `config.tis_cap` the truncated importance weights `min(exp(old - sampler), C)`
    (`policy_gradient.truncated_importance_weights`).

    Args:
      logps: `[N, C]` current log-probs (differentiated).
      old_logps: `[N, C]` the sampling policy's log-probs.
      advantages: `[N]` or `[N, C]`.
      mask: `[N, C]` completion mask.
      config: the family configuration.
      ref_logps: `[N, C]` reference log-probs (for the in-loss KL and the `kl` metric), or None
        (ValueError with `kl_mode="loss"` and `kl_coef > 0`).
      entropy: `[N, C]` per-token entropies (for the bonus and the `entropy` metric), or None
        (ValueError with `entropy_coef > 0`).
      num_tokens, num_sequences: global normalisers for micro-batches (see `aggregate`).
      sampler_logps: `[N, C]` the sampler's log-probs (needed with `config.tis_cap`).

    Returns:
      `(loss, metrics)`: metrics `loss/policy`, the policy loss's clip fractions and `approx_kl`,
      `tis/*` (with `tis_cap`),
      `kl` (token mean of the configured estimator against the reference), `kl/sequence` (mean
      over sequences of the summed k1), `entropy`.
    """
    norm = dict(mode=config.loss_aggregation, max_completion_length=config.max_completion_length,
                num_tokens=num_tokens, num_sequences=num_sequences)
    per_token, metrics = policy_loss_terms(config.policy_loss, config, logps, old_logps, advantages, mask,
                                           sampler_logps=sampler_logps)
    metrics = dict(metrics)
    metrics["loss/policy"] = aggregate_loss(per_token, mask, **norm)
    per_token = per_token + reference_and_entropy_terms(config, logps, ref_logps, entropy, mask, metrics)
    return aggregate_loss(per_token, mask, **norm), metrics


# ------------------------------------------------------------------------------------------ the step


def make_grpo_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    config: GRPOConfig,
    nonfinite: NonFinitePolicy = "skip",
    learning_rate: optax.Schedule | None = None,
) -> Callable[[RLState, dict], tuple[RLState, Metrics]]:
    """The GRPO family's update: advantages, then epochs x minibatches of policy updates.

    `step(state, batch) -> (state, metrics)` is pure; jit it with `steps.common.jit_step` (state
    donated). Only `state.policy` changes; `state.reference` and `state.kl` pass through.

    Args:
      model: the policy `CausalLM` (LM head).
      optimizer: the policy's optax transform.
      config: a `GRPOConfig` (e.g. `grpo_config("dapo")`).
      nonfinite: the NaN/Inf guard of each update (`steps.common.apply_gradients`).
      learning_rate: the schedule, reported as `learning_rate`.

    Returns:
      The pure step. Metrics: `loss`, `loss/policy`, `clip_ratio/low_mean|high_mean|region_mean`,
      `approx_kl`, `kl`, `kl/sequence`, `entropy`, `advantages/mean|std|abs_max`, `grad_norm`,
      `nonfinite` (updates skipped), `sampler_logprob_diff/mean|max` (first update, when the batch
      has `sampler_logps`), `completions/mean_length`.

    References: see `GRPO_PRESETS` for each configuration's paper.
    """
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"make_grpo_step: config must be a GRPOConfig, got {type(config).__name__}")
    old_source = old_logprobs_source(config)

    def make_update(group: int):
        """One minibatch update; `group` rows share each prompt's forward (static, from the batch shape)."""

        def loss_fn(params, mb, context, rng):
            logps, entropy = rollout_logprobs(model, params, mb, config, with_entropy=True, group_size=group, rng=rng)
            old = jax.lax.stop_gradient(logps) if old_source == "current" else mb["old_logps"]
            loss, metrics = grpo_objective(
                logps, old, mb["advantages"], mb["completion_mask"], config=config,
                ref_logps=mb.get("ref_logps"), entropy=entropy, sampler_logps=mb.get("sampler_logps"), **context,
            )
            if "sampler_logps" in mb:
                metrics.update(sampler_diff(logps, mb["sampler_logps"], mb["completion_mask"]))
            return loss, micro_batch_metrics(metrics, mb["completion_mask"], context, config.micro_batches)

        def update(policy: TrainState, mb):
            context = normalisers(mb["completion_mask"])
            loss, grads, metrics = accumulate_gradients(loss_fn, policy.params, mb, context, step_key(policy),
                                                        micro_batches=config.micro_batches)
            policy, opt_metrics = apply_gradients(policy, grads, loss, optimizer, nonfinite=nonfinite,
                                                  learning_rate=learning_rate)
            return policy, {"loss": loss, **metrics, **opt_metrics}

        return update

    def step(state: RLState, batch) -> tuple[RLState, Metrics]:
        n = check_rl_batch(batch, config, group_size=config.group_size, name="grpo_step")
        group = config.prompt_group(n)
        policy = state.policy
        mask = batch["completion_mask"]
        data = {k: batch[k] for k in ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask")}
        for key in ("sampler_logps", "ref_logps"):
            if key in batch:
                data[key] = batch[key]
        if old_source == "sampler":
            data["old_logps"] = batch["sampler_logps"]
        elif old_source == "recompute":
            data["old_logps"] = jax.lax.stop_gradient(rollout_logprobs(model, policy.params, batch, config,
                                                                       with_entropy=False, group_size=group)[0])
        advantages = grpo_advantages(batch["scores"], mask, config=config, old_logps=data.get("old_logps"),
                                     ref_logps=batch.get("ref_logps"), baseline_scores=batch.get("baseline_scores"))
        data["advantages"] = advantages
        policy, stacked = run_updates(make_update(group), policy, data, rng=step_key(policy),
                                      num_epochs=config.num_epochs, num_minibatches=config.num_minibatches,
                                      group=config.shuffle_group(n))
        metrics = reduce_update_metrics(stacked)
        adv_mask = mask if advantages.ndim == 2 else jnp.ones_like(advantages)
        metrics.update({
            "advantages/mean": _checks.masked_mean(advantages, adv_mask),
            "advantages/std": jnp.sqrt(_checks.masked_mean(jnp.square(advantages), adv_mask)
                                       - jnp.square(_checks.masked_mean(advantages, adv_mask))),
            "advantages/abs_max": jnp.max(jnp.abs(_checks.apply_mask(advantages, adv_mask))),
            **rollout_stats(batch),
        })
        return state._replace(policy=policy), metrics

    step.host_check = rollout_host_check(model.config.vocab_size, config.prompt_group)
    return step
