"""DPO step: log 2 at the start, sharded == single device, precomputed == model reference, accumulation."""

import numpy as np
import pytest

from step_fixtures import (
    STRATEGY_MESHES,
    host_params,
    max_rel_diff,
    numpy_seq_logps,
    pair_batches,
    run_steps,
    single_device_mesh,
    tiny_lm,
)
from rlhf_jax.steps import make_dpo_step, make_reference_logps_fn, precompute_reference_logps

BATCHES = pair_batches(3)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=BATCHES, with_reference=True)


def test_first_step_is_log2_with_policy_equal_reference(single_device):
    _, history = single_device
    first = history[0]
    assert first["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    b = BATCHES[0]
    want = numpy_seq_logps(host_params(), b["chosen_tokens"], b["chosen_loss_mask"]).mean()
    assert first["logps/chosen"] == pytest.approx(want, rel=1e-5)
    # After an update the policy prefers the chosen responses of the first batch.
    assert history[1]["loss"] != pytest.approx(np.log(2.0), rel=1e-6)


@pytest.mark.parametrize("strategy", list(STRATEGY_MESHES))
def test_sharded_equals_single_device(single_device, strategy):
    params, history = run_steps(make_dpo_step, head="lm", shape=STRATEGY_MESHES[strategy], strategy=strategy,
                                batches=BATCHES, with_reference=True)
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    for got, want in zip(history, single_device[1]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        # margins are differences of ~-50 summed log-probs: f32 round-off is ~beta * 50 * 6e-8
        assert got["rewards/margins"] == pytest.approx(want["rewards/margins"], rel=1e-4, abs=2e-6)


def test_gradient_accumulation_4x2_equals_batch_of_8(single_device):
    params, history = run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=BATCHES,
                                with_reference=True, micro_batches=4)
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    for got, want in zip(history, single_device[1]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["rewards/accuracies"] == pytest.approx(want["rewards/accuracies"])


def test_precomputed_reference_equals_reference_model(single_device):
    mesh = single_device_mesh()
    fn = make_reference_logps_fn(tiny_lm(), mesh=mesh, strategy="dp")
    batches = list(precompute_reference_logps(fn, host_params(), BATCHES))
    b = BATCHES[0]
    want = numpy_seq_logps(host_params(), b["rejected_tokens"], b["rejected_loss_mask"])
    np.testing.assert_allclose(batches[0]["ref_rejected_logps"], want, rtol=1e-5)
    params, history = run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=batches,
                                reference="precomputed")
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single_device[1]], rel=1e-5)


def test_shared_prefix_step_equals_plain_step(single_device):
    """Chosen and rejected sharing their 5 prompt tokens' forward pass (issue 23): same steps."""
    params, history = run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=BATCHES,
                                with_reference=True, shared_prefix_len=5)
    assert history[0]["loss"] == pytest.approx(np.log(2.0), rel=1e-6)
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    for got, want in zip(history, single_device[1]):
        assert got["nonfinite"] == 0
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["logps/chosen"] == pytest.approx(want["logps/chosen"], rel=1e-5)
        assert got["rewards/margins"] == pytest.approx(want["rewards/margins"], rel=1e-4, abs=2e-6)


# ------------------------------------------------------------------ input validation (audit)


def test_dpo_step_names_missing_reference_params_and_unknown_keys():
    from step_fixtures import jit_for, pair_batches, single_device_mesh, tiny_lm

    step = jit_for(make_dpo_step, tiny_lm(), single_device_mesh(), "dp")
    batch = dict(pair_batches(1)[0])
    with pytest.raises(TypeError, match=r"expected 1 frozen parameter tree\(s\) after the batch .*got 0"):
        step(None, batch)
    with pytest.raises(KeyError, match=r"unknown batch keys \['chosen_segment_id'\]"):
        step(None, {**batch, "chosen_segment_id": batch["chosen_tokens"]}, None)
    # the data pipeline's optional keys are accepted (no error before the state is used)
    accepted = {**batch, "margin": np.zeros(len(batch["chosen_tokens"]), np.float32),
                "example_mask": np.ones(len(batch["chosen_tokens"]), bool)}
    step.check_batch(accepted)
