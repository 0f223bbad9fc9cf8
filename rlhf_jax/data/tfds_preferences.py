"""A TFDS `GeneratorBasedBuilder` for preference data, written as array_record, read without TensorFlow.

`write_tfds_preferences({"train": "prefs.jsonl", "test": rows}, data_dir)` turns any row source of
`sources.read_rows` into a prepared TFDS dataset named `rlhf_jax_preferences`, in array_record files
that `tfds.data_source("rlhf_jax_preferences", data_dir=data_dir, split=...)` and
`read_rows(version_dir)` read back by random access, with no TensorFlow installed.

Features: `prompt`, `chosen`, `rejected` as JSON-encoded text (a string or a message list, so both
layouts round-trip exactly; an absent prompt is JSON `null`), and `margin` as float32 (0 when the row
has none). Rows keep their order (shuffling is disabled) and are not validated beyond the columns
they need: `load_dataset` validates them when it reads them back.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import numpy as np

from rlhf_jax.data.preference_records import (
    PREFERENCE_BUILDER_NAME,
    decode_preference_row,
    encode_preference_row,
)
from rlhf_jax.data.sources import Source, describe_source, read_rows

__all__ = [
    "PREFERENCE_BUILDER_NAME",
    "write_tfds_preferences",
    "decode_preference_row",
    "preference_builder_class",
]


@functools.cache
def preference_builder_class():
    """The builder class (defined on first use, so importing rlhf_jax.data does not import TFDS)."""
    import tensorflow_datasets as tfds

    class RlhfJaxPreferences(tfds.core.GeneratorBasedBuilder):
        """Preference pairs (prompt, chosen, rejected, margin) from rlhf_jax row sources."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "JSON-encoded prompt / chosen / rejected, float32 margin."}

        def __init__(self, *, split_sources: Mapping[str, Source] | None = None, **kwargs):
            self._split_sources = dict(split_sources or {})
            super().__init__(**kwargs)

        def _info(self):
            text = "JSON-encoded string or list of {role, content} messages"
            return tfds.core.DatasetInfo(
                builder=self,
                description="Preference pairs written by rlhf_jax.data.write_tfds_preferences.",
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {
                        "prompt": tfds.features.Text(doc=text + " (null: implicit prompt)"),
                        "chosen": tfds.features.Text(doc=text),
                        "rejected": tfds.features.Text(doc=text),
                        "margin": tfds.features.Scalar(np.float32, doc="preference margin, 0 when absent"),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            if not self._split_sources:
                raise ValueError(
                    f"{PREFERENCE_BUILDER_NAME}: nothing to prepare; pass split_sources={{'train': source}}"
                )
            return {name: self._generate_examples(name, source) for name, source in self._split_sources.items()}

        def _generate_examples(self, split, source):
            index = -1
            for index, (ref, row) in enumerate(read_rows(source)):
                yield index, encode_preference_row(ref, row)
            if index < 0:  # TFDS would fail with a bare AssertionError ("No examples were yielded")
                raise ValueError(
                    f"write_tfds_preferences: split {split!r} ({describe_source(source)}) has no rows; "
                    "TFDS cannot store an empty split"
                )

    return RlhfJaxPreferences


def write_tfds_preferences(split_sources: Mapping[str, Source], data_dir: str | os.PathLike) -> str:
    """Prepare the `rlhf_jax_preferences` TFDS dataset (array_record) from row sources.

    Args:
      split_sources: split name -> a source `read_rows` accepts (a JSONL path, a list of rows, ...).
      data_dir: the TFDS data directory (created if needed).

    Returns:
      The prepared version directory (`data_dir/rlhf_jax_preferences/1.0.0`), which `read_rows` and
      `load_dataset` accept as a source; `tfds.data_source(PREFERENCE_BUILDER_NAME, data_dir=data_dir,
      split=...)` reads it too.

    Raises:
      DataError: naming the file and line (row) of a row without `chosen` / `rejected`.
      ValueError: for a split name other than letters, digits and '_', or a split without rows.
      FileExistsError: when that version directory was already prepared (delete it to rewrite).
    """
    bad = [name for name in split_sources if not isinstance(name, str) or not re.fullmatch(r"\w+", name, re.ASCII)]
    if bad:  # a name like "train[:5]" was stored, then read back as a slice of a split named "train"
        raise ValueError(
            f"write_tfds_preferences: split names must be letters, digits and '_', got {bad[0]!r}"
        )
    builder_cls = preference_builder_class()
    data_dir = os.fspath(data_dir)
    builder = builder_cls(split_sources=split_sources, data_dir=data_dir, file_format="array_record")
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise FileExistsError(
            f"write_tfds_preferences: {builder.data_dir} is already prepared; delete it to rewrite"
        )
    builder.download_and_prepare(file_format="array_record")
    return os.fspath(builder.data_dir)
