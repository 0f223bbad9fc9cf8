"""Pairwise reward-model loss (Bradley-Terry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import _checks


def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_rewards_coefficient: float = 0.0,
) -> jax.Array:
    """Per-pair Bradley-Terry negative log-likelihood, with optional margin and reward centering.

    `l = -log sigmoid(r_c - r_r - margin) + eta * (r_c + r_r)^2`

    The margin term is Llama 2's (Touvron et al. 2023): pairs rated further apart must be
    separated by more. The centering term (`eta = center_rewards_coefficient`, Eisenstein et al.
    2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking") pulls the rewards towards zero mean, which the pairwise loss leaves free.

    Args:
      chosen_rewards: `[B]` scalar rewards of the preferred responses.
      rejected_rewards: `[B]` scalar rewards of the dispreferred responses.
      margin: optional `[B]` (or scalar) required reward gap.
      center_rewards_coefficient: `eta >= 0`; TRL's `center_rewards_coefficient` (0.01 is common).

    Returns:
      float32 `[B]` per-pair losses. Reference: Bradley & Terry 1952; Ouyang et al. 2022.

    Example:
      >>> [round(v, 4) for v in bradley_terry_loss(jnp.array([2.0, 0.0]), jnp.array([0.0, 0.0])).tolist()]
      [0.1269, 0.6931]
      >>> round(float(bradley_terry_loss(jnp.array([2.0]), jnp.array([0.0]), margin=2.0)[0]), 4)  # gap 2 - 2: log 2
      0.6931
    """
    fn = "bradley_terry_loss"
    _checks.check_rank(fn, "chosen_rewards", chosen_rewards, 1)
    _checks.check_same_shape(fn, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    _checks.check_nonempty(fn, "chosen_rewards", chosen_rewards)
    _checks.check_nonnegative(fn, "center_rewards_coefficient", center_rewards_coefficient)
    c, r = _checks.f32(chosen_rewards), _checks.f32(rejected_rewards)
    diff = c - r
    if margin is not None:
        if jnp.ndim(margin) not in (0, 1) or (jnp.ndim(margin) == 1 and jnp.shape(margin) != c.shape):
            raise ValueError(
                f"{fn}: margin must be a scalar or shaped like chosen_rewards {c.shape}, got {jnp.shape(margin)}"
            )
        diff = diff - _checks.f32(margin)
    loss = jax.nn.softplus(-diff)
    if not (_checks.is_number(center_rewards_coefficient) and center_rewards_coefficient == 0):
        loss = loss + _checks.f32(center_rewards_coefficient) * jnp.square(c + r)
    return loss
