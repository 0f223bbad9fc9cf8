"""A GRPO run small enough to be killed and resumed many times in a test (`tests/test_fault_resume.py`).

    rlhf-jax run tests/grpo_fault_experiment.py --set workdir=DIR [--set train.steps=8 ...]

`rlhf_jax.train.tiny_stages.arithmetic_grpo` shrunk (4 prompts x 4 samples, 6 new tokens) and
moved to the vowel task, whose gold reward is dense: from the random init the arithmetic grader
gives every sample 0, so every advantage would be 0 and no update would depend on the sampled
completions. Here each step's update does, which is what a bit-exact resume has to reproduce.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.steps import grpo_config
from rlhf_jax.train import rl
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig


def get_config(arg: str | None = None) -> rl.GRPORunConfig:
    if arg not in (None, "tiny"):
        raise ValueError(f"grpo_fault_experiment has only the tiny mode, got {arg!r}")
    return dataclasses.replace(
        tiny.arithmetic_grpo(name="grpo_fault"), workdir="runs/grpo_fault",
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=256, num_eval=8, max_len=16,
                        batch_size=4, vowel=tiny.VOWEL),
        algorithm=grpo_config("grpo", group_size=4), rollout=RolloutConfig(max_new_tokens=6),
        train=TrainConfig(steps=8, eval_every=0, eval_batches=1),
        checkpoint=CheckpointConfig(every=2, keep=5), logging=LoggingConfig(every=1, console=False, tensorboard=False))


def main(config: rl.GRPORunConfig) -> dict:
    return rl.train(config)
