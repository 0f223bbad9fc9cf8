"""Reward-model over-optimization curves (Gao et al. 2022): best-of-n and RL, gold vs sqrt(KL), fitted.

    rlhf-jax run experiments/overoptimization.py
    rlhf-jax run experiments/overoptimization.py --set betas=0.001,0.01 --set num_samples=128

The KL ablation's setting (`experiments/kl_ablation.py`: the vowel task's hidden gold reward, a
reward model trained on gold-labelled pairs that only cover vowel shares below the gold optimum,
the quickstart's stages from `rlhf_jax.train.tiny_stages`), measured the way Gao et al. measure it:

- **best-of-n**: `num_samples` (64) completions per held-out prompt from the SFT policy, scored by
  the proxy (the reward model) and the gold reward; for n = 1..64 the expected gold and proxy
  reward of the proxy's best of n (unbiased estimator over all n-subsets,
  `rlhf_jax.train.overoptimization.best_of_n_curve`) at `d = sqrt(KL_bon)`,
  `KL_bon = log n - (n - 1)/n`; fitted `R_bon(d) = d (alpha - beta d)` to the gold gain over n = 1.
- **RL**: PPO against the reward model at each `beta` (KL penalty in the reward), evaluated every 5
  steps (held-out gold, proxy and summed-log-ratio KL to the SFT policy); fitted
  `R_RL(d) = d (alpha - beta log d)` to the gold gain over the SFT policy, `d = sqrt(KL)`.
- **rejection sampling** (`rlhf_jax.train.rejection_sampling`, the driver no other experiment used):
  best-of-`rejection_n` fine-tuning of the SFT policy on the reward model's picks, its held-out gold
  reward compared with best-of-`rejection_n` at inference.

Writes `results.json` (curves, fitted coefficients with R^2 and the fitted peaks, the shape of the
best-of-n gold curve: "rises then falls" or "rises then saturates") and `results.png` (gold and
proxy vs sqrt(KL) for best-of-n and RL with the fitted curves; gold vs n). Checks that the gold
reward of best-of-n rises then falls or saturates, as the paper reports.

Measured on a CPU (one device, 128 held-out prompts x 64 samples): best-of-n gold 0.467 (n=1) ->
peak 0.858 (n=32) -> 0.835 (n=64), "rises then falls", while the proxy keeps rising (0.95 -> 3.00);
fit R_bon: alpha 0.400, beta 0.102 (R^2 0.987, peak at sqrt(KL) 1.96). PPO at beta 0.001: gold
0.455 -> peak 0.718 (sqrt(KL) 1.6) -> 0.209 (sqrt(KL) 4.5); fit R_RL: alpha 0.229, beta 0.189 (R^2
0.967). Rejection-sampling fine-tuning with n=16 (30 steps): gold 0.455 -> 0.695, below best-of-16
at inference (0.841) at a fraction of its sampling cost at test time.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from rlhf_jax.config import CheckpointConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.train import rejection_sampling, reward_model, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.overoptimization import best_of_n_curve, fit_best_of_n, fit_rl, score_samples
from rlhf_jax.train.results import check_passed, write_json
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.stages import Stage, run_stages
from rlhf_jax.train.weights import initial_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverOptimizationConfig:
    """The shared stages, the PPO template (one run per beta), the rejection-sampling run, best-of-n sizes.

    Attributes:
      workdir: the experiment's directory.
      betas: PPO's KL coefficients (one RL curve each).
      num_samples: samples per held-out prompt for best-of-n (the largest n).
      best_of: the n values of the best-of-n curve (each <= num_samples).
      bon_batches: held-out prompt batches for best-of-n (`data.batch_size` prompts each).
      rejection_n: samples per prompt of the rejection-sampling run.
      saturation: the best-of-n gold curve "saturates" when its last doubling of n gains less than
        this share of its largest gain.
    """

    workdir: str = "runs/overoptimization"
    betas: tuple[float, ...] = (0.001,)
    num_samples: int = 64
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    bon_batches: int = 4
    rejection_n: int = 16
    saturation: float = 0.1
    sft: sft.SFTConfig
    reward_model: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig
    rejection: rejection_sampling.RejectionSamplingConfig


def get_config(arg: str | None = None) -> OverOptimizationConfig:
    """The CPU configuration (the only mode; `arg` must be None or "tiny")."""
    if arg not in (None, "tiny"):
        raise ValueError(f"overoptimization has only the tiny mode, got {arg!r}")
    ppo = tiny.vowel_ppo("overoptimization_ppo")
    ppo = dataclasses.replace(ppo, train=dataclasses.replace(ppo.train, steps=40, eval_every=5))
    rejection = rejection_sampling.RejectionSamplingConfig(
        name="overoptimization_rejection_sampling", model=ppo.model, data=ppo.data,
        algorithm=rejection_sampling.BestOfNConfig(samples_per_prompt=16),
        rollout=RolloutConfig(max_new_tokens=ppo.rollout.max_new_tokens),
        rewards=RewardConfig(functions=("reward_model",)),
        optim=OptimizerConfig(learning_rate=3e-4), train=TrainConfig(steps=30, eval_every=10, eval_batches=8),
        checkpoint=CheckpointConfig(every=0, keep=1), logging=ppo.logging)
    return OverOptimizationConfig(sft=tiny.vowel_sft(), reward_model=tiny.vowel_reward_model(), ppo=ppo,
                                  rejection=rejection)


def _curve(run_dir: str) -> dict[str, list[float]]:
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "eval/gold_reward" in r]
    return {"step": [r["step"] for r in records], "gold": [r["eval/gold_reward"] for r in records],
            "proxy": [r["eval/reward"] for r in records], "kl": [r.get("eval/kl", float("nan")) for r in records]}


def bon_shape(gold: np.ndarray, saturation: float) -> str:
    """"rises then falls" (the peak is inside and the last point below it), "rises then saturates"
    (the last doubling gains < `saturation` x the largest gain), "keeps rising", or "does not rise"."""
    gain = gold - gold[0]
    peak = int(np.argmax(gold))
    if gain.max() <= 0:
        return "does not rise"
    if peak < len(gold) - 1:
        return "rises then falls"
    return "rises then saturates" if gold[-1] - gold[-2] < saturation * gain.max() else "keeps rising"


def main(config: OverOptimizationConfig) -> dict:
    """The stages, the best-of-n evaluation, the fits; `results.json` and `results.png`; checks the shape."""
    stages = [Stage("sft", config.sft), Stage("reward_model", config.reward_model)]
    for beta in config.betas:
        ppo = dataclasses.replace(config.ppo, algorithm=dataclasses.replace(config.ppo.algorithm, kl_coef=beta))
        stages.append(Stage(f"ppo_beta_{beta:g}", ppo, init_from="sft", reward_model="reward_model"))
    rejection = dataclasses.replace(config.rejection, algorithm=dataclasses.replace(
        config.rejection.algorithm, samples_per_prompt=config.rejection_n))
    stages.append(Stage("rejection_sampling", rejection, init_from="sft", reward_model="reward_model"))
    summaries = run_stages(config.workdir, stages)
    stopped = [s for s in summaries.values() if s["stopped_by"]]
    if stopped:
        return stopped[0]
    checkpoints = lambda stage: os.path.join(config.workdir, stage, "checkpoints")  # noqa: E731

    # Best-of-n from the SFT policy, the proxy being the reward model alone.
    proxy_config = dataclasses.replace(config.ppo, rewards=RewardConfig(functions=("reward_model",),
                                                                       reward_model=checkpoints("reward_model")))
    params = initial_params(CausalLM(config.ppo.model), checkpoints("sft"), rng=jax.random.key(0))
    proxy, gold = score_samples(proxy_config, params, config.num_samples, max_batches=config.bon_batches)
    bon = best_of_n_curve(proxy, gold, config.best_of)
    bon_fit = fit_best_of_n(bon["sqrt_kl"], bon["gold"] - bon["gold"][0])
    bon_proxy_fit = fit_best_of_n(bon["sqrt_kl"], bon["proxy"] - bon["proxy"][0])
    shape = bon_shape(bon["gold"], config.saturation)

    rl_curves, rl_fits = {}, {}
    for beta in config.betas:
        c = rl_curves[f"{beta:g}"] = _curve(summaries[f"ppo_beta_{beta:g}"]["run_dir"])
        d = np.sqrt(np.maximum(c["kl"], 0.0))
        rl_fits[f"{beta:g}"] = {"gold": fit_rl(d, np.asarray(c["gold"]) - c["gold"][0]),
                                "proxy": fit_rl(d, np.asarray(c["proxy"]) - c["proxy"][0])}
    rs = _curve(summaries["rejection_sampling"]["run_dir"])
    k = config.best_of.index(config.rejection_n) if config.rejection_n in config.best_of else None
    results = {
        "experiment": "overoptimization (Gao et al. 2022)",
        "best_of_n": {key: np.asarray(v).tolist() for key, v in bon.items()},
        "best_of_n_fit": {"gold": bon_fit, "proxy": bon_proxy_fit, "form": "R_bon(d) = d (alpha - beta d)"},
        "best_of_n_gold_shape": shape,
        "rl": rl_curves, "rl_fit": rl_fits, "rl_form": "R_RL(d) = d (alpha - beta log d)",
        "rejection_sampling": {"n": config.rejection_n, "gold_before": rs["gold"][0], "gold_after": rs["gold"][-1],
                               "best_of_n_inference_gold": None if k is None else float(bon["gold"][k])},
        "statement": (f"best-of-n gold reward {shape} in sqrt(KL): n=1 {bon['gold'][0]:.3f}, peak "
                      f"{bon['gold'].max():.3f} at n={int(bon['n'][int(np.argmax(bon['gold']))])}, "
                      f"n={int(bon['n'][-1])} {bon['gold'][-1]:.3f}; proxy {bon['proxy'][0]:.3f} -> "
                      f"{bon['proxy'][-1]:.3f}"),
        "config": config,
    }
    path = write_json(os.path.join(config.workdir, "results.json"), results)
    plot(os.path.join(config.workdir, "results.png"), results)
    print(results["statement"], flush=True)
    check_passed("overoptimization", {f"best-of-n gold reward rises, then falls or saturates ({shape})":
                                      shape in ("rises then falls", "rises then saturates")}, path)
    return {k: v for k, v in results.items() if k not in ("config", "rl")}


def plot(path: str, results: dict) -> None:
    """Best-of-n and RL: gold (solid) and proxy (dashed) vs sqrt(KL) with the fitted curves; gold vs n."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    bon, fit = results["best_of_n"], results["best_of_n_fit"]["gold"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    d = np.asarray(bon["sqrt_kl"])
    grid = np.linspace(0, d.max() * 1.1, 100)
    axes[0].plot(d, bon["gold"], "o-", label="gold")
    axes[0].plot(grid, bon["gold"][0] + grid * (fit["alpha"] - fit["beta"] * grid), ":",
                 label=f"fit d(a - b d): a={fit['alpha']:.3f}, b={fit['beta']:.3f}")
    ax_proxy = axes[0].twinx()
    ax_proxy.plot(d, bon["proxy"], "s--", color="grey", alpha=0.6, label="proxy (right axis)")
    ax_proxy.legend(fontsize=7, loc="lower right")
    axes[0].set_title("best-of-n from the SFT policy", fontsize=10)
    for beta, c in results["rl"].items():
        dr = np.sqrt(np.maximum(c["kl"], 0.0))
        line, = axes[1].plot(dr, c["gold"], "o-", label=f"gold, beta={beta}")
        f = results["rl_fit"][beta]["gold"]
        g = np.linspace(max(dr.min(), 1e-3), dr.max() * 1.1, 100)
        axes[1].plot(g, c["gold"][0] + g * (f["alpha"] - f["beta"] * np.log(g)), ":", color=line.get_color(),
                     label=f"fit d(a - b log d): a={f['alpha']:.3f}, b={f['beta']:.3f}")
    axes[1].set_title("PPO against the reward model", fontsize=10)
    axes[2].semilogx(bon["n"], bon["gold"], "o-", base=2, label="best-of-n at inference")
    rs = results["rejection_sampling"]
    axes[2].axhline(rs["gold_after"], color="tab:green", linestyle="--",
                    label=f"rejection-sampling fine-tuning (n={rs['n']})")
    axes[2].set_title("gold reward vs n", fontsize=10)
    axes[2].set_xlabel("n")
    for ax in axes[:2]:
        ax.set_xlabel("sqrt(KL) (nats^0.5)")
    for ax in axes:
        ax.set_ylabel("gold reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(results["statement"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
