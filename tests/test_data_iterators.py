"""Iteration: determinism by seed, epochs, per-host sharding, exact resume mid-epoch and at epoch ends."""

import json

import numpy as np
import pytest

from rlhf_jax.data import BatchConfig, BatchIterator, TokenizeConfig, load_dataset
from rlhf_jax.testing.tokenizer import offline_tokenizer


def _dataset(n):
    # Example i has a unique completion, of length 1 + i % 4, so rows identify examples.
    rows = [{"prompt": f"{i}:", "completion": chr(97 + i % 26) * (1 + i % 4)} for i in range(n)]
    return load_dataset(rows, kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=16))


def _ids(dataset, batch):
    """Example indices of a batch, row by row, segment by segment (-1 for an empty slot)."""
    lookup = {tuple(dataset.arrays["tokens"][i].tolist()): i for i in range(len(dataset))}
    out = []
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
        out.extend(lookup[tuple(tokens[seg == s].tolist())] for s in range(1, seg.max() + 1))
    return out


def _iter(dataset, **kw):
    host = dict(process_index=kw.pop("process_index", 0), process_count=kw.pop("process_count", 1))
    return BatchIterator(dataset, BatchConfig(**{"batch_size": 4, "seq_len": 16, **kw}), **host)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_same_seed_same_stream_other_seed_other_stream():
    ds = _dataset(10)
    a, b, c = _iter(ds, seed=3), _iter(ds, seed=3), _iter(ds, seed=4)
    stream_a = [_ids(ds, next(a)) for _ in range(6)]
    assert stream_a == [_ids(ds, next(b)) for _ in range(6)]
    assert stream_a != [_ids(ds, next(c)) for _ in range(6)]


def test_epochs_are_seeded_permutations_without_gaps():
    ds = _dataset(10)
    it = _iter(ds, seed=5, batch_size=5)
    flat = [i for _ in range(6) for i in _ids(ds, next(it))]
    for epoch in range(3):
        order = np.random.default_rng([5, epoch]).permutation(10).tolist()
        assert flat[10 * epoch : 10 * (epoch + 1)] == order == it.epoch_order(epoch).tolist()
    assert flat[:10] != flat[10:20]
    assert [i for _ in range(3) for i in _ids(ds, next(_iter(ds, shuffle=False, batch_size=5)))][:5] == [
        0,
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize("pack", [False, True])
def test_resume_yields_exactly_the_remaining_stream(pack):
    ds = _dataset(12)
    reference = _iter(ds, seed=1, pack=pack, max_segments=3)
    states, batches = [], []
    for _ in range(8):
        states.append(json.loads(json.dumps(reference.get_state())))  # what a checkpoint stores
        batches.append(next(reference))
    if not pack:  # 12 examples, 4 per batch: after 3 batches the next example starts epoch 1
        assert states[1] == {"seed": 1, "epoch": 0, "position": 4, "num_examples": 12, "shuffle": True,
                             "lengths_digest": states[0]["lengths_digest"]}
        assert states[3]["epoch"] == 1 and states[3]["position"] == 0
    assert any(s["epoch"] == 1 for s in states)
    for k, state in enumerate(states):
        restored = _iter(ds, seed=1, pack=pack, max_segments=3)
        restored.set_state(state)
        assert restored.get_state() == state
        for expected in batches[k:]:
            _same(next(restored), expected)


@pytest.mark.parametrize("pack", [False, True])
def test_processes_split_the_same_global_batches(pack):
    """P processes collate consecutive row blocks of the one global batch: together they are the batch
    a single process forms, for any process count, and a state saved under one count continues under another."""
    ds = _dataset(10)
    kw = dict(seed=2, batch_size=6, pack=pack, max_segments=2, seq_len=16)
    single = _iter(ds, **kw)
    expected = [next(single) for _ in range(4)]
    for hosts in (2, 3):
        its = [_iter(ds, process_index=h, process_count=hosts, **kw) for h in range(hosts)]
        for k in range(4):
            parts = [next(it) for it in its]
            joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            _same(joined, expected[k])
            assert its[0].last_global_rows == its[1].last_global_rows
            assert [r for h in range(hosts) for r in its[h].last_rows] == its[0].last_global_rows
        # Resuming under another process count continues the same stream.
        state = its[0].get_state()
        assert all(it.get_state() == state for it in its)
        other = _iter(ds, **kw)
        other.set_state(state)
        _same(next(other), next(single))
        single = _iter(ds, **kw)
        for _ in range(4):
            next(single)
    with pytest.raises(ValueError, match="global batch_size 6 does not split over 4 processes"):
        _iter(ds, process_index=0, process_count=4, **kw)


@pytest.mark.parametrize("pack", [False, True])
def test_finite_epochs_pad_or_drop_the_last_batch(pack):
    ds = _dataset(10)
    batches = list(_iter(ds, num_epochs=1, pack=pack, max_segments=2, seq_len=10))
    seen = [i for b in batches for i in _ids(ds, b)]
    assert sorted(seen) == list(range(10))
    last = batches[-1]
    if not pack:
        assert len(batches) == 3
        np.testing.assert_array_equal(last["example_mask"][:, 0], [True, True, False, False])
        assert (
            not last["loss_mask"][2:].any()
            and not last["segment_ids"][2:].any()
            and (last["tokens"][2:] == 0).all()
        )
    dropped = list(_iter(ds, num_epochs=1, pack=pack, max_segments=2, seq_len=10, drop_remainder=True))
    assert len(dropped) == len(batches) - 1
    for a, b in zip(dropped, batches):
        _same(a, b)
    assert len(list(_iter(ds, num_epochs=2, shuffle=False))) == 5  # 20 examples, 4 per batch


def test_state_mismatches_are_named():
    ds = _dataset(10)
    state = _iter(ds, seed=1).get_state()
    with pytest.raises(ValueError, match="state\\['seed'\\] = 1 but this iterator has seed = 2"):
        _iter(ds, seed=2).set_state(state)
    with pytest.raises(
        ValueError, match="state\\['num_examples'\\] = 10 but this iterator has num_examples = 9"
    ):
        _iter(_dataset(9), seed=1).set_state(state)
    with pytest.raises(ValueError, match="state lacks \\['position'\\]"):
        _iter(ds, seed=1).set_state({k: v for k, v in state.items() if k != "position"})


def test_config_errors_are_named():
    ds = _dataset(4)
    # Examples 0..3 have 5, 6, 7 and 8 tokens.
    with pytest.raises(ValueError, match="has a sequence of 8 tokens but BatchConfig.seq_len=6 \\(example 2 is the"):
        _iter(ds, seq_len=6)
    with pytest.raises(ValueError, match="seq_len=5 \\(example 1 is the first that does not fit\\)"):
        _iter(ds, seq_len=5)
    prompts = load_dataset(
        [{"prompt": "a"}], kind="prompt", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=8)
    )
    with pytest.raises(ValueError, match="pack applies to sft and preference data, not 'prompt'"):
        _iter(prompts, pack=True)
    with pytest.raises(ValueError, match="BatchConfig.batch_size must be a positive int"):
        BatchConfig(batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="process_index < process_count"):
        _iter(ds, process_index=2, process_count=2)


def test_kto_kl_rows_never_pair_an_example_with_its_own_completion():
    """A batch crossing an epoch boundary can hold an example twice; its KL rows used to take that
    example's own completion (a matched pair), as partners were looked up by example index."""
    rows = [{"prompt": p, "completion": c, "label": i % 2 == 0} for i, (p, c) in enumerate(["ax", "by", "cz"])]
    ds = load_dataset(rows, kind="unpaired", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=8))

    def kl_pairs(batch):  # (prompt char, completion char) of every KL row
        return [(chr(t[1] - 9 + 32), chr(t[2] - 9 + 32)) for t in batch["kl_tokens"]]

    kw = dict(batch_size=4, seq_len=8, shuffle=False)
    batch = next(_iter(ds, **kw))  # examples 0, 1, 2, 0
    assert kl_pairs(batch) == [("a", "y"), ("b", "z"), ("c", "x"), ("a", "y")]
    # Two processes collate their halves of the same KL rows.
    halves = [next(_iter(ds, process_index=h, process_count=2, **kw)) for h in range(2)]
    assert kl_pairs(halves[0]) + kl_pairs(halves[1]) == kl_pairs(batch)
    # One distinct example: nothing to mismatch it with, it is its own partner.
    one = load_dataset(rows[:1], kind="unpaired", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=8))
    assert kl_pairs(next(_iter(one, **kw))) == [("a", "x")] * 4


def test_bad_state_and_epoch_values_are_named():
    ds = _dataset(4)
    with pytest.raises(ValueError, match="BatchConfig.num_epochs must be None or a positive int, got True"):
        _iter(ds, num_epochs=True)
    state = _iter(ds).get_state()
    with pytest.raises(ValueError, match="state\\['position'\\] must be an int, got '2'"):
        _iter(ds).set_state({**state, "position": "2"})
    with pytest.raises(TypeError, match="state must be a mapping from get_state\\(\\), got NoneType"):
        _iter(ds).set_state(None)


def test_a_state_of_other_data_or_another_shuffle_is_refused():
    """Such a state used to be accepted whenever seed and size matched: its position then indexed
    another order, repeating and skipping examples silently."""
    ds = _dataset(10)
    state = _iter(ds, seed=1).get_state()
    other = load_dataset(
        [{"prompt": f"{i}:", "completion": "z" * (1 + i % 3)} for i in range(10)],
        kind="sft", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=16),
    )
    with pytest.raises(ValueError, match="state\\['lengths_digest'\\] = .* \\(another dataset: its examples'"):
        _iter(other, seed=1).set_state(state)
    with pytest.raises(ValueError, match="state\\['shuffle'\\] = True but this iterator has shuffle = False"):
        _iter(ds, seed=1, shuffle=False).set_state(state)
    # A state saved before these keys existed still resumes.
    legacy = _iter(ds, seed=1)
    legacy.set_state({k: state[k] for k in ("seed", "epoch", "position", "num_examples")} | {"position": 3})
    assert _ids(ds, next(legacy)) == legacy.epoch_order(0)[3:7].tolist()


def test_processes_cover_each_epoch_once_with_the_last_batch_padded_or_dropped():
    """7 examples, global batches of 4 over 2 processes, 2 epochs: the processes' rows, in order, are
    the stream of the epochs' permutations, each example once per epoch (a batch that crosses the
    epoch boundary may hold one twice); the stream's last partial batch is padded (3 rows
    and a masked one) or, with drop_remainder, dropped whole."""
    ds = _dataset(7)
    for drop in (False, True):
        its = [_iter(ds, seed=9, num_epochs=2, drop_remainder=drop, process_index=h, process_count=2)
               for h in range(2)]
        seen, masks = [], []
        while True:
            try:
                parts = [next(it) for it in its]
            except StopIteration:
                break
            rows = [r for it in its for r in it.last_rows]
            seen += [i for r in rows for i in r]
            masks.append(np.concatenate([p["example_mask"][:, 0] for p in parts]).tolist())
        stream = its[0].epoch_order(0).tolist() + its[0].epoch_order(1).tolist()
        assert sorted(stream[:7]) == sorted(stream[7:]) == list(range(7))
        assert seen == (stream[:12] if drop else stream)
        assert masks[-1] == ([True] * 4 if drop else [True, True, False, False])
        assert len(masks) == (3 if drop else 4)


def test_resume_under_another_batch_size_continues_the_example_stream():
    ds = _dataset(10)
    it = _iter(ds, seed=4, batch_size=4)
    next(it)
    resumed = _iter(ds, seed=4, batch_size=2)
    resumed.set_state(it.get_state())
    order = np.concatenate([it.epoch_order(0), it.epoch_order(1)]).tolist()
    assert [i for _ in range(5) for i in _ids(ds, next(resumed))] == order[4:14]
