"""Multi-turn, tool-using rollouts: environments, tools, trajectories with action masks, renderers.

- `environment`: the `Environment` protocol (`reset(task)`, `step(action) -> StepResult`), tool use
  as an environment (`ToolEnvironment`), the built-ins (`ENVIRONMENTS`: `calculator`, `arithmetic`)
  and the tool-use arithmetic task (`ArithmeticTools`).
- `tools`: `Tool`, call formats (`TagCallFormat`, `HermesCallFormat`, `JsonCallFormat`), the
  `ToolRunner` (time limit, output cap, errors as observations), the calculator.
- `render`: observations into tokens, raw (`RawRenderer`) or through the chat template's tool role
  (`ChatRenderer`).
- `trajectory`: `Trajectory` and its RL-batch layout (`trajectory_batch`: action mask = completion
  mask), `turn_token_rewards`.
- `rollout`: `run_episodes` (the multi-turn loop over the `Sampler`), `trajectory_metrics`.

The training side (config, collector, recipe) is `rlhf_jax.train.agentic`.
"""

from rlhf_jax.agents.environment import (
    ENVIRONMENTS,
    ArithmeticTools,
    Environment,
    StepResult,
    ToolEnvironment,
    UnknownEnvironment,
    exact_answer,
    make_environment,
    register_environment,
)
from rlhf_jax.agents.render import ChatRenderer, RawRenderer, detect_call_format
from rlhf_jax.agents.rollout import AgentLimits, environment_reward, run_episodes, trajectory_metrics
from rlhf_jax.agents.tools import (
    CallError,
    HermesCallFormat,
    JsonCallFormat,
    TagCallFormat,
    Tool,
    ToolCall,
    ToolResult,
    ToolRunner,
    calculate,
    calculator_tool,
)
from rlhf_jax.agents.trajectory import Trajectory, trajectory_batch, turn_token_rewards

__all__ = [
    "ENVIRONMENTS", "ArithmeticTools", "Environment", "StepResult", "ToolEnvironment", "UnknownEnvironment",
    "exact_answer", "make_environment", "register_environment", "ChatRenderer", "RawRenderer",
    "detect_call_format", "AgentLimits", "environment_reward", "run_episodes", "trajectory_metrics", "CallError",
    "HermesCallFormat", "JsonCallFormat", "TagCallFormat", "Tool", "ToolCall", "ToolResult", "ToolRunner",
    "calculate", "calculator_tool", "Trajectory", "trajectory_batch", "turn_token_rewards",
]
