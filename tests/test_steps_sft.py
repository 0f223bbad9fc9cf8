"""SFT step: sharded == single device, micro-batched == full batch, loss == a NumPy reference."""

import numpy as np
import pytest

from step_fixtures import (
    STRATEGY_MESHES,
    host_params,
    max_rel_diff,
    run_steps,
    sft_batches,
    tiny_lm,
)
from rlhf_jax.steps import make_sft_step

BATCHES = sft_batches(3)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(make_sft_step, head="lm", shape=None, strategy="dp", batches=BATCHES)


def _numpy_sft_loss(params, batch):
    """Token-mean next-token cross-entropy written in NumPy from the model's logits."""
    logits = np.asarray(tiny_lm().forward(params, batch["tokens"]).logits, np.float64)[:, :-1]
    labels, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:].astype(np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum(), mask.sum()


def test_first_step_loss_matches_numpy(single_device):
    _, history = single_device
    expected, count = _numpy_sft_loss(host_params(), BATCHES[0])
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert history[0]["num_tokens"] == count
    assert 0.0 <= history[0]["mean_token_accuracy"] <= 1.0
    assert history[0]["learning_rate"] == pytest.approx(1e-3)
    assert history[0]["nonfinite"] == 0.0
    # Training lowers the loss on a repeated batch pattern: not asserted here (random data); the
    # parameters must have moved, though.
    params, _ = single_device
    assert max_rel_diff(params, host_params()) > 1e-3


@pytest.mark.parametrize("strategy", list(STRATEGY_MESHES))
def test_sharded_equals_single_device(single_device, strategy):
    params, history = run_steps(make_sft_step, head="lm", shape=STRATEGY_MESHES[strategy], strategy=strategy,
                                batches=BATCHES)
    ref_params, ref_history = single_device
    assert max_rel_diff(params, ref_params) <= 1e-5
    for got, want in zip(history, ref_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_gradient_accumulation_4x2_equals_batch_of_8(single_device):
    # 4 micro-batches of 2 rows, on a 4-device mesh (data 2 x tensor 2), against one batch of 8.
    params, history = run_steps(make_sft_step, head="lm", shape={"data": 2, "tensor": 2}, strategy="tp",
                                batches=BATCHES, micro_batches=4)
    ref_params, ref_history = single_device
    assert max_rel_diff(params, ref_params) <= 1e-5
    for got, want in zip(history, ref_history):
        for key in ("loss", "mean_token_accuracy", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_chunked_logprobs_equal_full_logits(single_device):
    params, history = run_steps(make_sft_step, head="lm", shape=None, strategy="dp", batches=BATCHES[:1],
                                logits_chunk_size=24)
    assert history[0]["loss"] == pytest.approx(single_device[1][0]["loss"], rel=1e-5)
    assert "mean_token_accuracy" not in history[0]


def test_shifted_logprobs_and_accuracy_equal_the_sliced_forms():
    """Log-probs on all T positions sliced afterwards == log-probs of the sliced [B, T-1] logits."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.logprobs import token_logprobs
    from rlhf_jax.steps.sequences import shifted_label_is_argmax, shifted_token_logprobs

    logits = jax.random.normal(jax.random.key(0), (3, 6, 11)) * 3.0
    labels = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    labels = labels.at[0, 0].set(jnp.argmax(logits[0, 0]))          # at least one correct prediction
    np.testing.assert_allclose(shifted_token_logprobs(logits, labels, temperature=0.7),
                               token_logprobs(logits[:, :-1], labels, temperature=0.7), rtol=1e-6)
    want = (jnp.argmax(logits[:, :-1], axis=-1) == labels).astype(jnp.float32)
    np.testing.assert_array_equal(shifted_label_is_argmax(logits, labels), want)
    assert float(want.sum()) >= 1.0


# ------------------------------------------------------------------ input validation (audit)


def test_sft_step_checks_its_batch_before_compiling():
    from step_fixtures import jit_for, single_device_mesh

    lm = tiny_lm()
    step = jit_for(make_sft_step, lm, single_device_mesh(), "dp")
    batch = dict(BATCHES[0])
    v = lm.config.vocab_size
    state = None  # every check below fires before the state is looked at
    with pytest.raises(KeyError, match=r"unknown batch keys \['segment_id'\].*'segment_ids'"):
        step(state, {**batch, "segment_id": batch["tokens"]})
    with pytest.raises(TypeError, match=r"batch\['tokens'\] must hold integer token ids, got dtype float32"):
        step(state, {**batch, "tokens": batch["tokens"].astype(np.float32)})
    for bad in (v, -1):
        tokens = batch["tokens"].copy()
        tokens[1, 3] = bad
        with pytest.raises(ValueError, match=rf"token id {bad} at position \(1, 3\), outside .*\[0, {v}\)"):
            step(state, {**batch, "tokens": tokens})
    with pytest.raises(ValueError, match="has no rows"):
        step(state, {k: x[:0] for k, x in batch.items()})
    with pytest.raises(TypeError, match="expected 0 frozen parameter tree"):
        step(state, batch, host_params())


def test_sft_step_refuses_a_scalar_head_model():
    with pytest.raises(ValueError, match="make_sft_step needs an LM-head model"):
        make_sft_step(tiny_lm("scalar"), optax_sgd())


def optax_sgd():
    import optax

    return optax.sgd(0.1)
