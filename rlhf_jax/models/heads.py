"""Scalar heads on a transformer's final hidden states: values per token, rewards at the last token.

Right padding is the convention: a row's real tokens come first, and a reward model reads the final
hidden state of each row's last real token (as Hugging Face's `*ForSequenceClassification` does).
The same kernel shape serves a reward model (`CausalLM(config, head="scalar")`, its `score`
parameter) and a value head on a policy's shared backbone (`init_scalar_head`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_positive, check_rank
from rlhf_jax.models.config import ModelConfig

# Logical axis names of a scalar head's kernel (for placing it with a sharding rule table).
SCALAR_HEAD_AXES = ("embed",)


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last non-pad token.

    index_b = max{t : mask[b, t] != 0}, and 0 for a row without any real token (reading index 0 of
    an empty row is harmless; its value should be masked by the caller). With right padding this
    equals sum_t mask[b, t] - 1; taking the maximum index also serves packed or left-padded rows.

    Args:
      mask: [B, T], bool or numeric; nonzero marks real tokens.
    Returns:
      int32[B].

    Example:
      >>> last_token_index(jnp.array([[1, 1, 0], [1, 1, 1]]))   # [1, 2]
    """
    check_rank("last_token_index", "mask", mask, 2)
    mask = jnp.asarray(mask)
    t = mask.shape[1]
    idx = jnp.where(mask != 0, jnp.arange(t, dtype=jnp.int32)[None, :], -1)
    return jnp.maximum(jnp.max(idx, axis=1), 0).astype(jnp.int32)


def gather_last(values: jax.Array, mask: jax.Array) -> jax.Array:
    """values[b, last_token_index(mask)[b]]: read each row at its last non-pad token.

    Args:
      values: [B, T, ...], e.g. per-token scores [B, T] or hidden states [B, T, E].
      mask: [B, T], nonzero marks real tokens (right padding).
    Returns:
      [B, ...] with the dtype of `values`.
    """
    values = jnp.asarray(values)
    check_rank("gather_last", "mask", mask, 2)
    if values.ndim < 2 or values.shape[:2] != jnp.shape(mask):
        raise ValueError(
            f"gather_last: values must be [B, T, ...] with [B, T] = mask shape {jnp.shape(mask)}, "
            f"got values shape {values.shape}"
        )
    idx = last_token_index(mask)
    return jnp.take_along_axis(values, idx.reshape((-1, 1) + (1,) * (values.ndim - 2)), axis=1)[:, 0]


def scalar_head(kernel: jax.Array, hidden: jax.Array) -> jax.Array:
    """Project hidden states to one scalar per token: v[b, t] = Σ_e hidden[b, t, e] · kernel[e].

    The product runs in the dtype of `hidden` (the kernel is cast to it) and accumulates in float32,
    as in the value/reward heads of Ouyang et al. (2022), "Training language models to follow
    instructions with human feedback".

    Args:
      kernel: [E].
      hidden: [B, T, E] final-normed hidden states.
    Returns:
      f32[B, T].
    """
    check_rank("scalar_head", "kernel", kernel, 1)
    check_rank("scalar_head", "hidden", hidden, 3)
    if hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"scalar_head: hidden size {hidden.shape[-1]} != kernel size {kernel.shape[0]}"
        )
    return jnp.einsum("bte,e->bt", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def init_scalar_head(config: ModelConfig, rng: jax.Array, *, std: float | None = None) -> jax.Array:
    """A fresh scalar-head kernel: w ~ N(0, std²) truncated at ±2·std, in `config.param_dtype`.

    Args:
      config: the backbone's `ModelConfig` (hidden size, parameter dtype, default std
        `initializer_range`).
      rng: a `jax.random` key.
      std: the standard deviation; defaults to `config.initializer_range`.
    Returns:
      [E] array; its logical axes are `SCALAR_HEAD_AXES`.
    """
    std = config.initializer_range if std is None else std
    check_positive("init_scalar_head", "std", std)
    draw = jax.random.truncated_normal(rng, -2.0, 2.0, (config.hidden_size,), jnp.float32)
    return (std * draw).astype(config.jnp_param_dtype)

