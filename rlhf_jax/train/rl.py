"""Online RL driver (PPO and the GRPO family): prompts -> sample -> reward -> reference -> update.

    config = GRPORunConfig(name="grpo", algorithm=grpo_config("dapo", group_size=8),
                           data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic"))
    summary = train(config)                     # or train(config, reward_sources=[PythonReward(fn)])

One training step (the phases are timed and logged as `time/<phase>`):

1. `weight_handoff`: the policy's parameters to the sampler's layout (`Sampler.load_params`: dtype
   cast, resharding, per-layer split, on device);
2. `generate`: `data.batch_size` prompts x `algorithm.group_size` completions (PPO: one each);
3. `reward`: the configured reward sources (`rewards.functions`, or the `reward_sources` given to
   `train`), weighted; with `rollout.dynamic_sampling` (DAPO) groups whose rewards are all equal
   are dropped and more prompts are sampled until the batch is full again;
4. `reference`: the frozen reference policy's log-probs of the completions (one jitted forward);
5. `update`: the jitted `make_grpo_step` / `make_ppo_step` (epochs x minibatches inside).

Evaluation (every `train.eval_every` steps, and before the first): completions for the held-out
prompts (`data.eval`), scored by the training rewards (`eval/reward`, the proxy when it is a
reward model), by the synthetic task's gold function (`eval/accuracy` for arithmetic,
`eval/gold_reward` for the vowel task), and the KL to the reference (`eval/kl`, summed k1 per completion).

Checkpoints hold the whole RL state (policy params and optimizer, reference, critic, KL
controller) and the prompt iterator, so a restarted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError, check_choice, to_dict
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.models import CausalLM
from rlhf_jax.models.heads import SCALAR_HEAD_AXES, init_scalar_head
from rlhf_jax.optim import OptimizerConfig, make_optimizer, make_schedule
from rlhf_jax.rewards import (
    OnError,
    PythonReward,
    RewardInputs,
    RewardModelReward,
    RewardSource,
    combine_rewards,
    even_fraction_reward,
    missing_eos_penalty,
    overlong_penalty,
    reward_metrics,
)
from rlhf_jax.rollout import completion_logprobs
from rlhf_jax.sampling import Sampler, SamplingConfig, default_prompt_buckets, make_method
from rlhf_jax.state import (
    RLState,
    TrainState,
    abstract_train_state,
    place_params,
    rl_state_shardings,
    train_state_from_params,
)
from rlhf_jax.steps.common import jit_step
from rlhf_jax.steps import GRPOConfig, PPOConfig, make_grpo_step, make_ppo_step
from rlhf_jax.train import common
from rlhf_jax.train.loop import RunDir, fit, open_run

__all__ = [
    "RolloutConfig",
    "RewardConfig",
    "ValueConfig",
    "GRPORunConfig",
    "PPORunConfig",
    "REWARD_FUNCTIONS",
    "RolloutCollector",
    "make_policy_eval",
    "gold_source",
    "train",
    "evaluate",
]


# ---------------------------------------------------------------------------------------- rewards


def _task_reward(config, task) -> RewardSource:
    if isinstance(task, ArithmeticTask):
        return PythonReward(task.reward, "task")
    if isinstance(task, VowelTask):
        return PythonReward(task.gold_reward, "task")
    raise ConfigError("rewards.functions 'task' needs a synthetic prompt source (data.train=synthetic:...)")


def _reward_model(config, task, *, policy_config, mesh, strategy) -> RewardSource:
    model, params = _load_reward_model(config.rewards.reward_model, policy_config)
    return RewardModelReward(model, params, policy_vocab_size=policy_config.vocab_size,
                             batch_size=config.rewards.reward_model_batch_size, mesh=mesh, strategy=strategy)


# Built-in reward sources: name -> (config, task, **context) -> RewardSource.
REWARD_FUNCTIONS: dict[str, Callable[..., RewardSource]] = {
    "task": lambda config, task, **_: _task_reward(config, task),
    "reward_model": _reward_model,
    "missing_eos": lambda config, task, **_: missing_eos_penalty(config.rewards.missing_eos_penalty),
    "overlong": lambda config, task, **_: overlong_penalty(max_length=config.rollout.max_new_tokens,
                                                           buffer_length=config.rewards.overlong_buffer),
    "even_fraction": lambda config, task, **_: PythonReward(even_fraction_reward),
}


def gold_source(task) -> tuple[str, RewardSource] | None:
    """The synthetic task's gold metric for evaluation: (metric name, source)."""
    if isinstance(task, ArithmeticTask):
        return "eval/accuracy", PythonReward(task.reward, "gold")
    if isinstance(task, VowelTask):
        return "eval/gold_reward", PythonReward(task.gold_reward, "gold")
    return None


def _load_reward_model(path: str, policy_config) -> tuple[CausalLM, Any]:
    """A scalar-head model and its parameters from a checkpoint or Hugging Face directory.

    The architecture is read from the checkpoint (it may differ from the policy's), and the
    vocabulary is checked against the policy's by `RewardModelReward`.
    """
    from rlhf_jax.checkpoint import read_model_config  # noqa: PLC0415
    from rlhf_jax.config import from_dict  # noqa: PLC0415
    from rlhf_jax.models import ModelConfig  # noqa: PLC0415
    from rlhf_jax.models.hf import config_from_hf  # noqa: PLC0415

    import os  # noqa: PLC0415

    if not os.path.exists(path):
        raise FileNotFoundError(f"rewards.reward_model: {path} does not exist")
    saved = read_model_config(path) if common.is_checkpoint_dir(path) else None
    if saved is not None:
        rm_config = from_dict(ModelConfig, saved)
    elif os.path.isfile(os.path.join(path, "config.json")):
        rm_config = config_from_hf(path)
    else:
        rm_config = policy_config
    model = CausalLM(rm_config, head="scalar")
    return model, common.initial_params(model, path, rng=jax.random.key(0))


# ------------------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How completions are sampled for training and evaluation.

    The sampling temperature is the algorithm's (`algorithm.temperature`), so the trainer's
    log-probs are computed at the temperature the tokens were drawn at.

    Prompts per step are `data.batch_size`; the training batch is that times the group size.

    Attributes:
      max_new_tokens: completion tokens at most (a completion stops at EOS).
      top_k, top_p, min_p: truncation of the sampling distribution (0 / 1.0 / 0.0 = off).
      sampler_dtype: run the sampler in "float32" or "bfloat16" (None: the model's dtype).
      dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards are all equal and sample
        more prompts until `data.batch_size` groups with a learning signal are collected.
      max_sampling_rounds: generation rounds per step at most with dynamic sampling (then the batch
        is completed with zero-signal groups).
      eval_greedy: evaluate with greedy decoding (else with the training sampler and a fixed seed).
      ignore_eos: do not stop at the tokenizer's EOS: every completion has `max_new_tokens` tokens
        (benchmarks; vLLM's `ignore_eos`).
    """

    max_new_tokens: int = 16
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    sampler_dtype: Literal["float32", "bfloat16"] | None = None
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    eval_greedy: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("max_new_tokens", "max_sampling_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"rollout.{name} must be a positive int, got {value!r}")
        if self.sampler_dtype is not None:
            check_choice("rollout", "sampler_dtype", self.sampler_dtype, Literal["float32", "bfloat16"])
        make_method(top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)  # its own checks


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Which rewards train the policy, and what a failing reward function does.

    Attributes:
      functions: built-in reward sources by name (`REWARD_FUNCTIONS`): "task" (the synthetic
        task's grader: arithmetic exact match, or the vowel task's gold reward), "reward_model"
        (the scalar-head model at `reward_model`), "missing_eos" (`-missing_eos_penalty` without
        EOS), "overlong" (DAPO's soft overlong punishment, buffer `overlong_buffer`),
        "even_fraction" (the W4 benchmark reward). Ignored when `train` gets `reward_sources`.
      weights: one weight per function (empty: all 1).
      reward_model: a reward-model checkpoint (`runs/<rm>/checkpoints`) or Hugging Face directory.
      reward_model_batch_size: rows scored per reward-model call.
      missing_eos_penalty: the "missing_eos" amount.
      overlong_buffer: the "overlong" linear zone `L_buf` (`L_max` = `rollout.max_new_tokens`).
      on_error: "raise" on a failing reward function, or "penalty" (give `error_penalty`, count).
      error_penalty: the reward of a failing sample in penalty mode.
    """

    functions: tuple[str, ...] = ("task",)
    weights: tuple[float, ...] = ()
    reward_model: str | None = None
    reward_model_batch_size: int = 64
    missing_eos_penalty: float = 1.0
    overlong_buffer: int = 4
    on_error: OnError = "raise"
    error_penalty: float = 0.0

    def __post_init__(self):
        unknown = [f for f in self.functions if f not in REWARD_FUNCTIONS]
        if unknown:
            raise ConfigError(f"rewards.functions: unknown {unknown}; built-in: {sorted(REWARD_FUNCTIONS)}")
        if self.weights and len(self.weights) != len(self.functions):
            raise ConfigError(f"rewards.weights has {len(self.weights)} entries for {len(self.functions)} "
                              f"functions {list(self.functions)}")
        check_choice("rewards", "on_error", self.on_error, OnError)
        if not isinstance(self.reward_model_batch_size, int) or self.reward_model_batch_size < 1:
            raise ConfigError(f"rewards.reward_model_batch_size must be a positive int, got "
                              f"{self.reward_model_batch_size!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueConfig:
    """PPO's critic.

    Attributes:
      init: start the critic from the "reward_model" (InstructGPT) or from the "policy" (its
        backbone with a fresh scalar head).
      shared_backbone: put the value head on the policy's backbone (one model, one optimizer,
        `algorithm.vf_coef` weighting the value loss) instead of a separate critic.
      optim: the separate critic's optimizer.
    """

    init: Literal["reward_model", "policy"] = "reward_model"
    shared_backbone: bool = False
    optim: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)

    def __post_init__(self):
        check_choice("value", "init", self.init, Literal["reward_model", "policy"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPORunConfig(common.RunConfig):
    """A GRPO-family run: `RunConfig` plus the algorithm, sampling and reward sections.

    `data.train` / `data.eval` are prompt sources (`synthetic:arithmetic`, `synthetic:vowel`, or
    files with a `prompt` column and any extra columns the rewards read).
    """

    algorithm: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPORunConfig(common.RunConfig):
    """A PPO run: `RunConfig` plus the algorithm, sampling, reward and critic sections.

    Attributes:
      ptx_data: PPO-ptx's pretraining data (InstructGPT): an SFT-kind source (a file or
        `synthetic:NAME`) whose batches, as many rows as the rollout batch and `data.max_len`
        tokens each, add `algorithm.ptx_coef` times their language-modelling loss (over their
        `loss_mask` targets) to every policy update. None = plain PPO.
    """

    algorithm: PPOConfig = PPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig(functions=("reward_model", "missing_eos"))
    value: ValueConfig = ValueConfig()
    ptx_data: str | None = None


# ------------------------------------------------------------------------------------------- state


def _copy(tree):
    """Fresh device buffers (the reference must not alias the donated policy state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class _Models:
    """The models of a run and how their state is built, saved and restored."""

    def __init__(self, config, *, mesh, policy_tx, value_tx):
        self.config = config
        self.mesh = mesh
        self.strategy = config.mesh.strategy
        self.policy = CausalLM(config.model)
        self.ppo = isinstance(config, PPORunConfig)
        self.shared = self.ppo and config.value.shared_backbone
        self.value = CausalLM(config.model, head="scalar") if self.ppo and not self.shared else None
        self.policy_tx, self.value_tx = policy_tx, value_tx
        self.policy_axes = ({"lm": self.policy.logical_axes, "value_head": SCALAR_HEAD_AXES} if self.shared
                            else self.policy.logical_axes)

    def uses_reference(self) -> bool:
        return self.config.algorithm.uses_reference

    def lm_params(self, policy_params):
        return policy_params["lm"] if self.shared else policy_params

    def fresh(self) -> RLState:
        config = self.config
        rng = jax.random.key(config.seed)
        if config.checkpoint.init_from:
            lm = common.initial_params(self.policy, config.checkpoint.init_from, rng=rng)
        else:
            lm = jax.jit(self.policy.init)(jax.random.fold_in(rng, 0))
        params = {"lm": lm, "value_head": init_scalar_head(config.model, jax.random.fold_in(rng, 1))} \
            if self.shared else lm
        place = dict(mesh=self.mesh, strategy=self.strategy)
        policy = train_state_from_params(_copy(params), self.policy_tx, rng=config.seed,
                                         logical_axes=self.policy_axes, **place)
        reference = place_params(_copy(lm), self.policy.logical_axes, **place) if self.uses_reference() else None
        value = None
        if self.value is not None:
            if config.value.init == "reward_model":
                vparams = common.initial_params(self.value, config.rewards.reward_model, rng=rng)
            elif config.checkpoint.init_from:
                vparams = common.initial_params(self.value, config.checkpoint.init_from, rng=rng)
            else:
                vparams = {k: v for k, v in lm.items() if k != "lm_head"}
                vparams["score"] = init_scalar_head(config.model, jax.random.fold_in(rng, 2))
            value = train_state_from_params(_copy(vparams), self.value_tx, rng=config.seed + 1,
                                            logical_axes=self.value.logical_axes, **place)
        kl = config.algorithm.kl_controller().init() if self.ppo else None
        return RLState(policy, reference, value, kl)

    def _policy_init(self, key):
        lm = self.policy.init(key)
        return {"lm": lm, "value_head": init_scalar_head(self.config.model, key)} if self.shared else lm

    def abstract(self) -> RLState:
        """The state's shapes and dtypes, without allocating it."""
        policy = abstract_train_state(self._policy_init, self.policy_tx)
        reference = self.policy.abstract_params() if self.uses_reference() else None
        value = abstract_train_state(self.value.init, self.value_tx) if self.value is not None else None
        kl = jax.eval_shape(self.config.algorithm.kl_controller().init) if self.ppo else None
        return RLState(policy, reference, value, kl)

    def shardings(self, abstract: RLState) -> RLState:
        return rl_state_shardings(abstract, policy_axes=self.policy_axes,
                                  value_axes=None if self.value is None else self.value.logical_axes,
                                  policy_optimizer=self.policy_tx, value_optimizer=self.value_tx,
                                  mesh=self.mesh, strategy=self.strategy)

    def save_items(self, state: RLState) -> dict[str, Any]:
        """Checkpoint items; `params` is the policy's language model alone (exportable as is)."""
        p = state.policy
        items = {"params": self.lm_params(p.params), "train": {"step": p.step, "opt_state": p.opt_state, "rng": p.rng}}
        if self.shared:
            items["value_head"] = p.params["value_head"]
        if state.reference is not None:
            items["reference"] = state.reference
        if state.value is not None:
            v = state.value
            items["value"] = {"params": v.params, "step": v.step, "opt_state": v.opt_state, "rng": v.rng}
        if state.kl is not None:
            items["kl"] = state.kl
        return items

    def restore(self, run: RunDir) -> tuple[RLState, dict]:
        """The state saved at `run.restore_step` (each array read straight into its sharding) and extras."""
        abstract = self.abstract()
        shardings = self.shardings(abstract)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        items, extras = run.checkpointer.restore(self.save_items(target), step=run.restore_step)
        train = items["train"]
        params = {"lm": items["params"], "value_head": items["value_head"]} if self.shared else items["params"]
        policy = TrainState(train["step"], params, train["opt_state"], train["rng"])
        value = None
        if "value" in items:
            v = items["value"]
            value = TrainState(v["step"], v["params"], v["opt_state"], v["rng"])
        return RLState(policy, items.get("reference"), value, items.get("kl")), extras


# ---------------------------------------------------------------------------------------- rollouts

_DEVICE_KEYS = ("prompt_tokens", "prompt_lengths", "completion_tokens", "completion_mask", "sampler_logps")


def _pad_width(x: np.ndarray, width: int, value: int = 0) -> np.ndarray:
    return x if x.shape[1] == width else np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def _concat_rows(parts: Sequence[dict[str, Any]], rows: Sequence[tuple[int, np.ndarray]]) -> dict[str, Any]:
    """Rows `idx` of part `k` for each `(k, idx)`, concatenated (prompt widths padded to the widest)."""
    width = max(parts[k]["prompt_tokens"].shape[1] for k, _ in rows)
    out: dict[str, Any] = {}
    for key in parts[0]:
        if key == "columns":
            out[key] = {c: [parts[k][key][c][i] for k, idx in rows for i in idx] for c in parts[0][key]}
        elif key == "prompt_tokens":
            out[key] = np.concatenate([_pad_width(parts[k][key][idx], width) for k, idx in rows])
        else:
            out[key] = np.concatenate([parts[k][key][idx] for k, idx in rows])
    return out


class RolloutCollector:
    """Sampling and scoring of prompt batches on the host side of the loop (shared by the RL drivers).

    `config` needs `rollout` (`RolloutConfig`), `rewards` (`RewardConfig`) and
    `algorithm.temperature`; `group` completions are sampled per prompt.
    """

    def __init__(self, config, *, sampler: Sampler, tokenizer, sources, weights, group: int):
        self.config = config
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.sources = sources
        self.weights = weights
        self.group = group
        rollout, temperature = config.rollout, config.algorithm.temperature
        self.train_sampling = SamplingConfig(
            max_new_tokens=rollout.max_new_tokens, num_samples=group,
            eos_id=None if rollout.ignore_eos else tokenizer.eos_token_id,
            method=make_method(temperature=temperature, top_k=rollout.top_k, top_p=rollout.top_p, min_p=rollout.min_p),
        )
        eval_method = make_method(greedy=True) if rollout.eval_greedy else self.train_sampling.method
        self.eval_sampling = dataclasses.replace(self.train_sampling, num_samples=1, method=eval_method)

    def sample(self, params, batch: Mapping[str, Any], sampling: SamplingConfig, rng) -> dict[str, Any]:
        """Completions of the batch's real prompts, as host arrays, with columns repeated per sample."""
        valid = np.flatnonzero(np.asarray(batch["example_mask"]))
        out = self.sampler.generate(params, np.asarray(batch["prompt_tokens"])[valid], sampling,
                                    prompt_lengths=np.asarray(batch["prompt_lengths"])[valid], rng=rng)
        arrays = {k: np.asarray(v) for k, v in out._asdict().items()}
        arrays["sampler_logps"] = arrays.pop("logprobs")
        n = sampling.num_samples
        arrays["columns"] = {k: [v[i] for i in valid for _ in range(n)] for k, v in batch.get("columns", {}).items()}
        return arrays

    def reward_inputs(self, arrays: Mapping[str, Any]) -> RewardInputs:
        decode = lambda tokens, lengths: self.tokenizer.batch_decode(  # noqa: E731
            [row[:k].tolist() for row, k in zip(tokens, lengths)], skip_special_tokens=True)
        return RewardInputs(
            prompt_tokens=arrays["prompt_tokens"], prompt_lengths=arrays["prompt_lengths"],
            completion_tokens=arrays["completion_tokens"], completion_mask=arrays["completion_mask"],
            truncated=arrays["truncated"],
            prompts=decode(arrays["prompt_tokens"], arrays["prompt_lengths"]),
            completions=decode(arrays["completion_tokens"], arrays["lengths"]),
            columns=arrays["columns"],
        )

    def score(self, arrays: Mapping[str, Any], sources=None):
        rewards = self.config.rewards
        sources = self.sources if sources is None else sources
        weights = self.weights if sources is self.sources else None
        return combine_rewards(sources, self.reward_inputs(arrays), weights=weights, on_error=rewards.on_error,
                               error_penalty=rewards.error_penalty)

    def collect(self, params, first_batch, more_batches: Iterator, *, rng) -> tuple[dict[str, Any], Any, dict]:
        """One training batch of rollouts with rewards; DAPO dynamic sampling when configured.

        Returns `(arrays with "scores", RewardResult of the batch, host metrics)`.
        """
        g, dynamic = self.group, self.config.rollout.dynamic_sampling
        want = int(np.sum(np.asarray(first_batch["example_mask"])))
        parts, results, kept, spare = [], [], [], []
        timings = {"generate": 0.0, "reward": 0.0}
        generated_groups = zero_std_groups = 0
        batch = first_batch
        for r in range(self.config.rollout.max_sampling_rounds if dynamic else 1):
            if r:
                batch = next(more_batches)
            start = time.perf_counter()
            arrays = self.sample(params, batch, self.train_sampling, jax.random.fold_in(rng, r))
            timings["generate"] += time.perf_counter() - start
            start = time.perf_counter()
            result = self.score(arrays)
            timings["reward"] += time.perf_counter() - start
            arrays["scores"] = result.total
            parts.append(arrays)
            results.append(result)
            groups = len(result.total) // g
            generated_groups += groups
            signal = result.total.reshape(groups, g).std(axis=1) > 1e-6 if g > 1 else np.ones(groups, bool)
            zero_std_groups += int(np.sum(~signal))
            kept += [(r, i) for i in np.flatnonzero(signal)] if dynamic else [(r, i) for i in range(groups)]
            spare += [(r, i) for i in np.flatnonzero(~signal)] if dynamic else []
            if len(kept) >= want:
                break
        chosen = (kept + spare)[:want]
        rows = [(k, np.arange(i * g, (i + 1) * g)) for k, i in chosen]
        merged = _concat_rows(parts, rows)
        total = merged["scores"]
        per_source = {name: np.concatenate([results[k].per_source[name][idx] for k, idx in rows])
                      for name in results[0].per_source}
        errors = {name: sum(res.num_errors[name] for res in results) for name in results[0].num_errors}
        result = type(results[0])(total.astype(np.float32), per_source, errors)
        metrics = reward_metrics(result, group_size=g)
        metrics["frac_reward_zero_std"] = zero_std_groups / max(generated_groups, 1)
        metrics["completions/mean_length"] = float(np.mean(merged["lengths"]))
        metrics["completions/clipped_ratio"] = float(np.mean(merged["truncated"]))
        metrics["completions/generated_tokens"] = float(sum(np.sum(p["lengths"]) for p in parts))
        if dynamic:
            metrics["dynamic_sampling/rounds"] = float(len(parts))
            metrics["dynamic_sampling/filled_with_zero_std"] = float(max(0, want - len(kept)))
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        return merged, result, metrics


# -------------------------------------------------------------------------------------------- driver


def _device_batch(arrays: Mapping[str, Any], keys, mesh, strategy) -> dict[str, jax.Array]:
    return sh.shard_batch({k: np.asarray(arrays[k]) for k in keys}, mesh=mesh, strategy=strategy)


def _check_config(config, *, builtin_rewards: bool) -> None:
    if not isinstance(config, (GRPORunConfig, PPORunConfig)):
        raise TypeError(f"rl.train: config must be a GRPORunConfig or PPORunConfig, got {type(config).__name__}")
    if config.train.micro_batches != 1:
        raise ConfigError("train.micro_batches applies to the SFT/RM/DPO steps; for RL set "
                          "algorithm.micro_batches (micro-batches per minibatch)")
    if config.data.pack:
        raise ConfigError("data.pack must be false for RL prompt batches")
    if builtin_rewards and "reward_model" in config.rewards.functions and not config.rewards.reward_model:
        raise ConfigError("rewards.functions includes 'reward_model' but rewards.reward_model is not set")
    if isinstance(config, PPORunConfig) and (config.ptx_data is None) != (config.algorithm.ptx_coef == 0):
        raise ConfigError("PPO-ptx needs both ptx_data and algorithm.ptx_coef > 0 (or neither), got "
                          f"ptx_data={config.ptx_data!r}, algorithm.ptx_coef={config.algorithm.ptx_coef}")
    if isinstance(config, PPORunConfig) and config.value.init == "reward_model" and not config.value.shared_backbone \
            and not config.rewards.reward_model:
        raise ConfigError("value.init='reward_model' needs rewards.reward_model (or --set value.init=policy)")


class _Setup:
    """Everything a run builds before its state: tokenizer, data, mesh, models, sampler, rewards, programs."""

    def __init__(self, config, *, reward_sources, reward_weights):
        _check_config(config, builtin_rewards=reward_sources is None)
        self.config = config
        self.ppo = isinstance(config, PPORunConfig)
        self.tokenizer = common.make_tokenizer(config.data.tokenizer)
        common.check_vocab(self.tokenizer, config.model)
        self.train_data = common.load_split(config.data, kind="prompt", which="train", tokenizer=self.tokenizer)
        self.eval_data = common.load_split(config.data, kind="prompt", which="eval", tokenizer=self.tokenizer)
        self.ptx_data = None
        if self.ppo and config.ptx_data is not None:
            ptx = dataclasses.replace(config.data, train=config.ptx_data, eval=None, max_prompt_len=None)
            self.ptx_data = (ptx, common.load_split(ptx, kind="sft", which="train", tokenizer=self.tokenizer))
        task = common.synthetic_task(config.data, config.data.train)
        self.gold = gold_source(common.synthetic_task(config.data, config.data.eval))
        self.mesh = config.mesh.make_mesh()
        self.strategy = config.mesh.strategy
        if reward_sources is None:
            reward_sources = [REWARD_FUNCTIONS[name](config, task, policy_config=config.model, mesh=self.mesh,
                                                     strategy=self.strategy) for name in config.rewards.functions]
            reward_weights = config.rewards.weights or None
        self.policy_tx = make_optimizer(config.optim)
        self.value_tx = make_optimizer(config.value.optim) if self.ppo and not config.value.shared_backbone else None
        self.models = _Models(config, mesh=self.mesh, policy_tx=self.policy_tx, value_tx=self.value_tx)
        algorithm = config.algorithm
        prompt_len = config.data.max_prompt_len or config.data.row_len
        self.sampler = Sampler(self.models.policy, max_len=prompt_len + config.rollout.max_new_tokens,
                               prompt_buckets=default_prompt_buckets(prompt_len), mesh=self.mesh, strategy=self.strategy,
                               dtype=config.rollout.sampler_dtype)
        self.rollouts = RolloutCollector(config, sampler=self.sampler, tokenizer=self.tokenizer, sources=list(reward_sources),
                                  weights=reward_weights, group=1 if self.ppo else algorithm.group_size)
        policy = self.models.policy
        self.ref_logps = jax.jit(lambda params, pt, pl, ct, group_size=1: completion_logprobs(
            policy, params, pt, pl, ct, temperature=algorithm.temperature, chunk_size=algorithm.chunk_size,
            group_size=group_size)[0], static_argnames="group_size")
        self.key = jax.random.key(config.seed)

    def update_fn(self):
        """The pure RL step of the configured algorithm."""
        config, models = self.config, self.models
        lr = make_schedule(config.optim)
        if self.ppo:
            return make_ppo_step(models.policy, self.policy_tx, config=config.algorithm, value_model=models.value,
                                 value_optimizer=self.value_tx, nonfinite=config.train.nonfinite, learning_rate=lr)
        return make_grpo_step(models.policy, self.policy_tx, config=config.algorithm,
                              nonfinite=config.train.nonfinite, learning_rate=lr)

    def make_eval(self) -> Callable[[Any, Any], dict[str, float]] | None:
        """`(policy LM params, reference params or None) -> eval metrics` (None without held-out prompts)."""
        return make_policy_eval(self.config, self.rollouts, self.eval_data, gold=self.gold, ref_logps=self.ref_logps,
                                key=self.key)


def make_policy_eval(config, rollouts: RolloutCollector, eval_data, *, gold, ref_logps, key):
    """`(policy LM params, reference params or None) -> eval metrics` on held-out prompts.

    The first `train.eval_batches` prompt batches are sampled (one completion each, the training
    sampler or greedy, a fixed key) and scored: `eval/reward` (the training rewards), the task's
    gold metric (`gold` = (name, source)), `eval/completions/mean_length`, and with a reference
    `eval/kl` (summed log-ratio to it per completion, from `ref_logps(reference, ...)`).
    Returns None when there are no held-out prompts.
    """
    if eval_data is None:
        return None
    held_out = common.eval_batches(eval_data, config.data, max_batches=config.train.eval_batches)

    def evaluate(policy_params, reference) -> dict[str, float]:
        params = rollouts.sampler.load_params(policy_params)
        sums: dict[str, float] = {}
        count = 0
        for k, batch in enumerate(held_out):
            arrays = rollouts.sample(params, batch, rollouts.eval_sampling, jax.random.fold_in(key, 0x7FFFFFFF - k))
            parts = {"eval/reward": rollouts.score(arrays).total, "eval/completions/mean_length": arrays["lengths"]}
            if gold is not None:
                parts[gold[0]] = rollouts.score(arrays, sources=[gold[1]]).total
            if reference is not None and not config.rollout.eval_greedy:
                ref = np.asarray(ref_logps(reference, arrays["prompt_tokens"], arrays["prompt_lengths"],
                                           arrays["completion_tokens"]))
                parts["eval/kl"] = np.where(arrays["completion_mask"], arrays["sampler_logps"] - ref, 0.0).sum(axis=1)
            for name, values in parts.items():
                sums[name] = sums.get(name, 0.0) + float(np.sum(values))
            count += len(arrays["lengths"])
        return {name: v / max(count, 1) for name, v in sums.items()}

    return evaluate


def evaluate(
    config: GRPORunConfig | PPORunConfig,
    *,
    policies: Sequence[str | Mapping | None] | None = None,
    reference: str | None = None,
    reward_sources: Sequence[RewardSource] | None = None,
    reward_weights: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """Evaluate policies as `train` evaluates its own: held-out prompts, sampling, rewards, gold metric.

    Metrics: `eval/reward`, `eval/gold_reward` or `eval/accuracy` (synthetic tasks),
    `eval/completions/mean_length`, and with `reference` `eval/kl`, the summed log-ratio to it per
    completion. Any policy can be compared this way, e.g. a DPO run's against a PPO run's.

    Args:
      config: supplies the model, held-out data, sampling, rewards and evaluation size.
      policies: checkpoint or Hugging Face directories, parameter trees, or None (the seeded random
        init); default: `[config.checkpoint.init_from]`.
      reference: a checkpoint or Hugging Face directory of the reference policy for `eval/kl`.
      reward_sources, reward_weights: as in `train`.

    Returns:
      One metrics dict per policy.
    """
    setup = _Setup(config, reward_sources=reward_sources, reward_weights=reward_weights)
    evaluate_params = setup.make_eval()
    if evaluate_params is None:
        raise ConfigError("rl.evaluate needs held-out prompts (data.eval)")
    policy, key = setup.models.policy, jax.random.key(config.seed)
    ref = None if reference is None else common.initial_params(policy, reference, rng=key)
    out = []
    for path in [config.checkpoint.init_from] if policies is None else policies:
        if path is None:
            params = jax.jit(policy.init)(jax.random.fold_in(key, 0))
        elif isinstance(path, Mapping):
            params = path
        else:
            params = common.initial_params(policy, path, rng=key)
        out.append(evaluate_params(params, ref))
    return out


def train(
    config: GRPORunConfig | PPORunConfig,
    *,
    reward_sources: Sequence[RewardSource] | None = None,
    reward_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Run (or resume) online RL as configured; return a summary.

    Args:
      config: a `GRPORunConfig` (any GRPO-family preset) or a `PPORunConfig`.
      reward_sources: reward sources to use instead of `config.rewards.functions` (e.g.
        `PythonReward(my_fn)` for a custom verifier).
      reward_weights: their weights (default all 1).

    Returns:
      `{"run_dir", "step", "stopped_by", "eval": last eval metrics, "train": last train metrics}`.
    """
    setup = _Setup(config, reward_sources=reward_sources, reward_weights=reward_weights)
    models, sampler, rollouts, mesh, strategy = setup.models, setup.sampler, setup.rollouts, setup.mesh, setup.strategy
    with open_run(config.run_dir, run_config=config, checkpoint=config.checkpoint, model_config=config.model) as run:
        setup.tokenizer.save_pretrained(run.file("tokenizer"))
        if run.restore_step is not None:
            state, extras = models.restore(run)
            start = int(run.restore_step)
        else:
            state, extras, start = models.fresh(), {}, 0
        step = jit_step(setup.update_fn(), mesh=mesh, strategy=strategy,
                        state_shardings=models.shardings(models.abstract()),
                        name="ppo_step" if setup.ppo else "grpo_step")
        batches = common.batches_from(common.train_batches(setup.train_data, config.data), extras)
        ptx_batches = None
        if setup.ptx_data is not None:
            ptx_config, ptx_data = setup.ptx_data
            ptx_batches = common.train_batches(ptx_data, ptx_config)
            if "ptx" in extras:
                ptx_batches.set_state(extras["ptx"])
        counter = [start]
        last_done = [None]

        def rl_step(state: RLState, prompt_batch) -> tuple[RLState, dict]:
            counter[0] += 1
            began = time.perf_counter()
            params = sampler.load_params(models.lm_params(state.policy.params))
            merged, _, metrics = rollouts.collect(params, prompt_batch, batches,
                                                  rng=jax.random.fold_in(setup.key, counter[0]))
            metrics["time/weight_handoff"] = sampler.stats.handoff_seconds
            arrays = dict(merged)
            keys = _DEVICE_KEYS + ("scores",)
            if ptx_batches is not None:
                ptx = next(ptx_batches)
                arrays.update(ptx_tokens=ptx["tokens"], ptx_mask=ptx["loss_mask"])
                keys += ("ptx_tokens", "ptx_mask")
            device = _device_batch(arrays, keys, mesh, strategy)
            start_ref = time.perf_counter()
            if state.reference is not None:
                group = config.algorithm.group_size if not setup.ppo and config.algorithm.share_prompt else 1
                ref = setup.ref_logps(state.reference, device["prompt_tokens"], device["prompt_lengths"],
                                      device["completion_tokens"], group_size=group)
                device["ref_logps"] = jax.block_until_ready(jax.device_put(ref, device["completion_mask"].sharding))
            metrics["time/reference"] = time.perf_counter() - start_ref
            start_update = time.perf_counter()
            # Block on the new state too: the optimizer's writes can finish after the metrics, and
            # would otherwise be charged to the next step's weight hand-off.
            state, step_metrics = jax.block_until_ready(step(state, device))
            metrics["time/update"] = time.perf_counter() - start_update
            done = time.perf_counter()
            metrics["time/step"] = done - began
            if last_done[0] is not None:  # completion to completion: the loop's own work included
                metrics["time/between_steps"] = done - last_done[0]
            last_done[0] = done
            metrics["tokens_per_second"] = metrics.pop("completions/generated_tokens") / metrics["time/step"]
            return state, {**step_metrics, **metrics}

        evaluate_params = setup.make_eval()
        evaluate = None if evaluate_params is None else (
            lambda state: evaluate_params(models.lm_params(state.policy.params), state.reference))
        result = fit(state=state, step_fn=rl_step, batches=batches, start_step=start, train=config.train,
                     checkpoint=config.checkpoint, logging=config.logging, run=run, save_items=models.save_items,
                     extras=lambda: {"data": batches.get_state(),
                                     **({} if ptx_batches is None else {"ptx": ptx_batches.get_state()})},
                     evaluate=evaluate,
                     progress_keys=("reward", "kl", "completions/mean_length"), run_config=to_dict(config))
    return {"run_dir": run.path, "step": result.step, "stopped_by": result.stopped_by, "eval": result.last_eval,
            "train": result.last_metrics}
