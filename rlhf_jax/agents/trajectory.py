"""Multi-turn trajectories as data: one token row per trajectory, with a mask of the policy's tokens.

A trajectory after its prompt is a sequence of turns: the policy's tokens (an *action*), then what
the environment answered (an *observation*), and so on:

    prompt | a_1 a_1 a_1 | o_1 o_1 | a_2 a_2 | o_2 | a_3 a_3 <eos>
    mask     1   1   1     0   0     1   1     0     1   1   1

In the RL batch it is one row in the usual single-turn layout (`prompt_tokens`, `completion_tokens`
= everything after the prompt, `completion_mask` = the action mask, `sampler_logps` = the sampler's
log-probs of the action tokens, 0 on observations). Every step, loss and advantage estimator then
treats observation tokens as context only: the policy-gradient, KL and entropy terms are masked to
actions, `advantages.gae` skips masked positions (observations are not actions: the value bootstraps
over them), `per_token_rewards` puts the score at the last action token, and GRPO groups whole
trajectories (rows of a prompt stay contiguous).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Trajectory", "trajectory_batch", "turn_token_rewards"]


@dataclasses.dataclass
class Trajectory:
    """One episode: tokens after the prompt with the action mask, per-turn rewards and boundaries.

    Attributes:
      prompt: the prompt's token ids.
      tokens: every token after the prompt (actions and observations), in order.
      action_mask: True where the policy generated the token.
      logprobs: the sampler's log-prob of each action token (0.0 on observation tokens).
      turns: `(start, end)` of each action turn in `tokens` (end exclusive).
      turn_rewards: the environment's reward after each action turn.
      done: the environment ended the episode (else it stopped at a limit: `truncated`).
      truncated: the episode hit the token budget, the turn limit or a turn's token limit.
      tool_statuses: the status of each tool call (`ToolResult.status`, or `no_tool_role`).
      errors: the message of each failed environment step (status `env_error`: the step raised or
        returned an invalid `StepResult`; the episode ended there with reward 0).
    """

    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    action_mask: list[bool] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    turns: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    done: bool = False
    truncated: bool = False
    tool_statuses: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def add_action(self, ids, logprobs) -> None:
        start = len(self.tokens)
        self.tokens += [int(i) for i in ids]
        self.action_mask += [True] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.turns.append((start, len(self.tokens)))

    def add_observation(self, ids) -> None:
        self.tokens += [int(i) for i in ids]
        self.action_mask += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its turn rewards."""
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def generated_tokens(self) -> int:
        return int(sum(self.action_mask))

    @property
    def observed_tokens(self) -> int:
        return len(self.tokens) - self.generated_tokens


def trajectory_batch(trajectories: list[Trajectory], *, width: int, prompt_width: int | None = None,
                     pad_id: int = 0) -> dict[str, np.ndarray]:
    """The RL batch arrays of trajectories (see the module docstring), right-padded.

    Args:
      trajectories: N trajectories (a prompt's group contiguous).
      width: completion width C (the token budget after the prompt; longer trajectories raise).
      prompt_width: prompt width P (default the longest prompt).
      pad_id: the padding id.

    Returns:
      `prompt_tokens` [N, P], `prompt_lengths` [N], `completion_tokens` [N, C], `completion_mask`
      [N, C] (actions), `sampler_logps` [N, C], `lengths` [N] (tokens after the prompt), `truncated`
      [N], `turn_ends` [N, C] (True at the last token of each action turn), `rewards` [N].
    """
    n = len(trajectories)
    p = prompt_width if prompt_width is not None else max((len(t.prompt) for t in trajectories), default=0)
    out = {
        "prompt_tokens": np.full((n, p), pad_id, np.int32), "prompt_lengths": np.zeros((n,), np.int32),
        "completion_tokens": np.full((n, width), pad_id, np.int32), "completion_mask": np.zeros((n, width), bool),
        "sampler_logps": np.zeros((n, width), np.float32), "lengths": np.zeros((n,), np.int32),
        "truncated": np.zeros((n,), bool), "turn_ends": np.zeros((n, width), bool),
        "rewards": np.zeros((n,), np.float32),
    }
    for i, t in enumerate(trajectories):
        if len(t.tokens) > width:
            raise ValueError(f"trajectory_batch: trajectory {i} has {len(t.tokens)} tokens after its prompt, "
                             f"more than width={width}")
        if len(t.prompt) > p:
            raise ValueError(f"trajectory_batch: prompt {i} has {len(t.prompt)} tokens, more than prompt_width={p}")
        k = len(t.tokens)
        out["prompt_tokens"][i, : len(t.prompt)] = t.prompt
        out["prompt_lengths"][i] = len(t.prompt)
        out["completion_tokens"][i, :k] = t.tokens
        out["completion_mask"][i, :k] = t.action_mask
        out["sampler_logps"][i, :k] = t.logprobs
        out["lengths"][i] = k
        out["truncated"][i] = t.truncated
        for start, end in t.turns:
            if end > start:
                out["turn_ends"][i, end - 1] = True
        out["rewards"][i] = t.reward
    return out


def turn_token_rewards(turn_rewards: list[list[float]], turn_ends: np.ndarray) -> np.ndarray:
    """Per-token rewards with each turn's reward at its last action token (for GAE over turns).

    `r[b, t] = turn_rewards[b][k]` where `t` is the last token of action turn `k` of row `b`, else 0.
    With `advantages.gae(r, values, action_mask)` the observation tokens between turns are skipped
    (not actions), so the return of a turn's tokens is the discounted sum of this and later turns'
    rewards.

    Args:
      turn_rewards: per row, one reward per action turn.
      turn_ends: bool `[N, C]` from `trajectory_batch`.

    Returns:
      float32 `[N, C]`.
    """
    ends = np.asarray(turn_ends, bool)
    out = np.zeros(ends.shape, np.float32)
    for b, rewards in enumerate(turn_rewards):
        idx = np.flatnonzero(ends[b])
        if len(idx) != len(rewards):
            raise ValueError(f"turn_token_rewards: row {b} has {len(idx)} turns but {len(rewards)} rewards")
        out[b, idx] = rewards
    return out
