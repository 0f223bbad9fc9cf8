"""Training steps: `make_*` closures returning a pure `update(state, batch[, frozen]) -> (state, metrics)`.

Every `make_*_step` has the same contract: a pure update that the caller jits, with shardings and
the state donated (`common.jit_step`, or `common.jit_model_step` for one-model steps).

`common` holds the reusable pieces (gradient accumulation, the guarded update, `jit_step`),
`sequences` the batch -> log-prob helpers, `supervised` SFT and reward-model steps, `preference`
the DPO-family step (its objectives DPO, SimPO, ORPO and KTO in `preference_objectives`),
`policy_gradient` what the online RL steps share, `grpo` the GRPO family (`grpo_objective`) and
`ppo` PPO with a critic (`ppo_objective`).
"""

from rlhf_jax.steps.common import (
    NonFinitePolicy,
    Step,
    Update,
    accumulate_gradients,
    apply_gradients,
    jit_model_step,
    jit_step,
    make_update,
    split_micro_batches,
    step_key,
)
from rlhf_jax.steps.grpo import (
    GRPO_PRESETS,
    GRPOConfig,
    grpo_advantages,
    grpo_config,
    grpo_objective,
    make_grpo_step,
)
from rlhf_jax.steps.policy_gradient import (
    OPTIONAL_RL_BATCH_KEYS,
    RL_BATCH_KEYS,
    PolicyGradientConfig,
    check_rl_batch,
)
from rlhf_jax.steps.ppo import PPOConfig, make_ppo_step, ppo_objective
from rlhf_jax.steps.preference import (
    DPO,
    KTO,
    ORPO,
    SimPO,
    dpo_batch_keys,
    dpo_takes_reference,
    make_dpo_loss,
    make_dpo_step,
    make_reference_logps_fn,
    precompute_reference_logps,
)
from rlhf_jax.steps.supervised import (
    PAIR_KEYS,
    SFT_KEYS,
    make_reward_model_loss,
    make_reward_model_step,
    make_sft_loss,
    make_sft_step,
)

__all__ = [
    "GRPO_PRESETS",
    "OPTIONAL_RL_BATCH_KEYS",
    "RL_BATCH_KEYS",
    "GRPOConfig",
    "PPOConfig",
    "PolicyGradientConfig",
    "check_rl_batch",
    "grpo_advantages",
    "grpo_config",
    "grpo_objective",
    "make_grpo_step",
    "make_ppo_step",
    "ppo_objective",
    "DPO",
    "KTO",
    "ORPO",
    "SimPO",
    "NonFinitePolicy",
    "PAIR_KEYS",
    "SFT_KEYS",
    "Step",
    "Update",
    "accumulate_gradients",
    "apply_gradients",
    "dpo_batch_keys",
    "dpo_takes_reference",
    "jit_model_step",
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
    "step_key",
]
