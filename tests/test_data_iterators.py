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
        assert states[1] == {
            "seed": 1,
            "epoch": 0,
            "position": 4,
            "process_index": 0,
            "process_count": 1,
            "num_examples": 12,
        }
        assert states[3]["epoch"] == 1 and states[3]["position"] == 0
    assert any(s["epoch"] == 1 for s in states)
    for k, state in enumerate(states):
        restored = _iter(ds, seed=1, pack=pack, max_segments=3)
        restored.set_state(state)
        assert restored.get_state() == state
        for expected in batches[k:]:
            _same(next(restored), expected)


def test_hosts_are_disjoint_and_complete_per_epoch():
    ds, hosts, n = _dataset(10), 3, 10
    per_host = []
    for h in range(hosts):
        it = _iter(ds, seed=2, batch_size=2, process_index=h, process_count=hosts)
        per_host.append([i for _ in range(5) for i in _ids(ds, next(it))])
    # Host h's k-th example is global stream position k * hosts + h.
    by_epoch = {}
    for h, examples in enumerate(per_host):
        for k, i in enumerate(examples):
            g = k * hosts + h
            by_epoch.setdefault(g // n, {}).setdefault(h, []).append(i)
            assert (
                i
                == BatchIterator(
                    ds, BatchConfig(batch_size=2, seq_len=16, seed=2), process_index=0, process_count=1
                ).epoch_order(g // n)[g % n]
            )
    for epoch in (0, 1, 2):
        shards = by_epoch[epoch]
        flat = [i for h in range(hosts) for i in shards[h]]
        assert sorted(flat) == list(range(n))  # complete and disjoint
        assert max(map(len, shards.values())) - min(map(len, shards.values())) <= 1


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
        ValueError, match="state\\['process_count'\\] = 1 but this iterator has process_count = 2"
    ):
        _iter(ds, seed=1, process_count=2).set_state(state)
    with pytest.raises(
        ValueError, match="state\\['num_examples'\\] = 10 but this iterator has num_examples = 9"
    ):
        _iter(_dataset(9), seed=1).set_state(state)
    with pytest.raises(ValueError, match="state lacks \\['position'\\]"):
        _iter(ds, seed=1).set_state({k: v for k, v in state.items() if k != "position"})


def test_config_errors_are_named():
    ds = _dataset(4)
    with pytest.raises(ValueError, match="has a sequence of 8 tokens but BatchConfig.seq_len=6"):
        _iter(ds, seq_len=6)
    prompts = load_dataset(
        [{"prompt": "a"}], kind="prompt", tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=8)
    )
    with pytest.raises(ValueError, match="pack applies to sft and preference data, not 'prompt'"):
        _iter(prompts, pack=True)
    with pytest.raises(ValueError, match="BatchConfig.batch_size must be a positive int"):
        BatchConfig(batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="process_index < process_count"):
        _iter(ds, process_index=2, process_count=2)
