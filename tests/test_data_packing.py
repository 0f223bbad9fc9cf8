"""Packing and batch layouts: first-fit goldens, segment helpers, and packed == unpacked with the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import (
    BatchConfig,
    BatchIterator,
    RowPacker,
    TokenizeConfig,
    batch_spec,
    collate,
    load_dataset,
    pack_rows,
    segment_last_index,
    segment_sums,
)
from rlhf_jax.testing.tokenizer import offline_tokenizer

BOS, EOS = 1, 2


def ids(text):
    return [9 + ord(c) - 32 for c in text]


def _load(rows, kind, max_len=32):
    return load_dataset(
        rows, kind=kind, tokenizer=offline_tokenizer(), config=TokenizeConfig(max_len=max_len)
    )


def test_row_packer_first_fit_stops_at_the_first_misfit():
    packer = RowPacker(batch_size=2, seq_len=8, max_segments=3)
    assert [packer.add(i, [n]) for i, n in enumerate([5, 3, 4, 2])] == [True] * 4
    assert not packer.add(4, [6])  # row 0 holds 8, row 1 holds 6: no room, the batch is closed
    assert packer.rows == [[0, 1], [2, 3]] and not packer.full
    packer = RowPacker(batch_size=2, seq_len=8, max_segments=2)
    assert (
        [packer.add(i, [1]) for i in range(4)] == [True] * 4
        and packer.full
        and packer.rows == [[0, 1], [2, 3]]
    )
    # Two tracks: both must fit in the same row.
    packer = RowPacker(batch_size=2, seq_len=8, max_segments=4, num_tracks=2)
    assert packer.add(0, [6, 2]) and packer.add(1, [2, 6]) and packer.add(2, [1, 1])
    assert packer.rows == [[0, 1], [2]]
    with pytest.raises(ValueError, match="length 9 exceeds seq_len=8"):
        packer.add(3, [9, 1])
    # With no example shorter than 3 tokens, a row with 2 tokens of room is closed.
    packer = RowPacker(batch_size=2, seq_len=8, max_segments=4, min_length=3)
    assert packer.add(0, [6]) and not packer.full and packer.add(1, [6]) and packer.full
    assert packer.rows == [[0], [1]]


def test_pack_rows_keeps_every_example_once_in_order():
    lengths = np.random.default_rng(0).integers(1, 9, size=50)
    batches = pack_rows(lengths, batch_size=3, seq_len=10, max_segments=4)
    flat = [i for batch in batches for row in batch for i in row]
    assert sorted(flat) == list(range(50))
    for batch in batches:
        for row in batch:
            assert lengths[row].sum() <= 10 and len(row) <= 4


def test_packed_sft_row_layout():
    ds = _load(
        [
            {"prompt": "a", "completion": "bc"},
            {"prompt": "de", "completion": "f"},
            {"prompt": "g", "completion": "h"},
        ],
        "sft",
    )
    batch = collate(ds, [[0, 1, 2], []], seq_len=16, num_segments=4)
    np.testing.assert_array_equal(
        batch["tokens"][0], [BOS, *ids("abc"), EOS, BOS, *ids("def"), EOS, BOS, *ids("gh"), EOS, 0, 0]
    )
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 5 + [3] * 4 + [0, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["example_mask"], [[1, 1, 1, 0], [0, 0, 0, 0]])
    assert not batch["loss_mask"][1].any() and not batch["segment_ids"][1].any()


def test_packed_preference_pairs_share_row_and_slot():
    rows = [
        {"prompt": "p", "chosen": "long answer", "rejected": "x", "margin": 1.0},
        {"prompt": "q", "chosen": "y", "rejected": "another long", "margin": 2.0},
        {"prompt": "r", "chosen": "zz", "rejected": "w"},
    ]
    ds = _load(rows, "preference")
    it = BatchIterator(
        ds,
        BatchConfig(batch_size=2, seq_len=20, pack=True, max_segments=3, shuffle=False, num_epochs=1),
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    # Pair 0 (14/4 tokens) and pair 1 (4/15) fit together on both tracks; pair 2 (5/4) overflows the
    # rejected track of row 0 (4+15+4 > 20) and goes to row 1.
    np.testing.assert_array_equal(batch["example_mask"], [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(batch["margin"], [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    for track, texts in (("chosen", ["long answer", "y", "zz"]), ("rejected", ["x", "another long", "w"])):
        tokens, seg = batch[f"{track}_tokens"], batch[f"{track}_segment_ids"]
        for (b, s), text in zip([(0, 1), (0, 2), (1, 1)], texts):
            assert tokens[b][seg[b] == s].tolist()[2:] == ids(text) + [EOS]


def test_unpaired_and_prompt_batches_kto_pairs_and_padding_rows():
    rows = [
        {"prompt": "a", "completion": "xx", "label": True},
        {"prompt": "bb", "completion": "y", "label": False},
    ]
    ds = _load(rows, "unpaired")
    batch = collate(ds, [[0], [], [1]], seq_len=8)  # an empty (padding) row between the two
    np.testing.assert_array_equal(batch["label"], [True, False, False])
    np.testing.assert_array_equal(batch["example_mask"], [True, False, True])
    # KL row b: prompt of its example + completion of the other one.
    np.testing.assert_array_equal(batch["kl_tokens"][0], [BOS, *ids("a"), *ids("y"), EOS, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["kl_loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["kl_tokens"][2], [BOS, *ids("bb"), *ids("xx"), EOS, 0, 0])
    np.testing.assert_array_equal(batch["kl_loss_mask"][2], [0, 0, 0, 1, 1, 1, 0, 0])
    assert not batch["kl_segment_ids"][1].any() and not batch["segment_ids"][1].any()
    np.testing.assert_array_equal(batch["tokens"][2], [BOS, *ids("bb"), *ids("y"), EOS, 0, 0, 0])
    prompts = _load([{"prompt": "a", "answer": "1"}, {"prompt": "bcd", "answer": "2"}], "prompt")
    batch = collate(prompts, [[1], [], [0]], seq_len=5)
    np.testing.assert_array_equal(
        batch["prompt_tokens"], [[BOS, *ids("bcd"), 0], [0] * 5, [BOS, *ids("a"), 0, 0, 0]]
    )
    np.testing.assert_array_equal(batch["prompt_lengths"], [4, 0, 2])
    assert batch["columns"] == {"answer": ["2", None, "1"]}


@pytest.mark.parametrize(
    "kind, pack",
    [
        ("sft", False),
        ("sft", True),
        ("preference", False),
        ("preference", True),
        ("unpaired", False),
        ("prompt", False),
    ],
)
def test_batch_spec_matches_collate(kind, pack):
    rows = {
        "sft": [{"prompt": "a", "completion": "b"}] * 3,
        "preference": [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3,
        "unpaired": [{"prompt": "a", "completion": "b", "label": True}] * 3,
        "prompt": [{"prompt": "a", "answer": "1"}] * 3,
    }[kind]
    config = BatchConfig(batch_size=2, seq_len=12, pack=pack, max_segments=3)
    batch = next(BatchIterator(_load(rows, kind), config, process_index=0, process_count=1))
    spec = batch_spec(kind, batch_size=2, seq_len=12, num_segments=config.num_segments)
    arrays = {k: v for k, v in batch.items() if k != "columns"}
    assert set(arrays) == set(spec)
    for name, s in spec.items():
        assert (arrays[name].shape, arrays[name].dtype) == (s.shape, s.dtype), name
    if kind == "prompt":
        assert batch["columns"] == {"answer": ["1", "1"]}


def test_segment_helpers_golden_and_reference():
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 0, 0, 0, 0, 0]])
    vals = jnp.array([[1.0, 2.0, 4.0, 8.0, 16.0, 32.0], [5.0, 7.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(
        segment_sums(vals, seg, num_segments=3), [[3.0, 28.0, 0.0], [5.0, 0.0, 0.0]]
    )
    np.testing.assert_array_equal(segment_last_index(seg, num_segments=3), [[1, 4, 0], [0, 0, 0]])
    rng = np.random.default_rng(1)
    seg = np.sort(rng.integers(0, 5, size=(4, 20)), axis=1)[:, ::-1].copy()
    vals = rng.normal(size=(4, 20)).astype(np.float32)
    got = jax.jit(segment_sums, static_argnames="num_segments")(vals, seg, num_segments=4)
    want = np.array([[vals[b][seg[b] == s + 1].sum() for s in range(4)] for b in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_packed_and_unpacked_logprobs_agree_with_the_model():
    """Per-sequence log-probs and last-token hidden states of a packed batch equal the unpacked ones."""
    from rlhf_jax.logprobs import token_logprobs
    from rlhf_jax.models import CausalLM
    from rlhf_jax.testing.models import tiny_config

    rows = [{"prompt": f"{i}+{i}=", "completion": "x" * (1 + i % 5)} for i in range(7)]
    ds = _load(rows, "sft", max_len=16)
    model = CausalLM(tiny_config())
    # Random parameters straight from the abstract tree (any values serve an invariance test).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0.0, 0.1, a.shape), a.dtype), model.abstract_params()
    )

    @jax.jit
    def per_segment(tokens, positions, segment_ids, loss_mask):
        out = model.forward(params, tokens, positions, segment_ids)
        lp = token_logprobs(out.logits[:, :-1], tokens[:, 1:])
        logps = segment_sums(lp * loss_mask[:, 1:], segment_ids[:, 1:], num_segments=4)
        last = segment_last_index(segment_ids, num_segments=4)
        hidden = jnp.take_along_axis(out.hidden, last[..., None], axis=1)
        return logps, hidden

    packed_rows = [[0, 1, 2], [3, 4], [5, 6], [], [], [], []]  # same shapes as unpacked: one compile
    packed = collate(ds, packed_rows, seq_len=40, num_segments=4)
    assert packed["segment_ids"].max() == 3 and (packed["segment_ids"] > 0).sum() == ds.lengths().sum()
    p_logps, p_hidden = per_segment(
        packed["tokens"], packed["positions"], packed["segment_ids"], packed["loss_mask"]
    )
    single = collate(ds, [[i] for i in range(7)], seq_len=40, num_segments=4)
    u_logps, u_hidden = per_segment(
        single["tokens"], single["positions"], single["segment_ids"], single["loss_mask"]
    )
    for b, row in enumerate(packed_rows):
        for s, i in enumerate(row):
            np.testing.assert_allclose(p_logps[b, s], u_logps[i, 0], atol=1e-5, rtol=0)
            np.testing.assert_allclose(p_hidden[b, s], u_hidden[i, 0], atol=1e-5, rtol=0)
    assert np.all(np.asarray(u_logps[:, 0]) < 0)
    # Unpacked rows without segment ids (plain right padding) give the same numbers too.
    logits = jax.jit(lambda tokens: model.forward(params, tokens).logits)(single["tokens"])
    lp = token_logprobs(logits[:, :-1], single["tokens"][:, 1:])
    np.testing.assert_allclose(
        np.sum(lp * single["loss_mask"][:, 1:], axis=1), u_logps[:, 0], atol=1e-5, rtol=0
    )


def test_row_packer_and_collate_errors_name_the_example():
    packer = RowPacker(batch_size=2, seq_len=8, max_segments=2, num_tracks=2)
    with pytest.raises(ValueError, match=r"example 0 has 1 lengths \[5\], but num_tracks=2"):
        packer.add(0, [5])  # used to be packed on the chosen track only
    with pytest.raises(ValueError, match="example 1 has a negative length -3"):
        packer.add(1, [-3, 4])
    assert packer.rows == [[], []]
    with pytest.raises(ValueError, match="example 1 of length 9 exceeds seq_len=8"):
        pack_rows([3, 9], batch_size=2, seq_len=8, max_segments=2)
    assert pack_rows([], batch_size=2, seq_len=8, max_segments=2) == []
    ds = _load([{"prompt": "a", "completion": "bc"}, {"prompt": "d", "completion": "e"}], "sft")
    # 5 + 4 tokens: used to be a bare numpy broadcast error.
    with pytest.raises(ValueError, match=r"rows\[1\] \(examples \[0, 1\]\) needs 9 tokens, more than seq_len=8"):
        collate(ds, [[1], [0, 1]], seq_len=8, num_segments=2)
    with pytest.raises(ValueError, match=r"rows\[0\] holds example index -1, but <rows> has 2 examples"):
        collate(ds, [[-1]], seq_len=8)  # used to give an empty segment with example_mask True
    with pytest.raises(ValueError, match=r"rows\[0\] holds 2 examples, more than num_segments=1"):
        collate(ds, [[0, 1]], seq_len=16)
    with pytest.raises(ValueError, match="num_segments must be a positive int, got 0"):
        collate(ds, [[]], seq_len=8, num_segments=0)
    pairs = _load([{"prompt": "p", "chosen": "long answer", "rejected": "x"}], "preference")
    with pytest.raises(ValueError, match=r"rows\[0\] \(examples \[0\]\) needs 14 tokens, more than seq_len=10"):
        collate(pairs, [[0]], seq_len=10)  # the chosen track is the long one


def test_packed_batches_train_like_unpacked_ones_in_the_sft_and_dpo_steps():
    """The real SFT and DPO updates on a packed batch give the loss and gradients of the same examples
    one per row, and a single packed example's loss and gradient (its segment's loss mask only) do not
    depend on its neighbours in the row."""
    import optax

    from rlhf_jax.models import CausalLM
    from rlhf_jax.state import TrainState
    from rlhf_jax.steps import make_dpo_step, make_sft_step
    from rlhf_jax.testing.models import tiny_config

    model = CausalLM(tiny_config())
    params = jax.jit(model.init)(jax.random.key(0))
    reference = jax.jit(model.init)(jax.random.key(1))
    sgd = optax.sgd(1.0)  # new params = params - grads

    def loss_and_grads(update, batch, *frozen):
        state = TrainState(jnp.zeros((), jnp.int32), params, sgd.init(params), jax.random.PRNGKey(5))
        new, metrics = update(state, batch, *frozen)
        grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), params, new.params)
        return float(metrics["loss"]), grads

    def assert_same(a, b):
        np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)
        for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        assert max(np.abs(x).max() for x in jax.tree.leaves(a[1])) > 1e-3  # a real gradient

    def packed_and_single(ds, batch_size, prefixes):
        it = BatchIterator(ds, BatchConfig(batch_size=batch_size, seq_len=32, pack=True, max_segments=4, seed=3),
                           process_index=0, process_count=1)
        packed, rows = next(it), it.last_rows
        assert max(map(len, rows)) >= 3
        items = [i for row in rows for i in row]
        single = collate(ds, [[i] for i in items], seq_len=32)
        keys = [p + k for p in prefixes for k in ("tokens", "loss_mask", "positions", "segment_ids")]
        return {k: packed[k] for k in keys}, {k: single[k] for k in keys}, rows, items

    sft = _load([{"prompt": f"q{i}?", "completion": "abcdefg"[: 1 + i % 6]} for i in range(9)], "sft")
    packed, single, rows, items = packed_and_single(sft, 3, [""])
    sft_step = jax.jit(make_sft_step(model, sgd, nonfinite="off"))
    assert_same(loss_and_grads(sft_step, packed), loss_and_grads(sft_step, single))
    # One example in the middle of a full row, alone in the loss: its neighbours change nothing.
    b = max(range(len(rows)), key=lambda r: len(rows[r]))
    s, item = 2, rows[b][1]
    only_packed = {**packed, "loss_mask": packed["loss_mask"] * (packed["segment_ids"] == s)
                   * (np.arange(len(rows)) == b)[:, None]}
    only_single = {**single, "loss_mask": single["loss_mask"] * (np.arange(len(items)) == items.index(item))[:, None]}
    assert_same(loss_and_grads(sft_step, only_packed), loss_and_grads(sft_step, only_single))

    pairs = _load([{"prompt": f"p{i}", "chosen": "xyz"[: 1 + i % 3] * 2, "rejected": "uvw"[: 1 + (i + 1) % 3]}
                   for i in range(8)], "preference")
    packed, single, _, _ = packed_and_single(pairs, 2, ["chosen_", "rejected_"])
    dpo_packed = jax.jit(make_dpo_step(model, sgd, max_segments=4, nonfinite="off"))
    dpo_single = jax.jit(make_dpo_step(model, sgd, nonfinite="off"))
    assert_same(loss_and_grads(dpo_packed, packed, reference), loss_and_grads(dpo_single, single, reference))


def test_collate_never_marks_a_segment_start_as_a_target():
    """A hand-built dataset whose mask marks token 0 would let `loss_mask[:, 1:]` train the first token
    of segment k as predicted from the last token of segment k-1 (the recipe of the batches module)."""
    import dataclasses

    from rlhf_jax.data import Ragged

    ds = _load([{"prompt": "a", "completion": "bc"}, {"prompt": "d", "completion": "e"}], "sft")
    masks = [np.ones(len(ds.arrays["tokens"][i]), bool) for i in range(2)]
    ds = dataclasses.replace(ds, arrays={**ds.arrays, "loss_mask": Ragged.from_rows(masks, bool)})
    batch = collate(ds, [[0, 1]], seq_len=10, num_segments=2)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 4 + [0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 1, 1, 0, 1, 1, 1, 0])
