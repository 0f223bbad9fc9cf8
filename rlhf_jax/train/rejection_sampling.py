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
is not trained on (its loss mask is cleared).

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

from rlhf_jax.config import ConfigError, to_dict
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.sampling import Sampler, default_prompt_buckets
from rlhf_jax.steps import make_sft_step
from rlhf_jax.train import common
from rlhf_jax.train.loop import fit, open_run
from rlhf_jax.train.rl import REWARD_FUNCTIONS, RewardConfig, RolloutCollector, RolloutConfig, gold_source, make_policy_eval

__all__ = ["BestOfNConfig", "RejectionSamplingConfig", "select_best", "best_of_n_batch", "train"]


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
        if not self.temperature > 0:
            raise ConfigError(f"algorithm.temperature must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RejectionSamplingConfig(common.RunConfig):
    """A best-of-n fine-tuning run: `RunConfig` plus the algorithm, sampling and reward sections."""

    algorithm: BestOfNConfig = BestOfNConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig(functions=("reward_model",))


def select_best(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Row index of the highest reward in each contiguous group of `group_size` (the first on ties).

    `best_g = g * n + argmax_i r[g * n + i]`.
    """
    rewards = np.asarray(rewards)
    if rewards.ndim != 1 or rewards.size % group_size:
        raise ValueError(f"select_best: {rewards.shape} rewards do not split into groups of {group_size}")
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


def train(config: RejectionSamplingConfig, *, reward_sources=None, reward_weights=None) -> dict[str, Any]:
    """Run (or resume) best-of-n fine-tuning as configured; return a summary.

    Args:
      config: the run configuration.
      reward_sources, reward_weights: reward sources instead of `config.rewards.functions`.

    Returns:
      `{"run_dir", "step", "stopped_by", "eval", "train"}` as the other drivers.
    """
    if config.train.micro_batches != 1:
        raise ConfigError("train.micro_batches must be 1 for rejection sampling")
    tokenizer = common.make_tokenizer(config.data.tokenizer)
    common.check_vocab(tokenizer, config.model)
    train_data = common.load_split(config.data, kind="prompt", which="train", tokenizer=tokenizer)
    eval_data = common.load_split(config.data, kind="prompt", which="eval", tokenizer=tokenizer)
    task = common.synthetic_task(config.data, config.data.train)
    mesh, strategy = config.mesh.make_mesh(), config.mesh.strategy
    if reward_sources is None:
        if "reward_model" in config.rewards.functions and not config.rewards.reward_model:
            raise ConfigError("rewards.functions includes 'reward_model' but rewards.reward_model is not set")
        reward_sources = [REWARD_FUNCTIONS[name](config, task, policy_config=config.model, mesh=mesh, strategy=strategy)
                          for name in config.rewards.functions]
        reward_weights = config.rewards.weights or None
    model = CausalLM(config.model)
    n = config.algorithm.samples_per_prompt
    prompt_len = config.data.max_prompt_len or config.data.row_len
    sampler = Sampler(model, max_len=prompt_len + config.rollout.max_new_tokens,
                      prompt_buckets=default_prompt_buckets(prompt_len), mesh=mesh, strategy=strategy,
                      dtype=config.rollout.sampler_dtype)
    rollouts = RolloutCollector(config, sampler=sampler, tokenizer=tokenizer, sources=list(reward_sources),
                                weights=reward_weights, group=n)
    key = jax.random.key(config.seed)
    pad_id = tokenizer.pad_token_id or 0

    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run:
        tokenizer.save_pretrained(run.file("tokenizer"))
        state, start, extras = common.init_or_restore(model, make_optimizer(config.optim), config=config, mesh=mesh,
                                                      run=run)
        sft_step = make_sft_step(model, config.optim, mesh=mesh, strategy=strategy, nonfinite=config.train.nonfinite)
        batches = common.batches_from(common.train_batches(train_data, config.data), extras)
        counter = [start]

        def step_fn(state, prompt_batch):
            counter[0] += 1
            params = sampler.load_params(state.params)
            merged, result, metrics = rollouts.collect(params, prompt_batch, batches,
                                                       rng=jax.random.fold_in(key, counter[0]))
            metrics.pop("completions/generated_tokens")
            rows = select_best(result.total, n)
            best = result.total[rows]
            keep = np.ones(len(rows), bool) if config.algorithm.min_reward is None else best >= config.algorithm.min_reward
            sft_batch = common.device_batch(best_of_n_batch(merged, rows, keep, pad_id), mesh, strategy)
            start_update = time.perf_counter()
            for _ in range(config.algorithm.updates_per_batch):
                state, step_metrics = sft_step(state, sft_batch)
            step_metrics = jax.block_until_ready(step_metrics)
            metrics["time/update"] = time.perf_counter() - start_update
            metrics.update({"reward/best": float(best.mean()), "frac_kept": float(keep.mean())})
            return state, {**step_metrics, **metrics}

        policy_eval = make_policy_eval(config, rollouts, eval_data,
                                       gold=gold_source(common.synthetic_task(config.data, config.data.eval)),
                                       ref_logps=None, key=key)
        evaluate = None if policy_eval is None else (lambda s: policy_eval(s.params, None))
        result = fit(state=state, step_fn=step_fn, batches=batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run, save_items=common.save_items,
                     extras=lambda: {"data": batches.get_state()}, evaluate=evaluate,
                     progress_keys=("reward", "reward/best", "loss"), run_config=to_dict(config))
    return {"run_dir": run.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
