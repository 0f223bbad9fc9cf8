"""Tool-using RL on the tiny model: SFT on calculator demonstrations, then GRPO over multi-turn trajectories.

    rlhf-jax run experiments/agentic_tiny.py                  # SFT, GRPO with the calculator, GRPO without it
    rlhf-jax run experiments/agentic_tiny.py:smoke            # a few steps of each stage (the test)
    rlhf-jax run experiments/agentic_tiny.py --set tool.train.steps=100

The task: 3-digit x 2-digit multiplications (`347*59=`, `rlhf_jax.agents.ArithmeticTools`), far
beyond what the 2-layer character-level model can compute. Its demonstrations call the calculator
and copy the result (the tool's result is an observation, never trained on):

    347*59=<calc(347*59)>[20473]20473<eos>

1. `sft`: SFT on `NUM_DEMOS` such demonstrations (two rows each: the call, and the answer after
   the result), so the policy calls the tool and copies its answer, imperfectly.
2. `tool`: GRPO (`rlhf_jax.train.agentic`) with the `calculator` environment: each trajectory is
   the policy's call, the tool's result (observation tokens, masked out of the loss), the policy's
   answer; reward 1 for the exact product.
3. `no_tool`: the same GRPO with the `arithmetic` environment, which has no tools (a call gets an
   "unknown tool" error observation): the model on its own. It runs `NO_TOOL_STEPS` steps only:
   no sample of it is ever right, so every group's rewards are all 0 (`frac_reward_zero_std` 1) and
   GRPO's advantages are 0: there is no reward signal to learn from, however long it runs.

Checked (a miss raises `ChecksMissed`: `rlhf-jax run` exits 1): held-out accuracy with the tool
rises by at least `MIN_GAIN` over the SFT policy's, and ends at least `MIN_GAIN` above the best
accuracy the no-tool run ever reaches.

In our run (from scratch, `rlhf-jax run experiments/agentic_tiny.py`; 100 steps, 32 prompts x 8
trajectories, lr 5e-4; 512 held-out problems sampled at temperature 1, so an accuracy's sampling
std is ~0.02): with the tool 0.693 after SFT -> 0.717 (step 20), 0.752 (40), 0.764 (60), 0.764
(80), 0.773 (100): +0.080, about 1.0 tool call and 2.0 turns per trajectory, training reward 0.74
(first 10 steps) -> 0.78 (last 10); without the tool 0.0 throughout (20 steps). About 13 minutes
on a loaded 2-core host (SFT, both RL runs and the evaluations). Again on 2026-12-07 with
`--set tool.seed=1` (other draws in the RL run), on a quiet host: 0.717 -> 0.742, 0.762, 0.783,
0.779, 0.783 (+0.066), without the tool 0.0; 2.6 minutes in all.

Writes `runs/agentic_tiny/{data,sft,tool,no_tool}` and `results.json` + `results.png` (held-out
accuracy of both RL runs, tool calls per trajectory, training reward).
"""

from __future__ import annotations

import dataclasses
import json
import os

from rlhf_jax.agents import ArithmeticTools
from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.steps import grpo_config
from rlhf_jax.train import sft
from rlhf_jax.train.agentic import AgenticGRPORunConfig, EnvironmentConfig
from rlhf_jax.train.results import Panel, check_passed, plot_metrics, write_json
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.stages import Stage, run_stages

TASK = ArithmeticTools()
NUM_DEMOS = 512
MIN_GAIN = 0.05
NUM_EVAL = 512          # held-out problems: accuracy's sampling std ~0.02 at 0.7
TOOL_STEPS = 100
NO_TOOL_STEPS = 20
_LOG = LoggingConfig(every=5, tensorboard=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgenticTinyConfig:
    """The three stages (run directories `<workdir>/sft`, `/tool`, `/no_tool`) and the data sizes."""

    workdir: str
    num_demos: int
    num_rl_prompts: int
    num_eval_prompts: int
    sft: sft.SFTConfig
    tool: AgenticGRPORunConfig
    no_tool: AgenticGRPORunConfig
    min_gain: float | None = MIN_GAIN


def _environment(name: str) -> EnvironmentConfig:
    fmt = TASK.call_format
    return EnvironmentConfig(name=name, max_turns=3, turn_tokens=16, tool_timeout_s=2.0,
                             call_open=fmt.open, call_close=fmt.close, result_open=fmt.result_open,
                             result_close=fmt.result_close)


def _rl(name: str, workdir: str, environment: str, *, steps: int, batch_size: int, eval_every: int,
        eval_batches: int) -> AgenticGRPORunConfig:
    return AgenticGRPORunConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train=os.path.join(workdir, "data", "rl_train.jsonl"),
                        eval=os.path.join(workdir, "data", "rl_eval.jsonl"), max_len=16, batch_size=batch_size),
        algorithm=grpo_config("grpo", group_size=8),
        environment=_environment(environment),
        rollout=RolloutConfig(max_new_tokens=40),
        optim=OptimizerConfig(learning_rate=5e-4),
        train=TrainConfig(steps=steps, eval_every=eval_every, eval_batches=eval_batches),
        checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
    )


def get_config(arg: str | None = None) -> AgenticTinyConfig:
    """The tiny CPU configuration; `smoke`: a few steps of each stage, no checks (the test)."""
    if arg not in (None, "tiny", "smoke"):
        raise ValueError(f"agentic_tiny: unknown mode {arg!r}; the modes are tiny (default) and smoke")
    smoke = arg == "smoke"
    workdir = "runs/agentic_tiny_smoke" if smoke else "runs/agentic_tiny"
    sft_steps = 20 if smoke else 300
    rl = dict(batch_size=4 if smoke else 32, eval_every=2 if smoke else 20, eval_batches=1 if smoke else 16)
    return AgenticTinyConfig(
        workdir=workdir, num_demos=32 if smoke else NUM_DEMOS, num_rl_prompts=64 if smoke else 4096,
        num_eval_prompts=8 if smoke else NUM_EVAL,
        sft=sft.SFTConfig(
            name="agentic_tiny_sft", model=model_preset("tiny"),
            data=DataConfig(train=os.path.join(workdir, "data", "sft_train.jsonl"),
                            eval=os.path.join(workdir, "data", "sft_eval.jsonl"), max_len=48, batch_size=32),
            optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=min(20, sft_steps // 2),
                                  schedule="cosine", decay_steps=max(sft_steps - 20, 1), end_learning_rate_ratio=0.1),
            train=TrainConfig(steps=sft_steps, eval_every=sft_steps, eval_batches=2),
            checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
        ),
        tool=_rl("agentic_tiny_tool", workdir, "calculator", steps=2 if smoke else TOOL_STEPS, **rl),
        no_tool=_rl("agentic_tiny_no_tool", workdir, "arithmetic", steps=2 if smoke else NO_TOOL_STEPS, **rl),
        min_gain=None if smoke else MIN_GAIN,
    )


def write_data(config: AgenticTinyConfig) -> None:
    """The demonstrations and prompts as JSONL (seeds apart, so held-out problems are new)."""
    folder = os.path.join(config.workdir, "data")
    os.makedirs(folder, exist_ok=True)
    files = {
        "sft_train.jsonl": TASK.demonstration_rows(config.num_demos, seed=1),
        "sft_eval.jsonl": TASK.demonstration_rows(32, seed=2),
        "rl_train.jsonl": TASK.problems(config.num_rl_prompts, seed=3),
        "rl_eval.jsonl": TASK.problems(config.num_eval_prompts, seed=4),
    }
    for name, rows in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def _accuracy(run: dict) -> list[tuple[int, float]]:
    records = read_jsonl(os.path.join(run["run_dir"], "metrics.jsonl"))
    return [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]


def _in_workdir(config: AgenticTinyConfig) -> AgenticTinyConfig:
    """The stages reading the data files of `config.workdir` (also after `--set workdir=...`)."""
    folder = os.path.join(config.workdir, "data")

    def data(stage, train, eval_):
        return dataclasses.replace(stage, data=dataclasses.replace(
            stage.data, train=os.path.join(folder, train), eval=os.path.join(folder, eval_)))

    return dataclasses.replace(config, sft=data(config.sft, "sft_train.jsonl", "sft_eval.jsonl"),
                               tool=data(config.tool, "rl_train.jsonl", "rl_eval.jsonl"),
                               no_tool=data(config.no_tool, "rl_train.jsonl", "rl_eval.jsonl"))


def main(config: AgenticTinyConfig) -> dict:
    """SFT, both RL runs (or resume them), then `results.json` and `results.png` in `workdir`."""
    config = _in_workdir(config)
    write_data(config)
    summaries = run_stages(config.workdir, [Stage("sft", config.sft),
                                            Stage("tool", config.tool, init_from="sft"),
                                            Stage("no_tool", config.no_tool, init_from="sft")])
    if any(s["stopped_by"] for s in summaries.values()):
        return list(summaries.values())[-1]
    tool, no_tool = _accuracy(summaries["tool"]), _accuracy(summaries["no_tool"])
    tool_records = read_jsonl(os.path.join(summaries["tool"]["run_dir"], "metrics.jsonl"))
    results = {
        "experiment": "agentic_tiny", "steps": summaries["tool"]["step"],
        "sft_accuracy_with_tool": tool[0][1], "final_accuracy_with_tool": tool[-1][1],
        "accuracy_gain_with_tool": tool[-1][1] - tool[0][1],
        "sft_accuracy_without_tool": no_tool[0][1], "final_accuracy_without_tool": no_tool[-1][1],
        "best_accuracy_without_tool": max(a for _, a in no_tool),
        "accuracy_with_tool": tool, "accuracy_without_tool": no_tool,
        "tool_calls_per_trajectory": [(r["step"], r["tool_calls/mean"]) for r in tool_records
                                      if "tool_calls/mean" in r],
        "config": config,
    }
    path = write_json(os.path.join(config.workdir, "results.json"), results)
    no_tool_records = read_jsonl(os.path.join(summaries["no_tool"]["run_dir"], "metrics.jsonl"))
    merged = [dict(r) for r in tool_records] + [
        {"step": r["step"], **{f"{k} (no tool)": v for k, v in r.items() if k != "step"}} for r in no_tool_records]
    plot_metrics(os.path.join(config.workdir, "results.png"), merged,
                 [Panel(title="held-out accuracy", keys=("eval/accuracy", "eval/accuracy (no tool)")),
                  Panel(title="tool calls per trajectory", keys=("tool_calls/mean", "tool_calls/mean (no tool)")),
                  Panel(title="training reward", keys=("reward", "reward (no tool)"))],
                 title="GRPO with and without the calculator (3-digit x 2-digit products)")
    if config.min_gain is not None:
        gain = results["accuracy_gain_with_tool"]
        margin = results["final_accuracy_with_tool"] - results["best_accuracy_without_tool"]
        check_passed("agentic_tiny", {f"accuracy with the tool rose by {gain:.3f} >= {config.min_gain}":
                                      gain >= config.min_gain,
                                      f"it ends {margin:.3f} >= {config.min_gain} above the best without the tool":
                                      margin >= config.min_gain}, path)
    return {k: v for k, v in results.items() if k not in ("config", "accuracy_with_tool", "accuracy_without_tool",
                                                          "tool_calls_per_trajectory")}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
