"""Entropy bonus as a per-token loss term."""

from __future__ import annotations

import jax

from rlhf_jax import _checks
from rlhf_jax.losses.aggregate import check_loss_mask
from rlhf_jax.logprobs import token_entropy


def entropy_bonus(logits: jax.Array, mask: jax.Array, *, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Negative policy entropy per token: add `coef * aggregate(entropy_bonus(...))` to reward exploration.

    `l_t = -m_t H(softmax(logits_t / temperature))`. Minimising it raises the entropy.
    From hidden states, use `-chunked_token_entropy(hidden, w) * mask` instead.

    Args:
      logits: `[B, T, V]` logits.
      mask: `[B, T]` bool or 0/1 completion mask (weights go in `aggregate`'s mask only).
      temperature: sampling temperature (> 0).

    Returns:
      float32 `[B, T]`, zero where the mask is 0. Reference: Williams & Peng 1991; Mnih et al.
      2016 (A3C) for the entropy regulariser in policy gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]]])  # uniform over 4, near one-hot
      >>> [round(v, 4) for v in entropy_bonus(logits, jnp.array([[1, 1]]))[0].tolist()]  # -log 4 = -1.3863
      [-1.3863, -0.0037]
    """
    fn = "entropy_bonus"
    logits, mask = _checks.as_array(fn, "logits", logits), _checks.as_array(fn, "mask", mask)
    _checks.check_rank(fn, "logits", logits, 3)
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"{fn}: mask shape {mask.shape} must equal logits shape without vocab, {logits.shape[:-1]}")
    check_loss_mask(fn, mask)
    return -_checks.apply_mask(token_entropy(logits, temperature=temperature), mask)
