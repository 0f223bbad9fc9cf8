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
  otherwise. Text is decoded as UTF-8 one line at a time and a leading BOM is ignored: a line holding
  a byte that is not UTF-8 is a bad row (`DataError` naming the line and the byte offset, skipped
  under `on_error="skip"`); in a `.json` file, one document, it raises. A corrupt or truncated
  `.gz` or Parquet file raises a `DataError` naming the last good line (row).
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
import hashlib
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.formats import DataError, RowRef
from rlhf_jax.data.preference_records import PREFERENCE_BUILDER_NAME, decode_preference_row

__all__ = ["TFDSSource", "Source", "SourceError", "read_rows", "describe_source", "source_fingerprint", "NOT_READ"]

# What `read_rows(..., keep=...)` yields in place of a row it was told not to read.
NOT_READ = type("NotRead", (), {"__repr__": lambda self: "NOT_READ"})()


@dataclasses.dataclass(frozen=True)
class TFDSSource:
    """A registered TFDS dataset, read with `tfds.data_source(name, data_dir=..., split=...)`."""

    name: str
    data_dir: str | None = None
    split: str = "train"


Source = Any  # str | os.PathLike | TFDSSource | datasets.Dataset | Sequence[Mapping[str, Any]]


class SourceError(ValueError):
    """A source that cannot be read at all: an unknown file type or directory layout, or a split it
    does not have; the message names the path (callers add the config key that gave it)."""


def describe_source(source: Source) -> str:
    """A short name of a source for messages: the path, the TFDS name, or `<rows>`."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, TFDSSource):
        return f"tfds:{source.name}[{source.split}]"
    return "<rows>"


def source_fingerprint(source: Source) -> bytes | None:
    """The SHA-256 of a path source as this host sees it, or None for other sources.

    A file: its bytes. A directory (a saved dataset, a TFDS version): every file's relative path and
    size, and the bytes of those up to 1 MiB (the metadata: `state.json`, `dataset_info.json`, ...),
    so that telling two hosts' copies apart never reads the data shards twice.
    """
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            if size <= 1 << 20:
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.digest()


_BOM = b"\xef\xbb\xbf"
# What a damaged compressed stream raises while it is read: a truncated stream (EOFError), a bad
# header or CRC (gzip.BadGzipFile, an OSError), corrupt deflate data (zlib.error).
_COMPRESSED_ERRORS = (EOFError, OSError, zlib.error)


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _where(path: str, offset: int) -> str:
    return f"byte offset {offset}" + (" of the decompressed text" if path.endswith(".gz") else "")


def _bad_byte(path: str, data: bytes, err: UnicodeDecodeError, base: int) -> str:
    return (f"invalid UTF-8 byte 0x{data[err.start]:02x} at {_where(path, base + err.start)} "
            "(the file must be UTF-8 text)")


def _truncated(path: str, lines: int, err: BaseException) -> DataError:
    last = f"the last good line is {lines}" if lines else "no line could be read"
    return DataError(
        RowRef(path, lines + 1, "line"),
        f"the compressed file is corrupt or truncated ({type(err).__name__}: {err}); {last}",
    )


def _lines(path: str) -> Iterator[tuple[int, str, DataError | None]]:
    """`(line number, text, error)` of every line (1-based, line ending kept), decoded one at a time.

    A line that is not UTF-8 comes with a `DataError` naming its line and byte offset (so one bad
    byte costs one row) and its text decoded with U+FFFD in place of the bad bytes (ASCII bytes,
    hence line structure and CSV quoting, are kept); a leading UTF-8 BOM is dropped. A damaged
    compressed file raises a `DataError` naming the last good line.
    """
    lineno = offset = 0
    with _open_binary(path) as f:
        try:
            for raw in f:
                lineno += 1
                start = offset
                offset += len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    error = DataError(RowRef(path, lineno, "line"), _bad_byte(path, raw, err, start))
                    yield lineno, raw.decode("utf-8", "replace"), error
                else:
                    yield lineno, text, None
        except _COMPRESSED_ERRORS as err:  # raised by the decompressor, never by the consumer of a line
            if not path.endswith(".gz"):
                raise
            raise _truncated(path, lineno, err) from None


def _parse_json_line(line: str) -> Any:
    """One JSON value; ValueError naming the problem (and column) when the line is not one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON: {err.msg} at column {err.colno}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of over 4300 digits, deep nesting
        raise ValueError(f"malformed JSON: {err}") from None


def _read_jsonl(path: str, keep=None) -> Iterator[tuple[RowRef, Any]]:
    index = -1
    for lineno, line, error in _lines(path):
        ref = RowRef(path, lineno, "line")
        if error is not None:
            index += 1
            yield ref, error
            continue
        if not line.strip():
            continue
        index += 1
        if keep is not None and not keep(index):
            yield ref, NOT_READ  # the line is a row, but its JSON is not parsed
            continue
        try:
            yield ref, _parse_json_line(line.rstrip("\r\n"))
        except ValueError as err:
            yield ref, DataError(ref, str(err))


def _read_json(path: str) -> Iterator[tuple[RowRef, Any]]:
    chunks: list[bytes] = []
    with _open_binary(path) as f:
        try:
            while chunk := f.read(1 << 24):
                chunks.append(chunk)
        except _COMPRESSED_ERRORS as err:
            if not path.endswith(".gz"):
                raise
            raise _truncated(path, sum(c.count(b"\n") for c in chunks), err) from None
    data = b"".join(chunks)
    base = len(_BOM) if data.startswith(_BOM) else 0
    try:
        text = data[base:].decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, base + err.start) + 1
        raise DataError(RowRef(path, line, "line"), _bad_byte(path, data[base:], err, base)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            RowRef(path, err.lineno, "line"), f"malformed JSON: {err.msg} at column {err.colno}"
        ) from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of over 4300 digits, deep nesting
        long_int = re.search(r"\d{4301,}", text) if isinstance(err, ValueError) else None
        line = text.count("\n", 0, long_int.start()) + 1 if long_int else 1
        raise DataError(RowRef(path, line, "line"), f"malformed JSON: {err}") from None
    if not isinstance(data, list):
        raise DataError(
            RowRef(path, 1, "line"),
            f"a .json file must hold an array of row objects, got a {type(data).__name__} "
            "(use .jsonl for one object per line)",
        )
    for i, row in enumerate(data):
        yield RowRef(path, i), row


def _read_csv(path: str) -> Iterator[tuple[RowRef, Any]]:
    bad: dict[int, DataError] = {}

    def text_lines() -> Iterator[str]:
        for lineno, line, error in _lines(path):
            if error is not None:  # read on (U+FFFD in place of the bad bytes) to find its record
                bad[lineno] = error
            yield line

    reader = csv.reader(text_lines())
    header: list[str] | None = None
    last = 0  # the last line of the previous record
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            ref = RowRef(path, reader.line_num, "line")
            if header is None:
                raise DataError(ref, f"malformed CSV header: {err}") from None
            yield ref, DataError(ref, f"malformed CSV: {err}")
            last = reader.line_num
            continue
        ref = RowRef(path, reader.line_num, "line")
        errors = [bad[n] for n in range(last + 1, reader.line_num + 1) if n in bad] if bad else ()
        last = reader.line_num
        if header is None:
            if errors:
                raise errors[0]
            if record:  # blank lines before the header are not rows
                header = record
            continue
        if errors:
            yield errors[0].ref, errors[0]
        elif not record:
            continue  # a blank line is not a row
        elif len(record) > len(header):
            yield ref, DataError(ref, f"the row has more fields than the header {header}")
        else:  # missing trailing fields are None, as csv.DictReader reads them
            yield ref, dict(zip(header, record + [None] * (len(header) - len(record))))


def _read_parquet(path: str) -> Iterator[tuple[RowRef, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield RowRef(path, index), row
                index += 1
    except (pa.ArrowException, OSError) as err:  # not Parquet, truncated, a corrupt page
        last = f"the last good row is {index - 1}" if index else "no row could be read"
        raise DataError(
            RowRef(path, index), f"not a readable Parquet file ({type(err).__name__}: {err}); {last}"
        ) from None


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
            raise SourceError(
                f"{path} is a DatasetDict with splits {sorted(loaded)}: pass split= one of them, got {split!r}"
            )
        return loaded[split], f"{path}[{split}]"
    if split is not None:
        raise SourceError(f"{path} is a single saved Dataset without splits; pass split=None, got {split!r}")
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


def _array_record_files(data_source, name: str) -> list[tuple[int, str]]:
    """`(first row, path)` of every array_record file of a TFDS split, each checked to hold the records
    its `dataset_info.json` promises: a damaged or half-written file (a crash while writing, a bad
    copy) is a `SourceError` naming it, where TFDS would read each of its rows as all-None features or
    fail with a Riegeli message that names no file. Empty for other file formats."""
    info = getattr(data_source, "dataset_info", None)
    if info is None or "array_record" not in str(info.file_format).lower():
        return []
    from array_record.python.array_record_module import ArrayRecordReader

    files, first = [], 0
    for fi in info.splits[data_source.split].file_instructions:
        path = os.fspath(fi.filename)
        try:
            reader = ArrayRecordReader(path)
            count = reader.num_records()
            reader.close()
        except RuntimeError as err:
            reason = str(err) or "truncated or corrupt"
            raise SourceError(f"{name}: cannot read the array_record file {path}: {reason}") from err
        if count != fi.examples_in_shard:
            raise SourceError(
                f"{name}: the array_record file {path} holds {count} records but dataset_info.json says "
                f"{fi.examples_in_shard}; the file is damaged or half-written: prepare the dataset again"
            )
        files.append((first, path))
        first += fi.take
    return files


def _read_tfds(data_source, name: str, builder_name: str, keep=None) -> Iterator[tuple[RowRef, Any]]:
    ours = builder_name == PREFERENCE_BUILDER_NAME
    files = _array_record_files(data_source, name)
    for i in range(len(data_source)):
        if keep is not None and not keep(i):  # random access: a row not kept is never read
            yield RowRef(name, i), NOT_READ
            continue
        try:
            record = data_source[i]
        except RuntimeError as err:  # a chunk of the file fails its checksum
            path = next((p for first, p in reversed(files) if first <= i), "?")
            raise SourceError(f"{name}: row {i} of the array_record file {path} cannot be read: {err}") from err
        row = {k: _plain_value(v) for k, v in record.items()}
        yield RowRef(name, i), decode_preference_row(row) if ours else row


def read_rows(source: Source, *, split: str | None = None, keep=None) -> Iterator[tuple[RowRef, Any]]:
    """Yield `(ref, row)` for every row of `source` (module docstring lists the sources).

    Args:
      source: a file or directory path, a `TFDSSource`, a `datasets.Dataset`, or a list of rows.
      split: the split of a saved `DatasetDict` (required there) or of a TFDS directory
        (default "train"); must be None for other sources.
      keep: `row index -> bool` (0-based, counting every row this function yields): a row it
        rejects is yielded as `(ref, NOT_READ)`, unparsed where the format allows (a JSONL line's
        JSON, a TFDS record); a process of a multi-process run reads its shard this way.

    Yields:
      `(RowRef, row)`; `row` is a mapping (or any value a malformed source produced, which the
      format check rejects), or a `DataError` for a row the source itself could not read.

    Raises:
      FileNotFoundError: naming a path that does not exist.
      SourceError: naming the path for an unknown file type or directory layout, or a bad `split`.
    """
    rows = _read_any(source, split, keep)
    if keep is None:
        yield from rows
        return
    for i, (ref, row) in enumerate(rows):  # readers that cannot skip a row's parsing read it, unused
        yield (ref, row) if row is NOT_READ or keep(i) else (ref, NOT_READ)


def _read_any(source: Source, split: str | None, keep) -> Iterator[tuple[RowRef, Any]]:
    if isinstance(source, TFDSSource):
        if split is not None:
            raise ValueError("read_rows: a TFDSSource carries its own split; pass split=None")
        import tensorflow_datasets as tfds

        data_source = tfds.data_source(
            source.name, data_dir=source.data_dir, split=source.split, download=False
        )
        yield from _read_tfds(data_source, describe_source(source), data_source.dataset_info.name, keep)
        return
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"read_rows: no such file or directory: {path!r}")
        if os.path.isdir(path):
            yield from _read_dir(path, split, keep)
            return
        if split is not None:
            raise SourceError(
                f"read_rows: split= applies to directories (saved datasets, TFDS), not to the file {path!r}"
            )
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        stem = path[:-3] if path.endswith(".gz") else path
        suffix = os.path.splitext(stem)[1].lower()
        if suffix not in readers or (suffix == ".parquet" and path.endswith(".gz")):
            raise SourceError(
                f"read_rows: unknown file type {suffix or '(none)'!r} of {path!r}; "
                "expected .jsonl, .json, .csv (optionally .gz) or .parquet"
            )
        yield from (_read_jsonl(path, keep) if suffix == ".jsonl" else readers[suffix](path))
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


def _read_dir(path: str, split: str | None, keep=None) -> Iterator[tuple[RowRef, Any]]:
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
            raise SourceError(f"{path}: TFDS dataset has splits {sorted(builder.info.splits)}, not {split!r}")
        yield from _read_tfds(builder.as_data_source(split=split), f"{path}[{split}]", builder.info.name, keep)
        return
    raise SourceError(
        f"read_rows: {path!r} is neither a saved Hugging Face dataset (state.json / dataset_dict.json) "
        "nor a prepared TFDS version directory (features.json + dataset_info.json)"
    )
