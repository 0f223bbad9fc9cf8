"""The DPO family: preference pairs (or KTO's unpaired examples) -> `steps.make_dpo_step`.

    config = DPOConfig(name="dpo", checkpoint=CheckpointConfig(init_from="runs/sft/checkpoints"),
                       algorithm=DPO(beta=0.1, loss_type="sigmoid"))
    summary = train(config)

`algorithm` is the objective itself, one of `rlhf_jax.steps`' `DPO` (every `loss_type` of
`rlhf_jax.losses.dpo_loss`: sigmoid, robust, hinge, ipo, apo_zero, apo_down; reference-free,
label smoothing, RPO's NLL term), `SimPO`, `ORPO` or `KTO` (unpaired data: `prompt`,
`completion`, `label`). Their math: `losses.dpo_loss`, `simpo_loss`, `orpo_loss`, `kto_loss`.

The policy starts from `checkpoint.init_from` (an SFT checkpoint or a Hugging Face directory); the
frozen reference is the same weights, reloaded from there on every (re)start. `reference="model"`
runs the reference forward in every step; `reference="precomputed"` computes its log-probs of
every training example once before the first step (TRL's `precompute_ref_log_probs`) and frees it.
With a `lora` section the policy trains adapters on the frozen starting weights, and the reference
forward runs that base with the adapters off (`make_dpo_step(reference="base")`): no second copy.

Training metrics (TRL's names): `loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/accuracies` (paired), `rewards/margins`, `logps/chosen`, `logps/rejected`, `nll_loss` (with
an NLL term), ORPO's `log_odds_ratio`, KTO's `kl`, `count/chosen`, `count/rejected`, `grad_norm`,
`learning_rate` (a KTO step without one class logs no means of that class, nor a margin). A KTO
run warns once when its training set's classes differ in size and `desirable_weight x n_desirable /
(undesirable_weight x n_undesirable)` is outside the paper's [1, 4/3] (`kto_class_balance`, as TRL's
KTOTrainer). Evaluation: on held-out pairs `eval/rewards/accuracies`, `eval/rewards/margins`,
`eval/loss`, ... (KTO, on held-out unpaired examples: `eval/loss`, `eval/rewards/chosen`,
`eval/rewards/rejected`, `eval/kl`, ...); when the data is a synthetic task with a gold reward, samples from the policy on held-out prompts: `eval/gold_reward` and
`eval/gold_win_rate` (share of prompts where the policy's sample beats the reference policy's, ties
counting half).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax._checks import is_finite_number
from rlhf_jax.config import ConfigError, check_choice
from rlhf_jax.data.batches import kl_partners
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.rewards import PythonReward
from rlhf_jax.sampling import Categorical, Sampler, SamplingConfig, default_prompt_buckets
from rlhf_jax.steps import DPO, KTO, ORPO, SimPO, make_dpo_loss, make_dpo_step, make_reference_logps_fn
from rlhf_jax.steps.preference import dpo_batch_keys, dpo_step_context
from rlhf_jax.steps.sequences import causal_targets
from rlhf_jax.distributed import gather_rows, is_main
from rlhf_jax.sharding import local_rows
from rlhf_jax.train.data import device_batch, eval_batches, held_out_batches, load_split, one_pass
from rlhf_jax.train.evals import make_policy_eval, make_weighted_eval
from rlhf_jax.models.lora import base_params
from rlhf_jax.train.adapters import (
    lora_of,
    make_model,
    plain_model,
    plain_params,
    plain_reference_params,
    reference_model,
)
from rlhf_jax.train.recipe import Context, Recipe, run
from rlhf_jax.train.rollouts import RolloutCollector, model_stop_ids
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.supervised import ModelState, model_program, num_segments, supervised_trainer

__all__ = ["SampleEvalConfig", "DPOConfig", "RECIPE", "reference_params", "make_preference_eval", "kto_class_balance",
           "train"]

ReferenceMode = Literal["model", "precomputed"]
logger = logging.getLogger("rlhf_jax.train")


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
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ConfigError(f"sampling.temperature must be a finite number > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(RunConfig):
    """A DPO-family run: `RunConfig` plus the objective, the reference mode and the gold evaluation.

    Attributes:
      algorithm: the objective, `DPO(...)`, `SimPO(...)`, `ORPO(...)` or `KTO(...)`.
      reference: "model" (a reference forward per step) or "precomputed" (once, before training).
      logits_chunk_size: log-probs from hidden states this many tokens at a time (large vocabularies).
      shared_prefix_len: `p` when every pair's chosen and rejected rows begin with the same `p`
        tokens, none of them trained on (a prompt of at least `p` tokens, e.g. the shortest prompt's
        length): those run once per pair (`make_dpo_step(shared_prefix_len=...)`); same losses, fewer
        FLOPs. A batch that breaks it is a non-finite step (`train.nonfinite`). Unpacked rows only.
      sampling: the gold-reward evaluation's sampling.
    """

    algorithm: DPO | SimPO | ORPO | KTO = DPO()
    reference: ReferenceMode = "model"
    logits_chunk_size: int | None = None
    shared_prefix_len: int | None = None
    sampling: SampleEvalConfig = SampleEvalConfig()

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.algorithm, (DPO, SimPO, ORPO, KTO)):
            raise ConfigError(f"algorithm must be DPO, SimPO, ORPO or KTO, got {type(self.algorithm).__name__}")
        check_choice("", "reference", self.reference, ReferenceMode)
        if self.logits_chunk_size is not None and (not isinstance(self.logits_chunk_size, int)
                                                   or isinstance(self.logits_chunk_size, bool)
                                                   or self.logits_chunk_size < 1):
            raise ConfigError(f"logits_chunk_size must be a positive int or None, got {self.logits_chunk_size!r}")
        if self.shared_prefix_len is not None and (not isinstance(self.shared_prefix_len, int)
                                                   or isinstance(self.shared_prefix_len, bool)
                                                   or self.shared_prefix_len < 2 or not self.algorithm.paired):
            raise ConfigError("shared_prefix_len must be None or an int >= 2 with a paired objective, got "
                              f"{self.shared_prefix_len!r} with {type(self.algorithm).__name__}")
        if isinstance(self.algorithm, KTO) and self.data.pack:
            raise ConfigError("data.pack must be false with KTO: its unpaired examples are never packed (each "
                              "row holds one example, beside its own mismatched KL row)")
        if isinstance(self.algorithm, KTO) and self.algorithm.reference_point == "mismatched" \
                and self.data.batch_size < 2:
            raise ConfigError("data.batch_size must be >= 2 with KTO(reference_point='mismatched'), got "
                              f"{self.data.batch_size}: a batch of one example is its own mismatched pair, so z0 "
                              "equals its implied reward (TRL refuses this too); use reference_point='zero' for "
                              "batches of one")
        if self.shared_prefix_len is not None and self.shared_prefix_len >= self.data.row_len:
            raise ConfigError(f"shared_prefix_len ({self.shared_prefix_len}) must be smaller than the rows' "
                              f"{self.data.row_len} tokens (data.max_len / data.seq_len): every target would lie "
                              "inside the shared prefix")

    @property
    def uses_reference_model(self) -> bool:
        """Whether each step takes the reference parameters (not precomputed, not reference-free, not
        LoRA's base)."""
        return self.algorithm.needs_reference and self.step_reference == "model"

    @property
    def step_reference(self) -> str:
        """The step's reference mode: with `lora`, "model" is the policy's own base ("base")."""
        return "base" if self.lora is not None and self.reference == "model" else self.reference


def reference_params(model, config: DPOConfig, mesh) -> Any:
    """The frozen reference: the weights the policy started from, placed like the policy's params
    (for LoRA the base alone, a plain `CausalLM` tree)."""
    params = ModelState(model, make_optimizer(config.optim), mesh, config.mesh.strategy, config.seed,
                        config.checkpoint.init_from).fresh().params
    return params if lora_of(model) is None else base_params(params)


def kto_class_balance(num_desirable: int, num_undesirable: int, desirable_weight: float,
                      undesirable_weight: float) -> str | None:
    """Why KTO's class weights fall outside the paper's range for a training set, or None.

    Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8)
    recommend `lambda_D n_D / (lambda_U n_U)` in `[1, 4/3]` for `n_D` desirable and `n_U`
    undesirable examples. As TRL's KTOTrainer, only a set whose classes differ in size is judged
    (with equal counts the weights are a deliberate loss aversion); the message gives the ratio and
    the `desirable_weight` (or `undesirable_weight`) range that would bring it into `[1, 4/3]`.

    Example:
      >>> print(kto_class_balance(90, 10, 1.0, 1.0))  # doctest: +NORMALIZE_WHITESPACE
      KTO: the training set has 90 desirable and 10 undesirable examples, so algorithm.desirable_weight
      x 90 / (algorithm.undesirable_weight x 10) = 1 x 90 / (1 x 10) = 9 is outside [1, 4/3], the
      range the KTO paper recommends: set desirable_weight in [0.1111, 0.1481] or undesirable_weight in
      [6.75, 9]
    """
    d, u, wd, wu = num_desirable, num_undesirable, float(desirable_weight), float(undesirable_weight)
    if d == u:
        return None
    if not d or not u:
        return (f"KTO: the training set has {d} desirable and {u} undesirable examples: no weights bring "
                "algorithm.desirable_weight x n_desirable / (algorithm.undesirable_weight x n_undesirable) into "
                "[1, 4/3], the range the KTO paper recommends, with a class absent")
    ratio = wd * d / (wu * u) if wu else (float("inf") if wd else float("nan"))
    if 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9:
        return None
    fixes = [f"desirable_weight in [{wu * u / d:.4g}, {4 / 3 * wu * u / d:.4g}]"] if wu else []
    fixes += [f"undesirable_weight in [{0.75 * wd * d / u:.4g}, {wd * d / u:.4g}]"] if wd else []
    return (f"KTO: the training set has {d} desirable and {u} undesirable examples, so algorithm.desirable_weight "
            f"x {d} / (algorithm.undesirable_weight x {u}) = {wd:g} x {d} / ({wu:g} x {u}) = {ratio:.4g} is outside "
            f"[1, 4/3], the range the KTO paper recommends: set {' or '.join(fixes) or 'both weights above 0'}")


def warn_kto_class_balance(objective: KTO, dataset) -> None:
    """Log `kto_class_balance`'s warning for the training set's labels, once per run (a sharded
    multi-process set, which holds only its own rows' labels, is not judged)."""
    arrays = getattr(dataset, "arrays", None)
    if arrays is None:
        return
    label = np.asarray(arrays["label"], bool)
    message = kto_class_balance(int(label.sum()), int((~label).sum()), objective.desirable_weight,
                                objective.undesirable_weight)
    if message is not None:
        logger.warning("%s", message)


def _chosen_weight(batch):
    n = jnp.sum(batch["example_mask"].astype(jnp.float32))
    chosen = causal_targets(batch["chosen_tokens"], batch["chosen_loss_mask"], batch.get("chosen_segment_ids"))
    return {"num_pairs": n, "num_chosen_tokens": jnp.sum(chosen.mask)}, n


def _unpaired_weights(model, objective, *, max_segments: int, logits_chunk_size: int | None, micro_batches: int):
    """KTO's eval normalisers: the step's own (its counts and z0 over the whole batch, from the
    policy's log-probs of the batch's mismatched KL rows, in the step's micro-batches), and each
    metric's weight: the examples, the desirable ones for `*/chosen`, the undesirable for `*/rejected`."""
    step_context = dpo_step_context(model, objective, "precomputed", micro_batches=micro_batches,
                                    max_segments=max_segments, chunk_size=logits_chunk_size)

    def weights(params, batch):
        _, context = step_context(params, batch, (), None)
        n, d, u = context["num_examples"], context["num_desirable"], context["num_undesirable"]
        return context, {"loss": n, "kl": n, "rewards/chosen": d, "logps/chosen": d, "rewards/rejected": u,
                         "logps/rejected": u}

    return weights


def make_preference_eval(model: CausalLM, objective, batches: list[dict], reference, *, mesh, strategy: str,
                         max_segments: int = 1, logits_chunk_size: int | None = None, micro_batches: int = 1):
    """`params -> {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", ...}` on held-out pairs
    (KTO: held-out unpaired examples, `eval/loss`, `eval/rewards/chosen`, `eval/rewards/rejected`,
    `eval/rewards/margins`, `eval/logps/*`, `eval/kl`).

    The reference's log-probs of the fixed batches are computed once; each evaluation runs the
    policy through the objective's own loss function (`make_dpo_loss`), pair-weighted. Both passes
    run each batch in the run's `micro_batches` pieces inside their one program (as the update step
    does), so they fit wherever the step's forward does.

    KTO (TRL's KTOTrainer evaluation): each batch's z0 is that batch's own estimate from its
    mismatched KL rows (`max(0, mean log-ratio)`, over the whole batch, as the step computes it);
    `eval/loss` and `eval/kl` are means over examples, `*/chosen` over the desirable examples,
    `*/rejected` over the undesirable ones, `eval/rewards/margins` their difference. A class the held-out
    set lacks has no `*/<class>` means and no margin in the result, not 0 (as the training logs:
    `rlhf_jax.metrics.without_empty_means`).
    """
    prepare = None
    if objective.needs_reference:
        ref_fn = make_reference_logps_fn(reference_model(model), mesh=mesh, objective=objective, strategy=strategy,
                                         max_segments=max_segments, logits_chunk_size=logits_chunk_size,
                                         micro_batches=micro_batches)
        prepare = lambda batch, ref: {**batch, **ref_fn(ref, batch)}  # noqa: E731
    loss_fn = make_dpo_loss(model, objective, micro_batches=micro_batches, max_segments=max_segments,
                            logits_chunk_size=logits_chunk_size)
    frozen = (reference,) if prepare else ()
    if objective.paired:
        return make_weighted_eval(loss_fn, batches, weight=_chosen_weight, mesh=mesh, strategy=strategy,
                                  prepare=prepare, frozen=frozen, micro_batches=micro_batches)
    weights = _unpaired_weights(model, objective, max_segments=max_segments, logits_chunk_size=logits_chunk_size,
                                micro_batches=micro_batches)
    evaluate = make_weighted_eval(loss_fn, batches, weights=weights, mesh=mesh, strategy=strategy, prepare=prepare,
                                  frozen=frozen, micro_batches=micro_batches,
                                  keys=("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"))

    def unpaired(params) -> dict[str, float]:
        out = evaluate(params)  # the margin of the set's means (TRL's), not a mean of the batches' margins
        if "eval/rewards/chosen" in out and "eval/rewards/rejected" in out:  # a class the set lacks: no means
            out["eval/rewards/margins"] = out["eval/rewards/chosen"] - out["eval/rewards/rejected"]
        return out

    unpaired.program, unpaired.batches = evaluate.program, evaluate.batches
    return unpaired


def _precomputed_shapes(config: DPOConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    b, s = config.data.batch_size, num_segments(config)
    shape = (b,) if s == 1 else (b, s)
    data = sh.batch_sharding(mesh, config.mesh.strategy)
    keys = [k for k in dpo_batch_keys(config.algorithm, "precomputed") if k.startswith("ref_")]
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=data) for k in keys}


def _build(config: DPOConfig, mesh):
    model = make_model(config)
    objective = config.algorithm
    segments = num_segments(config)
    if config.shared_prefix_len is not None and segments != 1:
        raise ConfigError(f"shared_prefix_len={config.shared_prefix_len} needs unpacked rows; this run packs "
                          f"{segments} pairs per row")
    update = make_dpo_step(model, config.optim, objective=objective, reference=config.step_reference,
                           micro_batches=config.train.micro_batches, max_segments=segments,
                           logits_chunk_size=config.logits_chunk_size, shared_prefix_len=config.shared_prefix_len,
                           nonfinite=config.train.nonfinite)
    precomputed = objective.needs_reference and config.reference == "precomputed"
    return model_program(config, mesh, model=model, update=update,
                         kind="preference" if objective.paired else "unpaired",
                         batch_keys=dpo_batch_keys(objective, config.reference), name="dpo_step",
                         frozen_params=int(config.uses_reference_model),
                         batch_extra=_precomputed_shapes(config, mesh) if precomputed else None)


def precompute_reference(ref_fn, reference, dataset, config: DPOConfig, *, mesh
                         ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The reference's summed log-probs of every example of `dataset`: `({key: f32[num_examples]}, partners)`.

    One unshuffled pass in training-sized batches; each slot's value goes to the dataset index
    the batch iterator put there (`BatchIterator.last_global_rows`), so any later batch can gather
    them. In a multi-process run every process gets the whole table (its training batches hold
    other examples than the ones it collated in this pass).

    Unpaired (KTO) data: `ref_kl_logps[i]` is the reference log-prob of example i's prompt with the
    completion of `partners[i]`, the example this pass paired it with (`kl_partners`; TRL's KTO
    fixes these pairs once, too). Training must build its KL rows from the same pairs
    (`BatchIterator.kl_partner_of = partners`): a shuffled batch's own pairs would put a policy
    log-prob of one completion against a reference log-prob of another into KTO's `z0`.
    `partners` is None for paired data.
    """
    it = one_pass(dataset, config.data)
    out: dict[str, np.ndarray] = {}
    partners = np.arange(len(dataset)) if dataset.kind == "unpaired" else None
    for batch in it:
        if partners is not None:
            for row, partner in zip(it.last_global_rows, kl_partners(it.last_global_rows)):
                if row:
                    partners[row[0]] = partner
        values = ref_fn(reference, device_batch(batch, mesh, config.mesh.strategy))
        for key, v in values.items():
            table = out.setdefault(key, np.zeros(len(dataset), np.float32))
            v = gather_rows(local_rows(v)).reshape(len(it.last_global_rows), -1)
            for b, row in enumerate(it.last_global_rows):
                table[row] = v[b, :len(row)]
    return out, partners


def gather_precomputed(tables: dict[str, np.ndarray], rows: list[list[int]], num_segments: int) -> dict[str, np.ndarray]:
    """Per-example values of `tables` laid out like a batch: `[B]` (unpacked) or `[B, S]` (0 in empty slots)."""
    out = {}
    for key, table in tables.items():
        values = np.zeros((len(rows), num_segments), np.float32)
        for b, row in enumerate(rows):
            values[b, :len(row)] = table[row]
        out[key] = values[:, 0] if num_segments == 1 else values
    return out


def _gold_eval(ctx: Context, reference):
    """The sampled gold-reward evaluation (synthetic tasks with a gold reward), or None."""
    config, data = ctx.config, ctx.config.data
    task = data.task("eval")
    if task is None or task.gold_metric != "eval/gold_reward" or not config.sampling.num_prompts:
        return None
    prompts = load_split(dataclasses.replace(data, num_eval=config.sampling.num_prompts), kind="prompt",
                         which="eval", tokenizer=ctx.data.tokenizer)
    prompt_len = data.max_prompt_len or data.row_len
    model = ctx.program.parts["model"]
    sampler = Sampler(plain_model(model), max_len=prompt_len + config.sampling.max_new_tokens,
                      prompt_buckets=default_prompt_buckets(prompt_len), mesh=ctx.mesh, strategy=config.mesh.strategy)
    sampling = SamplingConfig(max_new_tokens=config.sampling.max_new_tokens,
                              method=Categorical(temperature=config.sampling.temperature),
                              eos_id=ctx.data.tokenizer.eos_token_id, stop_ids=model_stop_ids(sampler.model.config))
    collector = RolloutCollector(sampler=sampler, tokenizer=ctx.data.tokenizer, sources=[], weights=None,
                                 train_sampling=sampling, eval_sampling=sampling)
    batches = eval_batches(prompts, data, max_batches=-(-config.sampling.num_prompts // data.batch_size))
    evaluate = make_policy_eval(collector, batches, key=jax.random.key(config.seed),
                                gold=(task.gold_metric, PythonReward(task.reward, "gold")),
                                baseline=plain_reference_params(model, reference))
    return lambda params: evaluate(plain_params(model, params), None)


def _trainer(ctx: Context):
    config, mesh, strategy = ctx.config, ctx.mesh, ctx.config.mesh.strategy
    objective, segments = config.algorithm, num_segments(config)
    if isinstance(objective, KTO) and is_main():
        warn_kto_class_balance(objective, ctx.data.train)
    model = ctx.program.parts["model"]
    reference = reference_params(model, config, mesh)
    evaluators, held_out = [], None
    if ctx.data.eval is not None:
        held_out = held_out_batches(ctx.data.eval, config.data, max_batches=config.train.eval_batches)
        evaluators.append(make_preference_eval(model, objective, held_out.batches, reference, mesh=mesh,
                                               strategy=strategy, max_segments=segments,
                                               logits_chunk_size=config.logits_chunk_size,
                                               micro_batches=config.train.micro_batches))
    gold = _gold_eval(ctx, reference)
    if gold is not None:
        evaluators.append(gold)
    evaluate = (lambda params: {k: v for e in evaluators for k, v in e(params).items()}) if evaluators else None
    prepare, partners = None, None
    if objective.needs_reference and config.reference == "precomputed":
        ref_fn = make_reference_logps_fn(reference_model(model), mesh=mesh, objective=objective, strategy=strategy,
                                         max_segments=segments, logits_chunk_size=config.logits_chunk_size,
                                         micro_batches=config.train.micro_batches)
        tables, partners = precompute_reference(ref_fn, reference, ctx.data.train, config, mesh=mesh)
        prepare = lambda batch, it: {**batch, **gather_precomputed(tables, it.last_rows, segments)}  # noqa: E731
    frozen = (reference,) if config.uses_reference_model else ()
    del reference  # precomputed or reference-free runs keep no second copy of the weights
    trainer = supervised_trainer(ctx, evaluate=evaluate, frozen=frozen, prepare=prepare, held_out=held_out)
    trainer.batches.kl_partner_of = partners  # KTO: the KL rows whose reference log-probs were precomputed
    return trainer


RECIPE = Recipe(name="dpo", data_kind=lambda config: "preference" if config.algorithm.paired else "unpaired",
                build=_build, trainer=_trainer, progress_keys=("loss", "rewards/accuracies", "rewards/margins"))


def train(config: DPOConfig) -> dict[str, Any]:
    """Run (or resume) DPO-family training as configured; return `run(RECIPE, config)`'s summary."""
    return run(RECIPE, config)
