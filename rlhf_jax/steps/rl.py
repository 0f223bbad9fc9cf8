"""Online RL update steps: PPO (actor-critic with GAE) and the GRPO family, from the pure core.

One call of a step consumes one rollout batch (a dict, keys in `RL_BATCH_KEYS`: prompts,
completions, scores, the sampler's and the reference's log-probs) and runs `num_epochs x num_minibatches` optimizer updates
inside one jitted program: an outer `lax.scan` over epochs (each with a fresh permutation, keyed by
`fold_in(rng, step)`) around an inner `lax.scan` over minibatches.

The GRPO family is *configurations* of one objective, not subclasses (see `GRPO_PRESETS`):

    advantages  = estimator(scores [- beta * KL if kl_mode == "reward"])    # grpo, dr_grpo, rloo, ...
    per_token   = policy_loss(logps, old_logps, advantages, mask)          # ppo clip, gspo, cispo
                  [+ beta * kl_divergence(logps, ref_logps) if kl_mode == "loss"]
                  [- entropy_coef * entropy]
    loss        = aggregate(per_token, mask, mode=loss_aggregation)

PPO adds a critic (a separate scalar-head model, or a `value_head` on the policy's backbone: the
policy's params are then `{"lm": <CausalLM params>, "value_head": f32[E]}`), per-token rewards
with the KL penalty (`advantages.per_token_rewards`, coefficient from the KL controller state),
GAE, clipped value loss, and an optional pretraining-data term (PPO-ptx).

Old log-probs (`old_logprobs`): "sampler" uses the sampler's (the same numerics, see
`rlhf_jax.rollout`); "recompute" runs one forward pass of the current policy before the updates;
"auto" recomputes only when needed: with a single update and the KL not in the reward, the
current log-probs under `stop_gradient` are the old ones (the ratio is exactly 1, as on-policy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import _checks
from rlhf_jax.advantages import (
    gae,
    group_normalized,
    leave_one_out,
    per_token_rewards,
    reinforce_plus_plus,
    whiten,
)
from rlhf_jax.kl_control import KLController, adaptive_kl_controller, fixed_kl_controller
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
    value_loss,
)
from rlhf_jax.models.heads import scalar_head
from rlhf_jax.rollout import completion_hidden, completion_logprobs, completion_values, head_logprobs
from rlhf_jax.sampling.metrics import logprob_mismatch
from rlhf_jax.state import RLState, TrainState
from rlhf_jax.steps.common import NonFinitePolicy, accumulate_gradients, apply_gradients

__all__ = [
    "AdvantageName",
    "PolicyLossName",
    "KLMode",
    "OldLogprobs",
    "RL_BATCH_KEYS",
    "OPTIONAL_RL_BATCH_KEYS",
    "check_rl_batch",
    "GRPOConfig",
    "PPOConfig",
    "GRPO_PRESETS",
    "grpo_config",
    "make_grpo_step",
    "make_ppo_step",
    "grpo_advantages",
    "grpo_objective",
]

AdvantageName = Literal["grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
PolicyLossName = Literal["ppo", "gspo", "cispo"]
KLMode = Literal["loss", "reward", "none"]
OldLogprobs = Literal["auto", "sampler", "recompute"]
Metrics = dict[str, jax.Array]

# Estimators that compare the samples of one prompt and so need groups of >= 2.
GROUP_ADVANTAGES = frozenset({"grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp_baseline"})
# Estimators that take the KL penalty per token (REINFORCE++); the others subtract its sum.
_TOKEN_KL_ADVANTAGES = frozenset({"reinforce_pp", "reinforce_pp_baseline"})


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
RL_BATCH_KEYS = ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask", "scores")
OPTIONAL_RL_BATCH_KEYS = ("sampler_logps", "ref_logps", "ptx_tokens", "ptx_mask")


# ------------------------------------------------------------------------------------------ configs


def _fail(owner: str, field: str, message: str):
    raise ValueError(f"{owner}.{field} {message}")


def _check_literal(owner: str, field: str, value: Any, literal: Any) -> None:
    if value not in get_args(literal):
        _fail(owner, field, f"must be one of {get_args(literal)}, got {value!r}")


def _check_int(owner: str, field: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _fail(owner, field, f"must be an int >= {low}, got {value!r}")


def _check_clip(owner: str, config) -> None:
    if not 0 < config.clip_eps <= 1:
        _fail(owner, "clip_eps", f"must be in (0, 1], got {config.clip_eps!r}")
    if config.clip_eps_high is not None and not config.clip_eps_high > 0:
        _fail(owner, "clip_eps_high", f"must be > 0 or None, got {config.clip_eps_high!r}")
    if config.dual_clip is not None and not config.dual_clip > 1:
        _fail(owner, "dual_clip", f"must be > 1 or None, got {config.dual_clip!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """The objective of the GRPO family (critic-free policy gradient on group-relative rewards).

    Attributes:
      advantage: `grpo` (group mean and std), `dr_grpo` (group mean only), `batch_std` (group
        mean, batch std), `rloo` (leave-one-out mean), `reinforce_pp` (batch-whitened reward-to-go,
        token-level KL), `reinforce_pp_baseline` (group mean first, then as `reinforce_pp`).
      policy_loss: `ppo` (token-ratio clip), `gspo` (sequence-ratio clip), `cispo` (clipped
        stop-gradient weights; bound `1 + (clip_eps_high or clip_eps)`, no lower bound).
      loss_aggregation: how per-token losses become a scalar (`rlhf_jax.losses.aggregate`).
      group_size: completions per prompt `G` (>= 2 for the group estimators).
      clip_eps, clip_eps_high, dual_clip: the trust region (`clip_eps_high` > `clip_eps` is DAPO's
        clip-higher).
      kl_mode: the KL to the reference in the `loss`, in the `reward`, or `none`.
      kl_coef: `beta`.
      kl_estimator: `k1`, `k2` or `k3` (Schulman's estimators; `k3` is GRPO's, `k1` the usual
        in-reward one).
      entropy_coef: weight of an entropy bonus (0 = none).
      num_epochs: passes over each rollout batch (TRL's `num_iterations`).
      num_minibatches: optimizer updates per pass (the batch must divide evenly).
      micro_batches: gradient-accumulation micro-batches per minibatch (memory, not math: the
        losses are normalised by minibatch-wide counts, so the update is the same).
      temperature: the sampling temperature (log-probs are computed at it).
      old_logprobs: `auto`, `sampler` or `recompute` (see the module docstring).
      adv_eps: added to the std of `grpo`/`batch_std`.
      max_completion_length: Dr.GRPO's constant normaliser `L` for `seq_mean_token_sum_norm`
        (default: the batch's completion width).
      chunk_size: tokens per LM-head chunk (within a row).
      share_prompt: run each group's prompt through the model once and its completions on top of
        the shared KV cache (`rlhf_jax.rollout.completion_hidden`): same losses, fewer FLOPs.
        Applies when each minibatch holds whole groups and `micro_batches` is 1 (minibatches are
        shuffled by whole groups whenever a minibatch holds whole groups); the rows of a group must
        share their prompt, as the sampler's do.
    """

    advantage: AdvantageName = "grpo"
    policy_loss: PolicyLossName = "ppo"
    loss_aggregation: AggregateMode = "seq_mean_token_mean"
    group_size: int = 8
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    kl_mode: KLMode = "loss"
    kl_coef: float = 0.04
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    num_epochs: int = 1
    num_minibatches: int = 1
    micro_batches: int = 1
    temperature: float = 1.0
    old_logprobs: OldLogprobs = "auto"
    adv_eps: float = 1e-4
    max_completion_length: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    share_prompt: bool = True

    def __post_init__(self):
        o = "GRPOConfig"
        _check_literal(o, "advantage", self.advantage, AdvantageName)
        _check_literal(o, "policy_loss", self.policy_loss, PolicyLossName)
        _check_literal(o, "loss_aggregation", self.loss_aggregation, AggregateMode)
        _check_literal(o, "kl_mode", self.kl_mode, KLMode)
        _check_literal(o, "kl_estimator", self.kl_estimator, KLEstimator)
        _check_literal(o, "old_logprobs", self.old_logprobs, OldLogprobs)
        _check_int(o, "group_size", self.group_size, 1)
        if self.advantage in GROUP_ADVANTAGES and self.group_size < 2:
            _fail(o, "group_size", f"must be >= 2 for advantage {self.advantage!r} (a group baseline "
                  f"compares the samples of one prompt), got {self.group_size}")
        _check_clip(o, self)
        if not self.kl_coef >= 0:
            _fail(o, "kl_coef", f"must be >= 0, got {self.kl_coef!r}")
        if not self.entropy_coef >= 0:
            _fail(o, "entropy_coef", f"must be >= 0, got {self.entropy_coef!r}")
        _check_int(o, "num_epochs", self.num_epochs, 1)
        _check_int(o, "num_minibatches", self.num_minibatches, 1)
        _check_int(o, "micro_batches", self.micro_batches, 1)
        _check_int(o, "chunk_size", self.chunk_size, 1)
        if self.max_completion_length is not None:
            _check_int(o, "max_completion_length", self.max_completion_length, 1)
        if not self.temperature > 0:
            _fail(o, "temperature", f"must be > 0, got {self.temperature!r}")
        if not self.adv_eps >= 0:
            _fail(o, "adv_eps", f"must be >= 0, got {self.adv_eps!r}")

    @property
    def num_updates(self) -> int:
        return self.num_epochs * self.num_minibatches

    @property
    def uses_reference(self) -> bool:
        """Whether the step needs the reference's log-probs."""
        return self.kl_mode != "none" and self.kl_coef > 0

    def shuffle_group(self, batch_size: int) -> int:
        """Rows kept together when minibatches are shuffled: whole prompt groups when they fit."""
        minibatch = batch_size // self.num_minibatches
        return self.group_size if minibatch % self.group_size == 0 else 1

    def prompt_group(self, batch_size: int) -> int:
        """Rows per shared prompt forward for a batch of `batch_size` rows (1 = no sharing)."""
        if self.share_prompt and self.micro_batches == 1:
            return self.shuffle_group(batch_size)
        return 1

    def replace(self, **changes) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)


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
}


def grpo_config(preset: str = "grpo", **overrides) -> GRPOConfig:
    """A `GRPOConfig` from a named preset of `GRPO_PRESETS`, with field overrides.

    Example:
      >>> grpo_config("dapo", group_size=16, num_minibatches=4)
    """
    if preset not in GRPO_PRESETS:
        raise ValueError(f"grpo_config: unknown preset {preset!r}; presets: {sorted(GRPO_PRESETS)}")
    return GRPOConfig(**{**GRPO_PRESETS[preset], **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """The objective of PPO with a learned critic (InstructGPT-style RLHF).

    Attributes:
      gamma, lam: GAE's discount and lambda.
      clip_eps, clip_eps_high, dual_clip: the policy's trust region.
      value_clip: clip range of the value loss around the rollout's values (None = unclipped).
      vf_coef: weight of the value loss (in the shared objective of a value head on the policy's
        backbone; it scales the separate critic's loss otherwise).
      kl_mode: KL in the per-token `reward` (k1, coefficient from the KL controller), in the `loss`,
        or `none`.
      kl_coef: initial `beta`; `kl_target` set makes it adaptive (Ziegler et al. 2019) with
        `kl_horizon`.
      kl_estimator: the estimator of the in-loss KL (the in-reward KL is always k1).
      whiten_advantages: normalise the advantages over the batch.
      entropy_coef: weight of an entropy bonus.
      ptx_coef: weight of the pretraining-data language-modelling loss (PPO-ptx; 0 = off).
      loss_aggregation: reduction of per-token losses.
      num_epochs, num_minibatches: updates per rollout batch.
      micro_batches: gradient-accumulation micro-batches per minibatch.
      temperature: the sampling temperature.
      old_logprobs: `auto`, `sampler` or `recompute`.
      chunk_size: tokens per LM-head chunk.
    """

    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    kl_mode: KLMode = "reward"
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10_000.0
    kl_estimator: KLEstimator = "k3"
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    loss_aggregation: AggregateMode = "token_mean"
    num_epochs: int = 4
    num_minibatches: int = 1
    micro_batches: int = 1
    temperature: float = 1.0
    old_logprobs: OldLogprobs = "auto"
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self):
        o = "PPOConfig"
        for field in ("gamma", "lam"):
            if not 0 <= getattr(self, field) <= 1:
                _fail(o, field, f"must be in [0, 1], got {getattr(self, field)!r}")
        _check_clip(o, self)
        if self.value_clip is not None and not self.value_clip > 0:
            _fail(o, "value_clip", f"must be > 0 or None, got {self.value_clip!r}")
        for field in ("vf_coef", "kl_coef", "entropy_coef", "ptx_coef"):
            if not getattr(self, field) >= 0:
                _fail(o, field, f"must be >= 0, got {getattr(self, field)!r}")
        if self.kl_target is not None:
            if not self.kl_target > 0:
                _fail(o, "kl_target", f"must be > 0 or None, got {self.kl_target!r}")
            if not self.kl_coef > 0:
                _fail(o, "kl_coef", "must be > 0 for an adaptive controller (kl_target is set)")
        if not self.kl_horizon > 0:
            _fail(o, "kl_horizon", f"must be > 0, got {self.kl_horizon!r}")
        _check_literal(o, "kl_mode", self.kl_mode, KLMode)
        _check_literal(o, "kl_estimator", self.kl_estimator, KLEstimator)
        _check_literal(o, "loss_aggregation", self.loss_aggregation, AggregateMode)
        _check_literal(o, "old_logprobs", self.old_logprobs, OldLogprobs)
        _check_int(o, "num_epochs", self.num_epochs, 1)
        _check_int(o, "num_minibatches", self.num_minibatches, 1)
        _check_int(o, "micro_batches", self.micro_batches, 1)
        _check_int(o, "chunk_size", self.chunk_size, 1)
        if not self.temperature > 0:
            _fail(o, "temperature", f"must be > 0, got {self.temperature!r}")

    @property
    def num_updates(self) -> int:
        return self.num_epochs * self.num_minibatches

    @property
    def uses_reference(self) -> bool:
        return self.kl_mode != "none" and self.kl_coef > 0

    def kl_controller(self) -> KLController:
        """The KL-coefficient controller: adaptive when `kl_target` is set, else fixed."""
        if self.kl_target is None:
            return fixed_kl_controller(kl_coef=self.kl_coef)
        return adaptive_kl_controller(init_kl_coef=self.kl_coef, target=self.kl_target, horizon=self.kl_horizon)

    def replace(self, **changes) -> "PPOConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------- pure objective


def _sequence_kl(kl_tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return _checks.masked_sum(kl_tokens, mask, axis=-1)


def grpo_advantages(
    scores: jax.Array,
    mask: jax.Array,
    *,
    config: GRPOConfig,
    old_logps: jax.Array | None = None,
    ref_logps: jax.Array | None = None,
) -> jax.Array:
    """The GRPO family's advantages of one rollout batch.

    With `kl_mode="reward"`: `k_t = kl_divergence(old_logps, ref_logps)` (configured estimator)
    enters REINFORCE++ per token, and the other estimators as `score - beta * sum_t k_t`.

    Args:
      scores: `[N]` sequence rewards, groups of `config.group_size` contiguous.
      mask: `[N, C]` completion mask.
      config: the family configuration.
      old_logps, ref_logps: `[N, C]`, needed only for the KL in the reward.

    Returns:
      float32 `[N]` (group estimators) or `[N, C]` (REINFORCE++).
    """
    fn = "grpo_advantages"
    _checks.check_rank(fn, "scores", scores, 1)
    in_reward = config.kl_mode == "reward" and config.kl_coef > 0
    kl_tokens = None
    if in_reward:
        if old_logps is None or ref_logps is None:
            raise ValueError(f"{fn}: kl_mode='reward' needs old_logps and ref_logps")
        kl_tokens = kl_divergence(old_logps, ref_logps, estimator=config.kl_estimator)
    if config.advantage in _TOKEN_KL_ADVANTAGES:
        group = config.group_size if config.advantage == "reinforce_pp_baseline" else None
        return reinforce_plus_plus(scores, mask, kl=kl_tokens, kl_coef=config.kl_coef if in_reward else 0.0,
                                   group_size=group)
    s = _checks.f32(scores)
    if in_reward:
        s = s - config.kl_coef * _sequence_kl(kl_tokens, mask)
    return _SEQUENCE_ADVANTAGES[config.advantage](s, config)


_SEQUENCE_ADVANTAGES: dict[str, Callable[[jax.Array, GRPOConfig], jax.Array]] = {
    "grpo": lambda s, c: group_normalized(s, c.group_size, scale="group", eps=c.adv_eps),
    "dr_grpo": lambda s, c: group_normalized(s, c.group_size, scale="none"),
    "batch_std": lambda s, c: group_normalized(s, c.group_size, scale="batch", eps=c.adv_eps),
    "rloo": lambda s, c: leave_one_out(s, c.group_size),
}


def _policy_loss(name: str, config, logps, old_logps, advantages, mask) -> tuple[jax.Array, Metrics]:
    if name == "cispo":
        high = config.clip_eps if config.clip_eps_high is None else config.clip_eps_high
        return cispo_loss(logps, old_logps, advantages, mask, clip_eps_high=high)
    return ppo_policy_loss(
        logps, old_logps, advantages, mask,
        clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip,
        ratio_level="sequence" if name == "gspo" else "token",
    )


def _aggregate(config, per_token: jax.Array, mask: jax.Array, *, num_tokens=None, num_sequences=None) -> jax.Array:
    """`aggregate` in the configured mode, normalised by minibatch-wide counts when given."""
    mode = config.loss_aggregation
    if mode == "token_mean":
        return aggregate(per_token, mask, mode=mode, num_tokens=num_tokens)
    max_len = None
    if mode == "seq_mean_token_sum_norm":
        fixed = config.max_completion_length if isinstance(config, GRPOConfig) else None
        max_len = fixed or per_token.shape[1]
    return aggregate(per_token, mask, mode=mode, num_sequences=num_sequences, max_len=max_len)


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
) -> tuple[jax.Array, Metrics]:
    """The scalar loss of the GRPO family on one minibatch, from per-token arrays.

    `L = aggregate(policy_loss(logps, old, A, m) + beta k(logps, ref) [loss mode] - c_H H, m)`.

    Args:
      logps: `[N, C]` current log-probs (differentiated).
      old_logps: `[N, C]` the sampling policy's log-probs.
      advantages: `[N]` or `[N, C]`.
      mask: `[N, C]` completion mask.
      config: the family configuration.
      ref_logps: `[N, C]` reference log-probs (for the in-loss KL and the `kl` metric), or None.
      entropy: `[N, C]` per-token entropies (for the bonus and the `entropy` metric), or None.
      num_tokens, num_sequences: global normalisers for micro-batches (see `aggregate`).

    Returns:
      `(loss, metrics)`: metrics `loss/policy`, the policy loss's clip fractions and `approx_kl`,
      `kl` (token mean of the configured estimator against the reference), `kl/sequence` (mean
      over sequences of the summed k1), `entropy`.
    """
    norm = dict(num_tokens=num_tokens, num_sequences=num_sequences)
    per_token, metrics = _policy_loss(config.policy_loss, config, logps, old_logps, advantages, mask)
    metrics = dict(metrics)
    metrics["loss/policy"] = _aggregate(config, per_token, mask, **norm)
    per_token = per_token + _reference_and_entropy_terms(config, logps, ref_logps, entropy, mask, metrics)
    return _aggregate(config, per_token, mask, **norm), metrics


def _reference_and_entropy_terms(config, logps, ref_logps, entropy, mask, metrics: Metrics, kl_coef=None):
    """Per-token KL-in-loss and entropy-bonus terms (0 where unused); fills `kl*` and `entropy`."""
    extra = jnp.zeros(jnp.shape(logps), jnp.float32)
    if ref_logps is not None:
        kl_tokens = kl_divergence(logps, ref_logps, estimator=config.kl_estimator)
        metrics["kl"] = jax.lax.stop_gradient(_checks.masked_mean(kl_tokens, mask))
        k1 = jax.lax.stop_gradient(_checks.f32(logps) - _checks.f32(ref_logps))
        metrics["kl/sequence"] = jnp.mean(_sequence_kl(k1, mask))
        if config.kl_mode == "loss" and config.kl_coef > 0:
            beta = config.kl_coef if kl_coef is None else kl_coef
            extra = extra + beta * _checks.apply_mask(kl_tokens, mask)
    if entropy is not None:
        metrics["entropy"] = jax.lax.stop_gradient(_checks.masked_mean(entropy, mask))
        if config.entropy_coef > 0:
            extra = extra - config.entropy_coef * _checks.apply_mask(entropy, mask)
    return extra


# ------------------------------------------------------------------------------------ the steps


def check_rl_batch(batch, config, *, name: str) -> int:
    """Raise a clear error for an RL batch the step cannot take (before compiling); return N.

    Checks the required keys, ranks, matching rows and widths, divisibility by the group size and by
    `num_minibatches x micro_batches`, and the presence of `ref_logps` / `sampler_logps` when the
    configuration needs them.
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
    want = {"prompt_lengths": (n,), "completion_mask": (n, c), "scores": (n,),
            "sampler_logps": (n, c), "ref_logps": (n, c)}
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
    group = config.group_size if isinstance(config, GRPOConfig) else 1
    if n % group:
        raise ValueError(f"{name}: batch of {n} completions does not split into groups of group_size={group}")
    split = config.num_minibatches * config.micro_batches
    if n % split:
        raise ValueError(f"{name}: batch of {n} completions does not split into num_minibatches="
                         f"{config.num_minibatches} x micro_batches={config.micro_batches}")
    if config.uses_reference and "ref_logps" not in batch:
        raise KeyError(f"{name}: kl_mode={config.kl_mode!r} with kl_coef={config.kl_coef} needs batch['ref_logps']")
    if config.old_logprobs == "sampler" and "sampler_logps" not in batch:
        raise KeyError(f"{name}: old_logprobs='sampler' needs batch['sampler_logps']")
    return n


def _old_logprobs_source(config) -> Literal["current", "sampler", "recompute"]:
    """Where the old log-probs come from: `current` means `stop_gradient` of the training forward."""
    if config.old_logprobs != "auto":
        return config.old_logprobs
    in_reward = config.kl_mode == "reward" and config.kl_coef > 0
    return "recompute" if config.num_updates > 1 or in_reward else "current"


def _run_updates(update, carry, data: dict, *, rng: jax.Array, num_epochs: int, num_minibatches: int, group: int = 1):
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
# sum, max; everything else is averaged over updates.
_FIRST = ("sampler_logprob_diff/mean", "sampler_logprob_diff/max")


def _reduce_update_metrics(stacked: Metrics) -> Metrics:
    out = {}
    for key, value in stacked.items():
        if key in _FIRST:
            out[key] = value[0]
        elif key == "nonfinite":
            out[key] = jnp.sum(value)
        elif key == "halt":
            out[key] = jnp.max(value)
        else:
            out[key] = jnp.mean(value)
    return out


def _sampler_diff(logps: jax.Array, sampler_logps: jax.Array, mask: jax.Array) -> Metrics:
    return logprob_mismatch(sampler_logps, jax.lax.stop_gradient(logps), mask)


def _normalisers(mask: jax.Array) -> dict[str, jax.Array]:
    return {"num_tokens": count_tokens(mask), "num_sequences": count_sequences(mask)}


def _mb_logprobs(model, params, mb, config, *, with_entropy: bool, group_size: int = 1):
    return completion_logprobs(
        model, params, mb["prompt_tokens"], mb["prompt_lengths"], mb["completion_tokens"],
        temperature=config.temperature, with_entropy=with_entropy, chunk_size=config.chunk_size,
        group_size=group_size,
    )


def _rollout_stats(batch) -> Metrics:
    mask = _checks.mask_f32(batch["completion_mask"])
    return {"completions/mean_length": jnp.mean(jnp.sum(mask, axis=1))}


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
    old_source = _old_logprobs_source(config)

    def make_update(group: int):
        """One minibatch update; `group` rows share each prompt's forward (static, from the batch shape)."""

        def loss_fn(params, mb, context, rng):
            del rng
            logps, entropy = _mb_logprobs(model, params, mb, config, with_entropy=True, group_size=group)
            old = jax.lax.stop_gradient(logps) if old_source == "current" else mb["old_logps"]
            loss, metrics = grpo_objective(
                logps, old, mb["advantages"], mb["completion_mask"], config=config,
                ref_logps=mb.get("ref_logps"), entropy=entropy, **context,
            )
            if "sampler_logps" in mb:
                metrics.update(_sampler_diff(logps, mb["sampler_logps"], mb["completion_mask"]))
            return loss, metrics

        def update(policy: TrainState, mb):
            context = _normalisers(mb["completion_mask"])
            rng = jax.random.fold_in(policy.rng, policy.step)
            loss, grads, metrics = accumulate_gradients(loss_fn, policy.params, mb, context, rng,
                                                        micro_batches=config.micro_batches)
            policy, opt_metrics = apply_gradients(policy, grads, loss, optimizer, nonfinite=nonfinite,
                                                  learning_rate=learning_rate)
            return policy, {"loss": loss, **metrics, **opt_metrics}

        return update

    def step(state: RLState, batch) -> tuple[RLState, Metrics]:
        n = check_rl_batch(batch, config, name="grpo_step")
        group = config.prompt_group(n)
        policy = state.policy
        rng = jax.random.fold_in(policy.rng, policy.step)
        mask = batch["completion_mask"]
        data = {k: batch[k] for k in ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask")}
        for key in ("sampler_logps", "ref_logps"):
            if key in batch:
                data[key] = batch[key]
        if old_source == "sampler":
            data["old_logps"] = batch["sampler_logps"]
        elif old_source == "recompute":
            data["old_logps"] = jax.lax.stop_gradient(_mb_logprobs(model, policy.params, batch, config,
                                                                   with_entropy=False, group_size=group)[0])
        advantages = grpo_advantages(batch["scores"], mask, config=config, old_logps=data.get("old_logps"),
                                     ref_logps=batch.get("ref_logps"))
        data["advantages"] = advantages
        policy, stacked = _run_updates(make_update(group), policy, data, rng=rng, num_epochs=config.num_epochs,
                                       num_minibatches=config.num_minibatches, group=config.shuffle_group(n))
        metrics = _reduce_update_metrics(stacked)
        adv_mask = mask if advantages.ndim == 2 else jnp.ones_like(advantages)
        metrics.update({
            "advantages/mean": _checks.masked_mean(advantages, adv_mask),
            "advantages/std": jnp.sqrt(_checks.masked_mean(jnp.square(advantages), adv_mask)
                                       - jnp.square(_checks.masked_mean(advantages, adv_mask))),
            "advantages/abs_max": jnp.max(jnp.abs(_checks.apply_mask(advantages, adv_mask))),
            **_rollout_stats(batch),
        })
        return state._replace(policy=policy), metrics

    return step


def _explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """`1 - Var[R - V] / Var[R]` over the masked tokens (0 when the returns have no variance)."""
    var_r = _checks.masked_mean(jnp.square(returns - _checks.masked_mean(returns, mask)), mask)
    resid = returns - values
    var_e = _checks.masked_mean(jnp.square(resid - _checks.masked_mean(resid, mask)), mask)
    return jnp.where(var_r > 0, 1.0 - var_e / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def make_ppo_step(
    policy_model,
    policy_optimizer: optax.GradientTransformation,
    *,
    config: PPOConfig,
    value_model=None,
    value_optimizer: optax.GradientTransformation | None = None,
    nonfinite: NonFinitePolicy = "skip",
    learning_rate: optax.Schedule | None = None,
) -> Callable[[RLState, dict], tuple[RLState, Metrics]]:
    """PPO's update: rollout values, KL-shaped token rewards, GAE, then epochs x minibatches of
    policy and value updates, then the KL controller.

    1. `V_old` (critic) and, when needed, `logp_old` by a forward pass before any update;
    2. `r_t = per_token_rewards(scores, m, kl=logp_old - logp_ref, kl_coef=beta)` (KL in reward);
    3. `A, R = gae(r, V_old, m, gamma, lam)`, `A` whitened over the batch;
    4. per minibatch: `L_pi = aggregate(ppo_clip(logp, logp_old, A, m) [+ beta k(logp, logp_ref)]
       [- c_H H]) [+ ptx_coef * LM loss on ptx data]`, `L_V = vf_coef * aggregate(value_loss(V, V_old,
       R, m))`, each with its optimizer (or summed, for a value head on the policy's backbone);
    5. `beta <- controller.update(beta, mean_b sum_t (logp_old - logp_ref), N)`.

    Args:
      policy_model: the policy `CausalLM` (LM head).
      policy_optimizer: its optax transform (for the shared backbone, of the whole
        `{"lm", "value_head"}` tree).
      config: a `PPOConfig`.
      value_model: the critic, a `CausalLM(..., head="scalar")` with its own `TrainState` in
        `state.value`; None = a value head on the policy's backbone (`state.value` is None).
      value_optimizer: the critic's optax transform (required with `value_model`).
      nonfinite: the NaN/Inf guard of each update.
      learning_rate: the policy's schedule, reported as `learning_rate`.

    Returns:
      The pure `step(state, batch) -> (state, metrics)`. Metrics: those of `make_grpo_step` plus
      `value_loss`, `value_clipfrac`, `explained_variance`, `values/mean`, `returns/mean`,
      `kl_coef`, `loss/ptx` (with PPO-ptx), `value/grad_norm` (separate critic).

    References: Schulman et al. 2017 (PPO); Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT,
    PPO-ptx); Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
    """
    if not isinstance(config, PPOConfig):
        raise TypeError(f"make_ppo_step: config must be a PPOConfig, got {type(config).__name__}")
    shared = value_model is None
    if not shared and value_optimizer is None:
        raise ValueError("make_ppo_step: a separate value_model needs a value_optimizer")
    controller = config.kl_controller()
    old_source = _old_logprobs_source(config)
    if shared and old_source == "current":
        old_source = "recompute"  # the values' forward pass gives the log-probs for free

    def lm_params(params):
        return params["lm"] if shared else params

    def policy_forward(params, mb, *, with_entropy: bool):
        """Log-probs, entropies and (shared backbone) values of a minibatch from one forward pass."""
        hidden = completion_hidden(policy_model, lm_params(params), mb["prompt_tokens"], mb["prompt_lengths"],
                                   mb["completion_tokens"])
        logps, entropy = head_logprobs(hidden, policy_model.lm_head_weight(lm_params(params)), mb["completion_tokens"],
                                       temperature=config.temperature, with_entropy=with_entropy,
                                       chunk_size=config.chunk_size)
        values = scalar_head(params["value_head"], hidden) if shared else None
        return logps, entropy, values

    def critic(vparams, mb):
        return completion_values(value_model, vparams, mb["prompt_tokens"], mb["prompt_lengths"],
                                 mb["completion_tokens"])

    def value_terms(values, mb, norm, metrics):
        per_token = value_loss(values, mb["old_values"], mb["returns"], mb["completion_mask"],
                               clip_range=config.value_clip)
        vl = _aggregate(config, per_token, mb["completion_mask"], **norm)
        metrics["value_loss"] = vl
        if config.value_clip is not None:
            clipped = jnp.abs(values - mb["old_values"]) > config.value_clip
            metrics["value_clipfrac"] = _checks.masked_mean(clipped.astype(jnp.float32), mb["completion_mask"])
        return config.vf_coef * vl

    def ptx_term(params, mb, context, metrics):
        tokens, mask = mb["ptx_tokens"], mb["ptx_mask"]
        hidden = policy_model.forward(lm_params(params), tokens[:, :-1]).hidden
        logps, _ = head_logprobs(hidden, policy_model.lm_head_weight(lm_params(params)), tokens[:, 1:],
                                 chunk_size=config.chunk_size)
        lm_loss = -aggregate(logps, mask[:, 1:], mode="token_mean", num_tokens=context["ptx_tokens"])
        metrics["loss/ptx"] = lm_loss
        return config.ptx_coef * lm_loss

    def policy_loss_fn(params, mb, context, rng):
        del rng
        norm = {"num_tokens": context["num_tokens"], "num_sequences": context["num_sequences"]}
        mask = mb["completion_mask"]
        logps, entropy, values = policy_forward(params, mb, with_entropy=True)
        old = jax.lax.stop_gradient(logps) if old_source == "current" else mb["old_logps"]
        per_token, metrics = _policy_loss("ppo", config, logps, old, mb["advantages"], mask)
        metrics = dict(metrics)
        metrics["loss/policy"] = _aggregate(config, per_token, mask, **norm)
        per_token = per_token + _reference_and_entropy_terms(config, logps, mb.get("ref_logps"), entropy, mask,
                                                             metrics, kl_coef=context["kl_coef"])
        loss = _aggregate(config, per_token, mask, **norm)
        if shared:
            loss = loss + value_terms(values, mb, norm, metrics)
        if "ptx_tokens" in mb and config.ptx_coef > 0:
            loss = loss + ptx_term(params, mb, context, metrics)
        if "sampler_logps" in mb:
            metrics.update(_sampler_diff(logps, mb["sampler_logps"], mask))
        return loss, metrics

    def value_loss_fn(vparams, mb, context, rng):
        del rng
        metrics: Metrics = {}
        norm = {"num_tokens": context["num_tokens"], "num_sequences": context["num_sequences"]}
        return value_terms(critic(vparams, mb), mb, norm, metrics), metrics

    def update(carry, mb):
        policy, value, kl_coef = carry
        context = {**_normalisers(mb["completion_mask"]), "kl_coef": kl_coef}
        if "ptx_mask" in mb:
            context["ptx_tokens"] = _checks.safe_denominator(jnp.sum(_checks.mask_f32(mb["ptx_mask"][:, 1:])))
        rng = jax.random.fold_in(policy.rng, policy.step)
        loss, grads, metrics = accumulate_gradients(policy_loss_fn, policy.params, mb, context, rng,
                                                    micro_batches=config.micro_batches)
        policy, opt_metrics = apply_gradients(policy, grads, loss, policy_optimizer, nonfinite=nonfinite,
                                              learning_rate=learning_rate)
        metrics = {"loss": loss, **metrics, **opt_metrics}
        if not shared:
            vloss, vgrads, vmetrics = accumulate_gradients(value_loss_fn, value.params, mb, context, rng,
                                                           micro_batches=config.micro_batches)
            value, vopt = apply_gradients(value, vgrads, vloss, value_optimizer, nonfinite=nonfinite)
            metrics.update(vmetrics)
            metrics["value/grad_norm"] = vopt["grad_norm"]
            metrics["nonfinite"] = metrics["nonfinite"] + vopt.get("nonfinite", 0.0)
        return (policy, value, kl_coef), metrics

    def step(state: RLState, batch) -> tuple[RLState, Metrics]:
        check_rl_batch(batch, config, name="ppo_step")
        if state.kl is None:
            raise ValueError("ppo_step: state.kl is None; initialise it with config.kl_controller().init()")
        if shared != (state.value is None):
            raise ValueError("ppo_step: state.value must be None exactly when the value head shares the "
                             f"policy's backbone (value_model is None); got value_model="
                             f"{'None' if shared else 'a model'} and state.value="
                             f"{'None' if state.value is None else 'a TrainState'}")
        policy, value = state.policy, state.value
        rng = jax.random.fold_in(policy.rng, policy.step)
        mask = batch["completion_mask"]
        data = {k: batch[k] for k in batch if k != "scores"}
        if shared:
            logps, _, old_values = policy_forward(policy.params, batch, with_entropy=False)
            old_logps = jax.lax.stop_gradient(logps)
        else:
            old_values = critic(value.params, batch)
            old_logps = None
            if old_source == "recompute":
                old_logps = jax.lax.stop_gradient(_mb_logprobs(policy_model, policy.params, batch, config,
                                                               with_entropy=False)[0])
        if old_source == "sampler":
            old_logps = batch["sampler_logps"]
        old_values = jax.lax.stop_gradient(_checks.apply_mask(old_values, mask))
        if old_source != "current":
            data["old_logps"] = old_logps
        kl_coef = state.kl.kl_coef
        kl_metrics: Metrics = {}
        kl_tokens = None
        if "ref_logps" in batch and old_logps is not None:
            kl_tokens = _checks.apply_mask(_checks.f32(old_logps) - _checks.f32(batch["ref_logps"]), mask)
            kl_metrics["kl/rollout_sequence"] = jnp.mean(jnp.sum(kl_tokens, axis=1))
        in_reward = config.kl_mode == "reward" and config.kl_coef > 0
        rewards = per_token_rewards(batch["scores"], mask, kl=kl_tokens if in_reward else None, kl_coef=kl_coef)
        advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)
        data.update(advantages=advantages, returns=returns, old_values=old_values)
        (policy, value, _), stacked = _run_updates(update, (policy, value, kl_coef), data, rng=rng,
                                                   num_epochs=config.num_epochs,
                                                   num_minibatches=config.num_minibatches)
        metrics = _reduce_update_metrics(stacked)
        metrics.update(kl_metrics)
        metrics.update({
            "kl_coef": kl_coef,
            "explained_variance": _explained_variance(old_values, returns, mask),
            "values/mean": _checks.masked_mean(old_values, mask),
            "returns/mean": _checks.masked_mean(returns, mask),
            "advantages/mean": _checks.masked_mean(advantages, mask),
            "rewards/token_mean": _checks.masked_mean(rewards, mask),
            **_rollout_stats(batch),
        })
        kl_state = state.kl
        if config.uses_reference and "kl/rollout_sequence" in kl_metrics:
            kl_state = controller.update(state.kl, kl_metrics["kl/rollout_sequence"], mask.shape[0])
        return RLState(policy, state.reference, value, kl_state), metrics

    return step
