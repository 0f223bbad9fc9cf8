"""Training: one loop (`recipe.run`) and one recipe per algorithm family.

| family | config | recipe | its math |
|---|---|---|---|
| SFT | `sft.SFTConfig` | `sft.RECIPE` | `losses.sft_loss` in `steps.make_sft_loss` |
| reward model | `reward_model.RewardModelConfig` | `reward_model.RECIPE` | `losses.bradley_terry_loss` |
| DPO, SimPO, ORPO, KTO | `dpo.DPOConfig` | `dpo.RECIPE` | `losses.dpo_loss`, `simpo_loss`, `orpo_loss`, `kto_loss` |
| GRPO family | `rl.GRPORunConfig` | `rl.GRPO_RECIPE` | `steps.grpo_objective`, `steps.grpo_advantages` |
| agentic GRPO (multi-turn, tools) | `agentic.AgenticGRPORunConfig` | `agentic.RECIPE` | the GRPO family on trajectories with action masks |
| agentic PPO (multi-turn, tools) | `agentic.AgenticPPORunConfig` | `agentic.PPO_RECIPE` | PPO with per-turn rewards, GAE over action tokens |
| PPO | `rl.PPORunConfig` | `rl.PPO_RECIPE` | `steps.ppo_objective`, `advantages.gae` |
| best-of-n | `rejection_sampling.RejectionSamplingConfig` | `rejection_sampling.RECIPE` | `rejection_sampling.select_best` |
| process reward model | `prm.PRMConfig` | `prm.RECIPE` | `losses.process_reward.process_reward_loss` at step ends |
| online DPO | `online_dpo.OnlineDPOConfig` | `online_dpo.RECIPE` | `losses.dpo_loss` on ranked samples (`online_dpo.rank_pairs`) |

`recipe_for(config)` finds a config's recipe (what `rlhf-jax compile` uses), `stages.run_stages`
chains the stages of a multi-stage experiment.
"""

from __future__ import annotations

import importlib

__all__ = ["recipe_for", "RECIPE_MODULES"]

# Run config class name -> (module, recipe attribute); modules load on first use.
RECIPE_MODULES = {
    "SFTConfig": ("rlhf_jax.train.sft", "RECIPE"),
    "RewardModelConfig": ("rlhf_jax.train.reward_model", "RECIPE"),
    "DPOConfig": ("rlhf_jax.train.dpo", "RECIPE"),
    "GRPORunConfig": ("rlhf_jax.train.rl", "GRPO_RECIPE"),
    "AgenticGRPORunConfig": ("rlhf_jax.train.agentic", "RECIPE"),
    "AgenticPPORunConfig": ("rlhf_jax.train.agentic", "PPO_RECIPE"),
    "PPORunConfig": ("rlhf_jax.train.rl", "PPO_RECIPE"),
    "RejectionSamplingConfig": ("rlhf_jax.train.rejection_sampling", "RECIPE"),
    "PRMConfig": ("rlhf_jax.train.prm", "RECIPE"),
    "OnlineDPOConfig": ("rlhf_jax.train.online_dpo", "RECIPE"),
}


def recipe_for(config):
    """The `Recipe` that runs `config` (TypeError naming the known run configs otherwise)."""
    for cls in type(config).__mro__:
        entry = RECIPE_MODULES.get(cls.__name__)
        if entry is not None and cls.__module__ == entry[0]:
            return getattr(importlib.import_module(entry[0]), entry[1])
    raise TypeError(f"no recipe runs a {type(config).__name__}; run configs: {sorted(RECIPE_MODULES)}")
