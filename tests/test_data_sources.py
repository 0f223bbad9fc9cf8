"""Sources: JSONL, JSON, Parquet, CSV, HF datasets on disk, TFDS (no TensorFlow), Python lists."""

import csv
import glob
import gzip
import json
import os
import re
import shutil
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import (
    DataError,
    TFDSSource,
    TokenizeConfig,
    load_dataset,
    read_rows,
    write_tfds_preferences,
)
from rlhf_jax.data.sources import SourceError
from rlhf_jax.data.tfds_preferences import PREFERENCE_BUILDER_NAME
from rlhf_jax.testing.tokenizer import offline_tokenizer

STRING_ROWS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.0},
    {"prompt": "3+3=", "chosen": "6", "rejected": "66", "margin": 0.0},
]
U = {"role": "user", "content": "hi"}
MESSAGE_ROWS = [
    {
        "prompt": [U],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go"}],
        "margin": 0.0,
    },
    {
        "prompt": [U],
        "chosen": [{"role": "assistant", "content": "hey"}],
        "rejected": [{"role": "assistant", "content": "no"}],
        "margin": 2.0,
    },
]
CONFIG = TokenizeConfig(max_len=32)


def _load(source, **kw):
    return load_dataset(source, kind="preference", tokenizer=offline_tokenizer(), config=CONFIG, **kw)


def _assert_same(a, b):
    assert len(a) == len(b)
    for name in ("chosen_tokens", "chosen_loss_mask", "rejected_tokens", "rejected_loss_mask"):
        np.testing.assert_array_equal(a.arrays[name].values, b.arrays[name].values)
        np.testing.assert_array_equal(a.arrays[name].offsets, b.arrays[name].offsets)
    np.testing.assert_array_equal(a.arrays["margin"], b.arrays["margin"])


@pytest.fixture(params=["strings", "messages"])
def rows(request):
    return STRING_ROWS if request.param == "strings" else MESSAGE_ROWS


def test_in_memory_rows_give_the_expected_tokens():
    ds = _load(STRING_ROWS)
    assert ds.arrays["chosen_tokens"][2].tolist() == [1, *[9 + ord(c) - 32 for c in "3+3=6"], 2]
    np.testing.assert_array_equal(ds.arrays["margin"], [0.5, 1.0, 0.0])


def test_jsonl_and_gzip(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(path.read_text())
    _assert_same(_load(path), _load(rows))
    _assert_same(_load(gz), _load(rows))
    assert [ref.index for ref, _ in read_rows(path)] == list(range(1, len(rows) + 1))


def test_json_array(tmp_path, rows):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows, indent=1))
    _assert_same(_load(path), _load(rows))
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(DataError, match="bad.json line 1: a .json file must hold an array of row objects"):
        _load(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "q",\n')
    with pytest.raises(DataError, match="broken.json line 3: malformed JSON"):
        _load(broken)


def test_parquet(tmp_path, rows):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _assert_same(_load(path), _load(rows))


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "margin"])
        writer.writeheader()
        writer.writerows(STRING_ROWS)
    _assert_same(_load(path), _load(STRING_ROWS))  # margins come back from the strings "0.5", ...
    with open(path, "a") as f:
        f.write('4+4=,8,9,0,extra\n"5+5=",10,10,0\n')
    ds = _load(path, on_error="skip")
    assert len(ds) == 3
    assert [str(e) for e in ds.skipped] == [
        f"{path} line 5: the row has more fields than the header ['prompt', 'chosen', 'rejected', 'margin']",
        f"{path} line 6: 'chosen' and 'rejected' are identical",
    ]


def test_hf_dataset_saved_to_disk(tmp_path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    _assert_same(_load(tmp_path / "one"), _load(rows))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(tmp_path / "dict")
    _assert_same(_load(tmp_path / "dict", split="test"), _load(rows[:1]))
    with pytest.raises(ValueError, match="DatasetDict with splits \\['test', 'train'\\]: pass split="):
        _load(tmp_path / "dict")
    _assert_same(_load(datasets.Dataset.from_list(rows)), _load(rows))  # in memory


def test_tfds_round_trip_without_tensorflow(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in STRING_ROWS + MESSAGE_ROWS))
    implicit = [
        {
            "chosen": [U, {"role": "assistant", "content": "yo"}],
            "rejected": [U, {"role": "assistant", "content": "no"}],
        }
    ]
    version_dir = write_tfds_preferences({"train": jsonl, "test": implicit}, tmp_path / "tfds")
    assert version_dir == str(tmp_path / "tfds" / PREFERENCE_BUILDER_NAME / "1.0.0")
    # Rows come back exactly, in order (an absent margin reads as 0).
    assert [row for _, row in read_rows(version_dir)] == STRING_ROWS + MESSAGE_ROWS
    assert [row for _, row in read_rows(version_dir, split="test")] == [{**implicit[0], "margin": 0.0}]
    # The same data through tfds.data_source by name, and through load_dataset.
    by_name = TFDSSource(PREFERENCE_BUILDER_NAME, data_dir=str(tmp_path / "tfds"), split="train")
    assert [row for _, row in read_rows(by_name)] == STRING_ROWS + MESSAGE_ROWS
    _assert_same(_load(version_dir), _load(STRING_ROWS + MESSAGE_ROWS))
    _assert_same(_load(by_name), _load(STRING_ROWS + MESSAGE_ROWS))
    assert "tensorflow" not in sys.modules
    with pytest.raises(FileExistsError, match="already prepared"):
        write_tfds_preferences({"train": jsonl}, tmp_path / "tfds")


def test_tfds_writer_names_bad_rows(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(STRING_ROWS[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl line 2: missing column 'rejected'"):
        write_tfds_preferences({"train": jsonl}, tmp_path / "tfds")
    # A lone surrogate (JSON escape) failed inside TFDS with an error naming no row.
    jsonl.write_text(json.dumps(STRING_ROWS[0]) + "\n" + '{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2: column 'chosen' \\(as JSON\\) holds the lone surrogate"):
        write_tfds_preferences({"train": jsonl}, tmp_path / "tfds")


def test_tfds_round_trip_of_edge_rows_and_splits(tmp_path):
    """Unicode, empty strings, control characters, a 100,000-character row and message lists come back
    exactly; splits stay apart; an empty split or a split name TFDS would read as a slice is refused."""
    edge = [
        {"prompt": "héllo 你好 🎉", "chosen": "", "rejected": "x\x00y\n\t", "margin": 1.5},
        {"prompt": "", "chosen": "a" * 100_000, "rejected": "", "margin": -2.0},
        {"prompt": [{"role": "user", "content": "ü"}], "chosen": [{"role": "assistant", "content": ""}],
         "rejected": [{"role": "assistant", "content": "z"}], "margin": 0.25},
    ]
    version_dir = write_tfds_preferences({"train": edge, "validation": STRING_ROWS}, tmp_path / "tfds")
    assert [row for _, row in read_rows(version_dir)] == edge
    assert [row for _, row in read_rows(version_dir, split="validation")] == STRING_ROWS
    with pytest.raises(ValueError, match="splits \\['train', 'validation'\\], not 'test'"):
        list(read_rows(version_dir, split="test"))
    with pytest.raises(ValueError, match="split 'test' \\(<rows>\\) has no rows"):
        write_tfds_preferences({"test": []}, tmp_path / "empty")
    with pytest.raises(ValueError, match="split names must be letters, digits and '_', got 'train\\[:5\\]'"):
        write_tfds_preferences({"train[:5]": STRING_ROWS}, tmp_path / "sliced")


def test_a_rebuilt_tfds_dataset_reads_its_new_rows(tmp_path):
    data_dir = tmp_path / "tfds"
    version_dir = write_tfds_preferences({"train": STRING_ROWS}, data_dir)
    assert len(list(read_rows(version_dir))) == 3
    shutil.rmtree(version_dir)
    write_tfds_preferences({"train": STRING_ROWS[:1]}, data_dir)
    assert [row for _, row in read_rows(version_dir)] == STRING_ROWS[:1]
    by_name = TFDSSource(PREFERENCE_BUILDER_NAME, data_dir=str(data_dir), split="train")
    assert [row for _, row in read_rows(by_name)] == STRING_ROWS[:1]


@pytest.mark.parametrize("damage", ["half", "tail", "missing", "bit"])
def test_a_damaged_array_record_file_is_an_error_naming_it(tmp_path, damage):
    """A half-written array_record file read back as rows of None features (then a TypeError in JSON
    decoding), a damaged one as a Riegeli RuntimeError naming no file."""
    version_dir = write_tfds_preferences({"train": STRING_ROWS}, tmp_path / "tfds")
    (path,) = glob.glob(os.path.join(version_dir, "*-train.array_record-*"))
    data = open(path, "rb").read()
    if damage == "missing":
        os.remove(path)
    else:
        at = {"half": len(data) // 2, "tail": len(data) - 10}.get(damage, len(data))
        damaged = bytearray(data[:at])
        if damage == "bit":  # a flipped bit in the records' chunk data (bytes 64...) fails its checksum
            damaged[100] ^= 1
        open(path, "wb").write(bytes(damaged))
    where = "row 0 of the array_record file " if damage == "bit" else "the array_record file "
    with pytest.raises(SourceError, match=re.escape(where + path)):
        list(read_rows(version_dir))
    with pytest.raises(SourceError, match=re.escape(path)):
        _load(TFDSSource(PREFERENCE_BUILDER_NAME, data_dir=str(tmp_path / "tfds"), split="train"))


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _load(tmp_path / "nope.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type '.txt' of .*p.txt"):
        _load(tmp_path / "p.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saved Hugging Face dataset"):
        _load(tmp_path / "empty")
    with pytest.raises(TypeError, match="unsupported source int"):
        _load(3)


# Bad bytes and damaged files (issue 22): a DataError naming file, line and byte offset, never a bare
# UnicodeDecodeError or EOFError.
GOOD_LINE = json.dumps(STRING_ROWS[0]).encode() + b"\n"


def test_a_bad_byte_in_jsonl_names_line_and_offset_and_is_skippable(tmp_path):
    path = tmp_path / "p.jsonl"
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    data = GOOD_LINE + bad + GOOD_LINE
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    message = f"{path} line 2: invalid UTF-8 byte 0xe9 at byte offset {offset} (the file must be UTF-8 text)"
    with pytest.raises(DataError) as info:
        _load(path)
    assert str(info.value) == message and offset == 81  # len(GOOD_LINE) + len(b'{"prompt": "caf')
    ds = _load(path, on_error="skip")
    assert len(ds) == 2 and ds.num_rows == 3
    assert [str(e) for e in ds.skipped] == [message]
    assert f"{path}: 3 rows read, 2 preference examples, 1 rows skipped ({message})" == ds.report()


def test_a_bad_byte_in_csv_skips_the_record_holding_it(tmp_path):
    path = tmp_path / "p.csv"
    data = b'prompt,chosen,rejected\n1+1=,2,3\n"a\nb\xff",4,5\n2+2=,4,5\n'
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(DataError, match=f"p.csv line 4: invalid UTF-8 byte 0xff at byte offset {offset} "):
        _load(path)
    ds = _load(path, on_error="skip")  # the quoted record spans lines 3-4; line 5 is read as before
    assert [str(e) for e in ds.skipped] == [
        f"{path} line 4: invalid UTF-8 byte 0xff at byte offset 36 (the file must be UTF-8 text)"
    ]
    _assert_same(ds, _load([{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                            {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]))
    header = tmp_path / "h.csv"
    header.write_bytes(b"prompt,ch\xc3osen,rejected\n1+1=,2,3\n")
    with pytest.raises(DataError, match="h.csv line 1: invalid UTF-8 byte 0xc3 at byte offset 9 "):
        _load(header, on_error="skip")  # no header, no rows: not skippable


def test_a_bad_byte_in_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "p.json"
    data = b'[\n' + GOOD_LINE.rstrip() + b',\n{"prompt": "\x80", "chosen": "a", "rejected": "b"}\n]'
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        _load(path)
    offset = data.index(b"\x80")
    assert str(info.value) == (
        f"{path} line 3: invalid UTF-8 byte 0x80 at byte offset {offset} (the file must be UTF-8 text)"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_a_leading_bom_is_accepted(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in STRING_ROWS)
    elif suffix == ".json":
        text = json.dumps(STRING_ROWS)
    else:
        text = "prompt,chosen,rejected,margin\n" + "".join(
            f"{r['prompt']},{r['chosen']},{r['rejected']},{r['margin']}\n" for r in STRING_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    _assert_same(_load(path), _load(STRING_ROWS))
    gz = tmp_path / f"p{suffix}.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    _assert_same(_load(gz), _load(STRING_ROWS))


def test_a_truncated_gzip_names_the_file_and_the_last_good_line(tmp_path):
    lines = [json.dumps({"prompt": f"{i}+{i}=", "chosen": "x" * 30 + str(i), "rejected": "y"}) for i in range(400)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    read = []
    with pytest.raises(DataError) as info:
        for ref, row in read_rows(path):
            read.append((ref.index, row))
    good = len(read)
    assert 0 < good < 400 and read == [(i + 1, json.loads(lines[i])) for i in range(good)]
    assert str(info.value) == (
        f"{path} line {good + 1}: the compressed file is corrupt or truncated (EOFError: Compressed file ended "
        f"before the end-of-stream marker was reached); the last good line is {good}"
    )
    with pytest.raises(DataError, match=f"the last good line is {good}"):
        _load(path, on_error="skip")  # the rest of the file is lost: never skipped silently
    not_gzip = tmp_path / "q.csv.gz"
    not_gzip.write_bytes(b"prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="q.csv.gz line 1: the compressed file is corrupt or truncated "
                                        "\\(BadGzipFile: Not a gzipped file \\(b'pr'\\)\\); no line could be read"):
        _load(not_gzip)
    json_gz = tmp_path / "p.json.gz"
    json_gz.write_bytes(gzip.compress(json.dumps(STRING_ROWS, indent=1).encode())[:-12])
    with pytest.raises(DataError, match="p.json.gz line .*: the compressed file is corrupt or truncated"):
        _load(json_gz)


def test_a_corrupt_parquet_file_names_the_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(STRING_ROWS), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(DataError, match="p.parquet row 0: not a readable Parquet file .*; no row could be read"):
        _load(path)


def test_the_data_modules_import_no_circle():
    """No module of rlhf_jax.data imports another that (directly or not) imports it back, at any depth."""
    import ast
    import pathlib

    import rlhf_jax.data as data

    root = pathlib.Path(data.__file__).parent
    graph = {}
    for file in root.glob("*.py"):
        if file.name == "__init__.py":
            continue
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):  # function-level imports included
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_jax.data."):
                imported.add(node.module.rsplit(".", 1)[1])
        graph[file.stem] = imported

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert graph["sources"] and graph["tfds_preferences"]  # the graph was read
    assert [m for m in sorted(graph) if reaches(m, m)] == []


def test_rename_onto_an_existing_column_is_a_bad_row_not_a_silent_overwrite():
    tok = offline_tokenizer()
    config = TokenizeConfig(max_len=32)
    rows = [{"question": "q", "response": "r"}, {"prompt": "p", "question": "q", "completion": "c"}]
    rename = {"question": "prompt", "response": "completion"}
    with pytest.raises(DataError, match=r"<rows> row 1: rename maps column 'question' to 'prompt', which the row"):
        load_dataset(rows, kind="sft", tokenizer=tok, config=config, rename=rename)
    dataset = load_dataset(rows, kind="sft", tokenizer=tok, config=config, rename=rename, on_error="skip")
    assert (len(dataset), dataset.num_rows, len(dataset.skipped)) == (1, 2, 1)
    # a swap of two columns is no clash
    swapped = load_dataset([{"prompt": "c", "completion": "p"}], kind="sft", tokenizer=tok, config=config,
                           rename={"prompt": "completion", "completion": "prompt"})
    assert tok.decode(swapped.arrays["tokens"][0]) == "<bos>pc<eos>"
