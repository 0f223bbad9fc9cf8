"""Online RL (PPO and the GRPO family): prompts -> sample -> reward -> reference -> update.

    config = GRPORunConfig(name="grpo", algorithm=grpo_config("dapo", group_size=8),
                           data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic"))
    summary = train(config)                     # or train(config, reward_sources=[PythonReward(fn)])

The math lives in `rlhf_jax.steps`: `grpo_objective` / `grpo_advantages` (GRPO family) and
`ppo_objective` with `advantages.gae` (PPO). One training step (phases timed as `time/<phase>`):

1. `weight_handoff`: the policy's parameters to the sampler's layout (`Sampler.load_params`);
2. `generate`: `data.batch_size` prompts x the group size completions (PPO: one each), and for
   ReMax (`advantage="remax"`) one greedy completion per prompt, whose reward (`reward` phase) is
   the prompt's baseline (`baseline_scores`, logged as `remax/baseline_reward_mean`);
3. `reward`: the configured reward sources (`rewards.functions`, or the `reward_sources` given to
   `train`), weighted; with `rollout.dynamic_sampling` (DAPO) groups whose rewards are all equal
   (or, with `rollout.dynamic_sampling_metric`, one source's scores, e.g. the accuracy's) are
   dropped and more prompts are sampled until the batch is full again;
4. `reference`: the frozen reference policy's log-probs of the completions (one jitted forward);
5. `update`: the algorithm's jitted step (epochs x minibatches inside).

With `off_policy.enabled` (one-step off-policy, `rlhf_jax.train.off_policy`) a step trains on the
rollouts the previous step sampled, and samples the next step's (`time/overlapped_rollouts`) while
its update runs; `off_policy.sampler_devices` gives the sampler devices of its own (the trainer's
mesh takes the rest), `off_policy.sampler_mesh` its layout (e.g. tensor parallel).

Evaluation (every `train.eval_every` steps, and before the first): completions for the held-out
prompts (`data.eval`), scored by the training rewards (`eval/reward`), by the synthetic task's
grader (`eval/accuracy` for arithmetic, `eval/gold_reward` for the vowel task), and the KL to the
reference (`eval/kl`, summed k1 per completion). Checkpoints hold the whole RL state and the
prompt iterator, so a restarted run resumes where it stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError, check_choice
from rlhf_jax.models import CausalLM
from rlhf_jax.models.layers import rope_length_threshold
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards import PythonReward, RewardModelReward, RewardSource
from rlhf_jax.rewards.registry import REWARD_FUNCTIONS, RewardConfig, RewardContext, build_rewards, resolve_import
from rlhf_jax.rollout import completion_logprob_pass
from rlhf_jax.sampling import Sampler, default_prompt_buckets
from rlhf_jax.steps import GRPOConfig, PPOConfig
from rlhf_jax.steps.common import jit_step
from rlhf_jax.train.data import (HeldOut, batches_from, held_out_batches, load_run_data, load_split, saved_tokenizer,
                                 train_batches)
from rlhf_jax.train.evals import make_policy_eval
from rlhf_jax.train.off_policy import (Lookahead, OffPolicyConfig, check_devices, check_off_policy, policy_staleness,
                                       split_devices)
from rlhf_jax.train.recipe import Context, Program, Recipe, Trainer, run
from rlhf_jax.train.rl_algorithms import GRPO, PPO, RLAlgorithm
from rlhf_jax.train.rollouts import DEVICE_KEYS, RolloutCollector, RolloutConfig
from rlhf_jax.train.run_config import RunConfig
from rlhf_jax.train.weights import initial_params, load_reward_model

__all__ = ["ValueConfig", "GRPORunConfig", "PPORunConfig", "RolloutConfig", "RewardConfig", "GRPO_RECIPE",
           "PPO_RECIPE", "recipe_of", "train", "evaluate"]


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
class GRPORunConfig(RunConfig):
    """A GRPO-family run: `RunConfig` plus the algorithm, sampling and reward sections.

    `data.train` / `data.eval` are prompt sources (`synthetic:arithmetic`, `synthetic:vowel`, or
    files with a `prompt` column and any extra columns the rewards read).
    """

    algorithm: GRPOConfig = GRPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardConfig = RewardConfig()
    off_policy: OffPolicyConfig = OffPolicyConfig()

    def __post_init__(self):
        super().__post_init__()
        _check_rl(self, group_size=self.algorithm.group_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPORunConfig(RunConfig):
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
    off_policy: OffPolicyConfig = OffPolicyConfig()

    def __post_init__(self):
        super().__post_init__()
        _check_rl(self, group_size=1)
        if (self.ptx_data is None) != (self.algorithm.ptx_coef == 0):
            raise ConfigError("PPO-ptx needs both ptx_data and algorithm.ptx_coef > 0 (or neither), got "
                              f"ptx_data={self.ptx_data!r}, algorithm.ptx_coef={self.algorithm.ptx_coef}")


def _check_rl(config, *, group_size: int) -> None:
    """Checks of every RL run config; `group_size` completions are sampled per prompt (1 for PPO)."""
    if config.train.micro_batches != 1:
        raise ConfigError("train.micro_batches applies to the SFT/RM/DPO steps; for RL set "
                          "algorithm.micro_batches (micro-batches per minibatch)")
    algorithm, n = config.algorithm, config.data.batch_size * group_size
    if n % (algorithm.num_minibatches * algorithm.micro_batches):
        completions = f"data.batch_size {config.data.batch_size}" + (
            f" x algorithm.group_size {group_size} = {n} completions" if group_size > 1 else " completions")
        raise ConfigError(f"{completions} per step do not split into algorithm.num_minibatches "
                          f"{algorithm.num_minibatches} x algorithm.micro_batches {algorithm.micro_batches}; use "
                          f"values whose product divides {n}")
    if config.data.pack:
        raise ConfigError("data.pack must be false for RL prompt batches")
    buffer, longest = config.rewards.overlong_buffer, config.rollout.max_new_tokens
    if "overlong" in config.rewards.functions and not 0 < buffer <= longest:
        raise ConfigError(f"rewards.overlong_buffer {buffer} must be in [1, rollout.max_new_tokens={longest}] (the "
                          "'overlong' reward's linear zone ends at the longest completion)")
    if config.rollout.dynamic_sampling and group_size < 2:
        raise ConfigError(f"rollout.dynamic_sampling drops groups whose rewards are all equal, and this run samples "
                          f"{group_size} completion per prompt (PPO, or algorithm.group_size 1), so it would never "
                          "drop one: set it false, or sample groups (algorithm.group_size >= 2)")
    slots = config.rollout.continuous_slots
    if 0 < slots < group_size:  # a prompt's samples share its KV blocks: they are admitted together
        raise ConfigError(f"rollout.continuous_slots={slots} is fewer than algorithm.group_size={group_size}: "
                          "continuous batching decodes a prompt's group in slots at once; set "
                          f"rollout.continuous_slots >= {group_size} (or 0)")
    check_off_policy(config)
    check_rope_context(config)


def check_rope_context(config) -> None:
    """Refuse a run whose prompt + completion can pass the threshold of a length-dependent RoPE (LongRoPE,
    dynamic NTK: `models.layers.rope_length_threshold`). Past it the sampler's cached keys keep the frequencies
    of the call that wrote them (as transformers' `generate`) while the trainer's forward pass rotates the whole
    sequence with one set, so the sampler's and the trainer's log-probs of a token would differ."""
    threshold = rope_length_threshold(config.model)
    prompt_key = next(k for k in ("max_prompt_len", "seq_len", "max_len") if getattr(config.data, k) is not None)
    prompt, new = _prompt_len(config), config.rollout.max_new_tokens
    if threshold is None or prompt + new <= threshold:
        return
    s = config.model.rope_scaling
    where = ("model.rope_scaling.original_max_position_embeddings" if s.rope_type == "longrope"
             else "model.max_position_embeddings")
    raise ConfigError(
        f"data.{prompt_key} ({prompt}) + rollout.max_new_tokens ({new}) = {prompt + new} tokens pass {where} = "
        f"{threshold}, past which model.rope_scaling (rope_type {s.rope_type!r}) rotates keys with other frequencies: "
        "the sampler's cached keys keep the ones of the call that wrote them (as transformers' generate), the "
        "trainer's forward pass rotates the whole sequence with one set, so sampler and trainer log-probs (the "
        "importance ratios, sampler_logprob_diff, online DPO's objective/kl) would differ. Lower them so that "
        f"their sum is at most {threshold}")


def check_rewards(config, hooks: Mapping[str, Any]) -> None:
    """Checks that need the run's hooks (given reward sources replace the configured ones)."""
    builtin = hooks.get("reward_sources") is None
    given, weights = hooks.get("reward_sources"), hooks.get("reward_weights")
    if builtin and weights is not None:
        raise ConfigError("reward_weights weighs the given reward_sources, and none are given; weigh "
                          "rewards.functions with rewards.weights")
    if not builtin and weights is not None and len(weights) != len(given):
        raise ConfigError(f"reward_weights has {len(weights)} entries for {len(given)} reward_sources "
                          f"{[getattr(s, 'name', s) for s in given]}")
    if getattr(config, "off_policy", None) is not None:
        check_devices(config)
    metric = config.rollout.dynamic_sampling_metric
    names = list(config.rewards.functions) if builtin else [getattr(s, "name", s) for s in given]
    if metric != "reward" and metric not in names:
        raise ConfigError(f"rollout.dynamic_sampling_metric={metric!r} must be \"reward\" (the combined reward) or "
                          f"one of the run's reward functions {names}" + (
                              "" if builtin else " (the given reward_sources, which replace rewards.functions)"))
    for path in config.rewards.functions if builtin else ():
        if path not in REWARD_FUNCTIONS:
            resolve_import(path)  # a path that does not resolve stops the run before any model is built
    if builtin and "reward_model" in config.rewards.functions and not config.rewards.reward_model:
        raise ConfigError("rewards.functions includes 'reward_model' but rewards.reward_model is not set")
    if builtin and "judge" in config.rewards.functions and not config.rewards.judge:
        raise ConfigError("rewards.functions includes 'judge' but rewards.judge is not set")
    value = getattr(config, "value", None)
    if value is not None and value.init == "reward_model" and not value.shared_backbone \
            and not config.rewards.reward_model:
        raise ConfigError("value.init='reward_model' needs rewards.reward_model (or --set value.init=policy)")


# ------------------------------------------------------------------------------------------ program

def _prompt_len(config) -> int:
    return config.data.max_prompt_len or config.data.row_len


def _abstract_batch(config, algorithm: RLAlgorithm, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The device batch of one update: `batch_size x group` rollouts at the widest prompt bucket."""
    n, p, c = config.data.batch_size * algorithm.group_size, _prompt_len(config), config.rollout.max_new_tokens
    spec = {"prompt_tokens": ((n, p), jnp.int32), "prompt_lengths": ((n,), jnp.int32),
            "completion_tokens": ((n, c), jnp.int32), "completion_mask": ((n, c), jnp.bool_),
            "sampler_logps": ((n, c), jnp.float32), "scores": ((n,), jnp.float32)}
    if config.algorithm.uses_reference:
        spec["ref_logps"] = ((n, c), jnp.float32)
    if config.algorithm.greedy_baseline:
        spec["baseline_scores"] = ((n,), jnp.float32)
    if getattr(config, "ptx_data", None) is not None:
        spec["ptx_tokens"] = ((n, config.data.row_len), jnp.int32)
        spec["ptx_mask"] = ((n, config.data.row_len), jnp.float32)
    data = sh.batch_sharding(mesh, config.mesh.strategy)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data) for k, (shape, dtype) in spec.items()}


def _builder(algorithm_type: type[RLAlgorithm], name: str):
    def build(config, mesh) -> Program:
        algorithm = algorithm_type(config, mesh)
        step = jit_step(algorithm.update(), mesh=mesh, strategy=config.mesh.strategy,
                        state_shardings=algorithm.shardings(), name=name)
        return Program(step, algorithm, _abstract_batch(config, algorithm, mesh), parts={"algorithm": algorithm})

    return build


# ------------------------------------------------------------------------------------------ trainer

def _reference_logps(policy, config, mesh=None, strategy=None):
    """The jitted reference pass `(params, prompts, lengths, completions, group_size=1) -> [N, C]` of
    an RL run (`rlhf_jax.rollout.completion_logprob_pass`): `config` is the algorithm section, its
    sampling `temperature`, LM-head `chunk_size`, and `num_minibatches * micro_batches`, the pieces
    the update splits the rollout batch into, so the pass holds one update micro-batch's activations
    at a time. With a mesh it is traced in the activation-sharding context, as the update step is
    (`rlhf-jax compile` plans this same function)."""
    return completion_logprob_pass(policy, temperature=config.temperature, chunk_size=config.chunk_size,
                                   pieces=config.num_minibatches * config.micro_batches, mesh=mesh, strategy=strategy)


def _trainer_mesh(config, devices=None):
    """The trainer's mesh: all `devices` (default `jax.devices()`), or those `off_policy.sampler_devices` leaves it."""
    return config.mesh.make_mesh(split_devices(config, devices)[0] or devices)


def _sampler_mesh(config, mesh, devices=None):
    """The sampler's mesh and strategy: the trainer's, or `off_policy`'s devices (of `devices`, default
    `jax.devices()`) and `sampler_mesh` section."""
    off = getattr(config, "off_policy", None)
    if off is None or (not off.sampler_devices and off.sampler_mesh is None):
        return mesh, config.mesh.strategy
    section = off.sampler_mesh or config.mesh
    return section.make_mesh(split_devices(config, devices)[1] or list(mesh.devices.flat)), section.strategy


def rollout_parts(config, data, mesh, policy, group_size: int, hooks: Mapping[str, Any]):
    """The sampler and collector (training rewards, `group_size` samples per prompt, and each prompt's greedy
    completion scored too when the algorithm has a greedy baseline: ReMax) of a run, and its gold metric."""
    sources, weights = hooks.get("reward_sources"), hooks.get("reward_weights")
    task = config.data.task("train")
    if sources is None:
        def reward_model() -> RewardSource:
            model, params = load_reward_model(config.rewards.reward_model, config.model)
            # Same-size vocabularies may still map tokens to other ids: compare the tokenizers when the
            # reward model has one saved with it.
            return RewardModelReward(model, params, policy_vocab_size=config.model.vocab_size,
                                     batch_size=config.rewards.reward_model_batch_size, mesh=mesh,
                                     strategy=config.mesh.strategy, policy_tokenizer=data.tokenizer,
                                     reward_tokenizer=saved_tokenizer(config.rewards.reward_model))

        columns = {f"data.{which} {source}": split.column_names for which, source, split in
                   (("train", config.data.train, data.train), ("eval", config.data.eval, data.eval))
                   if split is not None}
        sources, weights = build_rewards(RewardContext(
            config.rewards, config.rollout.max_new_tokens, task_reward=None if task is None else task.reward,
            load_reward_model=reward_model, prompt_columns=columns))
    prompt_len = _prompt_len(config)
    sampler_mesh, sampler_strategy = _sampler_mesh(config, mesh)
    sampler = Sampler(policy, max_len=prompt_len + config.rollout.max_new_tokens,
                      prompt_buckets=default_prompt_buckets(prompt_len), mesh=sampler_mesh, strategy=sampler_strategy,
                      dtype=config.rollout.sampler_dtype)
    collector = RolloutCollector.from_config(config, sampler=sampler, tokenizer=data.tokenizer, sources=sources,
                                             weights=weights, group=group_size,
                                             temperature=config.algorithm.temperature,
                                             greedy_baseline=getattr(config.algorithm, "greedy_baseline", False))
    eval_task = config.data.task("eval")
    gold = None if eval_task is None else (eval_task.gold_metric, PythonReward(eval_task.reward, "gold"))
    return collector, gold


def policy_eval(config, data, collector: RolloutCollector, gold, ref_logps=None, mesh=None, policy_logps=None, *,
                held_out: HeldOut | None = None):
    """`(policy LM params, reference or None) -> metrics` on `data.eval`'s first `train.eval_batches` batches
    (`held_out`: those batches already built by `held_out_batches`, whose counts the trainer shows).

    `ref_logps` (`_reference_logps` on `mesh`) gives `eval/kl`, with `policy_logps` (the same pass
    over the plain policy) for its policy side where the sampler's numerics differ; the samples are
    each process's own rows, so they run on them as one global batch (`sharding.apply_to_local_rows`).
    """
    if data.eval is None:
        return None
    if held_out is None:
        held_out = held_out_batches(data.eval, config.data, max_batches=config.train.eval_batches)

    def on_rows(logps):
        if logps is None:
            return None
        return lambda params, *rows: sh.apply_to_local_rows(lambda *a: logps(params, *a), rows, mesh=mesh,
                                                            strategy=config.mesh.strategy)
    return make_policy_eval(collector, held_out.batches, key=jax.random.key(config.seed), gold=gold,
                            ref_logps=on_rows(ref_logps), policy_logps=on_rows(policy_logps))


def sampler_numerics_differ(config, model) -> bool:
    """Whether `rollout.sampler_dtype` runs the sampler in other dtypes than the trainer's `model`."""
    dtype = config.rollout.sampler_dtype
    return dtype is not None and (dtype != model.config.dtype or dtype != model.config.param_dtype)


def _ptx_batches(config, data, extras):
    if getattr(config, "ptx_data", None) is None:
        return None
    ptx = dataclasses.replace(config.data, train=config.ptx_data, eval=None, max_prompt_len=None)
    return batches_from(train_batches(load_split(ptx, kind="sft", which="train", tokenizer=data.tokenizer), ptx),
                        extras, key="ptx")


def _trainer(ctx: Context) -> Trainer:
    config, mesh, strategy = ctx.config, ctx.mesh, ctx.config.mesh.strategy
    algorithm: RLAlgorithm = ctx.program.parts["algorithm"]
    parts = ctx.hooks.get("rollout_parts", rollout_parts)  # a recipe may bring its own collector (agentic)
    collector, gold = parts(config, ctx.data, mesh, algorithm.sampling_model, algorithm.group_size, ctx.hooks)
    if config.algorithm.greedy_baseline and collector.baseline_sampling is None:
        raise ConfigError(f"algorithm.advantage 'remax' needs each prompt's greedy completion scored (the batch's "
                          f"baseline_scores), and this recipe's rollouts ({type(collector).__name__}) do not decode "
                          "one: choose another algorithm.advantage")
    sampler, step = collector.sampler, ctx.program.step
    ref_logps = _reference_logps(algorithm.reference_model, config.algorithm, mesh, strategy)
    batches = batches_from(train_batches(ctx.data.train, config.data), ctx.extras)
    ptx_batches = _ptx_batches(config, ctx.data, ctx.extras)
    key = jax.random.key(config.seed)
    clock = {"step": ctx.run.restore_step or 0, "last_done": None}
    off_policy = getattr(config, "off_policy", OffPolicyConfig())
    if off_policy.enabled:
        batches = Lookahead(batches)

    def rl_step(state, prompt_batch):
        began = time.perf_counter()
        clock["step"] += 1
        params = sampler.load_params(algorithm.sampling_params(state.policy.params))
        merged, _, metrics = collector.collect(params, prompt_batch, batches, rng=jax.random.fold_in(key, clock["step"]))
        metrics["time/weight_handoff"] = sampler.stats.handoff_seconds
        return update(state, merged, metrics, began)

    in_flight = collections.deque()  # off-policy: (policy version, prompt batch, rollouts, their metrics)

    def off_policy_step(state, prompt_batch):
        """Train on rollouts of the previous weights while sampling the next step's with these."""
        began = time.perf_counter()
        clock["step"] += 1
        version = clock["step"] - 1  # optimizer steps applied to `state`'s weights
        params = sampler.load_params(algorithm.sampling_params(state.policy.params))
        handoff = sampler.stats.handoff_seconds
        if not in_flight:  # the first step (of a run, or after a resume) samples its own rollouts
            merged, _, metrics = collector.collect(params, prompt_batch, batches,
                                                   rng=jax.random.fold_in(key, clock["step"]))
            in_flight.append((version, prompt_batch, merged, metrics))
        sampled_by, prompts, merged, metrics = in_flight.popleft()
        assert prompts is prompt_batch, "off-policy: the rollouts in flight are not of this step's prompts"
        metrics["off_policy/staleness"] = float(policy_staleness(version, sampled_by,
                                                                 max_staleness=off_policy.max_staleness))
        metrics["time/weight_handoff"] = handoff

        def while_updating():  # the update runs on the trainer's devices meanwhile (asynchronous dispatch)
            upcoming = batches.peek() if clock["step"] < config.train.steps else None
            if upcoming is None:
                return {}
            start = time.perf_counter()
            rollouts, _, rollout_metrics = collector.collect(params, upcoming, batches,
                                                             rng=jax.random.fold_in(key, clock["step"] + 1))
            in_flight.append((version, upcoming, rollouts, rollout_metrics))
            return {"time/overlapped_rollouts": time.perf_counter() - start}

        return update(state, merged, metrics, began, while_updating)

    def update(state, merged, metrics, began, while_updating=None):
        arrays, keys = dict(merged), DEVICE_KEYS + ("scores",)
        if "token_rewards" in arrays:  # rewards the rollout placed on tokens (agentic PPO: per turn)
            keys += ("token_rewards",)
        if "baseline_scores" in arrays:  # each prompt's greedy-completion score (ReMax)
            keys += ("baseline_scores",)
        if ptx_batches is not None:
            ptx = next(ptx_batches)
            arrays.update(ptx_tokens=ptx["tokens"], ptx_mask=ptx["loss_mask"])
            keys += ("ptx_tokens", "ptx_mask")
        device = sh.shard_batch({k: np.asarray(arrays[k]) for k in keys}, mesh=mesh, strategy=strategy)
        start = time.perf_counter()
        reference = algorithm.reference_params(state)
        if reference is not None:
            ref = ref_logps(reference, device["prompt_tokens"], device["prompt_lengths"],
                            device["completion_tokens"], group_size=algorithm.reference_group)
            device["ref_logps"] = jax.block_until_ready(jax.device_put(ref, device["completion_mask"].sharding))
        metrics["time/reference"] = time.perf_counter() - start
        start = time.perf_counter()
        # Block on the new state too: the optimizer's writes can finish after the metrics, and
        # would otherwise be charged to the next step's weight hand-off.
        out = step(state, device)
        if while_updating is not None:
            metrics.update(while_updating())
        state, step_metrics = jax.block_until_ready(out)
        done = time.perf_counter()
        metrics["time/update"] = done - start
        metrics["time/step"] = done - began
        if clock["last_done"] is not None:  # completion to completion: the loop's own work included
            metrics["time/between_steps"] = done - clock["last_done"]
        clock["last_done"] = done
        metrics["tokens_per_second"] = metrics.pop("completions/generated_tokens") / metrics["time/step"]
        return state, {**step_metrics, **metrics}

    policy_logps = None
    if sampler_numerics_differ(config, algorithm.sampling_model):  # the reference's pass when the model is the same
        policy_logps = ref_logps if algorithm.sampling_model is algorithm.reference_model else _reference_logps(
            algorithm.sampling_model, config.algorithm, mesh, strategy)
    held_out = None if ctx.data.eval is None else held_out_batches(ctx.data.eval, config.data,
                                                                   max_batches=config.train.eval_batches)
    evaluate_params = policy_eval(config, ctx.data, collector, gold, ref_logps, mesh, policy_logps, held_out=held_out)
    evaluate = None if evaluate_params is None else (
        lambda state: evaluate_params(algorithm.sampling_params(state.policy.params), algorithm.reference_params(state)))
    extras = lambda: {"data": batches.get_state(),  # noqa: E731
                      **({} if ptx_batches is None else {"ptx": ptx_batches.get_state()})}
    return Trainer(step=off_policy_step if off_policy.enabled else rl_step, batches=batches, extras=extras,
                   evaluate=evaluate, held_out=held_out)


_PROGRESS = ("reward", "kl", "time/generate", "time/reward", "time/reference", "time/update")
GRPO_RECIPE = Recipe(name="grpo", data_kind=lambda config: "prompt", build=_builder(GRPO, "grpo_step"),
                     trainer=_trainer, progress_keys=_PROGRESS, check=check_rewards, mesh=_trainer_mesh)
PPO_RECIPE = Recipe(name="ppo", data_kind=lambda config: "prompt", build=_builder(PPO, "ppo_step"),
                    trainer=_trainer, progress_keys=_PROGRESS, check=check_rewards, mesh=_trainer_mesh)
_RECIPES = {GRPORunConfig: GRPO_RECIPE, PPORunConfig: PPO_RECIPE}


def recipe_of(config) -> Recipe:
    """The recipe of an RL run config (TypeError for anything else)."""
    recipe = _RECIPES.get(type(config))
    if recipe is None:
        raise TypeError(f"rl: config must be a GRPORunConfig or PPORunConfig, got {type(config).__name__}")
    return recipe


def train(config: GRPORunConfig | PPORunConfig, *, reward_sources: Sequence[RewardSource] | None = None,
          reward_weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Run (or resume) online RL as configured; return the run's summary.

    Args:
      config: a `GRPORunConfig` (any GRPO-family preset) or a `PPORunConfig`.
      reward_sources: reward sources instead of `config.rewards.functions` (e.g.
        `PythonReward(my_fn)` for a custom verifier).
      reward_weights: their weights (default all 1).
    """
    return run(recipe_of(config), config, reward_sources=reward_sources, reward_weights=reward_weights)


def evaluate(config: GRPORunConfig | PPORunConfig, *, policies: Sequence[str | Mapping | None] | None = None,
             reference: str | None = None, reward_sources: Sequence[RewardSource] | None = None,
             reward_weights: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Evaluate policies as `train` evaluates its own: held-out prompts, sampling, rewards, gold metric.

    Any policy can be compared this way, e.g. a DPO run's against a PPO run's. The config supplies
    the model, held-out data (`data.eval`), sampling (`rollout`, `algorithm.temperature`), the
    evaluation size (`train.eval_batches`) and seed; nothing of the algorithm's training is built.

    Args:
      config: an RL run config.
      policies: checkpoint or Hugging Face directories, parameter trees, or None (the seeded random
        init); default: `[config.checkpoint.init_from]`.
      reference: a checkpoint or Hugging Face directory of the reference policy for `eval/kl`.
      reward_sources, reward_weights: as in `train`; `reward_sources=[]` scores with the synthetic
        task's grader alone (no `eval/reward`).

    Returns:
      One metrics dict per policy: `eval/reward` (with reward sources), the task's gold metric,
      `eval/completions/mean_length`, and with `reference` `eval/kl`.
    """
    hooks = {"reward_sources": reward_sources, "reward_weights": reward_weights}
    if reward_sources is None and "reward_model" in config.rewards.functions and not config.rewards.reward_model:
        raise ConfigError("rewards.functions includes 'reward_model' but rewards.reward_model is not set")
    data = load_run_data(config, "prompt")
    if data.eval is None:
        raise ConfigError("rl.evaluate needs held-out prompts (data.eval)")
    mesh = config.mesh.make_mesh()
    policy = CausalLM(config.model)
    collector, gold = rollout_parts(config, data, mesh, policy, 1, hooks)
    logps = _reference_logps(policy, config.algorithm, mesh, config.mesh.strategy)
    evaluate_params = policy_eval(config, data, collector, gold, logps, mesh,
                                  logps if sampler_numerics_differ(config, policy) else None)
    key = jax.random.key(config.seed)
    ref = None if reference is None else initial_params(policy, reference, rng=key)
    out = []
    for source in [config.checkpoint.init_from] if policies is None else policies:
        if source is None:
            params = jax.jit(policy.init)(jax.random.fold_in(key, 0))
        elif isinstance(source, Mapping):
            params = source
        else:
            params = initial_params(policy, source, rng=key)
        out.append(evaluate_params(params, ref))
    return out
