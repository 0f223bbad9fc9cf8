"""PPO tiny run: SFT, a reward model, then PPO against it on the vowel task (the quickstart's stages 1-3).

    rlhf-jax run experiments/ppo_tiny.py
    rlhf-jax run experiments/ppo_tiny.py --set ppo.algorithm.kl_target=1.0       # adaptive KL coefficient
    rlhf-jax run experiments/ppo_tiny.py --set ppo.value.shared_backbone=true    # value head on the policy
    rlhf-jax run experiments/ppo_tiny.py --set ppo.algorithm.kl_mode=loss --set ppo.algorithm.kl_coef=0.05

InstructGPT-style PPO (`rlhf_jax.steps.make_ppo_step`): a separate critic initialised from the
reward model, the k1 KL penalty in the per-token reward (beta 0.2), GAE (lambda 0.95), clipped
policy and value losses, 4 epochs x 2 minibatches per rollout of 32 prompts, and a missing-EOS
penalty. Every 5 steps 256 held-out prompts are sampled (temperature 1, fixed key) and scored by the
reward model (`eval/reward`), the hidden gold reward (`eval/gold_reward`) and the log-ratio to the
SFT policy (`eval/kl`).

What it shows: the gold reward rises with the reward model's score (about 0.46 -> 0.73 in 15 steps,
`experiments/quickstart.py` checks +0.10); run longer or with a smaller beta and the gold reward
turns down while the proxy keeps rising (`experiments/kl_ablation.py`).

Writes `runs/ppo_tiny/{sft,reward_model,ppo}` and `results.json` + `results.png`.
"""

from __future__ import annotations

import dataclasses
import os

from rlhf_jax.metrics import read_jsonl
from rlhf_jax.train import reward_model, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.results import Panel, plot_metrics, write_json
from rlhf_jax.train.stages import Stage, run_stages


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOTinyConfig:
    """The three stages (run directories `<workdir>/sft`, `reward_model`, `ppo`)."""

    workdir: str = "runs/ppo_tiny"
    sft: sft.SFTConfig
    reward_model: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig


def get_config(arg: str | None = None) -> PPOTinyConfig:
    """The tiny CPU configuration (the only mode; `arg` must be None or "tiny")."""
    if arg not in (None, "tiny"):
        raise ValueError(f"ppo_tiny has only the tiny mode, got {arg!r}")
    return PPOTinyConfig(sft=tiny.vowel_sft(), reward_model=tiny.vowel_reward_model(), ppo=tiny.vowel_ppo("ppo_tiny"))


def main(config: PPOTinyConfig) -> dict:
    """The stages (resumed when done), then `results.json` and `results.png` in `workdir`."""
    summaries = run_stages(config.workdir, [
        Stage("sft", config.sft), Stage("reward_model", config.reward_model),
        Stage("ppo", config.ppo, init_from="sft", reward_model="reward_model")])
    run = list(summaries.values())[-1]
    if run["stopped_by"]:
        return run
    rm_accuracy = [r["eval/accuracy"] for r in read_jsonl(os.path.join(summaries["reward_model"]["run_dir"],
                                                                       "metrics.jsonl")) if "eval/accuracy" in r]
    records = read_jsonl(os.path.join(run["run_dir"], "metrics.jsonl"))
    evals = [r for r in records if "eval/gold_reward" in r]
    results = {"experiment": "ppo_tiny", "steps": run["step"], "sft_gold_reward": evals[0]["eval/gold_reward"],
               "final_gold_reward": evals[-1]["eval/gold_reward"], "final_proxy_reward": evals[-1]["eval/reward"],
               "final_kl": evals[-1]["eval/kl"], "reward_model_heldout_accuracy": rm_accuracy[-1],
               "config": config}
    write_json(os.path.join(config.workdir, "results.json"), results)
    plot_metrics(os.path.join(config.workdir, "results.png"), records,
                 [Panel(title="gold reward (held-out samples)", keys=("eval/gold_reward",)),
                  Panel(title="reward model score", keys=("reward", "eval/reward")),
                  Panel(title="KL to the SFT policy", keys=("eval/kl",)),
                  Panel(title="critic", keys=("explained_variance", "value_loss"))],
                 title="PPO against a learned reward model (vowel task)")
    return {k: v for k, v in results.items() if k != "config"}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
