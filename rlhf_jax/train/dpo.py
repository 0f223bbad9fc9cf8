"""DPO-family driver: preference pairs -> jitted `make_dpo_step` -> reward accuracy, margins, gold reward.

    config = DPOConfig(name="dpo", checkpoint=CheckpointConfig(init_from="runs/sft/checkpoints"),
                       algorithm=DPOAlgorithm(beta=0.1, loss_type="sigmoid"))
    summary = train(config)

The policy starts from `checkpoint.init_from` (usually an SFT checkpoint or a Hugging Face
directory); the frozen reference is the same weights, reloaded from there on every (re)start. Any
objective of `rlhf_jax.steps.preference` is selectable: `algorithm.objective` = `dpo` with every
`loss_type` of `rlhf_jax.losses.dpo_loss` (sigmoid, robust, hinge, ipo, apo_zero, apo_down; optionally
reference-free, with label smoothing or an RPO NLL term), `simpo` or `orpo`.

Training metrics (TRL's names): `loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `grad_norm`,
`learning_rate`. Evaluation on held-out pairs: `eval/rewards/accuracies`, `eval/rewards/margins`,
`eval/loss`, ...; and when the data is a synthetic task with a gold reward, samples from the policy
on held-out prompts are scored: `eval/gold_reward` (mean gold reward) and `eval/gold_win_rate`
(share of prompts where the policy's sample beats the reference policy's, ties counting half).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError, check_choice, to_dict
from rlhf_jax.data.synthetic import VowelTask
from rlhf_jax.losses.preference import DPOLossType
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.state import as_raw_key
from rlhf_jax.steps import DPO, ORPO, SimPO, make_dpo_loss, make_dpo_step, make_reference_logps_fn
from rlhf_jax.steps.sequences import causal_targets
from rlhf_jax.train import common
from rlhf_jax.train.loop import fit, open_run

__all__ = ["DPOAlgorithm", "DPOConfig", "SampleEvalConfig", "OBJECTIVES", "make_objective",
           "make_preference_eval", "make_gold_eval", "reference_params", "train"]

ObjectiveName = Literal["dpo", "simpo", "orpo"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOAlgorithm:
    """The preference objective and its hyperparameters.

    Attributes:
      objective: "dpo" (Rafailov et al. 2023), "simpo" (Meng et al. 2024) or "orpo" (Hong et al. 2024).
      beta: DPO's implicit-reward scale, SimPO's reward scale, ORPO's odds-ratio weight.
      loss_type: DPO's loss (`sigmoid`, `robust`, `hinge`, `ipo`, `apo_zero`, `apo_down`).
      label_smoothing: conservative / robust DPO's label-flip rate.
      reference_free: DPO against a uniform reference (no reference model).
      nll_weight: RPO's weight of the chosen responses' NLL (DPO and SimPO).
      gamma: SimPO's target margin.
    """

    objective: ObjectiveName = "dpo"
    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    nll_weight: float = 0.0
    gamma: float = 0.5

    def __post_init__(self):
        check_choice("algorithm", "objective", self.objective, ObjectiveName)
        check_choice("algorithm", "loss_type", self.loss_type, DPOLossType)
        try:
            make_objective(self)
        except ValueError as e:
            raise ConfigError(f"algorithm: {e}") from None


OBJECTIVES: dict[str, Callable[[DPOAlgorithm], Any]] = {
    "dpo": lambda a: DPO(beta=a.beta, loss_type=a.loss_type, label_smoothing=a.label_smoothing,
                         reference_free=a.reference_free, nll_weight=a.nll_weight),
    "simpo": lambda a: SimPO(beta=a.beta, gamma=a.gamma, nll_weight=a.nll_weight),
    "orpo": lambda a: ORPO(beta=a.beta),
}


def make_objective(algorithm: DPOAlgorithm):
    """The `rlhf_jax.steps.preference` objective object an algorithm section describes."""
    return OBJECTIVES[algorithm.objective](algorithm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleEvalConfig:
    """Sampling from the policy for the gold-reward evaluation (synthetic tasks only).

    Attributes:
      num_prompts: held-out prompts sampled at each evaluation (0 = no gold evaluation).
      max_new_tokens: the most tokens per completion.
      temperature: sampling temperature (the same key at every evaluation, so changes between
        evaluations come from the policy alone).
    """

    num_prompts: int = 64
    max_new_tokens: int = 24
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ConfigError(f"sampling.num_prompts must be an int >= 0, got {self.num_prompts!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ConfigError(f"sampling.temperature must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(common.RunConfig):
    """A DPO-family run (the sections of `RunConfig` plus `algorithm` and `sampling`)."""

    algorithm: DPOAlgorithm = DPOAlgorithm()
    sampling: SampleEvalConfig = SampleEvalConfig()


def reference_params(model: CausalLM, config: DPOConfig, mesh) -> Any:
    """The frozen reference: the weights the policy started from, placed like the policy's params.

    From `checkpoint.init_from` when set; otherwise the random initialization of `config.seed`
    (the same values `create_train_state` gives the fresh policy).
    """
    strategy = config.mesh.strategy
    shardings = sh.param_shardings(model.abstract_params(), model.logical_axes, mesh=mesh, strategy=strategy)
    if config.checkpoint.init_from:
        params = common.initial_params(model, config.checkpoint.init_from, rng=jax.random.key(config.seed),
                                       mesh=mesh, strategy=strategy)
        return jax.device_put(params, shardings)
    init = jax.jit(model.init, out_shardings=shardings)
    return init(jax.random.fold_in(as_raw_key(config.seed), 0))


def make_preference_eval(model: CausalLM, objective, batches: list[dict], reference, *, mesh, strategy: str,
                         max_segments: int = 1):
    """`params -> {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", ...}` on held-out pairs.

    Reference log-probs of the fixed batches are computed once; each evaluation runs the policy
    through the objective's own loss function (`make_dpo_loss`) and averages over pairs.
    """
    loss_fn = make_dpo_loss(model, objective, max_segments=max_segments)
    device_batches = [common.device_batch(b, mesh, strategy) for b in batches]
    if objective.needs_reference:
        ref_fn = make_reference_logps_fn(model, mesh=mesh, objective=objective, strategy=strategy,
                                         max_segments=max_segments)
        device_batches = [{**b, **ref_fn(reference, b)} for b in device_batches]

    @jax.jit
    def totals(params, batch):
        n = jnp.sum(batch["example_mask"].astype(jnp.float32))
        chosen = causal_targets(batch["chosen_tokens"], batch["chosen_loss_mask"], batch.get("chosen_segment_ids"))
        context = {"num_pairs": n, "num_chosen_tokens": jnp.sum(chosen.mask)}
        loss, metrics = loss_fn(params, batch, context, jnp.zeros((2,), jnp.uint32))
        return {"loss": loss * n, **{k: v * n for k, v in metrics.items()}}, n

    def evaluate(params) -> dict[str, float]:
        results = jax.device_get([totals(params, b) for b in device_batches])
        n = max(sum(float(c) for _, c in results), 1.0)
        return {f"eval/{k}": sum(float(t[k]) for t, _ in results) / n for k in results[0][0]}

    return evaluate


def make_gold_eval(model: CausalLM, reference, *, task, prompts, tokenizer, sampling: SampleEvalConfig, mesh,
                   strategy: str, seed: int):
    """`params -> {"eval/gold_reward", "eval/gold_win_rate", "eval/completion_length"}` from samples.

    One completion per held-out prompt is sampled (temperature `sampling.temperature`, the same key
    at every evaluation) and scored with the synthetic task's gold reward. The reference policy's
    samples for the same prompts and key are drawn once; the win rate is the share of prompts whose
    policy sample has the higher gold reward (ties count half).

    Args:
      model: the policy `CausalLM`.
      reference: the reference parameters (the policy the run started from).
      task: a synthetic task with `gold_reward(completions, word=...)` (`VowelTask`).
      prompts: a tokenized "prompt" dataset whose `columns` hold the gold reward's arguments.
      tokenizer: decodes completions (special tokens dropped).
      sampling: how many prompts, completion length, temperature.
      mesh, strategy: where the sampler runs.
      seed: the sampling key.
    """
    from rlhf_jax.sampling import Categorical, Sampler, SamplingConfig  # noqa: PLC0415

    n = min(sampling.num_prompts, len(prompts))
    ids = [prompts.arrays["prompt_tokens"][i].tolist() for i in range(n)]
    columns = {k: list(v[:n]) for k, v in prompts.columns.items()}
    longest = max(len(x) for x in ids)
    sampler = Sampler(model, max_len=longest + sampling.max_new_tokens, pad_id=prompts.pad_id, mesh=mesh,
                      strategy=strategy)
    sample_config = SamplingConfig(max_new_tokens=sampling.max_new_tokens,
                                   method=Categorical(temperature=sampling.temperature),
                                   eos_id=tokenizer.eos_token_id)

    def gold(params) -> tuple[list[float], float]:
        out = sampler.generate(params, ids, sample_config, rng=seed)
        tokens, lengths = jax.device_get((out.completion_tokens, out.lengths))
        texts = tokenizer.batch_decode([row[:k].tolist() for row, k in zip(tokens, lengths)],
                                       skip_special_tokens=True)
        return task.gold_reward(texts, **columns), float(lengths.mean())

    reference_gold, _ = gold(reference)

    def evaluate(params) -> dict[str, float]:
        rewards, length = gold(params)
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, reference_gold)]
        return {"eval/gold_reward": sum(rewards) / n, "eval/gold_win_rate": sum(wins) / n,
                "eval/completion_length": length}

    return evaluate


def train(config: DPOConfig) -> dict[str, Any]:
    """Run (or resume) DPO-family training as configured; return a summary.

    Returns:
      `{"run_dir", "step", "stopped_by", "eval": last eval metrics, "train": last train metrics}`.
    """
    tokenizer = common.make_tokenizer(config.data.tokenizer)
    common.check_vocab(tokenizer, config.model)
    train_data = common.load_split(config.data, kind="preference", which="train", tokenizer=tokenizer)
    eval_data = common.load_split(config.data, kind="preference", which="eval", tokenizer=tokenizer)
    objective = make_objective(config.algorithm)
    mesh = config.mesh.make_mesh()
    model = CausalLM(config.model)
    strategy = config.mesh.strategy
    segments = config.data.max_segments if config.data.pack else 1
    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run:
        tokenizer.save_pretrained(run.file("tokenizer"))
        state, start, extras = common.init_or_restore(model, make_optimizer(config.optim), config=config,
                                                      mesh=mesh, run=run)
        reference = reference_params(model, config, mesh) if objective.needs_reference else None
        step = make_dpo_step(model, config.optim, mesh=mesh, objective=objective, strategy=strategy,
                             micro_batches=config.train.micro_batches, max_segments=segments,
                             nonfinite=config.train.nonfinite)
        frozen = () if reference is None else (reference,)
        step_fn = lambda s, b: step(s, common.device_batch(b, mesh, strategy), *frozen)  # noqa: E731
        batches = common.batches_from(common.train_batches(train_data, config.data), extras)
        evaluators = []
        if eval_data is not None:
            held_out = common.eval_batches(eval_data, config.data, max_batches=config.train.eval_batches)
            evaluators.append(make_preference_eval(model, objective, held_out, reference, mesh=mesh,
                                                   strategy=strategy, max_segments=segments))
        task = common.synthetic_task(config.data, config.data.eval)
        if isinstance(task, VowelTask) and config.sampling.num_prompts:
            prompts = common.load_split(dataclasses.replace(config.data, num_eval=config.sampling.num_prompts),
                                        kind="prompt", which="eval", tokenizer=tokenizer)
            evaluators.append(make_gold_eval(
                model, reference if reference is not None else reference_params(model, config, mesh), task=task,
                prompts=prompts, tokenizer=tokenizer, sampling=config.sampling, mesh=mesh, strategy=strategy,
                seed=config.seed))
        evaluate = None
        if evaluators:
            evaluate = lambda s: {k: v for e in evaluators for k, v in e(s.params).items()}  # noqa: E731
        result = fit(state=state, step_fn=step_fn, batches=batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run, save_items=common.save_items,
                     extras=lambda: {"data": batches.get_state()}, evaluate=evaluate,
                     progress_keys=("loss", "rewards/accuracies", "rewards/margins"), run_config=to_dict(config))
    return {"run_dir": run.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
