"""Multi-turn rollouts: the policy acts, the environments answer on the host, decoding continues.

    limits = AgentLimits(max_turns=4, max_tokens=64, turn_tokens=16)
    trajectories = run_episodes(sampler, params, prompts, envs, renderer=RawRenderer(tok, fmt),
                                sampling=SamplingConfig(max_new_tokens=16, eos_id=tok.eos_token_id),
                                limits=limits, tokenizer=tok, rng=0)
    metrics = trajectory_metrics(trajectories)

A turn is decoded until a stop: the EOS / stop ids, or the call format's stop strings (`</tool>`;
a stop string of one token is a sampler stop id, a longer one a stop sequence, also matched on the
host, where the tokens after it are dropped). The turn's text goes to its environment's `step`,
which runs in a thread pool (a tool call inside it under its `ToolRunner` time limit). The
observation is rendered to tokens (`RawRenderer` / `ChatRenderer`) and appended as non-action
tokens; the episode ends when the environment says so, after `max_turns` action turns, or at the
`max_tokens` budget (truncated).

The sampler's log-probs of every action token are kept: the trainer's recomputation over the whole
trajectory (`rlhf_jax.rollout.completion_logprobs` with the observations as context) equals them.

Two engines:

- `num_slots=None`, turn by turn: one static-batch `Sampler.generate` over the running trajectories
  (rows keyed by `fold_in(rng, turn)` and the row), then all their environment steps at once in the
  pool; a row whose turn ended early idles until the call's longest turn ends, and the next turn
  waits for the slowest step (at most its tool's time limit).
- `num_slots=S`, every trajectory on its own: one open continuous-batching session
  (`Sampler.continuous_batcher(...).session`, `S` decode slots). A trajectory's turn is a request
  with its own budget `min(turn_tokens, tokens left)`; when it finishes, its environment steps in
  the pool while the other slots keep decoding (a freed slot is refilled at once by another
  trajectory's request), and its next turn is submitted as soon as the step is back. So no
  trajectory waits for another's tool, and a slow tool holds up only its own trajectory, for at
  most its time limit. Turn `k` of trajectory `i` draws with `fold_in(fold_in(rng, k), i)` (`i`: its
  index in the global batch, `trajectory_ids`) and each slot has its own cache row
  (`attention="dense"`: a slot's arithmetic does not depend on where other requests sit), so with
  the same seed a trajectory's tokens and log-probs are bit-identical across runs whatever the
  timing of its and other tools, and its tokens do not depend on the slot count or the other
  trajectories. On a sampler with a mesh, one engine per data-parallel group
  (`rlhf_jax.sampling.data_parallel`), each process serving its own episodes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from rlhf_jax._checks import scalar_value
from rlhf_jax.agents.environment import Environment, StepResult
from rlhf_jax.agents.tools import ToolResult
from rlhf_jax.agents.trajectory import Trajectory
from rlhf_jax.distributed import any_process
from rlhf_jax.sampling import Sampler, SamplingConfig
from rlhf_jax.sampling.requests import Request
from rlhf_jax.sharding import local_rows

logger = logging.getLogger("rlhf_jax.agents")

__all__ = ["AgentLimits", "run_episodes", "trajectory_stats", "stats_metrics", "trajectory_metrics",
           "environment_reward", "TOOL_STATUS_METRICS"]

# Tool-call outcome -> metric (counted over a batch).
TOOL_STATUS_METRICS = {
    "error": "tool_calls/errors",
    "timeout": "tool_calls/timeouts",
    "truncated": "tool_calls/truncated",
    "unknown_tool": "tool_calls/unknown_tool",
    "malformed": "tool_calls/malformed",
    "no_tool_role": "tool_calls/no_tool_role",
    "env_error": "env/errors",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentLimits:
    """Limits of one episode.

    Attributes:
      max_turns: action turns at most.
      max_tokens: tokens after the prompt at most (actions and observations; the RL batch's width).
      turn_tokens: tokens of one action turn at most (the sampler's `max_new_tokens` per call).
      concurrency: environments stepped at once (threads).
      step_timeout_s: seconds one `env.step` may run, or None for no limit. A step still running
        then ends its episode as an `env_error` (reward 0, counted in `env/errors`); its thread is
        abandoned, as a hanging tool's is (`ToolRunner`).
    """

    max_turns: int = 4
    max_tokens: int = 64
    turn_tokens: int = 16
    concurrency: int = 16
    step_timeout_s: float | None = None

    def __post_init__(self):
        for name in ("max_turns", "max_tokens", "turn_tokens", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AgentLimits.{name} must be a positive int, got {value!r}")
        timeout = self.step_timeout_s
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not timeout > 0):
            raise ValueError(f"AgentLimits.step_timeout_s must be > 0 or None, got {timeout!r}")


def _stop_tokens(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Stop strings of one token become stop ids; the others are matched on the host."""
    ids, texts = [], []
    for s in stop_strings:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        (ids if len(enc) == 1 else texts).append(enc[0] if len(enc) == 1 else s)
    return tuple(ids), tuple(texts)


def _cut_at_stop_string(tokenizer, ids: list[int], texts: Sequence[str]) -> int | None:
    """The shortest prefix length of `ids` whose text contains a stop string, or None."""
    if not texts or not any(s in tokenizer.decode(ids) for s in texts):
        return None
    for k in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:k]) for s in texts):
            return k
    return None


def _step_problem(result) -> str | None:
    """What is wrong with a step's return value (one line), or None for a valid `StepResult`."""
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        what = f"a {len(result)}-tuple" if isinstance(result, tuple) else type(result).__name__
        return f"step returned {what}, not a StepResult(observation, reward, done, info)"
    observation, reward, done = result[:3]
    info = result[3] if len(result) == 4 else {}
    try:
        value = scalar_value("step", "reward", reward, allow_bool=True)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        return f"step returned reward {reward!r}; it must be a finite real number"
    if not isinstance(done, (bool, np.bool_)):
        return f"step returned done {done!r} ({type(done).__name__}); it must be a bool"
    if not done and not isinstance(observation, (str, ToolResult, type(None))):
        return f"step returned an observation of type {type(observation).__name__}; it must be str, ToolResult or None"
    if info is not None and not isinstance(info, Mapping):
        return f"step returned info {info!r} ({type(info).__name__}); it must be a mapping"
    return None


def _safe_step(env: Environment, action: str, timeout_s: float | None = None) -> StepResult:
    """`env.step(action)`, or an `env_error` result (episode over, reward 0, the message in `info`)
    when the step raises, returns something that is not a valid `StepResult`, or is still running
    after `timeout_s` seconds (then in a daemon thread, left behind)."""
    if timeout_s is None:
        return _checked_step(env, action)
    box: dict[str, StepResult] = {}
    thread = threading.Thread(target=lambda: box.update(result=_checked_step(env, action)),
                              name=f"env-step-{type(env).__name__}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "result" in box:
        return box["result"]
    what = "did not return within" if thread.is_alive() else "ended without a result (it raised a BaseException) in"
    return StepResult(None, 0.0, True, {"env_error": f"{type(env).__name__}.step {what} {timeout_s:g} s "
                                                     "(step_timeout_s)"})


def _checked_step(env: Environment, action: str) -> StepResult:
    """`_safe_step` without the time limit."""
    try:
        result = env.step(action)
    except Exception as e:  # noqa: BLE001 - an environment's failure ends its episode, not the run
        return StepResult(None, 0.0, True, {"env_error": f"{type(env).__name__}.step raised {type(e).__name__}: {e}"})
    problem = _step_problem(result)
    if problem is not None:
        return StepResult(None, 0.0, True, {"env_error": f"{type(env).__name__}.{problem}"})
    observation, reward, done = result[:3]
    info = (result[3] if len(result) == 4 else None) or {}
    return StepResult(observation, float(scalar_value("step", "reward", reward, allow_bool=True)), bool(done), info)


def run_episodes(
    sampler: Sampler,
    params,
    prompts: Sequence[Sequence[int]],
    envs: Sequence[Environment],
    *,
    renderer,
    sampling: SamplingConfig,
    limits: AgentLimits,
    tokenizer,
    rng: int | jax.Array = 0,
    stop_strings: Sequence[str] | None = None,
    num_slots: int | None = None,
    trajectory_ids: Sequence[int] | None = None,
) -> list[Trajectory]:
    """Run one episode per prompt (environments already `reset`) and return the trajectories.

    Args:
      sampler: the policy's `Sampler`; its `max_len` must hold the longest prompt, `max_tokens` and
        `turn_tokens`.
      params: the sampler's parameters (`Sampler.load_params`).
      prompts: token ids of each episode's prompt.
      envs: one environment per prompt, reset on its task.
      renderer: turns observations into token ids (`RawRenderer`, `ChatRenderer`).
      sampling: method, EOS and stop ids (its `max_new_tokens` and `num_samples` are replaced by
        `limits.turn_tokens` and 1: a group is `num_samples` copies of a prompt in `prompts`).
      limits: turns and token budgets.
      tokenizer: decodes actions for the environments.
      rng: int seed or PRNG key.
      stop_strings: texts that end a turn (default: the renderer's call format's).
      num_slots: decode slots of the continuous-batching engine, or None for the static batch.
      trajectory_ids: each episode's global index `i` in its draws' keys under continuous batching
        (default 0, 1, ...); a multi-process run passes its episodes' indices in the global batch,
        so that N processes draw what one process draws.

    Returns:
      One `Trajectory` per prompt.
    """
    if len(prompts) != len(envs):
        raise ValueError(f"run_episodes: {len(prompts)} prompts but {len(envs)} environments")
    if stop_strings is None:
        stop_strings = getattr(getattr(renderer, "call_format", None), "stop_strings", ())
    stop_ids, stop_texts = _stop_tokens(tokenizer, stop_strings)
    stop_sequences = tuple(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in stop_texts)
    longest_prompt = max((len(p) for p in prompts), default=0)   # none: this process only joins the collectives
    longest = longest_prompt + limits.max_tokens + limits.turn_tokens - 1
    if longest > sampler.max_len:
        raise ValueError(f"run_episodes: the longest prompt ({longest_prompt} tokens) + max_tokens "
                         f"({limits.max_tokens}) + turn_tokens ({limits.turn_tokens}) - 1 = {longest} exceeds the "
                         f"sampler's max_len {sampler.max_len}")
    config = dataclasses.replace(sampling, max_new_tokens=limits.turn_tokens, num_samples=1,
                                 stop_ids=tuple(sorted(set(sampling.stop_ids) | set(stop_ids))))
    key = rng if isinstance(rng, jax.Array) else jax.random.key(int(rng))
    ids = list(range(len(prompts))) if trajectory_ids is None else [int(i) for i in trajectory_ids]
    if len(ids) != len(prompts):
        raise ValueError(f"run_episodes: {len(prompts)} prompts but {len(ids)} trajectory_ids")
    trajectories = [Trajectory(prompt=[int(t) for t in p]) for p in prompts]
    turn = _Turns(tokenizer, renderer, limits, stop_texts, sampling.eos_id)
    with concurrent.futures.ThreadPoolExecutor(max_workers=limits.concurrency,
                                               thread_name_prefix="agent-env") as pool:
        if num_slots is None:
            _static_turns(sampler, params, trajectories, envs, config, key, turn, pool)
        else:
            _continuous_turns(sampler, params, trajectories, envs, config, stop_sequences, key, turn, pool, num_slots,
                              ids)
    errors = [e for t in trajectories for e in t.errors]
    if errors:
        logger.warning("run_episodes: %d of %d episodes ended by a failed environment step (reward 0, counted in "
                       "env/errors); the first: %s", len(errors), len(trajectories), errors[0])
    return trajectories


class _Turns:
    """What happens to a trajectory after an action turn and after its environment's step."""

    def __init__(self, tokenizer, renderer, limits: AgentLimits, stop_texts, eos):
        self.tokenizer, self.renderer, self.limits, self.stop_texts, self.eos = \
            tokenizer, renderer, limits, stop_texts, eos

    def action(self, traj: Trajectory, ids: list, lps: list, stopped: bool) -> str | None:
        """Append the turn's tokens; the action text for the environment, or None (truncated)."""
        k = _cut_at_stop_string(self.tokenizer, ids, self.stop_texts)
        if k is not None:
            ids, lps, stopped = ids[:k], lps[:k], True
        room = self.limits.max_tokens - len(traj.tokens)
        if len(ids) > room:
            ids, lps, stopped = ids[:room], lps[:room], False
        traj.add_action(ids, lps)
        if not stopped:  # no stop within the turn's or the episode's budget
            traj.turn_rewards.append(0.0)
            traj.truncated = True
            return None
        text_ids = ids[:-1] if ids and self.eos is not None and ids[-1] == self.eos else ids
        return self.tokenizer.decode(text_ids, skip_special_tokens=False)

    def observation(self, traj: Trajectory, result: StepResult) -> bool:
        """Record the step's reward and append its observation; True if the episode goes on."""
        traj.turn_rewards.append(float(result.reward))
        info = result.info or {}
        if "env_error" in info:
            traj.tool_statuses.append("env_error")
            traj.errors.append(str(info["env_error"]))
        if result.done:
            traj.done = True
            return False
        observation = result.observation if result.observation is not None else ""
        # The model's turn ended at its end-of-turn token (EOS) or not (a tag format's close tag): the
        # observation then starts after it, or closes the turn first.
        closed = bool(traj.tokens) and self.eos is not None and traj.tokens[-1] == self.eos
        rendered = self.renderer.observation(observation, turn_closed=closed)
        if isinstance(observation, ToolResult):
            traj.tool_statuses.append(rendered.status if rendered.status != "ok" else observation.status)
        if traj.num_turns >= self.limits.max_turns or len(rendered.ids) >= self.limits.max_tokens - len(traj.tokens):
            traj.truncated = True  # no room for another action turn
            return False
        traj.add_observation(rendered.ids)
        return True


def _static_turns(sampler, params, trajectories, envs, config, key, turn: _Turns, pool) -> None:
    """Turn by turn: one `Sampler.generate` over the running trajectories, then all their steps.

    On N processes `generate` is collective: every process takes each turn while any process has a
    running trajectory (one with none left samples a one-token row of `pad_id` and ignores it: its
    share of the collective), and reads its own rows of the outputs (`local_rows`).
    """
    active = list(range(len(trajectories)))
    for k in range(turn.limits.max_turns):
        if not any_process(bool(active)):
            break
        contexts = [trajectories[i].prompt + trajectories[i].tokens for i in active] or [[sampler.pad_id]]
        out = sampler.generate(params, contexts, config, rng=jax.random.fold_in(key, k))
        lengths, tokens, logps, cut_short = (local_rows(a) for a in (out.lengths, out.completion_tokens,
                                                                       out.logprobs, out.truncated))
        stepping, actions = [], []
        for r, i in enumerate(active):
            action = turn.action(trajectories[i], tokens[r, : lengths[r]].tolist(), logps[r, : lengths[r]].tolist(),
                                 not cut_short[r])
            if action is not None:
                stepping.append(i)
                actions.append(action)
        results = list(pool.map(_safe_step, [envs[i] for i in stepping], actions,
                                 [turn.limits.step_timeout_s] * len(stepping)))
        active = [i for i, result in zip(stepping, results) if turn.observation(trajectories[i], result)]


def _continuous_turns(sampler, params, trajectories, envs, config, stop_sequences, key, turn: _Turns, pool,
                      num_slots: int, ids: Sequence[int]) -> None:
    """Every trajectory on its own: a turn's request is submitted to one open continuous-batching
    session as soon as the trajectory's previous step is in, while the others keep decoding; steps
    run in the thread pool meanwhile. Turn `k` of trajectory `i` draws with
    `fold_in(fold_in(key, k), ids[i])`, so timing never changes a trajectory's tokens."""
    limits = turn.limits
    # A request stops at its stop ids only: EOS is one of them here (the static call stops at `eos_id` itself).
    stop_ids = tuple(sorted(set(config.stop_ids) | ({config.eos_id} if config.eos_id is not None else set())))
    batcher = sampler.continuous_batcher(num_slots=num_slots, attention="dense", max_stop_ids=max(len(stop_ids), 1),
                                         max_stop_sequences=max(len(stop_sequences), 1),
                                         max_stop_len=max((len(q) for q in stop_sequences), default=1))
    # Segments of at most a turn's tokens: a step that finished meanwhile gets its next turn admitted soon.
    session = batcher.session(params, rng=key, max_segment_steps=limits.turn_tokens)
    asked: dict[int, int] = {}              # session handle -> trajectory
    stepping: dict[concurrent.futures.Future, int] = {}

    def ask(i: int) -> None:
        traj = trajectories[i]
        request = Request(prompt=traj.prompt + traj.tokens, method=config.method, stop_ids=stop_ids,
                          max_new_tokens=min(limits.turn_tokens, limits.max_tokens - len(traj.tokens)),
                          stop_sequences=stop_sequences,
                          seed=jax.random.fold_in(jax.random.fold_in(key, traj.num_turns), ids[i]))
        asked[session.submit(request)] = i

    for i in range(len(trajectories)):
        ask(i)
    while asked or stepping:
        ready = [f for f in stepping if f.done()]
        if not ready and not asked:      # nothing to decode: wait for the first step to come back
            done, _ = concurrent.futures.wait(stepping, return_when=concurrent.futures.FIRST_COMPLETED)
            ready = list(done)
        for future in sorted(ready, key=stepping.get):
            i = stepping.pop(future)
            if turn.observation(trajectories[i], future.result()):
                ask(i)
        if asked:
            for handle, out in session.advance().items():
                i = asked.pop(handle)
                action = turn.action(trajectories[i], out.tokens[0].tolist(), out.logprobs[0].tolist(),
                                     out.finish_reasons[0] == "stop")
                if action is not None:
                    stepping[pool.submit(_safe_step, envs[i], action, limits.step_timeout_s)] = i


def trajectory_stats(trajectories: Sequence[Trajectory]) -> dict[str, np.ndarray]:
    """Per-trajectory counters, `[N]` arrays named `stats/...` (they travel with the batch's rows)."""
    rows = {
        "stats/num_turns": [t.num_turns for t in trajectories],
        "stats/tool_calls": [sum(s != "env_error" for s in t.tool_statuses) for t in trajectories],
        **{f"stats/{status}": [t.tool_statuses.count(status) for t in trajectories] for status in TOOL_STATUS_METRICS},
        "stats/generated_tokens": [t.generated_tokens for t in trajectories],
        "stats/observed_tokens": [t.observed_tokens for t in trajectories],
        "stats/trajectory_truncated": [t.truncated for t in trajectories],
        "stats/turn_reward_sum": [sum(t.turn_rewards) for t in trajectories],
        "stats/turn_count": [len(t.turn_rewards) for t in trajectories],
    }
    return {k: np.asarray(v, np.float64) for k, v in rows.items()}


def stats_metrics(stats: dict[str, np.ndarray], *, prefix: str = "") -> dict[str, float]:
    """Batch metrics from `trajectory_stats` rows (verl/Tunix-style names).

    `num_turns/mean|min|max`, `tool_calls/mean` (calls per trajectory), `tool_calls/total`, the
    failed-call counts of `TOOL_STATUS_METRICS` (`tool_calls/errors`, `tool_calls/timeouts`,
    `tool_calls/truncated`, `tool_calls/unknown_tool`, `tool_calls/malformed`,
    `tool_calls/no_tool_role`, `env/errors`), `trajectory/generated_tokens/mean`,
    `trajectory/observed_tokens/mean`, `trajectory/truncated_ratio`, `reward/per_turn/mean` (over all
    turns of the batch) and `reward/trajectory/mean`.
    """
    turns = stats["stats/num_turns"]
    if turns.size == 0:
        return {}
    out = {
        "num_turns/mean": float(turns.mean()), "num_turns/min": float(turns.min()), "num_turns/max": float(turns.max()),
        "tool_calls/mean": float(stats["stats/tool_calls"].mean()),
        "tool_calls/total": float(stats["stats/tool_calls"].sum()),
        **{name: float(stats[f"stats/{status}"].sum()) for status, name in TOOL_STATUS_METRICS.items()},
        "trajectory/generated_tokens/mean": float(stats["stats/generated_tokens"].mean()),
        "trajectory/observed_tokens/mean": float(stats["stats/observed_tokens"].mean()),
        "trajectory/truncated_ratio": float(stats["stats/trajectory_truncated"].mean()),
        "reward/per_turn/mean": float(stats["stats/turn_reward_sum"].sum() / max(stats["stats/turn_count"].sum(), 1)),
        "reward/trajectory/mean": float(stats["stats/turn_reward_sum"].mean()),
    }
    return {prefix + k: v for k, v in out.items()}


def trajectory_metrics(trajectories: Sequence[Trajectory], *, prefix: str = "") -> dict[str, float]:
    """`stats_metrics(trajectory_stats(trajectories))`: the batch metrics of trajectories."""
    return stats_metrics(trajectory_stats(trajectories), prefix=prefix) if trajectories else {}


def environment_reward(completions, env_reward, **kwargs) -> list[float]:
    """The reward function of agentic runs: each trajectory's return from its environment.

    Reads the `env_reward` column the trajectory collector adds (TRL calling convention), so the
    usual reward plumbing (weights, metrics, evaluation) applies to environment returns.
    """
    del completions, kwargs
    return [float(r) for r in env_reward]
