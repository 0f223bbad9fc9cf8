"""Reward-model driver: preference pairs -> jitted `make_reward_model_step` -> held-out accuracy.

    config = RewardModelConfig(name="rm", data=DataConfig(train="pairs.jsonl", eval="pairs_eval.jsonl"))
    summary = train(config)

The model is a `CausalLM(head="scalar")`: the reward of a sequence is the scalar head's value at
its last token, trained with the Bradley-Terry loss (Ouyang et al. 2022). Training metrics (TRL's
names): `loss`, `accuracy`, `margin`, `rewards/chosen`, `rewards/rejected`, `grad_norm`,
`learning_rate`. Evaluation: `eval/accuracy` (share of held-out pairs ranked as labelled; with
gold labels this is agreement with the gold preference), `eval/loss`, `eval/margin`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.steps import make_reward_model_loss, make_reward_model_step
from rlhf_jax.train import common
from rlhf_jax.train.loop import fit, open_run

__all__ = ["RewardModelAlgorithm", "RewardModelConfig", "make_reward_model_eval", "train"]


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
class RewardModelConfig(common.RunConfig):
    """A reward-model run (the sections of `RunConfig` plus `algorithm`)."""

    algorithm: RewardModelAlgorithm = RewardModelAlgorithm()


def make_reward_model_eval(model: CausalLM, batches: list[dict], *, mesh, strategy: str, max_segments: int = 1):
    """`params -> {"eval/accuracy", "eval/loss", "eval/margin", "eval/rewards/chosen", ...}`.

    Pair-weighted means over fixed held-out batches, computed by the training loss function
    (`make_reward_model_loss`): accuracy is the share of pairs with `r(chosen) > r(rejected)`.
    """
    loss_fn = make_reward_model_loss(model, max_segments=max_segments)
    device_batches = [common.device_batch(b, mesh, strategy) for b in batches]

    @jax.jit
    def totals(params, batch):
        n = jnp.sum(batch["example_mask"].astype(jnp.float32))
        loss, metrics = loss_fn(params, batch, {"num_pairs": n}, jnp.zeros((2,), jnp.uint32))
        return {"loss": loss * n, **{k: v * n for k, v in metrics.items()}}, n

    def evaluate(params) -> dict[str, float]:
        results = jax.device_get([totals(params, b) for b in device_batches])
        n = max(sum(float(c) for _, c in results), 1.0)
        return {f"eval/{k}": sum(float(t[k]) for t, _ in results) / n for k in results[0][0]}

    return evaluate


def train(config: RewardModelConfig) -> dict[str, Any]:
    """Run (or resume) reward-model training as configured; return a summary.

    Returns:
      `{"run_dir", "step", "stopped_by", "eval": last eval metrics, "train": last train metrics}`.
    """
    tokenizer = common.make_tokenizer(config.data.tokenizer)
    common.check_vocab(tokenizer, config.model)
    train_data = common.load_split(config.data, kind="preference", which="train", tokenizer=tokenizer)
    eval_data = common.load_split(config.data, kind="preference", which="eval", tokenizer=tokenizer)
    mesh = config.mesh.make_mesh()
    model = CausalLM(config.model, head="scalar")
    strategy = config.mesh.strategy
    segments = config.data.max_segments if config.data.pack else 1
    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run:
        tokenizer.save_pretrained(run.file("tokenizer"))
        state, start, extras = common.init_or_restore(model, make_optimizer(config.optim), config=config,
                                                      mesh=mesh, run=run)
        step = make_reward_model_step(model, config.optim, mesh=mesh, strategy=strategy,
                                      micro_batches=config.train.micro_batches, max_segments=segments,
                                      center_rewards_coefficient=config.algorithm.center_rewards_coefficient,
                                      nonfinite=config.train.nonfinite)
        batches = common.batches_from(common.train_batches(train_data, config.data), extras)
        evaluate = None
        if eval_data is not None:
            held_out = common.eval_batches(eval_data, config.data, max_batches=config.train.eval_batches)
            eval_params = make_reward_model_eval(model, held_out, mesh=mesh, strategy=strategy, max_segments=segments)
            evaluate = lambda s: eval_params(s.params)  # noqa: E731
        step_fn = lambda s, b: step(s, common.device_batch(b, mesh, strategy))  # noqa: E731
        result = fit(state=state, step_fn=step_fn, batches=batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run, save_items=common.save_items,
                     extras=lambda: {"data": batches.get_state()}, evaluate=evaluate,
                     progress_keys=("loss", "accuracy"), run_config=to_dict(config))
    return {"run_dir": run.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
