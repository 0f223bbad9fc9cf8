"""Policy-gradient surrogate losses: PPO clip (asymmetric, dual-clip, token or sequence ratio) and CISPO.

All take per-token log-probs under the current policy (`logps`) and under the policy that sampled
the data (`old_logps`, no gradient), advantages `[B]` (one per sequence: GRPO, RLOO) or `[B, T]`
(GAE), and a `[B, T]` completion mask. They return float32 `[B, T]` losses, zero where the mask is
0, and a metrics dict of masked means; reduce the loss with `aggregate`.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks
from rlhf_jax.losses.aggregate import check_loss_mask

RatioLevel = Literal["token", "sequence"]
Metrics = dict[str, jax.Array]

# Log importance ratios are clamped to this range before `exp` so that a stale or diverged token
# cannot overflow; the clip range of any useful setting lies far inside it.
_MAX_LOG_RATIO = 20.0


def _check_policy_inputs(
    fn: str, logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array
) -> jax.Array:
    """Validate shapes and return the advantages as float32 `[B, T]`."""
    _checks.check_rank(fn, "logps", logps, 2)
    _checks.check_same_shape(fn, logps=logps, old_logps=old_logps, mask=mask)
    _checks.check_floating(fn, "logps", logps)
    _checks.check_floating(fn, "old_logps", old_logps)
    check_loss_mask(fn, mask)
    adv = _checks.f32(advantages)
    if adv.ndim == 1 and adv.shape[0] == logps.shape[0]:
        return jnp.broadcast_to(adv[:, None], logps.shape)
    if adv.shape == logps.shape:
        return adv
    raise ValueError(
        f"{fn}: advantages must be [B] = [{logps.shape[0]}] or [B, T] = {list(logps.shape)}, "
        f"got {list(adv.shape)}"
    )


def _approx_kl(token_log_ratio: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean of Schulman's k3 estimate of KL(pi_old || pi): `(rho - 1) - log rho`."""
    lr = jax.lax.stop_gradient(jnp.clip(token_log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return _checks.masked_mean(jnp.expm1(lr) - lr, mask)


def _frac(cond: jax.Array, mask: jax.Array) -> jax.Array:
    return _checks.masked_mean(cond.astype(jnp.float32), mask)


def ppo_policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: RatioLevel = "token",
) -> tuple[jax.Array, Metrics]:
    """PPO's clipped surrogate per token, with clip-higher, dual clip and sequence-level ratios (GSPO).

    `l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))`, and with dual clip
    `c > 1`, for `A_t < 0`: `l_t = min(l_t, -c A_t)` (bounds the loss of very large ratios).

    - `ratio_level="token"`: `rho_t = pi(y_t) / pi_old(y_t)` (PPO; GRPO with `[B]` advantages).
    - `ratio_level="sequence"` (GSPO): `rho_t = sg(s) * pi(y_t) / sg(pi(y_t))` with the
      length-normalised sequence ratio `s = exp(mean_t log(pi(y_t) / pi_old(y_t)))`: every token
      carries the value `s` (so clipping acts per sequence) and the gradient `s grad log pi(y_t)`;
      reduce with `aggregate(mode="seq_mean_token_mean")` to recover the paper's objective.

    Args:
      logps: `[B, T]` float32 log-probs of the sampled tokens under the current policy.
      old_logps: `[B, T]` log-probs under the sampling policy (treated as constants).
      advantages: `[B]` per-sequence or `[B, T]` per-token advantages.
      mask: `[B, T]` bool or 0/1 completion mask (weights go in `aggregate`'s mask only).
      clip_eps: lower clip `eps_low` (and upper, unless `clip_eps_high` is set), in (0, 1].
      clip_eps_high: upper clip `eps_high` > 0; DAPO's clip-higher uses 0.28 with `clip_eps=0.2`.
      dual_clip: the dual-clip constant `c > 1` (3.0 in the paper), or None.
      ratio_level: `"token"` or `"sequence"`.

    Returns:
      `(per_token_loss, metrics)`: float32 `[B, T]`; metrics (masked token means):
      `clip_ratio/low_mean` (`rho < 1 - eps_low` and `A < 0`), `clip_ratio/high_mean`
      (`rho > 1 + eps_high` and `A > 0`), `clip_ratio/region_mean` (either), `clip_ratio/dual_mean`
      (dual clip active), `approx_kl` (k3 estimate of KL(pi_old || pi) from the token ratios).

    References: Schulman et al. 2017 (PPO); Yu et al. 2025 (DAPO, clip-higher); Ye et al. 2020,
    "Mastering Complex Control in MOBA Games with Deep RL" (dual clip); Zheng et al. 2025, "Group
    Sequence Policy Optimization" (GSPO).

    Example:
      >>> logps, old_logps = jnp.log(jnp.array([[0.6, 0.3]])), jnp.log(jnp.array([[0.4, 0.3]]))  # ratios 1.5, 1
      >>> loss, metrics = ppo_policy_loss(logps, old_logps, jnp.array([1.0]), jnp.array([[1, 1]]), clip_eps=0.2)
      >>> [round(v, 4) for v in loss[0].tolist()], float(metrics["clip_ratio/high_mean"])  # 1.5 clipped to 1.2
      ([-1.2, -1.0], 0.5)
    """
    fn = "ppo_policy_loss"
    _checks.check_choice(fn, "ratio_level", ratio_level, get_args(RatioLevel))
    _checks.check_range(fn, "clip_eps", clip_eps, 0.0, 1.0)
    _checks.check_positive(fn, "clip_eps", clip_eps)
    if clip_eps_high is not None:
        _checks.check_positive(fn, "clip_eps_high", clip_eps_high)
    if dual_clip is not None and (dual_value := _checks.scalar_value(fn, "dual_clip", dual_clip)) is not None \
            and not dual_value > 1:
        raise ValueError(f"{fn}: dual_clip must be > 1 (or None), got {dual_clip!r}")
    adv = _check_policy_inputs(fn, logps, old_logps, advantages, mask)
    lp, old = _checks.f32(logps), jax.lax.stop_gradient(_checks.f32(old_logps))
    token_log_ratio = lp - old
    if ratio_level == "token":
        log_ratio = token_log_ratio
    else:
        seq_log_ratio = jax.lax.stop_gradient(_checks.masked_mean(token_log_ratio, mask, axis=-1))
        log_ratio = lp - jax.lax.stop_gradient(lp) + seq_log_ratio[:, None]
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    low = 1.0 - clip_eps
    high = 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, low, high))
    sg_ratio = jax.lax.stop_gradient(ratio)
    negative = adv < 0
    if dual_clip is None:
        dual_active = jnp.zeros_like(negative)
    else:
        dual_active = negative & (-adv * sg_ratio > -adv * dual_clip)
        loss = jnp.where(negative, jnp.minimum(loss, -adv * dual_clip), loss)
    is_low = (sg_ratio < low) & negative
    is_high = (sg_ratio > high) & (adv > 0)
    metrics = {
        "clip_ratio/low_mean": _frac(is_low, mask),
        "clip_ratio/high_mean": _frac(is_high, mask),
        "clip_ratio/region_mean": _frac(is_low | is_high, mask),
        "clip_ratio/dual_mean": _frac(dual_active, mask),
        "approx_kl": _approx_kl(token_log_ratio, mask),
    }
    return _checks.apply_mask(loss, mask), metrics


def cispo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps_high: float = 0.28,
    clip_eps_low: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """CISPO: REINFORCE with clipped, stop-gradient importance weights, so no token loses its gradient.

    `l_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A_t log pi(y_t)`, `rho_t = pi(y_t) / pi_old(y_t)`.
    Unlike PPO, a token whose ratio leaves the trust region still contributes its (down-weighted)
    gradient. With `clip_eps_low=None` there is no lower bound, as in the paper.

    Args:
      logps: `[B, T]` log-probs under the current policy.
      old_logps: `[B, T]` log-probs under the sampling policy.
      advantages: `[B]` or `[B, T]`.
      mask: `[B, T]` bool or 0/1 completion mask (weights go in `aggregate`'s mask only).
      clip_eps_high: upper bound `eps_high > 0` of the importance weight.
      clip_eps_low: lower bound `eps_low` in (0, 1], or None for none.

    Returns:
      `(per_token_loss, metrics)`: float32 `[B, T]`; metrics `clip_ratio/low_mean`,
      `clip_ratio/high_mean`, `clip_ratio/region_mean` (fractions of tokens whose weight was
      clipped) and `approx_kl`.

    Reference: MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention" (section 3.1).

    Example:
      >>> logps, old_logps = jnp.log(jnp.array([[0.6, 0.3]])), jnp.log(jnp.array([[0.4, 0.3]]))  # ratios 1.5, 1
      >>> loss, _ = cispo_loss(logps, old_logps, jnp.array([1.0]), jnp.array([[1, 1]]), clip_eps_high=0.2)
      >>> [round(v, 4) for v in loss[0].tolist()]  # -1.2 log 0.6, -1 log 0.3
      [0.613, 1.204]
    """
    fn = "cispo_loss"
    _checks.check_positive(fn, "clip_eps_high", clip_eps_high)
    if clip_eps_low is not None:
        _checks.check_positive(fn, "clip_eps_low", clip_eps_low)
        _checks.check_range(fn, "clip_eps_low", clip_eps_low, 0.0, 1.0)
    adv = _check_policy_inputs(fn, logps, old_logps, advantages, mask)
    lp = _checks.f32(logps)
    token_log_ratio = lp - jax.lax.stop_gradient(_checks.f32(old_logps))
    ratio = jax.lax.stop_gradient(jnp.exp(jnp.clip(token_log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)))
    high = 1.0 + clip_eps_high
    low = 0.0 if clip_eps_low is None else 1.0 - clip_eps_low
    weight = jnp.clip(ratio, low, high)
    loss = -weight * adv * lp
    is_low, is_high = ratio < low, ratio > high
    metrics = {
        "clip_ratio/low_mean": _frac(is_low, mask),
        "clip_ratio/high_mean": _frac(is_high, mask),
        "clip_ratio/region_mean": _frac(is_low | is_high, mask),
        "approx_kl": _approx_kl(token_log_ratio, mask),
    }
    return _checks.apply_mask(loss, mask), metrics
