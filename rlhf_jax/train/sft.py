"""Supervised fine-tuning driver: SFT data -> jitted `make_sft_step` -> metrics, eval, checkpoints.

    config = SFTConfig(name="sft", data=DataConfig(train="data/sft.jsonl", eval="data/sft_eval.jsonl"))
    summary = train(config)            # re-running resumes from runs/sft/checkpoints

Training metrics (TRL's names): `loss`, `mean_token_accuracy`, `num_tokens`, `grad_norm`,
`learning_rate`. Evaluation: `eval/loss` (token-mean NLL over the held-out set) and
`eval/mean_token_accuracy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.config import to_dict
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.steps import make_sft_loss, make_sft_step
from rlhf_jax.steps.sequences import causal_targets
from rlhf_jax.train import common
from rlhf_jax.train.loop import fit, open_run

__all__ = ["SFTAlgorithm", "SFTConfig", "make_sft_eval", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTAlgorithm:
    """SFT settings.

    Attributes:
      logits_chunk_size: compute log-probs from hidden states this many tokens at a time instead
        of materialising `[B, T, V]` logits (large vocabularies); None = full logits.
    """

    logits_chunk_size: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(common.RunConfig):
    """A supervised fine-tuning run (the sections of `RunConfig` plus `algorithm`)."""

    algorithm: SFTAlgorithm = SFTAlgorithm()


def make_sft_eval(model: CausalLM, batches: list[dict], *, mesh, strategy: str):
    """`params -> {"eval/loss", "eval/mean_token_accuracy"}` over fixed held-out batches.

    Both are token-weighted over all batches: `loss = sum_b sum_t m_bt nll_bt / sum m`, computed by
    the training loss function itself (`make_sft_loss`) on each batch.
    """
    loss_fn = make_sft_loss(model)
    device_batches = [common.device_batch(b, mesh, strategy) for b in batches]

    @jax.jit
    def totals(params, batch):
        n = jnp.sum(causal_targets(batch["tokens"], batch["loss_mask"], batch.get("segment_ids")).mask)
        loss, metrics = loss_fn(params, batch, {"num_tokens": n}, jnp.zeros((2,), jnp.uint32))
        return loss * n, metrics["mean_token_accuracy"] * n, n

    def evaluate(params) -> dict[str, float]:
        sums = [totals(params, b) for b in device_batches]
        loss, acc, n = (float(sum(jax.device_get(s[i]) for s in sums)) for i in range(3))
        return {"eval/loss": loss / max(n, 1.0), "eval/mean_token_accuracy": acc / max(n, 1.0)}

    return evaluate


def train(config: SFTConfig) -> dict[str, Any]:
    """Run (or resume) supervised fine-tuning as configured; return a summary.

    Data, tokenizer and vocabulary are checked, and the checkpoint to resume from is checked
    against the model, before anything is compiled.

    Returns:
      `{"run_dir", "step", "stopped_by", "eval": last eval metrics, "train": last train metrics}`.
    """
    tokenizer = common.make_tokenizer(config.data.tokenizer)
    common.check_vocab(tokenizer, config.model)
    train_data = common.load_split(config.data, kind="sft", which="train", tokenizer=tokenizer)
    eval_data = common.load_split(config.data, kind="sft", which="eval", tokenizer=tokenizer)
    mesh = config.mesh.make_mesh()
    model = CausalLM(config.model)
    strategy = config.mesh.strategy
    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run:
        tokenizer.save_pretrained(run.file("tokenizer"))
        state, start, extras = common.init_or_restore(model, make_optimizer(config.optim), config=config,
                                                      mesh=mesh, run=run)
        step = make_sft_step(model, config.optim, mesh=mesh, strategy=strategy,
                             micro_batches=config.train.micro_batches, nonfinite=config.train.nonfinite,
                             logits_chunk_size=config.algorithm.logits_chunk_size)
        batches = common.batches_from(common.train_batches(train_data, config.data), extras)
        evaluate = None
        if eval_data is not None:
            held_out = common.eval_batches(eval_data, config.data, max_batches=config.train.eval_batches)
            eval_params = make_sft_eval(model, held_out, mesh=mesh, strategy=strategy)
            evaluate = lambda s: eval_params(s.params)  # noqa: E731
        step_fn = lambda s, b: step(s, common.device_batch(b, mesh, strategy))  # noqa: E731
        result = fit(state=state, step_fn=step_fn, batches=batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run, save_items=common.save_items,
                     extras=lambda: {"data": batches.get_state()}, evaluate=evaluate,
                     progress_keys=("loss", "mean_token_accuracy"), run_config=to_dict(config))
    return {"run_dir": run.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
