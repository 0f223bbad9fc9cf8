"""KL ablation: PPO against a learned reward model at beta in {0.001, 0.01, 0.1, 1.0}, showing over-optimization.

    rlhf-jax run experiments/kl_ablation.py
    rlhf-jax run experiments/kl_ablation.py --set betas=0.0,0.05,0.5 --set ppo.train.steps=60

The setting of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") in miniature, on
the vowel task (`rlhf_jax.data.synthetic.VowelTask`, hidden gold reward) with the quickstart's
stages (`rlhf_jax.train.tiny_stages`): an SFT policy and a reward model trained on gold-labelled
pairs (10% label noise) that only cover vowel shares below the gold optimum. PPO then optimizes the
reward model (the proxy) with the KL penalty `beta * KL(pi || pi_SFT)` in the reward, for the same
number of steps at each beta. Every 5 steps, 256 held-out prompts are sampled (temperature 1, fixed
key) and scored by the proxy (`eval/reward`), the gold reward (`eval/gold_reward`) and the summed
log-ratio to the SFT policy (`eval/kl`, nats per completion).

What it shows: the smaller beta, the further the policy moves (KL) and the higher the proxy; the
gold reward first rises with the proxy and then falls once the policy leaves the reward model's
data (over-optimization): at beta 0.001 and 0.01 the final gold reward is below its peak, while
beta 1.0 barely moves from the SFT policy. Plotted against sqrt(KL) (Gao et al.'s x-axis), gold
rises and then falls while the proxy keeps rising.

Writes `runs/kl_ablation/results.json` (per beta: the evaluation curves and the final and peak
values) and `results.png` (gold, proxy and KL against the step; gold and proxy against sqrt(KL)).
"""

from __future__ import annotations

import dataclasses
import math
import os

from rlhf_jax.metrics import read_jsonl
from rlhf_jax.train import reward_model, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.results import write_json
from rlhf_jax.train.stages import Stage, run_stages


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLAblationConfig:
    """The shared stages and the PPO template; one PPO run per beta in `<workdir>/ppo_beta_<beta>`.

    Attributes:
      workdir: the experiment's directory (`sft/` and `reward_model/` are shared by all betas).
      betas: the KL coefficients (fixed, in the reward).
      sft, reward_model: the quickstart's stages 1 and 2.
      ppo: the PPO run; its `algorithm.kl_coef`, `workdir`, initial policy and reward model are
        set per beta.
    """

    workdir: str = "runs/kl_ablation"
    betas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    sft: sft.SFTConfig
    reward_model: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig


def get_config(arg: str | None = None) -> KLAblationConfig:
    """The CPU configuration (the only mode; `arg` must be None or "tiny")."""
    if arg not in (None, "tiny"):
        raise ValueError(f"kl_ablation has only the tiny mode, got {arg!r}")
    ppo = tiny.vowel_ppo("kl_ablation_ppo")
    ppo = dataclasses.replace(ppo, train=dataclasses.replace(ppo.train, steps=40, eval_every=5))
    return KLAblationConfig(sft=tiny.vowel_sft(), reward_model=tiny.vowel_reward_model(), ppo=ppo)


def _curve(run_dir: str) -> dict[str, list[float]]:
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval/gold_reward" in r]
    return {"step": [r["step"] for r in records], "gold_reward": [r["eval/gold_reward"] for r in records],
            "proxy_reward": [r["eval/reward"] for r in records], "kl": [r["eval/kl"] for r in records]}


def plot(path: str, curves: dict[str, dict[str, list[float]]]) -> None:
    """Gold, proxy and KL against the step, and gold / proxy against sqrt(KL), one line per beta."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for beta, c in curves.items():
        label = f"beta={beta}"
        for ax, key in zip(axes[:3], ("gold_reward", "proxy_reward", "kl")):
            ax.plot(c["step"], c[key], marker="o", markersize=3, label=label)
        root = [math.sqrt(max(k, 0.0)) for k in c["kl"]]
        line, = axes[3].plot(root, c["gold_reward"], marker="o", markersize=3, label=f"gold, {label}")
        axes[3].plot(root, c["proxy_reward"], linestyle="--", color=line.get_color(), alpha=0.6)
    titles = ("gold reward (held-out samples)", "proxy reward (reward model)", "KL to SFT policy (nats)",
              "gold (solid) and proxy (dashed) vs sqrt(KL)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sqrt(KL)" if ax is axes[3] else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("KL ablation: PPO against a learned reward model (vowel task)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(config: KLAblationConfig) -> dict:
    """Shared stages, one PPO run per beta, then `results.json` and `results.png` in `workdir`."""
    stages = [Stage("sft", config.sft), Stage("reward_model", config.reward_model)]
    for beta in config.betas:
        ppo = dataclasses.replace(config.ppo, algorithm=dataclasses.replace(config.ppo.algorithm, kl_coef=beta))
        stages.append(Stage(f"ppo_beta_{beta:g}", ppo, init_from="sft", reward_model="reward_model"))
    summaries = run_stages(config.workdir, stages)
    stopped = [s for s in summaries.values() if s["stopped_by"]]
    if stopped:
        return stopped[0]
    rm_accuracy = [r["eval/accuracy"] for r in read_jsonl(os.path.join(summaries["reward_model"]["run_dir"],
                                                                       "metrics.jsonl")) if "eval/accuracy" in r]
    curves, summary = {}, {}
    for beta in config.betas:
        c = curves[f"{beta:g}"] = _curve(summaries[f"ppo_beta_{beta:g}"]["run_dir"])
        summary[f"{beta:g}"] = {
            "final_gold_reward": c["gold_reward"][-1], "peak_gold_reward": max(c["gold_reward"]),
            "peak_gold_step": c["step"][c["gold_reward"].index(max(c["gold_reward"]))],
            "final_proxy_reward": c["proxy_reward"][-1], "final_kl": c["kl"][-1],
        }
        print(f"beta={beta:g}: gold {c['gold_reward'][0]:.3f} -> {c['gold_reward'][-1]:.3f} "
              f"(peak {max(c['gold_reward']):.3f}), proxy {c['proxy_reward'][0]:.2f} -> {c['proxy_reward'][-1]:.2f}, "
              f"KL {c['kl'][-1]:.2f}", flush=True)
    results = {"experiment": "KL ablation", "sft_gold_reward": next(iter(curves.values()))["gold_reward"][0],
               "reward_model_heldout_accuracy": rm_accuracy[-1], "summary": summary, "curves": curves,
               "config": config}
    write_json(os.path.join(config.workdir, "results.json"), results)
    plot(os.path.join(config.workdir, "results.png"), curves)
    return summary


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
