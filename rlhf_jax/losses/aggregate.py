"""Reducing per-token losses to a scalar: token-mean, sequence-mean and Dr.GRPO's constant normaliser."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks

AggregateMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def aggregate(
    per_token: jax.Array,
    mask: jax.Array,
    *,
    mode: AggregateMode = "token_mean",
    num_tokens: jax.Array | float | None = None,
    max_len: int | None = None,
    num_sequences: jax.Array | float | None = None,
) -> jax.Array:
    """Reduce a `[B, T]` per-token loss to a scalar.

    With `m` the mask, `n_b = sum_t m_bt` and `S` the rows with `n_b > 0`:
    - `token_mean`:              `sum_bt m l / N`, `N = num_tokens or sum_bt m` (DAPO, TRL's `dapo`)
    - `seq_mean_token_mean`:     `sum_{b in S} (sum_t m l / n_b) / K` (GRPO, GSPO)
    - `seq_mean_token_sum`:      `sum_b (sum_t m l) / K`
    - `seq_mean_token_sum_norm`: `sum_b (sum_t m l) / (K * L)` (Dr.GRPO: a constant per-token weight)
    where `K = num_sequences or |S|` and `L = max_len or T`.

    Micro-batching and data parallelism: pass the *global* normaliser (`num_tokens` for
    `token_mean`, `num_sequences` for the seq modes: the number of non-empty rows of the full
    batch) and the per-shard results add up to the full-batch value. Without them, each call is
    normalised by its own counts. An empty batch gives 0, never NaN.

    Args:
      per_token: `[B, T]` per-token losses (any float dtype).
      mask: `[B, T]` bool or 0/1 mask, or non-negative per-token weights (applied once, here).
      mode: one of `AggregateMode`.
      num_tokens: global token count (`token_mean` only).
      max_len: Dr.GRPO's constant `L` (`seq_mean_token_sum_norm` only), e.g. the maximum completion
        length; defaults to `T`.
      num_sequences: global count of non-empty sequences (seq modes only).

    Returns:
      float32 scalar. References: Yu et al. 2025 (DAPO, token-level mean); Shao et al. 2024
      (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr.GRPO).

    Example:
      >>> per_token = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
      >>> mask = jnp.array([[1, 1, 1], [1, 0, 0]])
      >>> modes = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
      >>> [round(float(aggregate(per_token, mask, mode=m)), 4) for m in modes]  # 10/4, (2+4)/2, 10/2, 10/(2*3)
      [2.5, 3.0, 5.0, 1.6667]
      >>> float(aggregate(per_token[:1], mask[:1], num_tokens=4.0))  # row 0's share of the 4-token batch: 6/4
      1.5
    """
    fn = "aggregate"
    _checks.check_choice(fn, "mode", mode, get_args(AggregateMode))
    _checks.check_rank(fn, "per_token", per_token, 2)
    _checks.check_same_shape(fn, per_token=per_token, mask=mask)
    if num_tokens is not None and mode != "token_mean":
        raise ValueError(f"{fn}: num_tokens is the normaliser of mode 'token_mean' only, got mode {mode!r}")
    if num_sequences is not None and mode == "token_mean":
        raise ValueError(f"{fn}: num_sequences is the normaliser of the seq_mean_* modes, got mode {mode!r}")
    if max_len is not None and mode != "seq_mean_token_sum_norm":
        raise ValueError(f"{fn}: max_len is used by mode 'seq_mean_token_sum_norm' only, got mode {mode!r}")
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences), ("max_len", max_len)):
        if value is not None:
            _checks.check_positive(fn, name, value)
    x = _checks.f32(per_token)
    m = _checks.mask_f32(mask)
    if mode == "token_mean":
        denom = _checks.safe_denominator(jnp.sum(m)) if num_tokens is None else _checks.f32(num_tokens)
        return _checks.masked_sum(x, m) / denom
    row_tokens = jnp.sum(m, axis=-1)
    if num_sequences is None:
        n_seq = _checks.safe_denominator(jnp.sum((row_tokens > 0).astype(jnp.float32)))
    else:
        n_seq = _checks.f32(num_sequences)
    row_sums = _checks.masked_sum(x, m, axis=-1)
    if mode == "seq_mean_token_mean":
        return jnp.sum(row_sums / _checks.safe_denominator(row_tokens)) / n_seq
    if mode == "seq_mean_token_sum":
        return jnp.sum(row_sums) / n_seq
    length = x.shape[-1] if max_len is None else max_len
    return jnp.sum(row_sums) / (n_seq * length)


def count_tokens(mask: jax.Array) -> jax.Array:
    """The global normaliser of `token_mean`: `sum_bt m` over the full batch, float32.

    Example:
      >>> float(count_tokens(jnp.array([[1, 1, 0], [1, 0, 0]])))
      3.0
    """
    return jnp.sum(_checks.mask_f32(mask))


def count_sequences(mask: jax.Array) -> jax.Array:
    """The global normaliser of the seq modes: the number of rows of a `[B, T]` mask with at least
    one masked-in token.

    Example:
      >>> float(count_sequences(jnp.array([[1, 1, 0], [0, 0, 0]])))
      1.0
    """
    _checks.check_rank("count_sequences", "mask", mask, 2)
    return jnp.sum((jnp.sum(_checks.mask_f32(mask), axis=-1) > 0).astype(jnp.float32))


def check_loss_mask(fn: str, mask: jax.Array) -> None:
    """Raise ValueError when a concrete (non-traced) mask holds values other than 0 and 1.

    A per-token loss that is zero where masked multiplies by its mask, and `aggregate` weights by
    the mask again: a weight `w` there would count as `w^2`. Weights belong in `aggregate`'s mask only.
    """
    values = _checks.non_binary_values(mask)
    if values is not None:
        raise ValueError(f"{fn}: mask must be bool or 0/1, got values {values}; per-token weights would count "
                         f"twice (in this loss and in aggregate): pass a 0/1 mask here and the weights as "
                         f"aggregate's mask")
