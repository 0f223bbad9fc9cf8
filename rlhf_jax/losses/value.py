"""Clipped value-function loss for PPO critics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import _checks
from rlhf_jax.losses.aggregate import check_loss_mask


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_range: float | None = 0.2,
) -> jax.Array:
    """Per-token squared error of the value head, pessimistically clipped around the old values.

    `l_t = 1/2 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)`;
    with `clip_range=None`, `l_t = 1/2 (V_t - R_t)^2`.

    Args:
      values: `[B, T]` current value predictions.
      old_values: `[B, T]` value predictions at rollout time (constants).
      returns: `[B, T]` regression targets, e.g. the `returns` of `advantages.gae`.
      mask: `[B, T]` bool or 0/1 completion mask (weights go in `aggregate`'s mask only).
      clip_range: `c > 0`, or None for the unclipped loss.

    Returns:
      float32 `[B, T]`, zero where the mask is 0. Reference: Schulman et al. 2017 (PPO) as
      implemented in OpenAI baselines; Ziegler et al. 2019 for language models.

    Example:
      >>> values, old_values = jnp.array([[0.5, 2.0]]), jnp.array([[0.0, 2.0]])
      >>> returns, mask = jnp.array([[1.0, 1.0]]), jnp.array([[1, 1]])
      >>> [round(v, 4) for v in value_loss(values, old_values, returns, mask, clip_range=0.2)[0].tolist()]
      [0.32, 0.5]
    """
    fn = "value_loss"
    values, old_values, returns, mask = (_checks.as_array(fn, name, x) for name, x in (
        ("values", values), ("old_values", old_values), ("returns", returns), ("mask", mask)))
    _checks.check_rank(fn, "values", values, 2)
    _checks.check_same_shape(fn, values=values, old_values=old_values, returns=returns, mask=mask)
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        _checks.check_floating(fn, name, x)
    check_loss_mask(fn, mask)
    if clip_range is not None:
        _checks.check_positive(fn, "clip_range", clip_range)
    v = _checks.f32(values)
    ret = jax.lax.stop_gradient(_checks.f32(returns))
    loss = jnp.square(v - ret)
    if clip_range is not None:
        old = jax.lax.stop_gradient(_checks.f32(old_values))
        clipped = old + jnp.clip(v - old, -clip_range, clip_range)
        loss = jnp.maximum(loss, jnp.square(clipped - ret))
    return _checks.apply_mask(0.5 * loss, mask)
