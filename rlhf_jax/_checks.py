"""Trace-time argument checks and masked reductions shared by logprobs, losses and advantages.

Every check runs on static information only (shapes, dtypes, Python numbers), so it fires while
tracing under `jax.jit` and never adds work to the compiled program. A scalar hyperparameter may be
a Python number or an array: an array must have ndim 0 (checked for traced arrays too, shapes being
static), and a concrete (non-traced) array's value is range-checked like a Python number. The values
of traced hyperparameters (e.g. an adaptive KL coefficient inside `jit`) are not inspected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import ConfigError


def is_number(value: Any) -> bool:
    """True for a concrete Python/NumPy real number (not a bool, not a traced array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a concrete real number (not a bool, not a traced array) other than nan and +-inf: the
    one test behind every config field that must be a finite number (temperatures, coefficients)."""
    return is_number(value) and math.isfinite(value)


def check_choice(fn: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ValueError naming `name` when `value` is not one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")


def is_tracer(value: Any) -> bool:
    """True for an array traced by `jit`/`grad`/`vmap` (its value is unknown at trace time)."""
    return isinstance(value, jax.core.Tracer)


def host_values(x: Any) -> np.ndarray | None:
    """`x`'s values when they are already on the host or reach it without a device round trip: a
    NumPy array, nested lists or numbers, or a concrete, fully addressable jax array on CPU devices.
    None for traced, multi-process or accelerator arrays (value checks then skip them: no host sync
    in a step)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, numbers.Number)):
        return np.asarray(x)
    if (isinstance(x, jax.Array) and not is_tracer(x) and x.is_fully_addressable
            and all(d.platform == "cpu" for d in x.sharding.device_set)):
        return np.asarray(x)
    return None


def non_binary_values(mask: Any) -> list[float] | None:
    """The first (sorted) values other than 0 and 1 of a mask's host values (`host_values`), or None
    when there are none or the values are not on the host."""
    m = host_values(mask)
    if m is None:
        return None
    bad = (m != 0) & (m != 1)
    return [float(v) for v in np.unique(np.asarray(m)[bad])[:5]] if np.any(bad) else None  # NaNs as one


def scalar_value(fn: str, name: str, value: Any, *, allow_bool: bool = False) -> Any:
    """The concrete value of scalar hyperparameter `value` as a Python number, or None when traced.

    Python/NumPy numbers pass through; a (NumPy or JAX) array must have ndim 0, else ValueError
    naming `name` with its shape (checked for traced arrays too); a concrete array is read back as
    a Python number (outside `jit` only: a traced one gives None); non-numeric values raise TypeError,
    and so does a bool unless `allow_bool` (`beta=True` is a slip, not 1.0; an environment's reward
    may be a bool).
    """
    if is_number(value):
        return value
    if is_tracer(value):
        if value.ndim != 0:
            raise ValueError(f"{fn}: {name} must be a scalar (ndim 0), got shape {tuple(value.shape)}")
        return None
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise TypeError(f"{fn}: {name} must be a real scalar, got {type(value).__name__}") from err
    if arr.dtype == bool and not allow_bool:
        raise TypeError(f"{fn}: {name} must be a real number, got {arr.item()!r} (a bool)")
    if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {value!r} (dtype {arr.dtype})")
    if arr.ndim != 0:
        raise ValueError(f"{fn}: {name} must be a scalar (ndim 0), got shape {arr.shape}")
    return arr.item()


def check_scalar(fn: str, name: str, value: Any) -> None:
    """Raise naming `name` when `value` is not a real scalar (a number or an ndim-0 array)."""
    scalar_value(fn, name, value)


def check_positive(fn: str, name: str, value: Any, *, finite: bool = False) -> None:
    """Raise ValueError naming `name` when `value` is not a scalar, or when its concrete value is not
    > 0 (or, with `finite`, not a finite number > 0)."""
    v = scalar_value(fn, name, value)
    if v is not None and not (v > 0 and (not finite or math.isfinite(v))):
        want = "a finite number > 0" if finite else "> 0"
        raise ValueError(f"{fn}: {name} must be {want}, got {value!r}")


def check_nonnegative(fn: str, name: str, value: Any) -> None:
    """Raise ValueError naming `name` when `value` is not a scalar, or its concrete value is < 0."""
    v = scalar_value(fn, name, value)
    if v is not None and not v >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")


def check_range(fn: str, name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """Raise ValueError naming `name` when `value` is not a scalar, or its concrete value is outside
    [low, high] (or [low, high))."""
    v = scalar_value(fn, name, value)
    if v is None:
        return
    ok = low <= v < high if high_open else low <= v <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{fn}: {name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_positive_values(fn: str, name: str, x: Any, shape: tuple[int, ...], *, finite: bool = False) -> None:
    """A hyperparameter that may be a scalar or an array broadcasting to `shape` (e.g. a per-row
    temperature `[B, 1]` against logits `[B, V]`): raise ValueError naming `name` when it does not
    broadcast to `shape`, or when a concrete value is not > 0 (finite with `finite`)."""
    if is_number(x):
        check_positive(fn, name, x, finite=finite)
        return
    xshape = tuple(jnp.shape(x))
    try:
        ok = tuple(np.broadcast_shapes(xshape, tuple(shape))) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} must be a scalar or broadcast to shape {tuple(shape)}, got shape {xshape}")
    if is_tracer(x):
        return
    v = np.asarray(x)
    if not (jnp.issubdtype(v.dtype, jnp.integer) or jnp.issubdtype(v.dtype, jnp.floating)):
        raise TypeError(f"{fn}: {name} must be real, got dtype {v.dtype}")
    v = v.astype(np.float64)
    bad = ~(v > 0) | (~np.isfinite(v) if finite else False)
    if np.any(bad):
        want = "finite and > 0" if finite else "> 0"
        raise ValueError(f"{fn}: {name} must be {want}, got {x!r}")


def as_array(fn: str, name: str, x: Any) -> jax.Array:
    """`x` as an array: arrays (and tracers) pass through, nested lists / NumPy arrays are converted
    with `jnp.asarray`; anything else raises TypeError naming `name`."""
    if isinstance(x, (jax.Array, np.ndarray)) or is_tracer(x):
        return x
    try:
        return jnp.asarray(x)
    except Exception as err:
        raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}: {err}") from err


def check_nonempty(fn: str, name: str, x: Any, axis: int = 0) -> None:
    """Raise ValueError naming `name` when its `axis` (the batch axis) has length 0."""
    shape = jnp.shape(x)
    if len(shape) > axis and shape[axis] == 0:
        raise ValueError(f"{fn}: {name} is an empty batch (shape {tuple(shape)}); it needs at least one example")


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
