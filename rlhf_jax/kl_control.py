"""KL-penalty coefficient controllers as pure `(init, update)` pairs over a NamedTuple state.

Both controllers share `KLControllerState`, so a training state can hold either and a step calls
`controller.update(state, observed_kl, n_steps)` inside `jit` without knowing which one it is:

    >>> ctl = adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=10_000)
    >>> kl_state = ctl.init()
    >>> kl_state = jax.jit(ctl.update)(kl_state, 9.0, 1_000)  # observed KL 1.5x the target: error clipped to 0.2
    >>> round(float(kl_state.kl_coef), 6)  # 0.2 * (1 + 0.2 * 1000 / 10000)
    0.204
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import _checks

__all__ = ["KLControllerState", "KLController", "fixed_kl_controller", "adaptive_kl_controller"]


class KLControllerState(NamedTuple):
    """The current KL-penalty coefficient `beta` (float32 scalar)."""

    kl_coef: jax.Array


class KLController(NamedTuple):
    """`init() -> state` and `update(state, observed_kl, n_steps) -> state`, both pure and jittable."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jax.Array, jax.Array | int], KLControllerState]


def _check_update_args(fn: str, observed_kl: object, n_steps: object, horizon: float | None) -> None:
    """Trace-time checks of `update`'s arguments: a scalar KL (finite, when concrete: a NaN would stay in
    `kl_coef` for good), an integer `0 <= n_steps (<= horizon)`."""
    kl = _checks.scalar_value(fn, "observed_kl", observed_kl)
    if kl is not None and not math.isfinite(kl):
        raise ValueError(f"{fn}: observed_kl must be finite, got {observed_kl!r}")
    n = _checks.scalar_value(fn, "n_steps", n_steps)
    if _checks.is_number(n_steps):
        if not float(n_steps).is_integer():
            raise TypeError(f"{fn}: n_steps must be an integer, got {n_steps!r}")
    elif not jnp.issubdtype(jnp.result_type(n_steps), jnp.integer):
        raise TypeError(f"{fn}: n_steps must be an integer, got {n_steps!r} (dtype {jnp.result_type(n_steps)})")
    if n is None:
        return
    if n < 0:
        raise ValueError(f"{fn}: n_steps must be >= 0, got {n_steps!r}")
    if horizon is not None and _checks.is_number(horizon) and n > horizon:
        raise ValueError(f"{fn}: n_steps must be <= horizon ({horizon!r}) so that one update changes kl_coef by at "
                         f"most 20% and keeps it >= 0, got {n_steps!r}; raise the horizon or update more often")


def fixed_kl_controller(*, kl_coef: float) -> KLController:
    """A constant KL coefficient: `beta_{t+1} = beta_t`.

    Args:
      kl_coef: `beta >= 0`.

    Returns:
      A `KLController` whose `update` ignores the observed KL.

    Example:
      >>> ctl = fixed_kl_controller(kl_coef=0.05)
      >>> round(float(ctl.update(ctl.init(), 100.0, 64).kl_coef), 6)
      0.05
    """
    _checks.check_nonnegative("fixed_kl_controller", "kl_coef", kl_coef)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, observed_kl: jax.Array, n_steps: jax.Array | int) -> KLControllerState:
        _check_update_args("fixed_kl_controller.update", observed_kl, n_steps, None)
        return state

    return KLController(init=init, update=update)


def adaptive_kl_controller(*, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10_000) -> KLController:
    """Proportional controller that steers the observed KL towards a target (Ziegler et al. 2019).

    `e = clip(KL_obs / KL_target - 1, -0.2, 0.2)`, `beta_{t+1} = beta_t (1 + e n / H)` where `n` is
    the number of samples (or steps) the observation covers and `H` the horizon, i.e. the paper's
    `K_beta = n / H` (the same update as TRL's `AdaptiveKLController`).

    `update(state, observed_kl, n_steps)` requires a scalar `observed_kl` and an integer
    `0 <= n_steps <= H`: one update then moves `beta` by at most 20% (`|e n / H| <= 0.2`), so it
    stays positive. (Neither the paper nor TRL bounds `n`; with `n > 5 H` the factor would turn
    negative and so would `beta`.) A concrete `n_steps` outside that range raises ValueError; a
    traced one is not inspected. A concrete non-finite `observed_kl` raises ValueError; a traced NaN
    leaves `beta` unchanged (a NaN `beta` would never recover).

    Args:
      init_kl_coef: initial `beta > 0`.
      target: target KL per sequence (nats), > 0.
      horizon: `H > 0`; larger is slower.

    Returns:
      A `KLController`. Reference: Ziegler et al. 2019, "Fine-Tuning Language Models from Human
      Preferences", section 2.2.

    Example:
      >>> ctl = adaptive_kl_controller(init_kl_coef=0.1, target=4.0, horizon=100)
      >>> round(float(ctl.update(ctl.init(), 3.0, 10).kl_coef), 6)  # error 3/4 - 1 = -0.25, clipped to -0.2
      0.098
    """
    fn = "adaptive_kl_controller"
    _checks.check_positive(fn, "init_kl_coef", init_kl_coef)
    _checks.check_positive(fn, "target", target)
    _checks.check_positive(fn, "horizon", horizon)

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(state: KLControllerState, observed_kl: jax.Array, n_steps: jax.Array | int) -> KLControllerState:
        _check_update_args("adaptive_kl_controller.update", observed_kl, n_steps, horizon)
        kl = _checks.f32(observed_kl)
        error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
        mult = 1.0 + error * _checks.f32(n_steps) / horizon
        # A traced NaN KL (a NaN log-prob in a batch the step's guard skips) keeps beta: a NaN beta would
        # make every later reward NaN and so skip every later update. (+-inf clips to +-0.2 as any KL.)
        return KLControllerState(kl_coef=jnp.where(jnp.isnan(kl), state.kl_coef, state.kl_coef * mult))

    return KLController(init=init, update=update)
