"""Quickstart: SFT -> reward model -> PPO on the synthetic preference task, and SFT -> GRPO on arithmetic.

    rlhf-jax run experiments/quickstart.py
    rlhf-jax run experiments/quickstart.py --set ppo.train.steps=40 --set ppo.algorithm.kl_coef=0.01

The whole RLHF pipeline on a 2-layer character-level model (the "tiny" preset), on this
2-core CPU in a few minutes (well under 10), five stages in `runs/quickstart/<stage>/`:

1. `sft`: supervised fine-tuning on demonstrations of the vowel task (`data.synthetic.VowelTask`,
   whose hidden gold reward peaks at a vowel share of 0.5; demonstrations have 0.15-0.35).
2. `reward_model`: a Bradley-Terry reward model on preference pairs labelled by the gold reward
   with 10% label noise (accuracy is measured against the gold labels of held-out pairs).
3. `ppo`: PPO from the SFT policy against the reward model (a separate critic initialised from the
   reward model, as in InstructGPT; KL penalty in the reward, beta 0.2; missing-EOS penalty).
4. `sft_arithmetic`: supervised fine-tuning on single-digit additions (`ArithmeticTask`).
5. `grpo`: GRPO from that policy with the exact-match grader as the reward (groups of 8).

Printed before and after each stage, on held-out prompts sampled at temperature 1 with a fixed key:
the gold reward of the policy's samples (vowel task), the reward model's held-out accuracy against
the gold labels, and the exact-match accuracy (arithmetic). Acceptance margins (`MARGINS`), checked
and reported in `runs/quickstart/results.json` (a missed margin raises `ChecksMissed` after that file is
written, so `rlhf-jax run` exits 1 naming it):
- PPO raises the gold reward over the SFT policy by >= 0.10 (observed: 0.455 -> 0.718);
- GRPO raises the sampled accuracy over the SFT policy by >= 0.06 (observed: 0.619 -> 0.832);
- the reward model reaches >= 0.90 held-out accuracy (observed: 0.992).

Its output from a fresh clone, with times, is in README.md ("The two commands").

Re-running resumes finished stages from their checkpoints (a finished stage is not re-trained).
`--set ppo.train.steps=40 --set ppo.algorithm.kl_coef=0.05` shows reward over-optimization: the
reward model's score keeps rising while the gold reward falls (see `experiments/kl_ablation.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time

from rlhf_jax.metrics import read_jsonl
from rlhf_jax.train import reward_model, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.results import check_passed, write_json
from rlhf_jax.train.stages import Stage, checkpoints, run_stages

MARGINS = {"ppo_gold_reward": 0.10, "grpo_accuracy": 0.06, "reward_model_accuracy": 0.90}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuickstartConfig:
    """The five stages; each runs in `<workdir>/<stage>` (their own `workdir` fields are ignored).

    `ppo.checkpoint.init_from`, `ppo.rewards.reward_model` and `grpo.checkpoint.init_from` are set
    from the earlier stages' run directories.
    """

    workdir: str = "runs/quickstart"
    sft: sft.SFTConfig = dataclasses.field(default_factory=tiny.vowel_sft)
    reward_model: reward_model.RewardModelConfig = dataclasses.field(default_factory=tiny.vowel_reward_model)
    ppo: rl.PPORunConfig = dataclasses.field(default_factory=tiny.vowel_ppo)
    sft_arithmetic: sft.SFTConfig = dataclasses.field(default_factory=tiny.arithmetic_sft)
    grpo: rl.GRPORunConfig = dataclasses.field(default_factory=tiny.arithmetic_grpo)


def get_config(arg: str | None = None) -> QuickstartConfig:
    """The CPU configuration (the only mode; `arg` must be None or "tiny")."""
    if arg not in (None, "tiny"):
        raise ValueError(f"quickstart has only the tiny mode, got {arg!r}")
    return QuickstartConfig()


def _evals(summary: dict, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(os.path.join(summary["run_dir"], "metrics.jsonl")) if key in r]


def main(config: QuickstartConfig) -> dict:
    """Run the five stages, print before/after figures, write `<workdir>/results.json`."""
    began = time.perf_counter()
    results: dict = {"margins": MARGINS}
    vowel_probe, arithmetic_probe = config.ppo, config.grpo
    before = {"sft": tiny.probe_metric(vowel_probe, None, "eval/gold_reward")["eval/gold_reward"],
              "sft_arithmetic": tiny.probe_metric(arithmetic_probe, None, "eval/accuracy")["eval/accuracy"]}

    def report(stage: Stage, summary: dict, seconds: float) -> None:
        k = [s.name for s in stages].index(stage.name) + 1
        if stage.name in ("sft", "sft_arithmetic"):
            probe, key = (vowel_probe, "eval/gold_reward") if stage.name == "sft" else (arithmetic_probe, "eval/accuracy")
            after = tiny.probe_metric(probe, checkpoints(config.workdir, stage.name), key)[key]
            label = "gold reward" if stage.name == "sft" else "accuracy"
            results[stage.name] = {f"{key[5:]}_before": before[stage.name], f"{key[5:]}_after": after}
            text = f"{label} {before[stage.name]:.3f} (random policy) -> {after:.3f}"
        elif stage.name == "reward_model":
            accuracy = _evals(summary, "eval/accuracy")
            results[stage.name] = {"accuracy_before": accuracy[0], "accuracy_after": accuracy[-1]}
            text = f"held-out accuracy vs gold labels {accuracy[0]:.3f} -> {accuracy[-1]:.3f}"
        elif stage.name == "ppo":
            gold, proxy, kl = (_evals(summary, k) for k in ("eval/gold_reward", "eval/reward", "eval/kl"))
            results[stage.name] = {"gold_reward_before": gold[0], "gold_reward_after": gold[-1],
                                   "proxy_reward_before": proxy[0], "proxy_reward_after": proxy[-1], "kl_after": kl[-1]}
            text = (f"gold reward {gold[0]:.3f} -> {gold[-1]:.3f} (reward model {proxy[0]:.2f} -> {proxy[-1]:.2f}, "
                    f"KL to SFT {kl[-1]:.2f} nats)")
        else:
            accuracy = _evals(summary, "eval/accuracy")
            results[stage.name] = {"accuracy_before": accuracy[0], "accuracy_after": accuracy[-1]}
            text = f"accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}"
        print(f"[{k}/5] {stage.name:<15} {text}  ({seconds:.0f} s)", flush=True)

    stages = [Stage("sft", config.sft), Stage("reward_model", config.reward_model),
              Stage("ppo", config.ppo, init_from="sft", reward_model="reward_model"),
              Stage("sft_arithmetic", config.sft_arithmetic), Stage("grpo", config.grpo, init_from="sft_arithmetic")]
    summaries = run_stages(config.workdir, stages, after=report)
    stopped = [s for s in summaries.values() if s["stopped_by"]]
    if stopped:
        return stopped[0]
    passed = {
        "ppo_gold_reward": results["ppo"]["gold_reward_after"] - results["ppo"]["gold_reward_before"]
        >= MARGINS["ppo_gold_reward"],
        "grpo_accuracy": results["grpo"]["accuracy_after"] - results["grpo"]["accuracy_before"]
        >= MARGINS["grpo_accuracy"],
        "reward_model_accuracy": results["reward_model"]["accuracy_after"] >= MARGINS["reward_model_accuracy"],
    }
    results.update(passed=passed, all_passed=all(passed.values()), seconds=time.perf_counter() - began)
    path = write_json(os.path.join(config.workdir, "results.json"), results)
    print(f"quickstart: {'all margins met' if results['all_passed'] else 'MARGINS MISSED: ' + str(passed)} "
          f"in {results['seconds']:.0f} s; results in {path}", flush=True)
    check_passed("quickstart", passed, path)
    return {"passed": passed, "seconds": round(results["seconds"], 1)}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
