"""RLHF losses: pure, unreduced (per example or per token), float32, hyperparameters keyword-only.

Reduce per-token losses with `aggregate`; see docs/losses.md for the formulas and worked examples.
"""

from rlhf_jax.losses.aggregate import AggregateMode, aggregate, count_sequences, count_tokens
from rlhf_jax.losses.entropy import entropy_bonus
from rlhf_jax.losses.kl import KLEstimator, kl_divergence
from rlhf_jax.losses.policy import RatioLevel, cispo_loss, ppo_policy_loss
from rlhf_jax.losses.preference import (
    DPOLossType,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.losses.value import value_loss

__all__ = [
    "AggregateMode",
    "DPOLossType",
    "KLEstimator",
    "RatioLevel",
    "aggregate",
    "bradley_terry_loss",
    "cispo_loss",
    "count_sequences",
    "count_tokens",
    "dpo_loss",
    "entropy_bonus",
    "kl_divergence",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "ppo_policy_loss",
    "preference_metrics",
    "sft_loss",
    "simpo_loss",
    "value_loss",
]
