"""Trace-time argument checks and masked reductions shared by logprobs, losses and advantages.

Every check runs on static information only (shapes, dtypes, Python numbers), so it fires while
tracing under `jax.jit` and never adds work to the compiled program. Hyperparameters that arrive as
traced arrays (e.g. an adaptive KL coefficient) are not inspected.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.config import ConfigError


def is_number(value: Any) -> bool:
    """True for a concrete Python/NumPy real number (not a bool, not a traced array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(fn: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ValueError naming `name` when `value` is not one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")


def check_positive(fn: str, name: str, value: Any) -> None:
    """Raise ValueError naming `name` when a concrete `value` is not > 0."""
    if is_number(value) and not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")


def check_nonnegative(fn: str, name: str, value: Any) -> None:
    """Raise ValueError naming `name` when a concrete `value` is < 0."""
    if is_number(value) and not value >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")


def check_range(fn: str, name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ValueError naming `name` when a concrete `value` is outside [low, high] (or [low, high))."""
    if not is_number(value):
        return
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{fn}: {name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_rank(fn: str, name: str, x: jax.Array, ranks: int | tuple[int, ...]) -> None:
    """Raise ValueError naming `name` when `x.ndim` is not in `ranks`."""
    ranks = (ranks,) if isinstance(ranks, int) else ranks
    if jnp.ndim(x) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{fn}: {name} must have rank {want}, got shape {jnp.shape(x)}")


def check_same_shape(fn: str, **arrays: jax.Array | None) -> None:
    """Raise ValueError listing every shape when the given (non-None) arrays differ in shape."""
    shapes = {k: jnp.shape(v) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(f"{fn}: shapes must match, got {listed}")


def check_floating(fn: str, name: str, x: jax.Array) -> None:
    """Raise TypeError naming `name` when `x` is not a floating-point array."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(x)}")


def check_integer(fn: str, name: str, x: jax.Array) -> None:
    """Raise TypeError naming `name` when `x` is not an integer array."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{fn}: {name} must be an integer array, got dtype {jnp.result_type(x)}")


def f32(x: jax.Array) -> jax.Array:
    """Cast to float32 (the dtype of every log-prob, loss and advantage in this package)."""
    return jnp.asarray(x).astype(jnp.float32)


def mask_f32(mask: jax.Array) -> jax.Array:
    """A bool or numeric mask as float32 weights (0 = ignored)."""
    return jnp.asarray(mask).astype(jnp.float32)


def apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """`x * mask` that is exactly 0 where `mask == 0`, even when `x` is inf/NaN there.

    The `where` makes padded positions contribute neither value nor gradient.
    """
    m = mask_f32(mask)
    return jnp.where(m != 0, x, 0.0) * m


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Sum of `x` weighted by `mask` over `axis` (all axes when None)."""
    return jnp.sum(apply_mask(x, mask), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of `x` weighted by `mask`; 0 where the mask is empty (never NaN)."""
    return masked_sum(x, mask, axis) / safe_denominator(jnp.sum(mask_f32(mask), axis=axis))


def safe_denominator(denom: jax.Array) -> jax.Array:
    """`denom` where positive, 1 elsewhere: an empty sum (or an all-zero numerator) then gives 0, not NaN."""
    return jnp.where(denom > 0, denom, 1.0)


def check_micro_split(batch: Any, micro_batches: Any, where: str) -> None:
    """One-line `ValueError`s for a pass run in `micro_batches` pieces (evals, reference log-probs):
    `micro_batches` must be a positive int dividing every array's rows in the mapping `batch` (None:
    the count alone). The rows' message names the run's config key, `train.micro_batches`, and is a
    `ConfigError` (a `ValueError`), which the CLI reports in one line."""
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"{where}: micro_batches must be a positive int, got {micro_batches!r}")
    for key, x in (batch or {}).items():
        if x.shape[0] % micro_batches:
            raise ConfigError(f"{where}: batch[{key!r}] has {x.shape[0]} rows, not divisible by "
                              f"micro_batches={micro_batches} (train.micro_batches); use a batch size that is a "
                              f"multiple of it")
