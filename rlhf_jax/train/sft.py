"""Supervised fine-tuning: SFT data -> `steps.make_sft_step` -> token-weighted held-out loss.

    config = SFTConfig(name="sft", data=DataConfig(train="data/sft.jsonl", eval="data/sft_eval.jsonl"))
    summary = train(config)            # re-running resumes from runs/sft/checkpoints

The math is `rlhf_jax.losses.sft_loss` (token-mean cross-entropy over `loss_mask` targets) inside
`rlhf_jax.steps.make_sft_loss`. Training metrics (TRL's names): `loss`, `mean_token_accuracy`,
`num_tokens`, `grad_norm`, `learning_rate`. Evaluation: `eval/loss` (token-mean NLL over the
held-out set) and `eval/mean_token_accuracy` (without `algorithm.logits_chunk_size`).

What is trained on is the data's `loss_mask` (`rlhf_jax.data.tokenize`): a prompt/completion row's
completion (TRL's default `completion_only_loss`), a message list's assistant turns (TRL's
`assistant_only_loss=True`; TRL's default for message lists trains every token), a `text` row's
every token. There is no switch to train prompts too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rlhf_jax.config import ConfigError
from rlhf_jax.models import CausalLM
from rlhf_jax.steps import make_sft_loss, make_sft_step
from rlhf_jax.steps.sequences import causal_targets
from rlhf_jax.steps.supervised import SFT_KEYS
from rlhf_jax.train.data import held_out_batches
from rlhf_jax.train.evals import make_weighted_eval
from rlhf_jax.train.recipe import Context, Recipe, run
from rlhf_jax.train.adapters import make_model
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.supervised import model_program, supervised_trainer

__all__ = ["SFTAlgorithm", "SFTConfig", "RECIPE", "make_sft_eval", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTAlgorithm:
    """SFT settings.

    Attributes:
      logits_chunk_size: compute log-probs from hidden states this many tokens at a time instead
        of materialising `[B, T, V]` logits (large vocabularies); None = full logits.
    """

    logits_chunk_size: int | None = None

    def __post_init__(self):
        size = self.logits_chunk_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"algorithm.logits_chunk_size must be a positive int or None, got {size!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(RunConfig):
    """A supervised fine-tuning run (the sections of `RunConfig` plus `algorithm`)."""

    algorithm: SFTAlgorithm = SFTAlgorithm()


def make_sft_eval(model: CausalLM, batches: list[dict], *, mesh, strategy: str, micro_batches: int = 1,
                  logits_chunk_size: int | None = None):
    """`params -> {"eval/loss", "eval/mean_token_accuracy"}`, token-weighted over held-out batches.

    `eval/loss = sum_b sum_t m_bt nll_bt / sum m`, by the training loss function (`make_sft_loss`),
    each batch in the run's `micro_batches` pieces (`make_weighted_eval`). With `logits_chunk_size`
    (the run's `algorithm.logits_chunk_size`) log-probs come from hidden states in chunks, as in
    training, so no `[B, T, V]` logits are built, and there is no `eval/mean_token_accuracy`.
    """

    def weight(batch):
        n = jnp.sum(causal_targets(batch["tokens"], batch["loss_mask"], batch.get("segment_ids")).mask)
        return {"num_tokens": n}, n

    loss_fn = make_sft_loss(model, micro_batches=micro_batches, logits_chunk_size=logits_chunk_size)
    keys = ("mean_token_accuracy",) if logits_chunk_size is None else ()
    return make_weighted_eval(loss_fn, batches, weight=weight, mesh=mesh, strategy=strategy, keys=keys,
                              micro_batches=micro_batches)


def _build(config: SFTConfig, mesh):
    model = make_model(config)
    update = make_sft_step(model, config.optim, micro_batches=config.train.micro_batches,
                           nonfinite=config.train.nonfinite, logits_chunk_size=config.algorithm.logits_chunk_size)
    return model_program(config, mesh, model=model, update=update, kind="sft", batch_keys=SFT_KEYS, name="sft_step")


def _trainer(ctx: Context):
    config, evaluate, held_out = ctx.config, None, None
    if ctx.data.eval is not None:
        held_out = held_out_batches(ctx.data.eval, config.data, max_batches=config.train.eval_batches)
        evaluate = make_sft_eval(ctx.program.parts["model"], held_out.batches, mesh=ctx.mesh,
                                 strategy=config.mesh.strategy, micro_batches=config.train.micro_batches,
                                 logits_chunk_size=config.algorithm.logits_chunk_size)
    return supervised_trainer(ctx, evaluate=evaluate, held_out=held_out)


RECIPE = Recipe(name="sft", data_kind=lambda config: "sft", build=_build, trainer=_trainer,
                progress_keys=("loss", "mean_token_accuracy"))


def train(config: SFTConfig) -> dict[str, Any]:
    """Run (or resume) supervised fine-tuning as configured; return `run(RECIPE, config)`'s summary."""
    return run(RECIPE, config)
