"""Rejection sampling (best-of-n) fine-tuning driven by a reward model or any reward source.

    config = RejectionSamplingConfig(name="bon", rewards=RewardConfig(functions=("reward_model",),
                                     reward_model="runs/rm/checkpoints"), checkpoint=CheckpointConfig(
                                     init_from="runs/sft/checkpoints"))
    summary = train(config)

Each step: sample `algorithm.samples_per_prompt` completions for each of `data.batch_size` prompts,
score them with the rewards (`rl.RewardConfig`), keep the best completion of every prompt (ties:
the first), and take `algorithm.updates_per_batch` supervised steps (`steps.make_sft_step`, token
mean cross-entropy on the completion tokens) on the kept prompt + completion pairs. This is the
online form of best-of-n distillation (Touvron et al. 2023, "Llama 2", rejection-sampling
fine-tuning; Dong et al. 2023, "RAFT"). With `algorithm.min_reward`, a winner below the threshold
is not trained on (its loss mask is cleared); a batch none of whose winners reaches it (on any
process) takes no optimizer step (`frac_kept` 0, no `loss` logged), as online DPO skips a batch of
ties: an SFT step on an empty batch would still move the parameters through the optimizer's moments
and weight decay.

Metrics: `reward` (mean over all samples), `reward/best` (mean of the kept winners),
`rewards/<name>/mean`, `completions/mean_length`, `frac_kept`, the SFT step's `loss`,
`mean_token_accuracy`, `grad_norm`, and `time/generate|reward|update`. Evaluation as in the RL
driver (`eval/reward`, `eval/gold_reward` or `eval/accuracy`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from rlhf_jax._checks import is_finite_number
from rlhf_jax.config import ConfigError
from rlhf_jax.distributed import gather_rows
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.steps import make_sft_step
from rlhf_jax.steps.supervised import SFT_KEYS
from rlhf_jax.train.data import check_batch_size, device_batch, held_out_batches
from rlhf_jax.train.adapters import check_mergeable, make_model, plain_model, plain_params
from rlhf_jax.train.recipe import Context, Recipe, Trainer, run
from rlhf_jax.train.rl import check_rewards, policy_eval, rollout_parts
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.supervised import model_program, supervised_trainer

__all__ = ["BestOfNConfig", "RejectionSamplingConfig", "RECIPE", "select_best", "best_of_n_batch", "train"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    """Best-of-n settings.

    Attributes:
      samples_per_prompt: `n`, completions sampled per prompt (>= 2).
      updates_per_batch: supervised steps on each batch of winners.
      min_reward: train only on winners with at least this reward (None: every winner).
      temperature: the sampling temperature.
    """

    samples_per_prompt: int = 8
    updates_per_batch: int = 1
    min_reward: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.samples_per_prompt, int) or self.samples_per_prompt < 2:
            raise ConfigError(f"algorithm.samples_per_prompt must be an int >= 2, got {self.samples_per_prompt!r}")
        if not isinstance(self.updates_per_batch, int) or self.updates_per_batch < 1:
            raise ConfigError(f"algorithm.updates_per_batch must be a positive int, got {self.updates_per_batch!r}")
        if not (is_finite_number(self.temperature) and self.temperature > 0):  # inf: a uniform sampler
            raise ConfigError(f"algorithm.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.min_reward is not None and not is_finite_number(self.min_reward):
            # NaN kept no winner at all (`best >= nan` is false): every step trained on nothing
            raise ConfigError(f"algorithm.min_reward must be a finite number or None, got {self.min_reward!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RejectionSamplingConfig(RunConfig):
    """A best-of-n fine-tuning run: `RunConfig` plus the algorithm, sampling and reward sections."""

    algorithm: BestOfNConfig = BestOfNConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig(functions=("reward_model",))

    def __post_init__(self):
        super().__post_init__()
        if self.train.micro_batches != 1:
            raise ConfigError("train.micro_batches must be 1 for rejection sampling")


def _check(config: RejectionSamplingConfig, hooks) -> None:
    check_rewards(config, hooks)
    # The SFT step takes `data.batch_size` winners (load_run_data skips this check for prompt runs).
    check_batch_size(None, config.data, mesh=config.mesh.make_mesh(), strategy=config.mesh.strategy,
                     micro_batches=config.train.micro_batches)


def select_best(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Row index of the highest reward in each contiguous group of `group_size` (the first on ties).

    `best_g = g * n + argmax_i r[g * n + i]`.
    """
    rewards = np.asarray(rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"select_best: group_size must be a positive int, got {group_size!r}")
    if rewards.ndim != 1 or rewards.size % group_size:
        raise ValueError(f"select_best: {rewards.shape} rewards do not split into groups of {group_size}")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:  # argmax would pick a NaN as the winner
        raise ValueError(f"select_best: reward {int(bad[0])} is {rewards[bad[0]]}; rewards must be finite")
    groups = rewards.reshape(-1, group_size)
    return np.arange(groups.shape[0]) * group_size + np.argmax(groups, axis=1)


def best_of_n_batch(arrays: dict[str, Any], rows: np.ndarray, keep: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """An SFT batch (`tokens`, `loss_mask`, `[B, P + C]`) of the selected prompt + completion rows.

    `tokens[b] = prompt[:len] ++ completion ++ pad`; `loss_mask` is 1 on the completion's tokens
    (its EOS included) for kept rows and 0 elsewhere.
    """
    prompts, lengths = arrays["prompt_tokens"][rows], arrays["prompt_lengths"][rows]
    completions, mask = arrays["completion_tokens"][rows], arrays["completion_mask"][rows]
    b, p = prompts.shape
    c = completions.shape[1]
    tokens = np.full((b, p + c), pad_id, np.int32)
    loss_mask = np.zeros((b, p + c), np.float32)
    for i in range(b):
        n, k = int(lengths[i]), int(mask[i].sum())
        tokens[i, :n] = prompts[i, :n]
        tokens[i, n:n + k] = completions[i, :k]
        loss_mask[i, n:n + k] = float(keep[i])
    return {"tokens": tokens, "loss_mask": loss_mask}


def _build(config: RejectionSamplingConfig, mesh):
    check_mergeable(config)
    model = make_model(config)
    update = make_sft_step(model, config.optim, nonfinite=config.train.nonfinite)
    row_len = (config.data.max_prompt_len or config.data.row_len) + config.rollout.max_new_tokens
    return model_program(dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=row_len)), mesh,
                         model=model, update=update, kind="sft", batch_keys=SFT_KEYS, name="best_of_n_sft_step")


def _trainer(ctx: Context) -> Trainer:
    config, mesh, strategy = ctx.config, ctx.mesh, ctx.config.mesh.strategy
    n = config.algorithm.samples_per_prompt
    model = ctx.program.parts["model"]
    collector, gold = rollout_parts(config, ctx.data, mesh, plain_model(model), n, ctx.hooks)
    sampler, sft_step = collector.sampler, ctx.program.step
    pad_id = ctx.data.tokenizer.pad_token_id or 0
    key = jax.random.key(config.seed)
    base = supervised_trainer(ctx)
    batches, counter = base.batches, [ctx.run.restore_step or 0]

    def step_fn(state, prompt_batch):
        counter[0] += 1
        params = sampler.load_params(plain_params(model, state.params))
        merged, result, metrics = collector.collect(params, prompt_batch, batches,
                                                    rng=jax.random.fold_in(key, counter[0]))
        metrics.pop("completions/generated_tokens")
        rows = select_best(result.total, n)
        best = result.total[rows]
        keep = np.ones(len(rows), bool) if config.algorithm.min_reward is None else best >= config.algorithm.min_reward
        # The global batch's winners (each process selected its own prompts'), as `reward` is.
        kept = gather_rows(keep)
        metrics.update({"reward/best": float(gather_rows(best).mean()), "frac_kept": float(kept.mean())})
        if not kept.any():  # nothing to learn: no optimizer step (its moments and weight decay would move)
            return state, metrics
        sft_batch = device_batch(best_of_n_batch(merged, rows, keep, pad_id), mesh, strategy)
        start_update = time.perf_counter()
        for _ in range(config.algorithm.updates_per_batch):
            state, step_metrics = sft_step(state, sft_batch)
        step_metrics = jax.block_until_ready(step_metrics)
        metrics["time/update"] = time.perf_counter() - start_update
        return state, {**step_metrics, **metrics}

    held_out = None if ctx.data.eval is None else held_out_batches(ctx.data.eval, config.data,
                                                                   max_batches=config.train.eval_batches)
    evaluate_params = policy_eval(config, ctx.data, collector, gold, held_out=held_out)
    evaluate = None if evaluate_params is None else (lambda s: evaluate_params(plain_params(model, s.params), None))
    return Trainer(step=step_fn, batches=batches, extras=base.extras, evaluate=evaluate, held_out=held_out)


RECIPE = Recipe(name="rejection_sampling", data_kind=lambda config: "prompt", build=_build, trainer=_trainer,
                progress_keys=("reward", "reward/best", "loss"), check=_check)


def train(config: RejectionSamplingConfig, *, reward_sources=None, reward_weights=None) -> dict[str, Any]:
    """Run (or resume) best-of-n fine-tuning as configured; return the run's summary.

    Args:
      config: the run configuration.
      reward_sources, reward_weights: reward sources instead of `config.rewards.functions`.
    """
    return run(RECIPE, config, reward_sources=reward_sources, reward_weights=reward_weights)
