"""Best-of-n (rejection sampling) fine-tuning: winner selection, the SFT batch, a short run."""

import dataclasses

import numpy as np
import pytest

from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.data.synthetic import ArithmeticTask
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards import PythonReward, even_fraction_reward
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import rejection_sampling as rs
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.rl import RolloutConfig


def test_select_best_takes_each_groups_first_maximum():
    rewards = np.array([0.1, 0.9, 0.9, 0.2, 3.0, -1.0, 0.0, 0.0])
    np.testing.assert_array_equal(rs.select_best(rewards, 4), [1, 4])
    np.testing.assert_array_equal(rs.select_best(rewards, 2), [1, 2, 4, 6])
    with pytest.raises(ValueError, match="groups of 3"):
        rs.select_best(rewards, 3)
    np.testing.assert_array_equal(rs.select_best(np.full(6, 0.5), 3), [0, 3])  # all equal: each group's first
    # argmax took a NaN reward as the winner (and `best >= min_reward` then dropped it silently).
    with pytest.raises(ValueError, match="select_best: reward 5 is nan; rewards must be finite"):
        rs.select_best(np.array([0.0, 1.0, 2.0, 0.0, 1.0, np.nan]), 3)
    with pytest.raises(ValueError, match="select_best: group_size must be a positive int, got 0"):
        rs.select_best(rewards, 0)


def test_best_of_n_batch_joins_prompt_and_completion_with_a_completion_mask():
    arrays = {
        "prompt_tokens": np.array([[1, 5, 6], [1, 7, 0], [1, 8, 0]], np.int32),
        "prompt_lengths": np.array([3, 2, 2], np.int32),
        "completion_tokens": np.array([[9, 2, 0], [10, 11, 2], [12, 2, 0]], np.int32),
        "completion_mask": np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], bool),
    }
    batch = rs.best_of_n_batch(arrays, np.array([1, 0]), np.array([True, False]), pad_id=0)
    np.testing.assert_array_equal(batch["tokens"], [[1, 7, 10, 11, 2, 0], [1, 5, 6, 9, 2, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])


def test_best_of_n_run_trains_on_winners(tmp_path):
    config = rs.RejectionSamplingConfig(
        name="bon", workdir=str(tmp_path / "bon"), model=tiny_config(num_layers=1, hidden_size=32,
                                                                      intermediate_size=64, num_heads=2,
                                                                      num_kv_heads=1, head_dim=16),
        mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic", num_train=64, num_eval=8,
                        max_len=16, batch_size=8, arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=rs.BestOfNConfig(samples_per_prompt=4, updates_per_batch=2),
        rollout=RolloutConfig(max_new_tokens=4), optim=OptimizerConfig(learning_rate=1e-2),
        train=TrainConfig(steps=2, eval_every=2, eval_batches=1),
        checkpoint=CheckpointConfig(every=0, async_save=False),
        logging=LoggingConfig(every=1, console=False, tensorboard=False),
    )
    summary = rs.train(config, reward_sources=[PythonReward(even_fraction_reward)])
    train = summary["train"]
    assert summary["step"] == 2
    assert train["reward/best"] >= train["reward"]
    assert train["frac_kept"] == 1.0 and np.isfinite(train["loss"]) and train["num_tokens"] > 0
    assert "eval/accuracy" in summary["eval"]
    # No winner reaches min_reward (even fractions are <= 1): no update, no loss logged.
    strict = dataclasses.replace(config, workdir=str(tmp_path / "strict"),
                                 algorithm=rs.BestOfNConfig(samples_per_prompt=4, updates_per_batch=2, min_reward=2.0),
                                 train=TrainConfig(steps=1, eval_every=0))
    train = rs.train(strict, reward_sources=[PythonReward(even_fraction_reward)])["train"]
    assert train["frac_kept"] == 0.0 and "loss" not in train and "time/update" not in train
    with pytest.raises(ConfigError, match="samples_per_prompt must be an int >= 2"):
        rs.BestOfNConfig(samples_per_prompt=1)
    for bad in (float("nan"), float("inf"), True, "0.5"):  # NaN: no winner ever kept, every step skipped
        with pytest.raises(ConfigError, match=r"^algorithm.min_reward must be a finite number or None"):
            rs.BestOfNConfig(min_reward=bad)
    with pytest.raises(ConfigError, match=r"^algorithm.temperature must be a finite number > 0, got inf"):
        rs.BestOfNConfig(temperature=float("inf"))  # was accepted; the sampler refused it once the model was built


def test_a_batch_size_the_mesh_cannot_split_is_a_config_error_before_any_model_is_built(tmp_path):
    """6 winners on 8 data shards: the run built the model and sampled, then failed in the SFT step's
    device_batch with a ShardingError about batch['tokens']."""
    config = rs.RejectionSamplingConfig(
        name="bon", workdir=str(tmp_path / "bon"), model=tiny_config(), mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", eval=None, num_train=16, max_len=16, batch_size=6),
        algorithm=rs.BestOfNConfig(samples_per_prompt=2), rollout=RolloutConfig(max_new_tokens=4),
        train=TrainConfig(steps=1, eval_every=0), checkpoint=CheckpointConfig(every=0, async_save=False),
        logging=LoggingConfig(every=1, console=False, tensorboard=False))
    with pytest.raises(ConfigError, match=r"^data.batch_size: batch size 6 is not divisible by 8 = 8 data-parallel "
                                          r"shards .* x train.micro_batches 1"):
        rs.train(config, reward_sources=[PythonReward(even_fraction_reward)])
    assert not (tmp_path / "bon").exists()
