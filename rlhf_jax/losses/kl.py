"""Per-token estimators of KL(pi || pi_ref) from sampled tokens."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks

KLEstimator = Literal["k1", "k2", "k3"]


def kl_divergence(
    logps: jax.Array,
    ref_logps: jax.Array,
    *,
    estimator: KLEstimator = "k1",
    clamp: float | None = None,
) -> jax.Array:
    """Single-sample estimate of KL(pi || pi_ref) at each sampled token.

    With `d = log pi(y_t) - log pi_ref(y_t)` for `y_t ~ pi`:
    - `k1 = d` (unbiased, high variance, can be negative),
    - `k2 = d^2 / 2` (biased, low variance; its gradient is the KL gradient on-policy),
    - `k3 = exp(-d) - 1 + d` (unbiased, non-negative, low variance; GRPO's penalty).
    Each is exactly 0 where `logps == ref_logps`. With `clamp = c`, the result is clipped to
    `[-c, c]`. k3 is evaluated with `d` clipped below at -20 so that `exp(-d)` cannot overflow
    (there its value is `e^20 - 21` and its gradient 0); above, it is exact: where the policy has
    drifted far from the reference (`d > 20`), k3 ~ `d - 1` keeps its gradient ~1. With
    `estimator="k3", clamp=10.0` this is verl's `low_var_kl`.

    Args:
      logps: `[...]` float log-probs of the sampled tokens under the policy (arrays or nested lists).
      ref_logps: `[...]` same under the reference policy.
      estimator: `"k1"`, `"k2"` or `"k3"`.
      clamp: optional bound `c > 0` on the estimate.

    Returns:
      float32 `[...]` per-token estimates (unmasked: reduce with `aggregate`).

    Reference: J. Schulman, "Approximating KL Divergence" (2020); Shao et al. 2024 (DeepSeekMath,
    GRPO) for k3 as a loss.

    Example:
      >>> logps, ref_logps = jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.5]))  # d = +-log 2
      >>> [[round(v, 4) for v in kl_divergence(logps, ref_logps, estimator=e).tolist()] for e in ("k1", "k2", "k3")]
      [[0.6931, -0.6931], [0.2402, 0.2402], [0.1931, 0.3069]]
    """
    fn = "kl_divergence"
    logps, ref_logps = _checks.as_array(fn, "logps", logps), _checks.as_array(fn, "ref_logps", ref_logps)
    _checks.check_choice(fn, "estimator", estimator, get_args(KLEstimator))
    _checks.check_same_shape(fn, logps=logps, ref_logps=ref_logps)
    _checks.check_floating(fn, "logps", logps)
    _checks.check_floating(fn, "ref_logps", ref_logps)
    if clamp is not None:
        _checks.check_positive(fn, "clamp", clamp)
    d = _checks.f32(logps) - _checks.f32(ref_logps)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * jnp.square(d)
    else:
        d = jnp.maximum(d, -20.0)
        kl = jnp.expm1(-d) + d
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl
