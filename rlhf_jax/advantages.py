"""Advantage estimators and reward shaping for policy-gradient RLHF.

Per-token quantities are `[B, T]` with an explicit completion mask; masked positions are skipped by
the recursions (they pass values through, so interleaved tool/observation tokens are handled too)
and are 0 in every output. Group estimators take `[N]` rewards with the `group_size` samples of a
prompt stored contiguously; ReMax takes `[N]` rewards and, row for row, the reward of the row's
prompt's greedy completion. Everything returns float32. The KL controllers live in
`rlhf_jax.kl_control` and are re-exported here.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks
from rlhf_jax.kl_control import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)

__all__ = [
    "GroupScale",
    "gae",
    "discounted_returns",
    "group_normalized",
    "leave_one_out",
    "remax",
    "reinforce_plus_plus",
    "whiten",
    "per_token_rewards",
    "KLController",
    "KLControllerState",
    "fixed_kl_controller",
    "adaptive_kl_controller",
]

GroupScale = Literal["group", "batch", "none"]


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalized Advantage Estimation by a reverse `lax.scan` over time.

    Over the valid (masked-in) positions `t < t' < ...` of a row, with `t'` the next valid one:
    `delta_t = r_t + gamma V_t' - V_t`, `A_t = delta_t + gamma lam A_t'`, `R_t = A_t + V_t`;
    after the last valid token `V = A = 0` (the completion is terminal). Masked positions are
    skipped and set to 0 in the outputs.

    Args:
      rewards: `[B, T]` per-token rewards (e.g. from `per_token_rewards`).
      values: `[B, T]` value estimates at rollout time.
      mask: `[B, T]` completion mask.
      gamma: discount in [0, 1].
      lam: GAE lambda in [0, 1]; `lam = 1` gives Monte-Carlo returns minus values.

    Returns:
      `(advantages, returns)`, both float32 `[B, T]`. Reference: Schulman et al. 2016,
      "High-Dimensional Continuous Control Using Generalized Advantage Estimation".

    Example:
      >>> rewards, values = jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.5, 0.5]])
      >>> advantages, returns = gae(rewards, values, jnp.array([[1, 1, 1]]), gamma=1.0, lam=0.5)
      >>> advantages.tolist(), returns.tolist()  # deltas 0, 0, 0.5 discounted by gamma * lam = 0.5
      ([[0.125, 0.25, 0.5]], [[0.625, 0.75, 1.0]])
    """
    fn = "gae"
    _checks.check_rank(fn, "rewards", rewards, 2)
    _checks.check_same_shape(fn, rewards=rewards, values=values, mask=mask)
    _checks.check_range(fn, "gamma", gamma, 0.0, 1.0)
    _checks.check_range(fn, "lam", lam, 0.0, 1.0)
    m = _checks.mask_f32(mask)
    r = _checks.apply_mask(_checks.f32(rewards), m)
    v = _checks.apply_mask(_checks.f32(values), m)

    def step(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        adv = r_t + gamma * next_value - v_t + gamma * lam * next_adv
        valid = m_t != 0
        carry = (jnp.where(valid, v_t, next_value), jnp.where(valid, adv, next_adv))
        return carry, jnp.where(valid, adv, 0.0)

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    advantages = adv_t.T
    return advantages, _checks.apply_mask(advantages + v, m)


def discounted_returns(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """Reward-to-go over the valid tokens: `G_t = r_t + gamma G_t'` (`t'` the next valid token).

    Equal to `gae(rewards, 0, mask, gamma=gamma, lam=1)[0]`, which is how it is computed.

    Args:
      rewards: `[B, T]` per-token rewards.
      mask: `[B, T]` completion mask.
      gamma: discount in [0, 1].

    Returns:
      float32 `[B, T]`, 0 where the mask is 0.

    Example:
      >>> discounted_returns(jnp.array([[1.0, 0.0, 2.0, 5.0]]), jnp.array([[1, 1, 1, 0]]), gamma=0.5).tolist()
      [[1.5, 1.0, 2.0, 0.0]]
    """
    _checks.check_rank("discounted_returns", "rewards", rewards, 2)
    returns, _ = gae(rewards, jnp.zeros(jnp.shape(rewards), jnp.float32), mask, gamma=gamma, lam=1.0)
    return returns


def _grouped(fn: str, rewards: jax.Array, group_size: int) -> jax.Array:
    """Validate and reshape `[N]` rewards to `[N / G, G]`, shifted by each group's first reward.

    The shift makes identical rewards give exactly 0 (no rounding residue from the mean).
    """
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"{fn}: group_size must be a Python int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"{fn}: group_size must be >= 2 (a group baseline needs at least two samples per prompt), "
            f"got {group_size}"
        )
    _checks.check_rank(fn, "rewards", rewards, 1)
    n = jnp.shape(rewards)[0]
    if n % group_size:
        raise ValueError(f"{fn}: rewards length {n} is not divisible by group_size {group_size}")
    r = _checks.f32(rewards).reshape(n // group_size, group_size)
    return r - r[:, :1]


def group_normalized(
    rewards: jax.Array, group_size: int, *, scale: GroupScale = "group", eps: float = 1e-4
) -> jax.Array:
    """Group-relative advantages: each reward minus its group's mean, optionally scaled by a std.

    `A_i = (r_i - mean_g(r)) / (std + eps)` with `std` the unbiased standard deviation of the
    group (`scale="group"`, GRPO) or of the whole batch (`"batch"`), or `A_i = r_i - mean_g(r)`
    (`"none"`, Dr.GRPO). A group of identical rewards gets exactly 0.

    Args:
      rewards: `[N]` scalar rewards, the `group_size` completions of each prompt contiguous.
      group_size: samples per prompt `G >= 2` (static Python int).
      scale: `"group"`, `"batch"` or `"none"`.
      eps: added to the std, >= 0.

    Returns:
      float32 `[N]` per-sequence advantages (pass to `ppo_policy_loss` as `[B]`).

    References: Shao et al. 2024, "DeepSeekMath" (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective" (Dr.GRPO).

    Example:
      >>> rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of 3
      >>> [round(v, 4) for v in group_normalized(rewards, 3, scale="none").tolist()]  # Dr.GRPO: minus the mean
      [0.6667, -0.3333, -0.3333, 0.0, 0.0, 0.0]
      >>> [round(v, 4) for v in group_normalized(rewards, 3, eps=0.0).tolist()]  # GRPO: / the std 0.5774; 0 if tied
      [1.1547, -0.5774, -0.5774, 0.0, 0.0, 0.0]
    """
    fn = "group_normalized"
    _checks.check_choice(fn, "scale", scale, get_args(GroupScale))
    _checks.check_nonnegative(fn, "eps", eps)
    d = _grouped(fn, rewards, group_size)
    centered = d - jnp.mean(d, axis=1, keepdims=True)
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (group_size - 1))
    else:
        std = jnp.std(_checks.f32(rewards), ddof=1)
    # A zero std means every centred value is exactly 0: divide by 1 rather than 0 (eps may be 0).
    return (centered / _checks.safe_denominator(std + eps)).reshape(-1)


def leave_one_out(rewards: jax.Array, group_size: int) -> jax.Array:
    """RLOO advantages: each reward minus the mean of the *other* rewards of its group.

    `A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) (r_i - mean_g(r))`.

    Args:
      rewards: `[N]` scalar rewards, groups of `group_size` contiguous.
      group_size: samples per prompt `G >= 2`.

    Returns:
      float32 `[N]`. Reference: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
      Optimization for Learning from Human Feedback in LLMs" (Kool et al. 2019 for the estimator).

    Example:
      >>> leave_one_out(jnp.array([1.0, 0.0, 0.0, 4.0]), 2).tolist()  # each minus the other one of its pair
      [1.0, -1.0, -4.0, 4.0]
    """
    d = _grouped("leave_one_out", rewards, group_size)
    others = (jnp.sum(d, axis=1, keepdims=True) - d) / (group_size - 1)
    return (d - others).reshape(-1)


def remax(rewards: jax.Array, baseline_rewards: jax.Array) -> jax.Array:
    """ReMax advantages: each sampled completion's reward minus that of its prompt's greedy completion.

    `A_i = r(x_i, y_i) - r(x_i, ybar_i)`, `y_i ~ pi(. | x_i)` sampled and `ybar_i` the greedy
    (argmax) decoding of the same prompt under the same policy: REINFORCE with the greedy reward as
    a per-prompt baseline (Algorithm 1 of the paper). The baseline needs no critic and no group, so
    one sample per prompt suffices; with several, each row carries its prompt's baseline.

    Args:
      rewards: `[N]` rewards of the sampled completions (any KL penalty already subtracted).
      baseline_rewards: `[N]` the reward of the greedy completion of each row's prompt.

    Returns:
      float32 `[N]` per-sequence advantages (pass to `ppo_policy_loss` as `[B]`). Reference: Li,
      Xu, Zhang, Lin, Yu, Sun, Luo 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement
      Learning Method for Aligning Large Language Models" (arXiv 2310.10505).

    Example:
      >>> remax(jnp.array([1.0, 0.0, 0.25]), jnp.array([0.5, 0.5, 0.25])).tolist()  # sample beat greedy: > 0
      [0.5, -0.5, 0.0]
    """
    fn = "remax"
    rewards = _checks.as_array(fn, "rewards", rewards)
    baseline_rewards = _checks.as_array(fn, "baseline_rewards", baseline_rewards)
    _checks.check_rank(fn, "rewards", rewards, 1)
    _checks.check_rank(fn, "baseline_rewards", baseline_rewards, 1)
    _checks.check_same_shape(fn, rewards=rewards, baseline_rewards=baseline_rewards)
    return _checks.f32(rewards) - _checks.f32(baseline_rewards)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Normalise to zero mean and unit variance over the masked entries of the whole batch.

    `(x - mu) / sqrt(sigma^2 + eps)` with the masked mean `mu` and (population) variance `sigma^2`;
    with `shift_mean=False` the mean is added back (only the scale changes). Values equal over the
    mask give exactly 0 (the mean is taken of `x` minus its first masked-in value, so it has no
    rounding residue to amplify by `1 / sqrt(eps)`), and a zero `sigma^2 + eps` divides by 1, not 0.

    Args:
      x: `[...]` values, e.g. advantages `[B, T]`.
      mask: `[...]` mask of the same shape.
      shift_mean: keep the result centred (True) or restore the mean (False).
      eps: variance floor, >= 0.

    Returns:
      float32, shaped like `x`, 0 where the mask is 0.

    Example:
      >>> [round(v, 4) for v in whiten(jnp.array([[1.0, 3.0, 100.0]]), jnp.array([[1, 1, 0]]))[0].tolist()]
      [-1.0, 1.0, 0.0]
    """
    fn = "whiten"
    _checks.check_same_shape(fn, x=x, mask=mask)
    _checks.check_nonnegative(fn, "eps", eps)
    v = _checks.f32(x)
    if v.size == 0:
        return v
    first = jnp.argmax(jnp.reshape(_checks.mask_f32(mask) != 0, -1))
    shift = jnp.reshape(v, -1)[first]
    d = v - shift
    mean = _checks.masked_mean(d, mask)
    var = _checks.masked_mean(jnp.square(d - mean), mask)
    out = (d - mean) / _checks.safe_denominator(jnp.sqrt(var + eps))
    if not shift_mean:
        out = out + (mean + shift)
    return _checks.apply_mask(out, mask)


def per_token_rewards(
    scores: jax.Array,
    mask: jax.Array,
    *,
    kl: jax.Array | None = None,
    kl_coef: float | jax.Array = 0.0,
) -> jax.Array:
    """PPO's per-token reward: the sequence score at the last valid token, minus beta * KL everywhere.

    `r_t = -beta KL_t m_t + [t = last valid token] score`. A row with an empty mask gets 0.

    Args:
      scores: `[B]` sequence-level rewards (reward model, verifier).
      mask: `[B, T]` completion mask (right padded, or with masked holes: the last 1 counts).
      kl: `[B, T]` per-token KL estimates (`kl_divergence(logps, ref_logps)`), or None.
      kl_coef: `beta >= 0`, a number or a traced scalar (e.g. `KLControllerState.kl_coef`).

    Returns:
      float32 `[B, T]`. Reference: Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT).

    Example:
      >>> mask, kl = jnp.array([[1, 1, 1, 0]]), jnp.array([[0.5, 1.0, 0.0, 0.0]])
      >>> rewards = per_token_rewards(jnp.array([2.0]), mask, kl=kl, kl_coef=0.1)  # score at the last valid token
      >>> [round(v, 4) for v in rewards[0].tolist()]
      [-0.05, -0.1, 2.0, 0.0]
    """
    fn = "per_token_rewards"
    scores, mask = _checks.as_array(fn, "scores", scores), _checks.as_array(fn, "mask", mask)
    _checks.check_rank(fn, "mask", mask, 2)
    _checks.check_rank(fn, "scores", scores, 1)
    if scores.shape[0] != mask.shape[0]:
        raise ValueError(f"{fn}: scores {list(scores.shape)} must have one entry per mask row, mask {list(mask.shape)}")
    _checks.check_nonnegative(fn, "kl_coef", kl_coef)
    m = _checks.mask_f32(mask)
    t = m.shape[1]
    present = m != 0
    last = t - 1 - jnp.argmax(present[:, ::-1], axis=1)
    at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(present, axis=1, keepdims=True)
    rewards = jnp.where(at_last, _checks.f32(scores)[:, None], 0.0)
    if kl is not None:
        _checks.check_same_shape(fn, kl=kl, mask=mask)
        rewards = rewards - _checks.f32(kl_coef) * _checks.apply_mask(_checks.f32(kl), m)
    return rewards


def reinforce_plus_plus(
    scores: jax.Array,
    mask: jax.Array,
    *,
    kl: jax.Array | None = None,
    kl_coef: float | jax.Array = 0.0,
    gamma: float = 1.0,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """REINFORCE++ advantages: reward-to-go of KL-shaped token rewards, whitened over the batch.

    1. (with `group_size`, "REINFORCE++-baseline") `score_i -= mean of its group`;
    2. `r = per_token_rewards(score, mask, kl=kl, kl_coef=beta)`;
    3. `G = discounted_returns(r, mask, gamma)`;
    4. `A = whiten(G, mask)` over every valid token of the batch (global, not per group).

    Args:
      scores: `[B]` sequence rewards.
      mask: `[B, T]` completion mask.
      kl: optional `[B, T]` per-token KL estimates folded into the reward.
      kl_coef: `beta >= 0`.
      gamma: discount in [0, 1].
      group_size: subtract a per-prompt group mean first (groups contiguous), or None.
      eps: whitening variance floor.

    Returns:
      float32 `[B, T]` per-token advantages. Reference: Hu 2025, "REINFORCE++: A Simple and
      Efficient Approach for Aligning Large Language Models".

    Example:
      >>> mask = jnp.array([[1, 1], [1, 1]])
      >>> advantages = reinforce_plus_plus(jnp.array([1.0, 0.0]), mask)  # returns [1, 1 | 0, 0], whitened
      >>> [[round(v, 4) for v in row] for row in advantages.tolist()]
      [[1.0, 1.0], [-1.0, -1.0]]
    """
    if group_size is not None:
        scores = group_normalized(scores, group_size, scale="none")
    rewards = per_token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    return whiten(discounted_returns(rewards, mask, gamma=gamma), mask, eps=eps)
