"""Host-side checks of a step's batch values, run on every batch before the jitted call (`Step`).

Cheap (dtype tests, a min/max over host arrays; the offending position is searched for only once
something is wrong), and on host values only: a traced or device array is not read back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import _checks

__all__ = ["check_token_ids", "check_segment_ids", "check_loss_masks", "host_batch_check"]


def check_token_ids(batch: Mapping[str, Any], keys: Sequence[str], vocab_size: int | None, *, name: str) -> None:
    """Token-id arrays `batch[key]` (present `keys`) must be integer (not bool) and, on host values, in
    `[0, vocab_size)`; raise naming the key (and the first bad value and its position). Cheap: a dtype
    test, and a min/max over host arrays (the position is only searched for once something is wrong)."""
    for key in keys:
        if key not in batch:
            continue
        x = batch[key]
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not np.issubdtype(np.dtype(dtype), np.integer):
            raise TypeError(f"{name}: batch[{key!r}] must hold integer token ids, got dtype {dtype}")
        if vocab_size is None:
            continue
        values = _checks.host_values(x)
        if values is None or values.size == 0:
            continue
        if values.min() < 0 or values.max() >= vocab_size:
            position = tuple(int(i) for i in np.argwhere((values < 0) | (values >= vocab_size))[0])
            raise ValueError(f"{name}: batch[{key!r}] holds token id {int(values[position])} at position {position}, "
                             f"outside the model's vocabulary [0, {vocab_size})")


def check_segment_ids(batch: Mapping[str, Any], max_segments: int, *, name: str) -> None:
    """Packed rows' `*segment_ids` (host values) must not number more segments than the step sums:
    a step built for `max_segments` reads segments 1..max_segments of a row and drops the rest."""
    for key in [k for k in batch if str(k).endswith("segment_ids")]:
        values = _checks.host_values(batch[key])
        if values is not None and values.size and values.max() > max_segments:
            raise ValueError(f"{name}: batch[{key!r}] numbers up to {int(values.max())} segments in a row, but the "
                             f"step was built for max_segments={max_segments}: the rows' other segments would be "
                             "dropped; build the step with the data's max_segments")


def check_loss_masks(batch: Mapping[str, Any], *, name: str) -> None:
    """`*loss_mask` host values must be 0/1: the steps mark target tokens (`causal_targets`) and weigh
    each by 1, so a weight such as 0.5, 2 or NaN would be read as 1."""
    for key in [k for k in batch if str(k).endswith("loss_mask")]:
        values = _checks.non_binary_values(batch[key])
        if values is not None:
            raise ValueError(f"{name}: batch[{key!r}] must be bool or 0/1, got values {values}; the step weighs "
                             "every marked target token by 1 (per-token weights are not supported)")


def host_batch_check(vocab_size: int | None, keys: Sequence[str] | None = None, *,
                     max_segments: int | None = None) -> Callable[[Mapping, str], None]:
    """A `Step` host check: token ids in the vocabulary (`keys`, or every batch key ending in
    `tokens`), 0/1 loss masks (`check_loss_masks`) and, with `max_segments`, the packed rows'
    segment count (`check_segment_ids`)."""

    def check(batch: Mapping[str, Any], name: str) -> None:
        token_keys = keys if keys is not None else [k for k in batch if str(k).endswith("tokens")]
        check_token_ids(batch, token_keys, vocab_size, name=name)
        check_loss_masks(batch, name=name)
        if max_segments is not None:
            check_segment_ids(batch, max_segments, name=name)

    return check
