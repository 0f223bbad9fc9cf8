"""Row sources: JSONL, JSON, Parquet, CSV, Hugging Face datasets saved to disk, TFDS, Python lists.

`read_rows(source)` yields `(RowRef, row)` pairs for every kind of source, so the rest of the pipeline
never asks where rows came from. A source-level problem confined to one row (a malformed JSON line,
a CSV row with too many fields) is yielded as a `DataError` in place of the row, so that
`on_error="skip"` can count it; a problem with the whole source (missing file, unknown suffix,
a `.json` file that does not parse) raises.

Sources:

- a path to a file: `.jsonl` (one JSON object per line; blank lines are not rows), `.json` (a JSON
  array of objects), `.parquet`, `.csv` (a header row; every value is a string); `.jsonl.gz`,
  `.json.gz`, `.csv.gz` are read through gzip. Refs are 1-based lines for JSONL/CSV, 0-based rows
  otherwise.
- a path to a directory: a Hugging Face `datasets` dataset written by `save_to_disk` (a
  `DatasetDict` needs `split=`), or a prepared TFDS dataset version directory (read with
  `as_data_source`, no TensorFlow needed; `split` defaults to "train").
- `TFDSSource(name, data_dir=..., split=...)`: a registered TFDS dataset read with
  `tfds.data_source`.
- a `datasets.Dataset`, or a list/tuple of row mappings (e.g. from `rlhf_jax.data.synthetic`).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.formats import DataError, RowRef

__all__ = ["TFDSSource", "Source", "read_rows", "describe_source"]


@dataclasses.dataclass(frozen=True)
class TFDSSource:
    """A registered TFDS dataset, read with `tfds.data_source(name, data_dir=..., split=...)`."""

    name: str
    data_dir: str | None = None
    split: str = "train"


Source = Any  # str | os.PathLike | TFDSSource | datasets.Dataset | Sequence[Mapping[str, Any]]


def describe_source(source: Source) -> str:
    """A short name of a source for messages: the path, the TFDS name, or `<rows>`."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, TFDSSource):
        return f"tfds:{source.name}[{source.split}]"
    return "<rows>"


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_jsonl(path: str) -> Iterator[tuple[RowRef, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ref = RowRef(path, lineno, "line")
            try:
                yield ref, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield ref, DataError(ref, f"malformed JSON: {err.msg} at column {err.colno}")


def _read_json(path: str) -> Iterator[tuple[RowRef, Any]]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(
                RowRef(path, err.lineno, "line"), f"malformed JSON: {err.msg} at column {err.colno}"
            ) from None
    if not isinstance(data, list):
        raise DataError(
            RowRef(path, 1, "line"),
            f"a .json file must hold an array of row objects, got a {type(data).__name__} "
            "(use .jsonl for one object per line)",
        )
    for i, row in enumerate(data):
        yield RowRef(path, i), row


def _read_csv(path: str) -> Iterator[tuple[RowRef, Any]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            ref = RowRef(path, reader.line_num, "line")
            if None in row:
                yield ref, DataError(ref, f"the row has more fields than the header {reader.fieldnames}")
            else:
                yield ref, row


def _read_parquet(path: str) -> Iterator[tuple[RowRef, Any]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield RowRef(path, index), row
            index += 1


def _read_hf(dataset, name: str) -> Iterator[tuple[RowRef, Any]]:
    index = 0
    for batch in dataset.iter(batch_size=4096):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield RowRef(name, index), dict(zip(columns, values))
            index += 1


def _load_hf_dir(path: str, split: str | None):
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{path} is a saved Hugging Face dataset: reading it needs `pip install datasets`"
        ) from err

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise ValueError(
                f"{path} is a DatasetDict with splits {sorted(loaded)}: pass split= one of them, got {split!r}"
            )
        return loaded[split], f"{path}[{split}]"
    if split is not None:
        raise ValueError(f"{path} is a single saved Dataset without splits; pass split=None, got {split!r}")
    return loaded, path


def _plain_value(value: Any) -> Any:
    """TFDS values as Python values: bytes -> str, NumPy scalars/arrays -> numbers/lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind == "S":
            return [_plain_value(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain_value(v) for k, v in value.items()}
    return value


def _read_tfds(data_source, name: str, builder_name: str) -> Iterator[tuple[RowRef, Any]]:
    from rlhf_jax.data.tfds_preferences import PREFERENCE_BUILDER_NAME, decode_preference_row

    ours = builder_name == PREFERENCE_BUILDER_NAME
    for i in range(len(data_source)):
        row = {k: _plain_value(v) for k, v in data_source[i].items()}
        yield RowRef(name, i), decode_preference_row(row) if ours else row


def read_rows(source: Source, *, split: str | None = None) -> Iterator[tuple[RowRef, Any]]:
    """Yield `(ref, row)` for every row of `source` (module docstring lists the sources).

    Args:
      source: a file or directory path, a `TFDSSource`, a `datasets.Dataset`, or a list of rows.
      split: the split of a saved `DatasetDict` (required there) or of a TFDS directory
        (default "train"); must be None for other sources.

    Yields:
      `(RowRef, row)`; `row` is a mapping (or any value a malformed source produced, which the
      format check rejects), or a `DataError` for a row the source itself could not read.

    Raises:
      FileNotFoundError: naming a path that does not exist.
      ValueError: naming the path for an unknown file type or directory layout, or a bad `split`.
    """
    if isinstance(source, TFDSSource):
        if split is not None:
            raise ValueError("read_rows: a TFDSSource carries its own split; pass split=None")
        import tensorflow_datasets as tfds

        data_source = tfds.data_source(
            source.name, data_dir=source.data_dir, split=source.split, download=False
        )
        yield from _read_tfds(data_source, describe_source(source), data_source.dataset_info.name)
        return
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"read_rows: no such file or directory: {path!r}")
        if os.path.isdir(path):
            yield from _read_dir(path, split)
            return
        if split is not None:
            raise ValueError(
                f"read_rows: split= applies to directories (saved datasets, TFDS), not to the file {path!r}"
            )
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        stem = path[:-3] if path.endswith(".gz") else path
        suffix = os.path.splitext(stem)[1].lower()
        if suffix not in readers or (suffix == ".parquet" and path.endswith(".gz")):
            raise ValueError(
                f"read_rows: unknown file type {suffix or '(none)'!r} of {path!r}; "
                "expected .jsonl, .json, .csv (optionally .gz) or .parquet"
            )
        yield from readers[suffix](path)
        return
    if "datasets" in sys.modules:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            raise ValueError(
                f"read_rows: pass one split of the DatasetDict (splits {sorted(source)}), e.g. dataset['train']"
            )
        if isinstance(source, datasets.Dataset):
            if split is not None:
                raise ValueError("read_rows: split= does not apply to an in-memory Dataset")
            yield from _read_hf(source, "<dataset>")
            return
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if split is not None:
            raise ValueError("read_rows: split= does not apply to a list of rows")
        for i, row in enumerate(source):
            yield RowRef("<rows>", i), row
        return
    raise TypeError(
        f"read_rows: unsupported source {type(source).__name__}; expected a path, a TFDSSource, "
        "a datasets.Dataset or a list of row mappings"
    )


def _read_dir(path: str, split: str | None) -> Iterator[tuple[RowRef, Any]]:
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
        os.path.join(path, "state.json")
    ):
        dataset, name = _load_hf_dir(path, split)
        yield from _read_hf(dataset, name)
        return
    if os.path.exists(os.path.join(path, "features.json")) and os.path.exists(
        os.path.join(path, "dataset_info.json")
    ):
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(path)
        split = split or "train"
        if split not in builder.info.splits:
            raise ValueError(f"{path}: TFDS dataset has splits {sorted(builder.info.splits)}, not {split!r}")
        yield from _read_tfds(builder.as_data_source(split=split), f"{path}[{split}]", builder.info.name)
        return
    raise ValueError(
        f"read_rows: {path!r} is neither a saved Hugging Face dataset (state.json / dataset_dict.json) "
        "nor a prepared TFDS version directory (features.json + dataset_info.json)"
    )
