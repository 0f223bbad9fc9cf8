"""Quickstart: SFT -> reward model -> PPO on the synthetic preference task, and SFT -> GRPO on arithmetic.

    rlhf-jax run experiments/quickstart.py
    rlhf-jax run experiments/quickstart.py --set ppo.train.steps=40 --set ppo.algorithm.kl_coef=0.01

The whole RLHF pipeline on a 2-layer character-level model (`rlhf_jax.testing.tiny_config`), on this
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
and reported in `runs/quickstart/results.json`:
- PPO raises the gold reward over the SFT policy by >= 0.10 (observed: 0.455 -> 0.719);
- GRPO raises the sampled accuracy over the SFT policy by >= 0.06 (observed: 0.566 -> 0.805);
- the reward model reaches >= 0.90 held-out accuracy (observed: 0.992).

Its output from a fresh clone, with times, is in README.md ("The two commands").

Re-running resumes finished stages from their checkpoints (a finished stage is not re-trained).
`--set ppo.train.steps=40 --set ppo.algorithm.kl_coef=0.05` shows reward over-optimization: the
reward model's score keeps rising while the gold reward falls (see `experiments/kl_ablation.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.steps import PPOConfig, grpo_config
from rlhf_jax.testing import tiny_config
from rlhf_jax.train import reward_model, rl, sft
from rlhf_jax.train.common import DataConfig
from rlhf_jax.train.results import write_json

MARGINS = {"ppo_gold_reward": 0.10, "grpo_accuracy": 0.06, "reward_model_accuracy": 0.90}

_VOWEL = VowelTask(relevance_bonus=0.0)
_ARITHMETIC = ArithmeticTask(max_operand=9)
_LOG = LoggingConfig(every=10, console=False, tensorboard=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuickstartConfig:
    """The five stages; each runs in `<workdir>/<stage>` (their own `workdir` fields are ignored).

    `ppo.checkpoint.init_from`, `ppo.rewards.reward_model` and `grpo.checkpoint.init_from` are set
    from the earlier stages' run directories.
    """

    workdir: str = "runs/quickstart"
    sft: sft.SFTConfig
    reward_model: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig
    sft_arithmetic: sft.SFTConfig
    grpo: rl.GRPORunConfig


def _sft(name: str, train: str, task_field: dict, steps: int) -> sft.SFTConfig:
    return sft.SFTConfig(
        name=name, model=tiny_config(),
        data=DataConfig(train=train, eval=train, num_train=4096, num_eval=128, max_len=32, batch_size=32,
                        **task_field),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                              decay_steps=steps - 20, end_learning_rate_ratio=0.1),
        train=TrainConfig(steps=steps, eval_every=steps, eval_batches=4),
        checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
    )


def get_config(arg: str | None = None) -> QuickstartConfig:
    """The CPU configuration (the only mode; `arg` must be None or "tiny")."""
    if arg not in (None, "tiny"):
        raise ValueError(f"quickstart has only the tiny mode, got {arg!r}")
    vowel_data = dict(vowel=_VOWEL)
    return QuickstartConfig(
        sft=_sft("quickstart_sft", "synthetic:vowel", vowel_data, 200),
        reward_model=reward_model.RewardModelConfig(
            name="quickstart_reward_model", model=tiny_config(),
            data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=4096, num_eval=256,
                            label_noise=0.1, max_len=32, batch_size=32, **vowel_data),
            optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                                  decay_steps=130, end_learning_rate_ratio=0.1),
            train=TrainConfig(steps=150, eval_every=150, eval_batches=8),
            checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
        ),
        ppo=rl.PPORunConfig(
            name="quickstart_ppo", model=tiny_config(),
            data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=4096, num_eval=256,
                            max_len=32, batch_size=32, **vowel_data),
            algorithm=PPOConfig(kl_coef=0.2, num_epochs=4, num_minibatches=2, vf_coef=0.5),
            rollout=rl.RolloutConfig(max_new_tokens=24),
            rewards=rl.RewardConfig(functions=("reward_model", "missing_eos")),
            value=rl.ValueConfig(init="reward_model", optim=OptimizerConfig(learning_rate=1e-3)),
            optim=OptimizerConfig(learning_rate=1e-4),
            train=TrainConfig(steps=15, eval_every=5, eval_batches=8),
            checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
        ),
        sft_arithmetic=_sft("quickstart_sft_arithmetic", "synthetic:arithmetic", dict(arithmetic=_ARITHMETIC), 200),
        grpo=rl.GRPORunConfig(
            name="quickstart_grpo", model=tiny_config(),
            data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic", num_train=4096, num_eval=512,
                            max_len=16, batch_size=64, arithmetic=_ARITHMETIC),
            algorithm=grpo_config("grpo", group_size=8),
            rollout=rl.RolloutConfig(max_new_tokens=4),
            rewards=rl.RewardConfig(functions=("task",)),
            optim=OptimizerConfig(learning_rate=5e-4),
            train=TrainConfig(steps=120, eval_every=20, eval_batches=8),
            checkpoint=CheckpointConfig(every=0, keep=1), logging=_LOG,
        ),
    )


def _evals(run_dir: str, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r]


def gold_eval(config, init_from: str | None, key: str, *, reference: str | None = None) -> dict[str, float]:
    """Held-out metrics of a policy (`init_from`), sampled and scored by the task as the RL driver does.

    `config` supplies the model, data, sampling and eval size; `key` must be among the results
    (`eval/gold_reward` or `eval/accuracy`); with `reference`, `eval/kl` to that policy is included.
    """
    probe = rl.GRPORunConfig(name="probe", model=config.model, data=config.data, seed=config.seed,
                             rollout=config.rollout, rewards=rl.RewardConfig(functions=("task",)),
                             algorithm=grpo_config("dapo", group_size=2), train=config.train,
                             checkpoint=CheckpointConfig(init_from=init_from))
    metrics = rl.evaluate(probe, reference=reference)[0]
    if key not in metrics:
        raise KeyError(f"{key} is not an evaluation metric of this task: {sorted(metrics)}")
    return metrics


def sft_and_reward_model(sft_config, rm_config, workdir: str, *, probe=None, log=print) -> dict:
    """Stages 1 and 2 (resumed when already done): the SFT policy and the reward model.

    Returns `{"sft": <checkpoints dir>, "reward_model": <checkpoints dir>, "sft_summary", "rm_summary",
    "gold_before", "gold_after", "rm_accuracy"}`; gold figures only with a `probe` config.
    """
    out: dict = {}
    start = time.perf_counter()
    if probe is not None:
        out["gold_before"] = gold_eval(probe, None, "eval/gold_reward")["eval/gold_reward"]
    out["sft_summary"] = sft.train(dataclasses.replace(sft_config, workdir=os.path.join(workdir, "sft")))
    out["sft"] = os.path.join(out["sft_summary"]["run_dir"], "checkpoints")
    if probe is not None:
        out["gold_after"] = gold_eval(probe, out["sft"], "eval/gold_reward")["eval/gold_reward"]
        log(f"[1/5] {'sft':<15} gold reward {out['gold_before']:.3f} (random policy) -> {out['gold_after']:.3f}"
            f"  ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    out["rm_summary"] = reward_model.train(dataclasses.replace(rm_config, workdir=os.path.join(workdir, "reward_model")))
    out["reward_model"] = os.path.join(out["rm_summary"]["run_dir"], "checkpoints")
    out["rm_accuracy"] = _evals(out["rm_summary"]["run_dir"], "eval/accuracy")
    if probe is not None:
        log(f"[2/5] {'reward_model':<15} held-out accuracy vs gold labels {out['rm_accuracy'][0]:.3f} -> "
            f"{out['rm_accuracy'][-1]:.3f}  ({time.perf_counter() - start:.0f} s)")
    return out


def ppo_from(ppo_config, stages: dict, workdir: str) -> rl.PPORunConfig:
    """The PPO config started from the SFT policy, scored by (and its critic from) the reward model."""
    return dataclasses.replace(
        ppo_config, workdir=workdir,
        rewards=dataclasses.replace(ppo_config.rewards, reward_model=stages["reward_model"]),
        checkpoint=dataclasses.replace(ppo_config.checkpoint, init_from=stages["sft"]))


def main(config: QuickstartConfig) -> dict:
    """Run the five stages, print before/after figures, write `<workdir>/results.json`."""
    began = time.perf_counter()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only init_from directories
    where = lambda stage: os.path.join(config.workdir, stage)  # noqa: E731
    ckpt = lambda stage: os.path.join(where(stage), "checkpoints")  # noqa: E731
    results: dict = {"margins": MARGINS}

    def report(k: int, stage: str, text: str, start: float) -> None:
        print(f"[{k}/5] {stage:<15} {text}  ({time.perf_counter() - start:.0f} s)", flush=True)

    # 1-2. SFT on the vowel task's demonstrations; reward model on gold-labelled pairs (10% flipped).
    ppo_probe = dataclasses.replace(config.ppo, rewards=rl.RewardConfig(functions=("task",)))
    stages = sft_and_reward_model(config.sft, config.reward_model, config.workdir, probe=ppo_probe,
                                  log=lambda text: print(text, flush=True))
    if stages["sft_summary"]["stopped_by"] or stages["rm_summary"]["stopped_by"]:
        return {"stopped_by": stages["sft_summary"]["stopped_by"] or stages["rm_summary"]["stopped_by"]}
    results["sft"] = {"gold_reward_before": stages["gold_before"], "gold_reward_after": stages["gold_after"]}
    results["reward_model"] = {"accuracy_before": stages["rm_accuracy"][0], "accuracy_after": stages["rm_accuracy"][-1]}

    # 3. PPO against the reward model.
    start = time.perf_counter()
    ppo_config = ppo_from(config.ppo, stages, where("ppo"))
    summary = rl.train(ppo_config)
    if summary["stopped_by"]:
        return summary
    gold, proxy, kl = (_evals(summary["run_dir"], k) for k in ("eval/gold_reward", "eval/reward", "eval/kl"))
    results["ppo"] = {"gold_reward_before": gold[0], "gold_reward_after": gold[-1], "proxy_reward_before": proxy[0],
                      "proxy_reward_after": proxy[-1], "kl_after": kl[-1]}
    report(3, "ppo", f"gold reward {gold[0]:.3f} -> {gold[-1]:.3f} (reward model {proxy[0]:.2f} -> {proxy[-1]:.2f}, "
                     f"KL to SFT {kl[-1]:.2f} nats)", start)

    # 4. SFT on arithmetic.
    start = time.perf_counter()
    grpo_probe = config.grpo
    random_accuracy = gold_eval(grpo_probe, None, "eval/accuracy")["eval/accuracy"]
    summary = sft.train(dataclasses.replace(config.sft_arithmetic, workdir=where("sft_arithmetic")))
    if summary["stopped_by"]:
        return summary
    sft_accuracy = gold_eval(grpo_probe, ckpt("sft_arithmetic"), "eval/accuracy")["eval/accuracy"]
    results["sft_arithmetic"] = {"accuracy_before": random_accuracy, "accuracy_after": sft_accuracy}
    report(4, "sft_arithmetic", f"accuracy {random_accuracy:.3f} (random policy) -> {sft_accuracy:.3f}", start)

    # 5. GRPO with the exact-match grader.
    start = time.perf_counter()
    grpo_config_ = dataclasses.replace(
        config.grpo, workdir=where("grpo"),
        checkpoint=dataclasses.replace(config.grpo.checkpoint, init_from=ckpt("sft_arithmetic")))
    summary = rl.train(grpo_config_)
    if summary["stopped_by"]:
        return summary
    accuracy = _evals(summary["run_dir"], "eval/accuracy")
    results["grpo"] = {"accuracy_before": accuracy[0], "accuracy_after": accuracy[-1]}
    report(5, "grpo", f"accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}", start)

    passed = {
        "ppo_gold_reward": results["ppo"]["gold_reward_after"] - results["ppo"]["gold_reward_before"]
        >= MARGINS["ppo_gold_reward"],
        "grpo_accuracy": results["grpo"]["accuracy_after"] - results["grpo"]["accuracy_before"]
        >= MARGINS["grpo_accuracy"],
        "reward_model_accuracy": results["reward_model"]["accuracy_after"] >= MARGINS["reward_model_accuracy"],
    }
    results.update(passed=passed, all_passed=all(passed.values()), seconds=time.perf_counter() - began)
    write_json(os.path.join(config.workdir, "results.json"), results)
    print(f"quickstart: {'all margins met' if results['all_passed'] else 'MARGINS MISSED: ' + str(passed)} "
          f"in {results['seconds']:.0f} s; results in {os.path.join(config.workdir, 'results.json')}", flush=True)
    return {"passed": passed, "seconds": round(results["seconds"], 1)}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
