"""Property: whatever rows and bytes a data file holds, `load_dataset` returns a dataset or raises a
`DataError` naming that file and a line (row); nothing else escapes, and no row is dropped silently.

Random rows (any JSON-ish values under the column names of every layout, non-object rows, lone
surrogates, huge integers) are written as every file format `read_rows` reads (jsonl, json, csv,
parquet, and the gzip variants); then the bytes may be damaged (random bytes inserted, a byte
flipped, the file truncated, or the whole file replaced by random bytes).
"""

import csv
import gzip
import io
import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax.data import DataError, TokenizeConfig, load_dataset
from rlhf_jax.testing.tokenizer import offline_tokenizer

FORMATS = ("jsonl", "json", "csv", "parquet", "jsonl.gz", "json.gz", "csv.gz")
COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "text", "label", "margin", "answer")
CONFIG = TokenizeConfig(max_len=24)

text = st.text(max_size=8) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # lone surrogates
scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**400), max_value=10**400)
           | st.floats() | text | st.sampled_from(["q", "a", "b", "true", "0", " "]))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": scalars},
    optional={"name": text},
)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
                      max_leaves=6) | st.lists(message, max_size=3)
word = st.text("abcxyz 0123+=", min_size=1, max_size=6).filter(str.strip)
good_row = st.builds(  # a row every kind accepts (sft, preference, unpaired, prompt), so that files also load
    lambda q, a, b: {"prompt": q, "completion": a, "chosen": a, "rejected": a + b, "label": True},
    word, word, word,
)
rows = st.lists(good_row | st.dictionaries(st.sampled_from(COLUMNS), values, max_size=5) | values, max_size=4)
damage = st.one_of(
    st.none(),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("replace"), st.binary(max_size=64)),
)


def _csv_bytes(rows) -> bytes:
    dicts = [r for r in rows if isinstance(r, dict)]
    header = sorted({k for r in dicts for k in r}) or ["prompt"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        if isinstance(row, dict):
            writer.writerow(["" if row.get(k) is None else str(row.get(k)) for k in header])
        else:
            writer.writerow([str(row)])
    return out.getvalue().encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


def _parquet_bytes(rows) -> bytes:
    dicts = [r for r in rows if isinstance(r, dict)]
    out = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(dicts), out)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # mixed types: every value as JSON text
        names = sorted({k for r in dicts for k in r})
        out = io.BytesIO()
        pq.write_table(pa.table({k: [None if k not in r else json.dumps(r[k]) for r in dicts] for k in names}), out)
    return out.getvalue()


def _file_bytes(fmt: str, rows) -> bytes:
    base = fmt.removesuffix(".gz")
    if base == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()  # ensure_ascii: surrogates as \ud800
    elif base == "json":
        data = json.dumps(rows).encode()
    elif base == "csv":
        data = _csv_bytes(rows)
    else:
        data = _parquet_bytes(rows)
    return gzip.compress(data, mtime=0) if fmt.endswith(".gz") else data


def _damage(data: bytes, how) -> bytes:
    if how is None:
        return data
    if how[0] == "replace":
        return how[1]
    at = int(how[1] * len(data))
    if how[0] == "insert":
        return data[:at] + how[2] + data[at:]
    if how[0] == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ how[2]]) + data[at + 1:]
    return data[:at]


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fmt=st.sampled_from(FORMATS), rows=rows, how=damage,
       kind=st.sampled_from(["sft", "preference", "unpaired", "prompt"]), on_error=st.sampled_from(["raise", "skip"]))
def test_only_data_errors_naming_file_and_line_escape(fmt, rows, how, kind, on_error):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"data.{fmt}")
        with open(path, "wb") as f:
            f.write(_damage(_file_bytes(fmt, rows), how))
        try:
            dataset = load_dataset(path, kind=kind, tokenizer=offline_tokenizer(), config=CONFIG, on_error=on_error)
        except DataError as error:
            assert error.ref.source == path and str(error).startswith(path)
            if error.ref.index is None:  # a whole-file verdict names the first bad row's line
                assert str(error).startswith(f"{path}: no usable {kind} rows (")
                assert "first problem" not in str(error) or f"first problem: {path} " in str(error)
            else:
                assert isinstance(error.ref.index, int) and error.ref.index >= 0
                assert str(error).startswith(f"{path} {error.ref.unit} {error.ref.index}: ")
        else:
            assert dataset.num_rows == len(dataset) + len(dataset.skipped)  # nothing dropped silently
            assert all(e.ref.source == path and isinstance(e.ref.index, int) for e in dataset.skipped)
            if on_error == "raise":
                assert not dataset.skipped
