"""Agentic RL: the GRPO family and PPO over multi-turn, tool-using trajectories.

    config = AgenticGRPORunConfig(name="agentic", algorithm=grpo_config("grpo", group_size=8),
                                  environment=EnvironmentConfig(name="calculator", max_turns=3),
                                  rollout=RolloutConfig(max_new_tokens=48), ...)
    rlhf_jax.train.recipe.run(RECIPE, config)       # or `rlhf-jax run` on an experiment

Everything but the rollout is the GRPO recipe (`rlhf_jax.train.rl`): same state, same jitted step,
same reference pass, evaluation and checkpoints. The rollout is a `TrajectoryCollector`: for every
prompt of the batch, `group_size` environments (`environment.name` of
`rlhf_jax.agents.ENVIRONMENTS`) each run one episode (`rlhf_jax.agents.run_episodes`), and each
trajectory becomes one row of the usual RL batch with the *action mask* as its completion mask
(`rlhf_jax.agents.trajectory`): loss, KL and entropy only on the policy's own tokens, observation
tokens as context, whole trajectories grouped per prompt.

PPO (`AgenticPPORunConfig`, `PPO_RECIPE`: the PPO recipe's step and critic) gets per-turn rewards:
the collector adds `token_rewards`, each turn's reward at that turn's last action token (and
whatever the score adds beyond the turns' rewards at the trajectory's last action token, so a row
sums to its score); the PPO step uses them in place of the score at the last token
(`rlhf_jax.steps.ppo.ppo_token_rewards`), and GAE runs over the action tokens only.

Prompts (`load_data`, the recipes' data): with `environment.renderer="chat"` a prompt is the chat
template's render of the row's messages (a string prompt: one user message, whatever
`data.string_format`) with the environment's tools (`tools=` their JSON schemas: the template's tool
list, e.g. Qwen's `# Tools` system turn) and the generation prompt, the text
`ChatRenderer.prompt_tokens` gives, so the model is told which tools exist and how to call them, and
the trajectory (prompt, turns, observations) is the template's render of the whole conversation.
Such a prompt is never cut: one longer than `data.max_prompt_len` (or leaving no room within
`data.max_len`) is a bad row (`data.on_error`: raised naming the row, or skipped and reported).
With `renderer="raw"` prompts are tokenized as `data` says (`data.string_format`, truncation).

Sizes: `rollout.max_new_tokens` is the token budget of a trajectory after its prompt (actions and
observations; the batch's completion width) and `environment.turn_tokens` the budget of one turn.
The reward is the environment's return (the `env_reward` column, read by the default reward
function `rlhf_jax.agents.rollout:environment_reward`); evaluation reports it as `eval/accuracy` too
(the built-in environments reward an exact final answer with 1).

Training metrics add `num_turns/*`, `tool_calls/*` (calls, errors, timeouts, truncated results,
unknown tools, malformed calls, templates without a tool role), `env/errors`,
`trajectory/generated_tokens/mean`, `trajectory/observed_tokens/mean`, `trajectory/truncated_ratio`,
`reward/per_turn/mean` and `reward/trajectory/mean` (`rlhf_jax.agents.rollout.stats_metrics`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.agents.environment import ENVIRONMENTS, make_environment
from rlhf_jax.agents.render import ChatRenderer, RawRenderer, detect_call_format
from rlhf_jax.agents.rollout import AgentLimits, environment_reward, run_episodes, stats_metrics, trajectory_stats
from rlhf_jax.agents.tools import TagCallFormat, Tool, ToolRunner
from rlhf_jax.agents.trajectory import trajectory_batch, turn_token_rewards
from rlhf_jax.config import ConfigError, check_choice
from rlhf_jax.rewards import PythonReward
from rlhf_jax.rewards.registry import RewardConfig, RewardContext, build_rewards
from rlhf_jax.sampling import Sampler, SamplingConfig
from rlhf_jax.train import rl
from rlhf_jax.train.data import RunData, load_run_data, make_tokenizer
from rlhf_jax.train.recipe import Context, Recipe
from rlhf_jax.train.rl_algorithms import GRPO, PPO
from rlhf_jax.train.rollouts import RolloutCollector, global_prompt_index

__all__ = ["EnvironmentConfig", "AgenticGRPORunConfig", "AgenticPPORunConfig", "TrajectoryCollector", "RECIPE",
           "PPO_RECIPE", "rollout_parts", "place_scores", "load_data"]

ENVIRONMENT_REWARD = "rlhf_jax.agents.rollout:environment_reward"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvironmentConfig:
    """The environment of agentic rollouts (the `environment` config section).

    Attributes:
      name: an environment of `rlhf_jax.agents.ENVIRONMENTS` ("calculator", "arithmetic", ...).
      max_turns: action turns per trajectory at most.
      turn_tokens: tokens of one action turn at most.
      tool_timeout_s: seconds a tool call may run (then a timeout observation).
      step_timeout_s: seconds one environment step may run, its tool calls included (then the
        episode ends as a counted `env/errors`, reward 0), or None for no limit.
      max_observation_chars: characters of a tool's result kept (the rest cut, with a note).
      concurrency: environments stepped at once (host threads).
      renderer: "raw" (observations as text) or "chat" (prompts rendered by the tokenizer's chat
        template with the environment's tools, `load_data`; observations through its tool role;
        calls in the template's own format, `detect_call_format`, or in the `call_open` /
        `call_close` tags when the template teaches none).
      num_slots: decode slots of the continuous-batching engine (one open session: each
        trajectory's next turn is submitted as soon as its environment step is back while the other
        slots keep decoding; on a sampler mesh with a data axis, that many slots per data-parallel
        group, one engine each), or None for one static batch per turn (`Sampler.generate`, on the
        run's mesh).
      call_open, call_close: the tags around a call (`<tool>calc(1+2)</tool>`) in the raw format, and in
        the chat format of a template without a call format of its own; decoding stops at `call_close`.
      result_open, result_close: the tags around a tool's result in the raw format.
    """

    name: str = "calculator"
    max_turns: int = 4
    turn_tokens: int = 16
    tool_timeout_s: float = 5.0
    step_timeout_s: float | None = 60.0
    max_observation_chars: int = 1024
    concurrency: int = 16
    renderer: Literal["raw", "chat"] = "raw"
    num_slots: int | None = None
    call_open: str = "<tool>"
    call_close: str = "</tool>"
    result_open: str = "<result>"
    result_close: str = "</result>"

    def __post_init__(self):
        if self.name not in ENVIRONMENTS:
            raise ConfigError(f"environment.name: unknown environment {self.name!r}; available: {sorted(ENVIRONMENTS)}")
        for name in ("max_turns", "turn_tokens", "max_observation_chars", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"environment.{name} must be a positive int, got {value!r}")
        if not isinstance(self.tool_timeout_s, (int, float)) or not self.tool_timeout_s > 0:
            raise ConfigError(f"environment.tool_timeout_s must be > 0, got {self.tool_timeout_s!r}")
        if self.step_timeout_s is not None and (not isinstance(self.step_timeout_s, (int, float))
                                                or not self.step_timeout_s > 0):
            raise ConfigError(f"environment.step_timeout_s must be > 0 or None, got {self.step_timeout_s!r}")
        check_choice("environment", "renderer", self.renderer, Literal["raw", "chat"])
        if self.num_slots is not None and (not isinstance(self.num_slots, int) or isinstance(self.num_slots, bool)
                                           or self.num_slots < 1):
            raise ConfigError(f"environment.num_slots must be a positive int or None, got {self.num_slots!r}")
        for name in ("call_open", "call_close"):
            if not getattr(self, name):
                raise ConfigError(f"environment.{name} must be a non-empty string")

    @property
    def call_format(self) -> TagCallFormat:
        return TagCallFormat(open=self.call_open, close=self.call_close, result_open=self.result_open,
                             result_close=self.result_close)

    @property
    def runner(self) -> ToolRunner:
        return ToolRunner(timeout_s=float(self.tool_timeout_s), max_chars=self.max_observation_chars)

    def limits(self, max_tokens: int) -> AgentLimits:
        return AgentLimits(max_turns=self.max_turns, max_tokens=max_tokens, turn_tokens=self.turn_tokens,
                           concurrency=self.concurrency, step_timeout_s=self.step_timeout_s)

    def probe(self):
        """One environment of this config (its tools and call format)."""
        return make_environment(self.name, call_format=self.call_format, runner=self.runner)


def offered_tools(environment) -> list[Tool]:
    """The tools an environment offers the model (its `tools` mapping; none when it has none)."""
    return list(getattr(environment, "tools", {}).values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgenticGRPORunConfig(rl.GRPORunConfig):
    """A GRPO-family run over multi-turn trajectories: `GRPORunConfig` plus the `environment` section.

    `rollout.max_new_tokens` is the trajectory's token budget after the prompt; the default reward
    is the environment's return.
    """

    environment: EnvironmentConfig = EnvironmentConfig()
    rewards: RewardConfig = RewardConfig(functions=(ENVIRONMENT_REWARD,))

    def __post_init__(self):
        _check_budget(self)  # first: the agentic refusals name what these runs use instead
        super().__post_init__()


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgenticPPORunConfig(rl.PPORunConfig):
    """A PPO run over multi-turn trajectories: `PPORunConfig` plus the `environment` section.

    Each turn's reward is placed at that turn's last action token (the batch's `token_rewards`),
    and GAE runs over the action tokens only (observations are not actions), so a turn's
    advantage sees its own and later turns' rewards. `rollout.max_new_tokens` is the trajectory's
    token budget after the prompt; the default reward is the environment's return.
    """

    environment: EnvironmentConfig = EnvironmentConfig()
    rewards: RewardConfig = RewardConfig(functions=(ENVIRONMENT_REWARD,))

    def __post_init__(self):
        _check_budget(self)  # first: the agentic refusals name what these runs use instead
        super().__post_init__()


def _check_budget(config) -> None:
    if config.rollout.continuous_slots:
        raise ConfigError(f"rollout.continuous_slots={config.rollout.continuous_slots} has no effect on agentic "
                          "rollouts: set environment.num_slots for continuous batching of trajectories")
    if config.rollout.min_new_tokens:   # a trajectory is many turns: neither a per-turn nor a total minimum is defined
        raise ConfigError(f"rollout.min_new_tokens={config.rollout.min_new_tokens} is not supported by agentic "
                          "rollouts (a trajectory spans several turns); leave it at 0")
    if config.algorithm.greedy_baseline:   # a trajectory's greedy twin would have to replay the environment
        raise ConfigError(f"algorithm.advantage={config.algorithm.advantage!r} needs each prompt's greedy completion "
                          "scored, which agentic rollouts do not decode: choose another algorithm.advantage")
    if config.environment.turn_tokens > config.rollout.max_new_tokens:
        raise ConfigError(f"environment.turn_tokens ({config.environment.turn_tokens}) must be <= "
                          f"rollout.max_new_tokens ({config.rollout.max_new_tokens}), the trajectory's budget")


def place_scores(token_rewards: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token rewards whose row sums are the scores: what the scores add beyond the per-turn
    rewards (other reward functions, weights) goes at the row's last action token.

    `r[b, t] = token_rewards[b, t] + [t = last action token of b] (scores[b] - sum_t token_rewards[b, t])`.
    """
    out = np.array(token_rewards, np.float32, copy=True)
    mask = np.asarray(mask, bool)
    rows = np.flatnonzero(mask.any(axis=1))
    last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
    out[rows, last] += np.asarray(scores, np.float32)[rows] - out[rows].sum(axis=1)
    return out


class TrajectoryCollector(RolloutCollector):
    """A `RolloutCollector` whose samples are whole episodes (`rlhf_jax.agents.run_episodes`).

    Each sampled row is a trajectory in the RL batch layout (`trajectory_batch`): completion =
    everything after the prompt, completion mask = the action mask; the environment's return is the
    `env_reward` column; per-row counters (`stats/...`) give the agent metrics of `collect`.
    """

    def setup(self, environment: EnvironmentConfig, *, max_tokens: int,
              per_turn_rewards: bool = False) -> "TrajectoryCollector":
        """`per_turn_rewards`: also give each row's `token_rewards` (each turn's reward at its last
        action token, the rest of the score at the last; PPO's per-token rewards)."""
        self.environment = environment
        self.per_turn_rewards = per_turn_rewards
        self.limits = environment.limits(max_tokens)
        options = dict(call_format=environment.call_format, runner=environment.runner)
        probe = environment.probe()
        if environment.renderer == "chat":
            # The template's own call format, else the configured tags (call_open / call_close).
            fmt = detect_call_format(getattr(self.tokenizer, "chat_template", None)) or environment.call_format
            self.renderer = ChatRenderer(self.tokenizer, tools=offered_tools(probe), call_format=fmt)
            if hasattr(probe, "call_format"):
                options["call_format"] = self.renderer.call_format
        else:
            self.renderer = RawRenderer(self.tokenizer, environment.call_format)
        self.env_options = options
        return self

    def sample(self, params, batch: Mapping[str, Any], sampling: SamplingConfig, rng) -> dict[str, Any]:
        """Episodes for the batch's real prompts (`num_samples` each, contiguous), as host arrays.

        The prompts are the batch's tokens as they are: with the chat renderer, `load_data` rendered
        them with the environment's tools (`ChatRenderer.prompt_tokens`' text). An environment's
        task is the row's columns, with `prompt` the decoded prompt tokens (special tokens skipped;
        with the chat renderer, the rendered conversation's text) unless the row has one.
        """
        valid = np.flatnonzero(np.asarray(batch["example_mask"]))
        tokens, lengths = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_lengths"])
        columns = batch.get("columns", {})
        n = sampling.num_samples
        prompts, envs = [], []
        for i in valid:
            ids = tokens[i, : lengths[i]].tolist()
            task = {k: v[i] for k, v in columns.items()}
            task.setdefault("prompt", self.tokenizer.decode(ids, skip_special_tokens=True))
            for _ in range(n):
                env = make_environment(self.environment.name, **self.env_options)
                env.reset(task)
                envs.append(env)
                prompts.append(ids)
        ids = [int(i) * n + j for i in global_prompt_index(batch, valid) for j in range(n)]   # episodes' global ids
        trajectories = run_episodes(self.sampler, params, prompts, envs, renderer=self.renderer, sampling=sampling,
                                    limits=self.limits, tokenizer=self.tokenizer, rng=rng,
                                    num_slots=self.environment.num_slots, trajectory_ids=ids)
        arrays = trajectory_batch(trajectories, width=self.limits.max_tokens, prompt_width=tokens.shape[1],
                                  pad_id=self.sampler.pad_id)
        returns = arrays.pop("rewards")
        if getattr(self, "per_turn_rewards", False):
            arrays["token_rewards"] = turn_token_rewards([t.turn_rewards for t in trajectories], arrays["turn_ends"])
        arrays.update(trajectory_stats(trajectories))
        arrays["columns"] = {k: [v[i] for i in valid for _ in range(n)] for k, v in columns.items()}
        arrays["columns"]["env_reward"] = returns.tolist()
        return arrays

    def collect(self, params, first_batch, more_batches, *, rng):
        merged, result, metrics = super().collect(params, first_batch, more_batches, rng=rng)
        if "token_rewards" in merged:
            merged["token_rewards"] = place_scores(merged["token_rewards"], merged["scores"],
                                                   merged["completion_mask"])
        metrics.update(stats_metrics({k: v for k, v in merged.items() if k.startswith("stats/")}))
        return merged, result, metrics


def rollout_parts(config: AgenticGRPORunConfig | AgenticPPORunConfig, data, mesh, policy, group_size: int,
                  hooks: Mapping[str, Any], *, per_turn_rewards: bool = False):
    """The sampler and trajectory collector of an agentic run, and its gold metric (`eval/accuracy`);
    `per_turn_rewards`: the collector gives `token_rewards` (PPO)."""
    sources, weights = hooks.get("reward_sources"), hooks.get("reward_weights")
    if sources is None:
        sources, weights = build_rewards(RewardContext(config.rewards, config.rollout.max_new_tokens))
    budget = config.rollout.max_new_tokens
    sampler_mesh, sampler_strategy = rl._sampler_mesh(config, mesh)   # num_slots: one engine per data group
    sampler = Sampler(policy, max_len=rl._prompt_len(config) + budget + config.environment.turn_tokens,
                      mesh=sampler_mesh, strategy=sampler_strategy, dtype=config.rollout.sampler_dtype)
    collector = TrajectoryCollector.from_config(config, sampler=sampler, tokenizer=data.tokenizer, sources=sources,
                                                weights=weights, group=group_size,
                                                temperature=config.algorithm.temperature)
    collector.setup(config.environment, max_tokens=budget, per_turn_rewards=per_turn_rewards)
    return collector, ("eval/accuracy", PythonReward(environment_reward, "accuracy"))


def load_data(config: AgenticGRPORunConfig | AgenticPPORunConfig) -> RunData:
    """The run's tokenizer and prompts (module docstring): with `environment.renderer="chat"` each
    prompt rendered by the chat template with the environment's tools and never cut, else as `data` says."""
    if config.environment.renderer != "chat":
        return load_run_data(config, "prompt")
    tokenizer = make_tokenizer(config.data.tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"environment.renderer='chat' needs a tokenizer with a chat template; data.tokenizer "
                          f"{config.data.tokenizer!r} has none (use renderer='raw')")
    schemas = tuple(t.schema() for t in offered_tools(config.environment.probe()))
    return load_run_data(config, "prompt", tokenizer=tokenizer,
                         tokenize=dataclasses.replace(config.data.tokenize, string_format="chat", tools=schemas))


def _trainer(ctx: Context):
    return rl._trainer(dataclasses.replace(ctx, hooks={**ctx.hooks, "rollout_parts": rollout_parts}))


def _ppo_trainer(ctx: Context):
    parts = functools.partial(rollout_parts, per_turn_rewards=True)
    return rl._trainer(dataclasses.replace(ctx, hooks={**ctx.hooks, "rollout_parts": parts}))


def _ppo_builder(config, mesh):
    """PPO's program, its abstract batch with the per-token rewards the trajectories bring."""
    program = rl._builder(PPO, "ppo_step")(config, mesh)
    mask = program.batch["completion_mask"]
    batch = {**program.batch, "token_rewards": jax.ShapeDtypeStruct(mask.shape, jnp.float32, sharding=mask.sharding)}
    return dataclasses.replace(program, batch=batch)


_PROGRESS = ("reward", "num_turns/mean", "tool_calls/mean", "kl", "time/generate")
RECIPE = Recipe(name="agentic_grpo", data_kind=lambda config: "prompt", build=rl._builder(GRPO, "grpo_step"),
                trainer=_trainer, progress_keys=_PROGRESS, check=rl.check_rewards, mesh=rl._trainer_mesh,
                load_data=load_data)
PPO_RECIPE = Recipe(name="agentic_ppo", data_kind=lambda config: "prompt", build=_ppo_builder,
                    trainer=_ppo_trainer, progress_keys=_PROGRESS, check=rl.check_rewards, mesh=rl._trainer_mesh,
                    load_data=load_data)
