"""Supervised fine-tuning (next-token cross-entropy) loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import _checks
from rlhf_jax.losses.aggregate import check_loss_mask
from rlhf_jax.logprobs import token_logprobs


def sft_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood of the labels, zero where `mask` is 0.

    `l_t = -m_t log softmax(logits_t)[y_t]` (float32, temperature 1). Reduce with `aggregate`
    (`token_mean` is the usual SFT objective). Labels at masked positions may hold any value
    (e.g. -100); they are never gathered. A label outside `[0, V)` where the mask is set would give
    NaN: with concrete (non-traced) labels and mask it raises ValueError instead.

    With the chunked head the same loss is `-chunked_token_logprobs(hidden, w, labels) * mask`.

    Args:
      logits: `[B, T, V]` logits aligned with `labels` (see `next_token_targets`).
      labels: `[B, T]` integer targets.
      mask: `[B, T]` bool or 0/1 loss mask (completion tokens only, for chat SFT).

    Returns:
      float32 `[B, T]` per-token losses.

    Reference: standard maximum-likelihood training; for chat data the mask covers assistant
    turns only (Ouyang et al. 2022, "Training language models to follow instructions").

    Example:
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
      >>> [round(v, 4) for v in sft_loss(logits, jnp.array([[0, 1]]), jnp.array([[1, 1]]))[0].tolist()]
      [0.6931, 0.2231]
    """
    fn = "sft_loss"
    labels, mask = _checks.as_array(fn, "labels", labels), _checks.as_array(fn, "mask", mask)
    _checks.check_rank(fn, "logits", logits, 3)
    _checks.check_same_shape(fn, labels=labels, mask=mask)
    _checks.check_integer(fn, "labels", labels)
    check_loss_mask(fn, mask)
    y, m = _checks.host_values(labels), _checks.host_values(mask)
    if y is not None and m is not None:  # values on the host: checked without a device round trip
        vocab = jnp.shape(logits)[-1]
        bad = (m != 0) & ((y < 0) | (y >= vocab))
        if np.any(bad):
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{fn}: labels must be in [0, {vocab}) where mask is set, got {int(y[where])} at {where} "
                             f"({int(bad.sum())} such positions); exclude ignored positions (e.g. label -100) from "
                             f"the mask, e.g. mask = labels != -100")
    safe_labels = jnp.where(_checks.mask_f32(mask) != 0, labels, 0)
    return -_checks.apply_mask(token_logprobs(logits, safe_labels), mask)
