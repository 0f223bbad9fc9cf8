"""GRPO-family tiny run: SFT on single-digit additions, then RL with the exact-match grader.

    rlhf-jax run experiments/grpo_tiny.py                 # GRPO
    rlhf-jax run experiments/grpo_tiny.py:dapo            # any preset: grpo, dr_grpo, dapo, gspo, cispo,
                                                          # rloo, reinforce_pp, reinforce_pp_baseline
    rlhf-jax run experiments/grpo_tiny.py:rloo --set grpo.train.steps=100 --set grpo.algorithm.kl_coef=0.1

The quickstart's stages 4 and 5 (`experiments/quickstart.py`) with the preset chosen by `:ARG`
(`rlhf_jax.steps.GRPO_PRESETS`; every field stays overridable with `--set grpo.algorithm.*`).
DAPO also turns on dynamic sampling (groups whose 8 answers are all right or all wrong are dropped
and more prompts are sampled). The policy is evaluated every 20 steps on 512 held-out problems
(one sample each, temperature 1, fixed key): `eval/accuracy`.

What it shows: RL with a verifiable reward sharpens the SFT policy (sampled accuracy about 0.59)
toward its mode (greedy accuracy 1.0): the GRPO preset reaches about 0.72 after 60 steps
(`experiments/quickstart.py` asserts a gain of at least 0.06 for it).

Writes `runs/grpo_tiny_<preset>/sft` and `.../rl` (metrics, checkpoints) and `results.json` +
`results.png` (held-out accuracy, training reward, KL to the SFT policy).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from rlhf_jax.cli import load_experiment
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.steps import GRPO_PRESETS, grpo_config
from rlhf_jax.train import rl, sft
from rlhf_jax.train.results import Panel, plot_metrics, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOTinyConfig:
    """The SFT stage and the RL stage (run directories `<workdir>/sft` and `<workdir>/rl`)."""

    workdir: str
    sft: sft.SFTConfig
    grpo: rl.GRPORunConfig


def get_config(arg: str | None = None) -> GRPOTinyConfig:
    """The tiny CPU configuration; `arg` is a preset name of `GRPO_PRESETS` (default "grpo")."""
    preset = arg or "grpo"
    if preset not in GRPO_PRESETS:
        raise ValueError(f"grpo_tiny: unknown mode {arg!r}; the modes are the presets {sorted(GRPO_PRESETS)}")
    qs, _ = load_experiment(os.path.join(HERE, "quickstart.py"))
    base = qs.get_config()
    grpo = dataclasses.replace(base.grpo, name=f"grpo_tiny_{preset}", algorithm=grpo_config(preset, group_size=8),
                               rollout=dataclasses.replace(base.grpo.rollout, dynamic_sampling=preset == "dapo"))
    return GRPOTinyConfig(workdir=f"runs/grpo_tiny_{preset}", sft=base.sft_arithmetic, grpo=grpo)


def main(config: GRPOTinyConfig) -> dict:
    """SFT (or resume it), the RL run, then `results.json` and `results.png` in `workdir`."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    first = sft.train(dataclasses.replace(config.sft, workdir=os.path.join(config.workdir, "sft")))
    if first["stopped_by"]:
        return first
    run = rl.train(dataclasses.replace(
        config.grpo, workdir=os.path.join(config.workdir, "rl"),
        checkpoint=dataclasses.replace(config.grpo.checkpoint,
                                       init_from=os.path.join(first["run_dir"], "checkpoints"))))
    if run["stopped_by"]:
        return run
    records = read_jsonl(os.path.join(run["run_dir"], "metrics.jsonl"))
    accuracy = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    results = {"experiment": "grpo_tiny", "preset": config.grpo.algorithm, "steps": run["step"],
               "sft_accuracy": accuracy[0], "final_accuracy": accuracy[-1], "accuracy_gain": accuracy[-1] - accuracy[0],
               "config": config}
    write_json(os.path.join(config.workdir, "results.json"), results)
    plot_metrics(os.path.join(config.workdir, "results.png"), records,
                 [Panel(title="held-out accuracy (sampled)", keys=("eval/accuracy",)),
                  Panel(title="training reward", keys=("reward",)),
                  Panel(title="KL to the SFT policy", keys=("eval/kl",))],
                 title=f"GRPO family on arithmetic ({config.grpo.algorithm.advantage}, "
                       f"{config.grpo.algorithm.policy_loss}, {config.grpo.algorithm.loss_aggregation})")
    return {k: v for k, v in results.items() if k not in ("config", "preset")}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
