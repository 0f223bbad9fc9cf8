"""Reward models: preference pairs -> `steps.make_reward_model_step` -> held-out accuracy.

    config = RewardModelConfig(name="rm", data=DataConfig(train="pairs.jsonl", eval="pairs_eval.jsonl"))
    summary = train(config)

The model is a `CausalLM(head="scalar")`: the reward of a sequence is the scalar head's value at
its last token, trained with `rlhf_jax.losses.bradley_terry_loss` (Ouyang et al. 2022) inside
`rlhf_jax.steps.make_reward_model_loss`: TRL's `RewardTrainer` loss, per-pair `margin` column and
`center_rewards_coefficient` included. Training metrics: `loss`, `accuracy` (`r_c > r_r`, a tie is a
miss), `margin`, `mean_reward`, `min_reward`, `max_reward` (over the step's chosen and rejected
rewards: the whole batch's extremes; TRL logs the mean of its micro-batches' extremes), `num_tokens`
(the tokens read this step, prompts included; TRL's is the running total), `grad_norm`,
`learning_rate` (TRL's names), and `rewards/chosen`, `rewards/rejected` (the mean reward of each side).
Evaluation: `eval/accuracy` (share of held-out pairs ranked as labelled; with gold labels, agreement
with the gold preference), `eval/loss` (the training objective), `eval/margin`, `eval/mean_reward`,
`eval/rewards/*`.

Sequences longer than `data.max_len` are truncated, not dropped as TRL's `RewardTrainer` drops them,
and counted in the data loading warning: the default `data.truncation="keep_end"` cuts the prompt's
start and keeps the completion's end, where the reward is read (`keep_start` cuts the completion's
end and EOS); a pair that truncation makes identical is a bad row (`data.on_error`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.steps import make_reward_model_loss, make_reward_model_step
from rlhf_jax.steps.supervised import PAIR_KEYS
from rlhf_jax.train.data import held_out_batches
from rlhf_jax.train.evals import make_weighted_eval
from rlhf_jax.train.recipe import Context, Recipe, run
from rlhf_jax.train.adapters import make_model
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.supervised import model_program, num_segments, supervised_trainer

__all__ = ["RewardModelAlgorithm", "RewardModelConfig", "RECIPE", "make_reward_model_eval", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelAlgorithm:
    """Reward-model settings.

    Attributes:
      center_rewards_coefficient: weight of `(r_c + r_r)^2` keeping rewards centred near 0
        (Eisenstein et al. 2023; TRL's `center_rewards_coefficient`).
    """

    center_rewards_coefficient: float = 0.0

    def __post_init__(self):
        if not self.center_rewards_coefficient >= 0:
            raise ConfigError(f"algorithm.center_rewards_coefficient must be >= 0, got "
                              f"{self.center_rewards_coefficient!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig(RunConfig):
    """A reward-model run (the sections of `RunConfig` plus `algorithm`)."""

    algorithm: RewardModelAlgorithm = RewardModelAlgorithm()


def pair_weight(batch):
    """`(context, pairs)` of a preference batch: its real pairs are the global normaliser and weight."""
    n = jnp.sum(batch["example_mask"].astype(jnp.float32))
    return {"num_pairs": n}, n


# Pair-weighted means over held-out batches; a per-batch extreme or token count has no such mean.
_EVAL_KEYS = ("accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")


def make_reward_model_eval(model: CausalLM, batches: list[dict], *, mesh, strategy: str, max_segments: int = 1,
                           micro_batches: int = 1, center_rewards_coefficient: float = 0.0):
    """`params -> {"eval/accuracy", "eval/loss", "eval/margin", "eval/rewards/chosen", ...}`, pair-weighted.

    By the training loss function (`make_reward_model_loss`): accuracy is the share of held-out
    pairs with `r(chosen) > r(rejected)` (a tie counts as wrong, as in TRL); `eval/loss` is the
    training objective, the pairs' margins and the centering term (`center_rewards_coefficient`, pass
    the run's) included, as TRL's `eval_loss` is; `eval/mean_reward` the mean over both sides (no
    `min_reward`, `max_reward`, `num_tokens`: a weighted mean of batch extremes or counts means
    nothing). Each batch runs in the run's `micro_batches` pieces.
    """
    loss_fn = make_reward_model_loss(model, micro_batches=micro_batches, max_segments=max_segments,
                                     center_rewards_coefficient=center_rewards_coefficient)
    return make_weighted_eval(loss_fn, batches, weight=pair_weight, mesh=mesh, strategy=strategy,
                              keys=_EVAL_KEYS, micro_batches=micro_batches)


def _build(config: RewardModelConfig, mesh):
    model = make_model(config, head="scalar")
    update = make_reward_model_step(model, config.optim, micro_batches=config.train.micro_batches,
                                    max_segments=num_segments(config), nonfinite=config.train.nonfinite,
                                    center_rewards_coefficient=config.algorithm.center_rewards_coefficient)
    return model_program(config, mesh, model=model, update=update, kind="preference", batch_keys=PAIR_KEYS,
                         name="reward_model_step")


def _trainer(ctx: Context):
    config, evaluate, held_out = ctx.config, None, None
    if ctx.data.eval is not None:
        held_out = held_out_batches(ctx.data.eval, config.data, max_batches=config.train.eval_batches)
        evaluate = make_reward_model_eval(ctx.program.parts["model"], held_out.batches, mesh=ctx.mesh,
                                          strategy=config.mesh.strategy, max_segments=num_segments(config),
                                          micro_batches=config.train.micro_batches,
                                          center_rewards_coefficient=config.algorithm.center_rewards_coefficient)
    return supervised_trainer(ctx, evaluate=evaluate, held_out=held_out)


RECIPE = Recipe(name="reward_model", data_kind=lambda config: "preference", build=_build, trainer=_trainer,
                progress_keys=("loss", "accuracy"))


def train(config: RewardModelConfig) -> dict[str, Any]:
    """Run (or resume) reward-model training as configured; return `run(RECIPE, config)`'s summary."""
    return run(RECIPE, config)
