"""GRPO with the math checker on a tiny GSM8K-format file: word problems of single-digit sums.

    rlhf-jax run experiments/grpo_gsm8k_tiny.py
    rlhf-jax run experiments/grpo_gsm8k_tiny.py --set grpo.train.steps=80 --set grpo.rewards.functions=math,answer_format

The experiment writes its data in GSM8K's format (`{"question", "answer"}`, the answer a worked
solution ending in "#### 7") to `<workdir>/data/` and trains on it the way a real GSM8K run would:

1. `sft`: a short SFT of the tiny character-level model on `{"prompt": question, "completion":
   "#### 7"}` demonstrations (so the policy states final answers; its sampled accuracy is partial);
2. `grpo`: GRPO on the GSM8K rows as prompts (the row's `question` is the prompt, its `answer`
   column reaches the rewards), rewarded by the built-in reward "math"
   (`rlhf_jax.rewards.math_answers.MathReward`: the completion's final answer against the
   solution's "#### x", equivalence by math-verify). Evaluation: held-out GSM8K rows, one sample
   each at temperature 1 with a fixed key, scored by the same checker: `eval/reward` is the
   held-out accuracy. `rewards/math/failures` and `rewards/math/timeouts` count samples the
   checker could not handle (scored 0).

Checks held-out accuracy after GRPO >= before + `margin` (0.05) on 512 held-out rows; writes
`results.json` and `results.png` (held-out accuracy, training reward) in the workdir. GRPO's
optimizer warms up over 10 steps to a peak of 5e-4 and decays by a cosine to 5e-5 at step 100:
Adam's first step moves every weight by the full learning rate, and at 1e-3 without warm-up that
first update dropped the training reward from 0.34-0.39 to 0.11-0.25 and the run's outcome hung on
float rounding (held-out 0.418 -> 0.422 from one SFT state, 0.348 -> 0.527 from a neighbouring one);
at a constant 5e-4 the late updates undid the gain on one CPU class (AVX2 EPYC, seed 0: held-out
0.359 -> 0.471 at step 50 -> 0.516 at 75 -> 0.369 at 100, a grad norm of 7.2 at the last step) while
another (AVX-512) kept it (+0.162, +0.155, +0.073 over seeds 0-2). Measured with the decay, held-out
accuracy after SFT -> after 100 GRPO steps on the AVX2 EPYC (one device, 2026-12-07), `grpo.seed` 0 / 1 / 2:
0.359 -> 0.521, 0.361 -> 0.461, 0.338 -> 0.504 (+0.162, +0.100, +0.166), rising at every eval but
one (seed 1: 0.387 -> 0.338 at step 50); the checker failed and timed out on no sample.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.steps import grpo_config
from rlhf_jax.train import rl, sft
from rlhf_jax.train.results import Panel, check_passed, plot_metrics, write_json
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.stages import Stage, run_stages

_NAMES = ("Ann", "Tom", "Mia", "Bob", "Eve", "Sam")
_THINGS = ("apples", "pears", "coins", "cards", "books", "shells")


def gsm8k_rows(n: int, *, seed: int) -> list[dict]:
    """`n` GSM8K-format rows `{"question", "answer"}` of single-digit sums (up to 18), e.g.
    `{"question": "Mia has 3 coins and gets 4 more. How many coins?", "answer": "3 + 4 = <<3+4=7>>7 coins.\\n#### 7"}`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        name, thing = _NAMES[rng.integers(len(_NAMES))], _THINGS[rng.integers(len(_THINGS))]
        rows.append({"question": f"{name} has {a} {thing} and gets {b} more. How many {thing}?",
                     "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"})
    return rows


def write_data(workdir: str, *, num_train: int, num_eval: int) -> dict[str, str]:
    """The GSM8K-format train/eval files and the SFT demonstrations, under `<workdir>/data`."""
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    train, held_out = gsm8k_rows(num_train, seed=0), gsm8k_rows(num_eval, seed=1)
    files = {"train": train, "eval": held_out,
             "sft": [{"prompt": r["question"], "completion": r["answer"].splitlines()[-1]} for r in train]}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(workdir, "data", f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


_LOG = LoggingConfig(every=10, tensorboard=False)
_ONE = CheckpointConfig(every=0, keep=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GSM8KTinyConfig:
    """The SFT and GRPO stages (run directories `<workdir>/sft`, `<workdir>/grpo`) and the data sizes."""

    workdir: str = "runs/grpo_gsm8k_tiny"
    num_train: int = 2048
    num_eval: int = 512
    margin: float = 0.05
    sft: sft.SFTConfig
    grpo: rl.GRPORunConfig


def get_config(arg: str | None = None) -> GSM8KTinyConfig:
    """The tiny CPU configuration (the only mode); file paths are filled in by `main`."""
    if arg not in (None, "tiny"):
        raise ValueError(f"grpo_gsm8k_tiny: unknown mode {arg!r}; only the tiny mode exists")
    model = model_preset("tiny")
    data = DataConfig(train="<workdir>/data/sft.jsonl", eval=None, max_len=64, batch_size=32)
    sft_config = sft.SFTConfig(
        name="grpo_gsm8k_tiny_sft", model=model, data=data,
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=10, schedule="cosine",
                              decay_steps=190, end_learning_rate_ratio=0.1),
        train=TrainConfig(steps=200, eval_every=0), checkpoint=_ONE, logging=_LOG)
    grpo = rl.GRPORunConfig(
        name="grpo_gsm8k_tiny_grpo", model=model,
        data=DataConfig(train="<workdir>/data/train.jsonl", eval="<workdir>/data/eval.jsonl", max_len=64,
                        max_prompt_len=56, batch_size=32),
        algorithm=grpo_config("grpo", group_size=8),
        rollout=RolloutConfig(max_new_tokens=8),
        rewards=RewardConfig(functions=("math",)),
        optim=OptimizerConfig(learning_rate=5e-4, warmup_steps=10, schedule="cosine", decay_steps=90,
                              end_learning_rate_ratio=0.1),
        train=TrainConfig(steps=100, eval_every=25, eval_batches=16),
        checkpoint=_ONE, logging=_LOG)
    return GSM8KTinyConfig(sft=sft_config, grpo=grpo)


def _with_files(config: GSM8KTinyConfig, paths: dict[str, str]) -> GSM8KTinyConfig:
    """The files `write_data` wrote where the config still names `<workdir>/data/...`; a path given
    with `--set` (e.g. `grpo.data.train=my_gsm8k.jsonl`) is kept."""
    def pick(given, key):
        return paths[key] if given is not None and given.startswith("<workdir>/") else given

    sft_data = dataclasses.replace(config.sft.data, train=pick(config.sft.data.train, "sft"))
    rl_data = dataclasses.replace(config.grpo.data, train=pick(config.grpo.data.train, "train"),
                                  eval=pick(config.grpo.data.eval, "eval"))
    return dataclasses.replace(config, sft=dataclasses.replace(config.sft, data=sft_data),
                               grpo=dataclasses.replace(config.grpo, data=rl_data))


def main(config: GSM8KTinyConfig) -> dict:
    """Write the data, run SFT then GRPO (or resume), write `results.json` + `results.png`, check the margin."""
    config = _with_files(config, write_data(config.workdir, num_train=config.num_train, num_eval=config.num_eval))
    summaries = run_stages(config.workdir, [Stage("sft", config.sft), Stage("grpo", config.grpo, init_from="sft")])
    run = summaries["grpo"]
    if run["stopped_by"]:
        return run
    records = read_jsonl(os.path.join(run["run_dir"], "metrics.jsonl"))
    accuracy = [r["eval/reward"] for r in records if "eval/reward" in r]
    failures = sum(r.get("rewards/math/failures", 0.0) for r in records)
    timeouts = sum(r.get("rewards/math/timeouts", 0.0) for r in records)
    results = {"experiment": "grpo_gsm8k_tiny", "steps": run["step"], "reward": "math (math-verify)",
               "accuracy_before": accuracy[0], "accuracy_after": accuracy[-1],
               "accuracy_gain": accuracy[-1] - accuracy[0], "margin": config.margin,
               "checker_failures": failures, "checker_timeouts": timeouts,
               "passed": accuracy[-1] >= accuracy[0] + config.margin, "config": config}
    path = write_json(os.path.join(config.workdir, "results.json"), results)
    plot_metrics(os.path.join(config.workdir, "results.png"), records,
                 [Panel(title="held-out accuracy (math checker, sampled)", keys=("eval/reward",)),
                  Panel(title="training reward", keys=("reward",))],
                 title="GRPO with the math reward on a GSM8K-format file")
    check_passed("grpo_gsm8k_tiny", {f"accuracy gain {accuracy[-1] - accuracy[0]:+.3f} >= {config.margin}":
                                     results["passed"]}, path)
    return {k: v for k, v in results.items() if k != "config"}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
