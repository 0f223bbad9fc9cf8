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


# ------------------------------------------------------- parity with transformers (TRL's SFT loss)


def _hf_sft_case(tmp_path):
    """The tiny model's (perturbed) weights in a transformers Llama, and a batch of varied prompt and
    completion lengths whose long rows mostly hold the model's own argmax as targets (accuracy not 0,
    and a mean of per-sequence means far from the token mean)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.models.hf import save_hf

    lm, rng = tiny_lm(), np.random.default_rng(0)
    params = jax_tree_map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype), host_params())
    save_hf(tmp_path / "hf", lm.config, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                           dtype=torch.float32)
    b, t = 8, 16
    tokens = rng.integers(4, lm.config.vocab_size, (b, t))
    lengths = np.array([16, 6, 11, 16, 9, 13, 7, 15])
    real = np.arange(t)[None] < lengths[:, None]
    mask = (real & (np.arange(t)[None] >= np.array([1, 4, 2, 5, 1, 3, 4, 2])[:, None])).astype(np.int32)
    with torch.no_grad():
        for i in range(t - 1):
            pick = rng.random(b) < np.where(lengths > 12, 0.9, 0.1)  # long rows easy: a token mean differs
            tokens[pick, i + 1] = hf(input_ids=torch.tensor(tokens)).logits[:, i].numpy()[pick].argmax(-1)
    tokens = np.where(real, tokens, 0).astype(np.int32)
    return torch, hf, params, tokens, mask, real, lengths


def _hf_reference(torch, hf, tokens, mask, real):
    """transformers' loss as TRL's SFTTrainer calls it: labels -100 off the completion, the summed
    cross-entropy divided by `num_items_in_batch` (the batch's target count); gradients by autograd."""
    hf.zero_grad()
    labels = np.where(mask != 0, tokens, -100)
    n = int((labels[:, 1:] != -100).sum())
    out = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(real.astype(np.int64)),
             labels=torch.tensor(labels, dtype=torch.long), num_items_in_batch=torch.tensor(n))
    out.loss.backward()
    pred, lab = out.logits[:, :-1].argmax(-1).numpy(), labels[:, 1:]
    accuracy = float(((pred == lab) & (lab != -100)).sum() / n)
    return out.loss.item(), {k: p.grad.numpy() for k, p in hf.named_parameters()}, accuracy, n


def _our_sgd_step(params, batch, tmp_path, *, shape, micro_batches=1, logits_chunk_size=None):
    """Metrics and gradients (as transformers-named tensors) of one SGD(1) step."""
    import optax
    from safetensors.numpy import load_file

    from rlhf_jax.models.hf import save_hf
    from rlhf_jax.state import train_state_from_params
    from rlhf_jax.steps import SFT_KEYS, jit_model_step
    from step_fixtures import FAST_COMPILE, mesh_for

    lm, tx = tiny_lm(), optax.sgd(1.0)
    mesh = mesh_for(shape)
    state = train_state_from_params(params, tx, rng=0, logical_axes=lm.logical_axes, mesh=mesh, strategy="dp")
    update = make_sft_step(lm, tx, micro_batches=micro_batches, nonfinite="off", logits_chunk_size=logits_chunk_size)
    step = jit_model_step(update, lm, tx, mesh=mesh, strategy="dp", micro_batches=micro_batches, batch_keys=SFT_KEYS)
    step.check_batch(batch)
    new, metrics = step.lower(state, batch).compile(compiler_options=FAST_COMPILE)(state, batch)
    grads = jax_tree_map(lambda a, b: a - np.asarray(b), params, new.params)
    out = save_hf(tmp_path / f"grads{len(list(tmp_path.iterdir()))}", lm.config, grads)
    return {k: float(v) for k, v in metrics.items()}, load_file(out / "model.safetensors")


def jax_tree_map(fn, *trees):
    import jax

    return jax.tree.map(fn, *trees)


def _assert_grads_close(got, want, tol=1e-5):
    assert sorted(got) == sorted(want)
    for name in want:
        scale = np.abs(want[name]).max()
        assert np.abs(got[name] - want[name]).max() <= tol * scale, name


def test_loss_gradients_accuracy_equal_transformers_token_mean(tmp_path):
    """Data parallel (2 devices) x 2 micro-batches == TRL's token mean over the whole batch's
    completion tokens (not a mean of per-sequence or per-micro-batch means)."""
    torch, hf, params, tokens, mask, real, _ = _hf_sft_case(tmp_path)
    loss, grads, accuracy, n = _hf_reference(torch, hf, tokens, mask, real)
    # The batch discriminates: per-sequence means (and per-micro-batch means) give other numbers.
    labels = np.where(mask != 0, tokens, -100)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(
            hf(input_ids=torch.tensor(tokens, dtype=torch.long)).logits[:, :-1].transpose(1, 2),
            torch.tensor(labels[:, 1:], dtype=torch.long), reduction="none").numpy()
    per_seq = (nll.sum(1) / (labels[:, 1:] != -100).sum(1)).mean()
    micro = np.mean([nll[rows].sum() / (labels[rows, 1:] != -100).sum() for rows in ([0, 2, 4, 6], [1, 3, 5, 7])])
    assert abs(per_seq - loss) > 1e-2 and abs(micro - loss) > 1e-3
    assert 0.2 < accuracy < 0.9

    metrics, ours = _our_sgd_step(params, {"tokens": tokens, "loss_mask": mask}, tmp_path, shape={"data": 2},
                                  micro_batches=2)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics["num_tokens"] == n
    assert metrics["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    _assert_grads_close(ours, grads)


def test_packed_chunked_loss_and_gradients_equal_transformers_unpacked(tmp_path):
    """The same sequences packed two to a row (segment ids, per-segment positions), log-probs from
    hidden states 7 tokens at a time: TRL's unpacked loss and gradients."""
    torch, hf, params, tokens, mask, real, lengths = _hf_sft_case(tmp_path)
    loss, grads, _, n = _hf_reference(torch, hf, tokens, mask, real)
    b, t = tokens.shape
    packed = {k: np.zeros((b // 2, 2 * t), np.int32) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    for row in range(b // 2):
        start = 0
        for s, i in enumerate((2 * row, 2 * row + 1)):
            piece = slice(start, start + lengths[i])
            packed["tokens"][row, piece], packed["loss_mask"][row, piece] = tokens[i, :lengths[i]], mask[i, :lengths[i]]
            packed["segment_ids"][row, piece], packed["positions"][row, piece] = s + 1, np.arange(lengths[i])
            start += lengths[i]
    metrics, ours = _our_sgd_step(params, packed, tmp_path, shape={"data": 1}, logits_chunk_size=7)
    assert metrics["loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics["num_tokens"] == n
    _assert_grads_close(ours, grads)


def test_sft_step_refuses_weighted_masks_and_misshapen_segments():
    from step_fixtures import jit_for, single_device_mesh

    step = jit_for(make_sft_step, tiny_lm(), single_device_mesh(), "dp")
    batch = dict(BATCHES[0])
    for weights, shown in ((0.5, r"\[0\.5\]"), (2, r"\[2\.0\]"), (np.nan, r"\[nan\]")):
        mask = np.where(batch["loss_mask"] > 0, weights, 0.0)
        with pytest.raises(ValueError, match=rf"batch\['loss_mask'\] must be bool or 0/1, got values {shown}"):
            step(None, {**batch, "loss_mask": mask})
    # A misshapen segment_ids is named while the step traces (it was a bare broadcasting TypeError).
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.state import train_state_from_params
    from step_fixtures import OPTIMIZER

    state = train_state_from_params(host_params(), make_optimizer(OPTIMIZER), rng=0, mesh=single_device_mesh(),
                                    logical_axes=tiny_lm().logical_axes, strategy="dp")
    with pytest.raises(ValueError, match=r"segment_ids shape \(8, 15\) != tokens shape \(8, 16\)"):
        step(state, {**batch, "segment_ids": np.ones((8, 15), np.int32)})


def test_a_batch_without_targets_has_loss_zero_and_zero_gradients():
    """Documented: loss 0, gradient 0 (TRL: 0 / 0 = NaN); SGD then leaves the parameters as they are."""
    import optax

    from step_fixtures import FAST_COMPILE, single_device_mesh

    from rlhf_jax.state import train_state_from_params
    from rlhf_jax.steps import SFT_KEYS, jit_model_step

    lm, tx, mesh = tiny_lm(), optax.sgd(1.0), single_device_mesh()
    first_only = np.zeros_like(BATCHES[0]["loss_mask"])
    first_only[:, 0] = 1  # the first token of a row is never a target
    batch = {**BATCHES[0], "loss_mask": first_only}
    state = train_state_from_params(host_params(), tx, rng=0, logical_axes=lm.logical_axes, mesh=mesh, strategy="dp")
    step = jit_model_step(make_sft_step(lm, tx), lm, tx, mesh=mesh, strategy="dp", batch_keys=SFT_KEYS)
    step.check_batch(batch)
    state, metrics = step.lower(state, batch).compile(compiler_options=FAST_COMPILE)(state, batch)
    assert {k: float(metrics[k]) for k in ("loss", "grad_norm", "num_tokens", "nonfinite")} == {
        "loss": 0.0, "grad_norm": 0.0, "num_tokens": 0.0, "nonfinite": 0.0}
    assert max_rel_diff(jax_tree_map(np.asarray, state.params), host_params()) == 0.0


def test_sft_eval_with_the_runs_logits_chunk_size_equals_full_logits():
    """A run with `algorithm.logits_chunk_size` evaluates chunked too (its eval built `[B, T, V]`
    logits, which the setting exists to avoid): same `eval/loss`, no accuracy."""
    from step_fixtures import single_device_mesh

    from rlhf_jax.train.sft import make_sft_eval

    mesh, batches = single_device_mesh(), sft_batches(2, seed=3)
    full = make_sft_eval(tiny_lm(), batches, mesh=mesh, strategy="dp")(host_params())
    chunked = make_sft_eval(tiny_lm(), batches, mesh=mesh, strategy="dp", micro_batches=2,
                            logits_chunk_size=5)(host_params())
    assert set(full) == {"eval/loss", "eval/mean_token_accuracy"} and set(chunked) == {"eval/loss"}
    assert chunked["eval/loss"] == pytest.approx(full["eval/loss"], rel=1e-6)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_sft_algorithm_refuses_a_bad_logits_chunk_size(size):
    from rlhf_jax.config import ConfigError
    from rlhf_jax.train.sft import SFTAlgorithm

    with pytest.raises(ConfigError, match=rf"algorithm\.logits_chunk_size must be a positive int or None, got {size}"):
        SFTAlgorithm(logits_chunk_size=size)
