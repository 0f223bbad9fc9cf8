"""Rewards for online RL: host-side verifiable functions and reward-model scoring, combined by weight."""

from rlhf_jax.rewards.base import (
    OnError,
    PythonReward,
    RewardFunctionError,
    RewardInputs,
    RewardResult,
    RewardSource,
    ScoredRewards,
    combine_rewards,
    reward_metrics,
)
from rlhf_jax.rewards.math_answers import MathReward, math_equal, math_reward
from rlhf_jax.rewards.model import RewardModelReward, check_same_vocabulary
from rlhf_jax.rewards.shaping import CosineLengthReward, repetition_penalty
from rlhf_jax.rewards.verifiable import (
    even_fraction_reward,
    exact_match,
    format_reward,
    missing_eos_penalty,
    overlong_penalty,
)

__all__ = [
    "CosineLengthReward",
    "MathReward",
    "OnError",
    "PythonReward",
    "RewardFunctionError",
    "RewardInputs",
    "RewardModelReward",
    "RewardResult",
    "RewardSource",
    "ScoredRewards",
    "check_same_vocabulary",
    "combine_rewards",
    "even_fraction_reward",
    "exact_match",
    "format_reward",
    "math_equal",
    "math_reward",
    "missing_eos_penalty",
    "overlong_penalty",
    "repetition_penalty",
    "reward_metrics",
]
