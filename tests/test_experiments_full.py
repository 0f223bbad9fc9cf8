"""The tiny experiments at full length, asserting the learning each docstring states.

Several CPU minutes in all, so opt-in: `RLHF_JAX_FULL_EXPERIMENTS=1 python -m pytest
tests/test_experiments_full.py`. Each runs as a user runs it (`experiment_runs.run_experiment`: its
own interpreter, one CPU device). The default suite runs the same experiments for a few steps
(tests/test_experiments.py, tests/test_fault_resume.py).
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


def test_sft_tiny_loss_falls_below_threshold(tmp_path):
    run_experiment("sft_tiny", tmp_path, "--set", "logging.console=false")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_eval_loss"] < results["loss_threshold"] == 3.1
    assert results["initial_eval_loss"] > 5.0  # ln(256) = 5.55 at initialization
    assert results["passed"]


def test_reward_model_tiny_reaches_90_percent_heldout_accuracy(tmp_path):
    run_experiment("reward_model_tiny", tmp_path, "--set", "logging.console=false")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_heldout_accuracy"] >= 0.90 and results["passed"]
    assert results["final_heldout_accuracy"] > results["initial_heldout_accuracy"]


def test_dpo_tiny_raises_gold_reward_over_the_sft_policy(tmp_path):
    run_experiment("dpo_tiny", tmp_path, "--set", "sft.logging.console=false", "--set", "dpo.logging.console=false")
    results = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert results["gold_reward_gain"] >= results["gold_margin_required"] == 0.1
    assert results["final_gold_win_rate_vs_sft"] > 0.5
    assert results["passed"]


def test_grpo_gsm8k_tiny_math_reward_raises_heldout_accuracy(tmp_path):
    run_experiment("grpo_gsm8k_tiny", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy_after"] >= results["accuracy_before"] + results["margin"] and results["passed"]
    first = json.loads((tmp_path / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"question", "answer"} and "\n#### " in first["answer"]


def test_prm_tiny_step_accuracy_and_best_of_16_beats_the_outcome_rm(tmp_path):
    run_experiment("prm_tiny", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prm_step_accuracy"] >= 0.9
    acc = results["final_answer_accuracy"]
    assert acc["prm_min"] > acc["orm"] and all(results["passed"].values())


def test_overoptimization_best_of_n_gold_rises_then_falls_or_saturates(tmp_path):
    run_experiment("overoptimization", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_of_n_gold_shape"] in ("rises then falls", "rises then saturates")
    assert set(results["best_of_n_fit"]["gold"]) >= {"alpha", "beta", "r2"}
    assert (tmp_path / "results.png").exists()
