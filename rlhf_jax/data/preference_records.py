"""The stored form of a preference row in the `rlhf_jax_preferences` TFDS dataset.

Shared by the writer (`tfds_preferences`, which reads rows through `sources.read_rows`) and the
reader (`sources`, which decodes the rows it reads back), so neither module imports the other.

A stored row holds `prompt`, `chosen`, `rejected` as JSON-encoded text (a string or a message
list; an absent prompt is JSON `null`) and `margin` as float32 (0 when the row has none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_jax.data.formats import (
    DataError,
    RowRef,
    _check_unicode,
    describe_value,
    parse_margin,
    refuse_row_tools,
    require_columns,
)

__all__ = ["PREFERENCE_BUILDER_NAME", "TEXT_FIELDS", "encode_preference_row", "decode_preference_row"]

PREFERENCE_BUILDER_NAME = "rlhf_jax_preferences"
TEXT_FIELDS = ("prompt", "chosen", "rejected")


def encode_preference_row(ref: RowRef, row: Any) -> dict[str, Any]:
    """A source row as the stored features; `DataError` naming `ref` for a row that lacks them."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, Mapping):
        raise DataError(ref, f"a row must be an object, got {describe_value(row)}")
    require_columns(row, ref, "chosen", "rejected")
    refuse_row_tools(row, ref)  # not a stored feature: refused, as reading the row would, not dropped
    # A lone surrogate (a JSON escape such as \ud800) cannot be stored as UTF-8: TFDS failed on it
    # with an error naming no row.
    out = {
        name: _check_unicode(json.dumps(row.get(name), ensure_ascii=False), ref, f"column {name!r} (as JSON)")
        for name in TEXT_FIELDS
    }
    margin = parse_margin(row.get("margin"), ref)
    if abs(margin) > float(np.finfo(np.float32).max):
        raise DataError(ref, f"column 'margin' {margin!r} does not fit the stored float32")
    out["margin"] = np.float32(margin)
    return out


def decode_preference_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row (JSON text fields) back as `{"prompt"?, "chosen", "rejected", "margin"}`."""
    out = {name: json.loads(row[name]) for name in TEXT_FIELDS}
    if out["prompt"] is None:
        del out["prompt"]
    out["margin"] = float(row["margin"])
    return out
