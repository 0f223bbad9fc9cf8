"""Sharded loading (`rlhf_jax.data.sharded`): P processes, simulated by P threads that swap their tables
through an in-memory all-gather, each tokenize only their share of the rows, yet their blocks put
together are, batch for batch, the global batches of one process over `load_dataset` (shuffled,
packed, across epochs, KTO pairs, prompt columns), resume included; bad rows are agreed on."""

import json
import threading

import numpy as np
import pytest

from rlhf_jax.data import BatchConfig, BatchIterator, DataError, TokenizeConfig, load_dataset
from rlhf_jax.data.sharded import ShardedDataset, load_sharded
from rlhf_jax.data.sources import source_fingerprint
from rlhf_jax.testing.tokenizer import offline_tokenizer

TOKENIZE = TokenizeConfig(max_len=24, chunk_size=4)


def _rows(kind, n):
    rows = []
    for i in range(n):
        word = chr(97 + i % 26) * (1 + i % 5)
        if kind == "sft":
            rows.append({"prompt": f"{i}:", "completion": word})
        elif kind == "preference":
            rows.append({"prompt": f"{i}:", "chosen": word, "rejected": word[:1] + "z" * (1 + i % 3)})
        elif kind == "unpaired":
            rows.append({"prompt": f"{i}:", "completion": word, "label": i % 3 != 0})
        else:
            rows.append({"prompt": f"{i}: {word}", "answer": str(i)})
    return rows


def _sharded(source, kind, count, *, tokenizer=None, on_error="raise"):
    """`load_sharded` on `count` threads joined by an in-memory all-gather: per process, the dataset or the error.

    `source` may be a list of one source per process (each host's own copy of a path)."""
    tokenizer = tokenizer or offline_tokenizer()
    barrier, slots = threading.Barrier(count), [None] * count
    out = [None] * count

    def allgather(index):
        def gather(x):
            slots[index] = np.asarray(x)
            barrier.wait()
            result = np.concatenate(list(slots))
            barrier.wait()
            return result
        return gather

    def work(index):
        try:
            mine = source[index] if isinstance(source, list) and len(source) == count and \
                not isinstance(source[0], dict) else source
            out[index] = load_sharded(mine, kind=kind, tokenizer=tokenizer, config=TOKENIZE, index=index,
                                      count=count, allgather=allgather(index), on_error=on_error)
        except Exception as e:  # noqa: BLE001 (compared by the test)
            out[index] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _global(iterators):
    """The next global batch: every process's block, concatenated in process order."""
    blocks = [next(it) for it in iterators]
    return {k: (np.concatenate([b[k] for b in blocks]) if k != "columns"
                else {c: sum((b[k][c] for b in blocks), []) for c in blocks[0][k]}) for k in blocks[0]}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "columns":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kind, pack", [("sft", True), ("preference", True), ("unpaired", False), ("prompt", False)])
def test_shards_form_the_global_batches_of_one_process(kind, pack, tmp_path):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(kind, 37)))
    config = BatchConfig(batch_size=8, seq_len=24, pack=pack, max_segments=3, seed=7)
    whole = load_dataset(str(path), kind=kind, tokenizer=offline_tokenizer(), config=TOKENIZE)
    one = BatchIterator(whole, config, process_index=0, process_count=1)
    for count in (2, 4):
        shards = _sharded(str(path), kind, count)
        assert all(isinstance(s, ShardedDataset) for s in shards), shards
        assert [len(s) for s in shards] == [len(whole)] * count
        np.testing.assert_array_equal(shards[0].lengths(), whole.lengths())
        its = [BatchIterator(s, config, process_index=i, process_count=count) for i, s in enumerate(shards)]
        ref = BatchIterator(whole, config, process_index=0, process_count=1)
        for step in range(12):  # several epochs: 37 examples, 8 rows a batch
            _same(_global(its), next(ref))
            assert its[0].get_state() == ref.get_state()
        # Each process tokenized its rows once to validate them, then the examples it collates.
        for s in shards:
            assert s.rows_validated in (len(whole) // count, len(whole) // count + 1)
            epochs = ref.get_state()["epoch"] + 1  # each one loaded its share of every epoch begun
            assert s.rows_tokenized <= epochs * (len(whole) + 24) / count + 4, (count, epochs, s.rows_tokenized)
            assert len(s.held) < len(whole)
        # Resume: fresh sharded iterators from the saved state continue exactly.
        state = ref.get_state()
        again = [BatchIterator(s, config, process_index=i, process_count=count) for i, s in enumerate(shards)]
        for it in again:
            it.set_state(state)
        for _ in range(3):
            _same(_global(again), next(ref))
    del one


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired", "prompt"])
def test_one_pass_over_shards_ending_in_padding_rows(kind):
    rows = _rows(kind, 21)  # the last batch holds one example: process 1's rows are all padding
    whole = load_dataset(rows, kind=kind, tokenizer=offline_tokenizer(), config=TOKENIZE)
    shards = _sharded(rows, kind, 2)
    config = BatchConfig(batch_size=4, seq_len=24, shuffle=False, num_epochs=1)
    ref = list(BatchIterator(whole, config, process_index=0, process_count=1))
    its = [BatchIterator(s, config, process_index=i, process_count=2) for i, s in enumerate(shards)]
    for batch in ref:
        _same(_global(its), batch)
        assert its[0].last_global_rows == its[1].last_global_rows
    for it in its:
        with pytest.raises(StopIteration):
            next(it)


def test_bad_rows_are_agreed_on(tmp_path):
    rows = _rows("sft", 20)
    rows[13] = {"prompt": "x"}  # no completion
    rows[6] = {"completion": "y"}  # no prompt: the first bad row, read by process 0 of 2 and 2 of 4
    errors = _sharded(rows, "sft", 4)
    single = pytest.raises(DataError, load_dataset, rows, kind="sft", tokenizer=offline_tokenizer(), config=TOKENIZE)
    assert all(isinstance(e, DataError) for e in errors), errors
    assert {str(e) for e in errors} == {str(single.value)}
    # on_error="skip": the global counts, the same examples as one process.
    whole = load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(), config=TOKENIZE, on_error="skip")
    shards = _sharded(rows, "sft", 2, on_error="skip")
    assert [(len(s), s.num_rows, s.num_skipped) for s in shards] == [(18, 20, 2)] * 2
    np.testing.assert_array_equal(shards[1].lengths(), whole.lengths())
    config = BatchConfig(batch_size=6, seq_len=24, seed=1)
    ref = BatchIterator(whole, config, process_index=0, process_count=1)
    its = [BatchIterator(s, config, process_index=i, process_count=2) for i, s in enumerate(shards)]
    for _ in range(5):
        _same(_global(its), next(ref))


def test_hosts_with_different_copies_of_a_file_are_told_so(tmp_path):
    """Each host reads its own copy of the data path; copies that differ (an edited row, the same row
    count) used to give a silently mixed dataset. Every process now raises the same DataError naming
    the source and which processes hold which copy; equal copies load as before."""
    rows = _rows("sft", 12)
    copies = [tmp_path / f"host{i}" / "train.jsonl" for i in range(3)]
    for i, path in enumerate(copies):
        path.parent.mkdir()
        edited = [dict(r, completion="changed") if (i == 2 and k == 5) else r for k, r in enumerate(rows)]
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    errors = _sharded([str(p) for p in copies], "sft", 3)
    assert all(isinstance(e, DataError) for e in errors), errors
    # (a real run names the same path on every host; here each host's copy has its own path)
    problems = {str(e).removeprefix(f"{path}: ") for e, path in zip(errors, copies)}
    assert len(problems) == 1
    problem = problems.pop()
    assert problem.startswith("the processes' copies of the source differ (sha256 ")
    assert "on processes [0, 1]; sha256 " in problem and problem.endswith(
        "on processes [2]): every process must read the same data")
    same = _sharded([str(p) for p in copies[:2]], "sft", 2)
    assert [len(d) for d in same] == [12, 12]


def test_source_fingerprint_of_a_directory_reads_metadata_and_sizes_only(tmp_path):
    """A directory's fingerprint: relative paths, sizes and the bytes of files up to 1 MiB; so two
    copies are equal, an edited metadata file or a shard of another size tells them apart."""
    def make(root, state='{"_fingerprint": "a"}', shard=b"x" * (2 << 20)):
        (root / "train").mkdir(parents=True)
        (root / "train" / "state.json").write_text(state)
        (root / "train" / "data-00000.arrow").write_bytes(shard)
        return source_fingerprint(str(root))

    one, two = make(tmp_path / "a"), make(tmp_path / "b")
    assert one == two and len(one) == 32
    assert make(tmp_path / "c", state='{"_fingerprint": "b"}') != one
    assert make(tmp_path / "d", shard=b"x" * ((2 << 20) + 1)) != one
    assert make(tmp_path / "e", shard=b"y" * (2 << 20)) == one  # a shard's bytes are not read
    assert source_fingerprint([{"prompt": "a"}]) is None
