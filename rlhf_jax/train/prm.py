"""Process reward models: step-labelled solutions -> a per-step classifier -> held-out step accuracy.

    config = PRMConfig(name="prm", data=DataConfig(train="steps.jsonl", eval="steps_eval.jsonl"))
    summary = train(config)

Data: rows `{"prompt", "completions": [steps], "labels": [per-step bools]}` (TRL's stepwise
supervision format; PRM800K / Math-Shepherd converted to it), read by `rlhf_jax.data.prm` with
`algorithm.step_separator` after every step. The model is a `CausalLM(head="scalar")`; its value at
the last token of each step's separator is that step's logit, trained with
`rlhf_jax.losses.process_reward.process_reward_loss` (step-mean binary cross-entropy; TRL's
`PRMTrainer` labels the same positions). With `algorithm.outcome_only`, only the last step's position
is trained, on the label "every step correct": an outcome reward model (ORM; Cobbe et al. 2021) on
the same data and budget, the PRM's baseline.

Metrics: `loss`, `accuracy` (steps classified right, threshold 0.5), `grad_norm`, `learning_rate`;
evaluation `eval/loss`, `eval/accuracy` (held-out step accuracy). Scoring whole solutions:
`PRMScorer` (step logits of any texts, aggregated by `min` / `prod` / `last` / `mean`), which is a
reward source for the RL drivers (`PRMScorer.reward(...)`) and the ranker of `best_of_n`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError, check_choice
from rlhf_jax.data.prm import StepDataset, StepExample, load_step_dataset, step_batches, tokenize_steps
from rlhf_jax.losses.process_reward import StepAggregation, aggregate_step_scores, process_reward_loss
from rlhf_jax.optim import make_optimizer
from rlhf_jax.rewards.base import RewardInputs
from rlhf_jax.steps import common
from rlhf_jax.steps.common import jit_step
from rlhf_jax.train.adapters import make_model
from rlhf_jax.train.data import HeldOut, RunData, check_batch_size, check_vocab, make_tokenizer
from rlhf_jax.train.evals import make_weighted_eval
from rlhf_jax.train.recipe import Context, Program, Recipe, Trainer, run
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.supervised import ModelState

__all__ = ["PRMAlgorithm", "PRMConfig", "PRM_KEYS", "make_prm_loss", "make_prm_step", "PRMScorer", "load_prm_scorer", "best_of_n",
           "RECIPE", "train"]

PRM_KEYS = ("tokens", "step_mask", "step_labels")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRMAlgorithm:
    """Process-reward-model settings.

    Attributes:
      step_separator: the text after every step; its last token carries the step's label.
      outcome_only: train an outcome RM instead: one label per solution (all steps correct), at
        its last step.
      aggregation: how a scorer of this run turns step scores into a solution score ("min", "prod",
        "last", "mean"): the default `mode` of `load_prm_scorer` (read from the run's `config.json`);
        training never aggregates. `rewards.prm_aggregation` chooses it for an RL run's `prm` reward.
    """

    step_separator: str = "\n"
    outcome_only: bool = False
    aggregation: StepAggregation = "min"

    def __post_init__(self):
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ConfigError(f"algorithm.step_separator must be a non-empty string, got {self.step_separator!r}")
        check_choice("algorithm", "aggregation", self.aggregation, StepAggregation)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRMConfig(RunConfig):
    """A process-reward-model run (`RunConfig` plus `algorithm`); `data.train` / `data.eval` are step-labelled files."""

    algorithm: PRMAlgorithm = PRMAlgorithm()

    def __post_init__(self):
        super().__post_init__()
        if self.data.pack:
            raise ConfigError("data.pack must be false for process reward models")
        for which in ("train", "eval"):
            source = getattr(self.data, which)
            if isinstance(source, str) and source.startswith("synthetic:"):
                raise ConfigError(f"data.{which}: a process reward model reads step-labelled files, got {source!r}")


def outcome_labels(dataset: StepDataset) -> StepDataset:
    """The ORM's view of step data: one label (all steps correct) at each row's last step end.

    The label is the whole solution's (`dataset.solution_labels`): a wrong step cut by `max_len`
    still makes the solution wrong.
    """
    t = np.arange(dataset.tokens.shape[1])
    last = np.max(np.where(dataset.step_mask, t, -1), axis=1)
    all_good = np.all(np.where(dataset.step_mask, dataset.step_labels, 1) == 1, axis=1)
    if dataset.solution_labels is not None:
        all_good = dataset.solution_labels == 1
    mask = np.zeros_like(dataset.step_mask)
    labels = np.zeros_like(dataset.step_labels)
    rows = np.arange(len(dataset))
    mask[rows, last] = True
    labels[rows, last] = all_good.astype(np.int32)
    return dataclasses.replace(dataset, step_mask=mask, step_labels=labels)


def _num_steps(batch):
    n = jnp.sum(batch["step_mask"].astype(jnp.float32))
    return {"num_steps": n}, n


def make_prm_loss(model, *, micro_batches: int = 1) -> common.LossFn:
    """The PRM micro-batch loss: `sum_{b,t} l_{b,t} / N` with `l` = `process_reward_loss` and `N` the
    step ends of the full batch (`context["num_steps"]`); metric `accuracy` = share of step ends with
    `1[s > 0] = y`."""

    def loss_fn(params, batch, context, rng):
        out = model.forward(params, batch["tokens"], rng=rng)
        if out.values is None:
            raise ValueError("make_prm_loss needs a scalar-head model: CausalLM(config, head='scalar')")
        mask = batch["step_mask"].astype(jnp.float32)
        losses = process_reward_loss(out.values, batch["step_labels"], mask)
        n = context["num_steps"]
        right = ((jax.lax.stop_gradient(out.values) > 0) == (batch["step_labels"] > 0)).astype(jnp.float32)
        metrics = {"accuracy": common.micro_share(jnp.sum(right * mask), n, micro_batches)}
        return jnp.sum(losses) / jnp.maximum(n, 1.0), metrics

    return loss_fn


def make_prm_step(model, optimizer, *, micro_batches: int = 1, nonfinite: common.NonFinitePolicy = "skip"
                  ) -> common.Update:
    """The pure PRM update `update(state, batch) -> (state, metrics)` (batch keys `PRM_KEYS`); jit it."""
    tx, schedule = common.resolve_optimizer(optimizer)

    def prepare(params, batch, frozen, rng):
        del params, frozen, rng
        return batch, _num_steps(batch)[0]

    return common.make_update(make_prm_loss(model, micro_batches=micro_batches), tx, prepare=prepare,
                              micro_batches=micro_batches, nonfinite=nonfinite, learning_rate=schedule)


# -------------------------------------------------------------------------------------------- recipe

def _load(config: PRMConfig) -> RunData:
    tokenizer = make_tokenizer(config.data.tokenizer)
    check_vocab(tokenizer, config.model)

    def split(source):
        if source is None:
            return None
        data = load_step_dataset(source, tokenizer, max_len=config.data.max_len,
                                 step_separator=config.algorithm.step_separator)
        return outcome_labels(data) if config.algorithm.outcome_only else data

    # the batch splits over the data shards x micro-batches, refused before anything is built
    check_batch_size(None, config.data, mesh=config.mesh.make_mesh(), strategy=config.mesh.strategy,
                     micro_batches=config.train.micro_batches)
    return RunData(tokenizer, split(config.data.train), split(config.data.eval))


def _abstract_batch(config, mesh) -> dict:
    data = sh.batch_sharding(mesh, config.mesh.strategy)
    b, t = config.data.batch_size, config.data.max_len
    spec = {"tokens": jnp.int32, "step_mask": jnp.bool_, "step_labels": jnp.int32}
    return {k: jax.ShapeDtypeStruct((b, t), dtype, sharding=data) for k, dtype in spec.items()}


def _build(config: PRMConfig, mesh) -> Program:
    model = make_model(config, head="scalar")
    tx = make_optimizer(config.optim)
    state = ModelState(model, tx, mesh, config.mesh.strategy, config.seed, config.checkpoint.init_from)
    update = make_prm_step(model, tx, micro_batches=config.train.micro_batches, nonfinite=config.train.nonfinite)
    step = jit_step(update, mesh=mesh, strategy=config.mesh.strategy, state_shardings=state.shardings(),
                    micro_batches=config.train.micro_batches, batch_keys=PRM_KEYS, name="prm_step")
    return Program(step, state, _abstract_batch(config, mesh), parts={"model": model})


class _Batches:
    """Resumable endless step batches (the position is the batch count)."""

    def __init__(self, dataset: StepDataset, config: PRMConfig, start: int = 0):
        self.dataset, self.config, self.position = dataset, config, start
        self._it = step_batches(dataset, batch_size=config.data.batch_size, seed=config.data.seed, start=start,
                                shuffle=config.data.shuffle)

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return next(self._it)

    def get_state(self) -> dict:
        return {"position": self.position}


def _eval_batches(dataset: StepDataset, batch_size: int, max_batches: int) -> HeldOut:
    out, examples = [], 0
    for start in range(0, len(dataset), batch_size):
        rows = np.arange(start, start + batch_size) % len(dataset)
        real = np.arange(start, start + batch_size) < len(dataset)
        out.append({"tokens": dataset.tokens[rows], "step_labels": dataset.step_labels[rows],
                    "step_mask": dataset.step_mask[rows] & real[:, None]})
        examples += int(real.sum())
        if len(out) == max_batches:
            break
    return HeldOut(out, examples, len(dataset))


def _trainer(ctx: Context) -> Trainer:
    config = ctx.config
    batches = _Batches(ctx.data.train, config, start=int(ctx.extras.get("data", {}).get("position", 0)))
    evaluate, held_out = None, None
    if ctx.data.eval is not None:
        held_out = _eval_batches(ctx.data.eval, config.data.batch_size, config.train.eval_batches)
        m = config.train.micro_batches
        loss_fn = make_prm_loss(ctx.program.parts["model"], micro_batches=m)
        evaluate_params = make_weighted_eval(loss_fn, held_out.batches, weight=_num_steps, mesh=ctx.mesh,
                                             strategy=config.mesh.strategy, micro_batches=m)
        evaluate = lambda state: evaluate_params(state.params)  # noqa: E731
    step = ctx.program.step

    def step_fn(state, batch):
        arrays = {k: batch[k] for k in PRM_KEYS}
        return step(state, sh.shard_batch(arrays, mesh=ctx.mesh, strategy=config.mesh.strategy))

    return Trainer(step=step_fn, batches=batches, extras=lambda: {"data": batches.get_state()}, evaluate=evaluate,
                   held_out=held_out)


RECIPE = Recipe(name="prm", data_kind=lambda config: "steps", build=_build, trainer=_trainer,
                progress_keys=("loss", "accuracy"), load_data=_load)


def train(config: PRMConfig) -> dict[str, Any]:
    """Run (or resume) process-reward-model training as configured; return `run(RECIPE, config)`'s summary."""
    return run(RECIPE, config)


# ------------------------------------------------------------------------------------------- scoring

class PRMScorer:
    """Scores solutions with a trained PRM: step logits at separator ends, aggregated per solution.

    Every step of a solution is scored: a solution whose steps do not all fit in `max_len` raises
    ValueError naming it (a score of its first steps only would hide a wrong later step). A
    solution without steps scores 0 (`aggregate_step_scores`). `mode` is the default aggregation.

    Example:
      >>> scorer = PRMScorer(model, params, tokenizer, max_len=64)
      >>> scorer.score(["2+3"], [["2+3=5", "5"]], mode="min")     # one score in [0, 1] per solution
    """

    def __init__(self, model, params, tokenizer, *, max_len: int, step_separator: str = "\n", batch_size: int = 64,
                 mode: StepAggregation = "min"):
        check_choice("PRMScorer", "mode", mode, StepAggregation)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_len, self.step_separator, self.batch_size, self.mode = max_len, step_separator, batch_size, mode
        self._values = jax.jit(lambda p, tokens: model.forward(p, tokens).values)

    def step_logits(self, prompts: Sequence[str], solutions: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """`(logits [N, max_len], step_mask [N, max_len])` of the solutions (lists of steps)."""
        if len(prompts) != len(solutions):
            raise ValueError(f"PRMScorer: {len(prompts)} prompts but {len(solutions)} solutions")
        examples = [StepExample(p, tuple(s) or ("",), (0,) * max(len(s), 1)) for p, s in zip(prompts, solutions)]
        data = tokenize_steps(examples, self.tokenizer, max_len=self.max_len, step_separator=self.step_separator)
        kept = data.step_mask.sum(axis=1)
        for i, s in enumerate(solutions):
            if len(s) > kept[i]:
                raise ValueError(f"PRMScorer: solution {i} has {len(s)} steps but only its first {int(kept[i])} fit "
                                 f"in max_len={self.max_len} tokens; raise max_len (rewards.prm_max_len)")
        empty = np.array([len(s) == 0 for s in solutions], bool)
        data = dataclasses.replace(data, step_mask=data.step_mask & ~empty[:, None])  # no steps: scores 0
        n, pad = len(data), (-len(data)) % self.batch_size
        tokens = np.concatenate([data.tokens, np.repeat(data.tokens[:1], pad, axis=0)])
        values = np.concatenate([np.asarray(self._values(self.params, jnp.asarray(tokens[i:i + self.batch_size])))
                                 for i in range(0, n + pad, self.batch_size)])[:n]
        return values, data.step_mask

    def score(self, prompts: Sequence[str], solutions: Sequence[Sequence[str]], *,
              mode: StepAggregation | None = None) -> np.ndarray:
        """float32 `[N]`: `aggregate_step_scores` of each solution's step logits (`mode` default: the scorer's)."""
        logits, mask = self.step_logits(prompts, solutions)
        return np.asarray(aggregate_step_scores(logits, mask, mode=mode or self.mode), np.float32)

    def reward(self, *, mode: StepAggregation | None = None, name: str = "prm"):
        """A reward source for the RL drivers: each completion split at the separator into its non-empty
        steps, scored (a completion without any scores 0)."""
        scorer = self

        @dataclasses.dataclass(frozen=True)
        class _PRMReward:
            name: str

            def __call__(self, inputs: RewardInputs) -> np.ndarray:
                if inputs.completions is None or inputs.prompts is None:
                    raise ValueError(f"{self.name}: needs decoded prompts and completions (give the driver a tokenizer)")
                steps = [[s for s in c.split(scorer.step_separator) if s.strip()] for c in inputs.completions]
                return scorer.score(list(inputs.prompts), steps, mode=mode)

        return _PRMReward(name)


def _trained_with(path: str) -> dict:
    """The `algorithm` section of the run whose checkpoints are `path` (its `config.json`), or {}."""
    config_file = os.path.join(os.path.dirname(os.path.normpath(path)), "config.json")
    try:
        with open(config_file) as f:
            algorithm = json.load(f).get("algorithm")
    except (OSError, ValueError, AttributeError):
        return {}
    return algorithm if isinstance(algorithm, dict) else {}


def load_prm_scorer(path: str, *, max_len: int, step_separator: str = "\n", batch_size: int = 64,
                    tokenizer: str | None = None, key: str = "process_reward_model",
                    mode: StepAggregation | None = None) -> PRMScorer:
    """A `PRMScorer` over the scalar-head model saved at `path` (a checkpoint directory of this recipe).

    The architecture is read from the checkpoint and the tokenizer from beside it (or `tokenizer`:
    a directory or "offline"); a missing path raises FileNotFoundError naming `key`. When the run's
    `config.json` lies beside `path`, a `step_separator` other than the one the PRM was trained with
    raises ConfigError (its labels sat at that separator's last token), and `mode=None` takes the
    run's `algorithm.aggregation` ("min" without a record).
    """
    from rlhf_jax.train.rlaif import tokenizer_of  # noqa: PLC0415 -- rlaif imports the sampler stack
    from rlhf_jax.train.weights import load_reward_model  # noqa: PLC0415

    model, params = load_reward_model(path, None, key=key)
    trained = _trained_with(path)
    if "step_separator" in trained and trained["step_separator"] != step_separator:
        raise ConfigError(f"{key}: the PRM at {path} was trained with algorithm.step_separator="
                          f"{trained['step_separator']!r}, but it would score with step_separator={step_separator!r} "
                          "(rewards.prm_step_separator); use the training one")
    mode = mode or trained.get("aggregation") or "min"
    return PRMScorer(model, params, tokenizer_of(path, tokenizer), max_len=max_len, step_separator=step_separator,
                     batch_size=batch_size, mode=mode)


def best_of_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Index (within each group of `n` contiguous candidates) of the highest score; ties: the first."""
    scores = np.asarray(scores)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"best_of_n: n must be a positive int, got {n!r}")
    if scores.ndim != 1 or len(scores) % n:
        raise ValueError(f"best_of_n: {scores.shape} scores do not split into groups of {n}")
    return np.argmax(scores.reshape(-1, n), axis=1)
