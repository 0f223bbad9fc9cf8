"""Reward-model step: Bradley-Terry loss golden, sharded == single device, micro-batching."""

import numpy as np
import pytest

from step_fixtures import STRATEGY_MESHES, host_params, max_rel_diff, pair_batches, run_steps, tiny_lm
from rlhf_jax.steps import make_reward_model_step

BATCHES = pair_batches(3)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp", batches=BATCHES)


def _numpy_rewards(params, tokens, mask):
    """The scalar head's value at each row's last target token."""
    values = np.asarray(tiny_lm("scalar").forward(params, tokens).values, np.float64)
    last = np.array([np.nonzero(row)[0].max() for row in mask])
    return values[np.arange(len(last)), last]


def test_first_step_matches_numpy_bradley_terry(single_device):
    _, history = single_device
    b = BATCHES[0]
    c = _numpy_rewards(host_params("scalar"), b["chosen_tokens"], b["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), b["rejected_tokens"], b["rejected_loss_mask"])
    assert history[0]["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(c - r)))), rel=1e-5)
    assert history[0]["accuracy"] == pytest.approx(np.mean(c > r))
    assert history[0]["margin"] == pytest.approx(np.mean(c - r), rel=1e-4, abs=1e-7)
    assert history[0]["rewards/chosen"] == pytest.approx(np.mean(c), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("strategy", list(STRATEGY_MESHES))
def test_sharded_equals_single_device(single_device, strategy):
    params, history = run_steps(make_reward_model_step, head="scalar", shape=STRATEGY_MESHES[strategy],
                                strategy=strategy, batches=BATCHES)
    ref_params, ref_history = single_device
    assert max_rel_diff(params, ref_params) <= 1e-5
    for got, want in zip(history, ref_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["accuracy"] == want["accuracy"]


def test_gradient_accumulation_4x2_equals_batch_of_8(single_device):
    params, history = run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp",
                                batches=BATCHES, micro_batches=4)
    assert max_rel_diff(params, single_device[0]) <= 1e-5
    for got, want in zip(history, single_device[1]):
        for key in ("loss", "accuracy", "margin"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)


def test_margin_shifts_the_loss():
    batch = dict(BATCHES[0], margin=np.full(8, 0.5, np.float32))
    _, with_margin = run_steps(make_reward_model_step, head="scalar", shape=None, strategy="dp", batches=[batch])
    b = BATCHES[0]
    c = _numpy_rewards(host_params("scalar"), b["chosen_tokens"], b["chosen_loss_mask"])
    r = _numpy_rewards(host_params("scalar"), b["rejected_tokens"], b["rejected_loss_mask"])
    assert with_margin[0]["loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(c - r - 0.5)))), rel=1e-5)
