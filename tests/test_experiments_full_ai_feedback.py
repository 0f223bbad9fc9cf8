"""Online DPO and RLAIF tiny experiments at full length, asserting their acceptance margins (issue 20).

Several CPU minutes each, so opt-in like tests/test_experiments_full.py:
`RLHF_JAX_FULL_EXPERIMENTS=1 python -m pytest tests/test_experiments_full_ai_feedback.py`.
"""

import json
import os

import pytest

from experiment_runs import run_experiment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("RLHF_JAX_FULL_EXPERIMENTS") != "1",
                       reason="full-length experiments are opt-in: set RLHF_JAX_FULL_EXPERIMENTS=1"),
]


def _run(name, workdir, *extra):
    run_experiment(name, workdir, *extra)
    return json.loads((workdir / "results.json").read_text())


def test_online_dpo_beats_offline_dpo_in_held_out_gold_reward(tmp_path):
    results = _run("online_dpo_tiny", tmp_path)
    assert results["online_final_gold_reward"] - results["offline_final_gold_reward"] >= results["margin_required"]
    assert results["online_gain"] > 0.1 and results["passed"]
    # Online DPO's final policy beats even offline DPO's best evaluated checkpoint.
    assert results["online_final_gold_reward"] > max(g for _, g in results["offline_gold_curve"])
    assert (tmp_path / "results.png").exists()


def test_rlaif_judge_agrees_with_gold_and_rlaif_dpo_keeps_most_of_the_gain(tmp_path):
    results = _run("rlaif_tiny", tmp_path)
    assert results["judge_held_out_agreement"] >= 0.85
    assert 0 <= results["judge_held_out_position_consistency"] <= 1
    assert results["gain_ratio"] >= 0.8 and results["passed"]
    assert (tmp_path / "results.png").exists()
