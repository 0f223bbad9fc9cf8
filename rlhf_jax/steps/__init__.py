"""Jitted, sharded training steps: `make_*` closures returning `step(state, batch) -> (state, metrics)`.

`common` holds the reusable pieces (gradient accumulation, the guarded update, `jit_step`),
`sequences` the batch -> log-prob helpers, `supervised` SFT and reward-model steps, `preference`
the DPO family, SimPO, ORPO and KTO.
"""

from rlhf_jax.steps.common import (
    NonFinitePolicy,
    Step,
    accumulate_gradients,
    apply_gradients,
    jit_step,
    make_update,
    split_micro_batches,
)
from rlhf_jax.steps.preference import (
    DPO,
    KTO,
    ORPO,
    SimPO,
    make_dpo_loss,
    make_dpo_step,
    make_reference_logps_fn,
    precompute_reference_logps,
)
from rlhf_jax.steps.rl import (
    GRPO_PRESETS,
    OPTIONAL_RL_BATCH_KEYS,
    RL_BATCH_KEYS,
    GRPOConfig,
    PPOConfig,
    check_rl_batch,
    grpo_advantages,
    grpo_config,
    grpo_objective,
    make_grpo_step,
    make_ppo_step,
)
from rlhf_jax.steps.supervised import make_reward_model_loss, make_reward_model_step, make_sft_loss, make_sft_step

__all__ = [
    "GRPO_PRESETS",
    "OPTIONAL_RL_BATCH_KEYS",
    "RL_BATCH_KEYS",
    "GRPOConfig",
    "PPOConfig",
    "check_rl_batch",
    "grpo_advantages",
    "grpo_config",
    "grpo_objective",
    "make_grpo_step",
    "make_ppo_step",
    "DPO",
    "KTO",
    "ORPO",
    "SimPO",
    "NonFinitePolicy",
    "Step",
    "accumulate_gradients",
    "apply_gradients",
    "jit_step",
    "make_dpo_loss",
    "make_dpo_step",
    "make_reference_logps_fn",
    "make_reward_model_loss",
    "make_reward_model_step",
    "make_sft_loss",
    "make_sft_step",
    "make_update",
    "precompute_reference_logps",
    "split_micro_batches",
]
