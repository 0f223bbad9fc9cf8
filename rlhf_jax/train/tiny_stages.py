"""Stage configs of the tiny CPU experiments on the built-in synthetic tasks, in one place.

The quickstart's five stages, and the tiny experiments built from them (`grpo_tiny`, `ppo_tiny`,
`dpo_tiny`, `kl_ablation`, `dpo_vs_ppo`), take their configs from here instead of importing each
other: a 2-layer character-level model (the "tiny" preset) on the vowel task (hidden gold reward
peaking at a vowel share of 0.5) and on single-digit additions.
"""

from __future__ import annotations

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.data.synthetic import ArithmeticTask, VowelTask
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import DPO, PPOConfig, grpo_config
from rlhf_jax.train import dpo, reward_model, rl, sft
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig

__all__ = ["VOWEL", "ARITHMETIC", "LOG", "sft_stage", "sft_tiny", "vowel_sft", "arithmetic_sft", "vowel_reward_model",
           "vowel_ppo", "arithmetic_grpo", "vowel_dpo", "probe_metric"]

VOWEL = VowelTask(relevance_bonus=0.0)
ARITHMETIC = ArithmeticTask(max_operand=9)
LOG = LoggingConfig(every=10, tensorboard=False)  # the progress bar on stderr, metrics.jsonl; no TensorBoard
_ONE_CHECKPOINT = CheckpointConfig(every=0, keep=1)


def _cosine(steps: int, learning_rate: float = 3e-3) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", learning_rate=learning_rate, warmup_steps=20, schedule="cosine",
                           decay_steps=steps - 20, end_learning_rate_ratio=0.1)


def sft_stage(name: str, train: str, steps: int = 200, **task) -> sft.SFTConfig:
    """SFT on a synthetic task's demonstrations (`task`: `vowel=...` or `arithmetic=...`)."""
    return sft.SFTConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train=train, eval=train, num_train=4096, num_eval=128, max_len=32, batch_size=32, **task),
        optim=_cosine(steps), train=TrainConfig(steps=steps, eval_every=steps, eval_batches=4),
        checkpoint=_ONE_CHECKPOINT, logging=LOG,
    )


def sft_tiny(name: str = "sft_tiny") -> sft.SFTConfig:
    """`experiments/sft_tiny.py`'s run (also the SFT stage of `dpo_tiny`): 300 steps on vowel demonstrations."""
    return sft.SFTConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=8192, num_eval=256,
                        max_len=32, batch_size=32),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                              decay_steps=280, end_learning_rate_ratio=0.1, weight_decay=0.0),
        mesh=MeshConfig(strategy="dp"),
        train=TrainConfig(steps=300, eval_every=50, eval_batches=8),
        checkpoint=CheckpointConfig(every=100, keep=2),
        logging=LoggingConfig(every=10),
    )


def vowel_sft(name: str = "quickstart_sft") -> sft.SFTConfig:
    return sft_stage(name, "synthetic:vowel", vowel=VOWEL)


def arithmetic_sft(name: str = "quickstart_sft_arithmetic") -> sft.SFTConfig:
    return sft_stage(name, "synthetic:arithmetic", arithmetic=ARITHMETIC)


def vowel_reward_model(name: str = "quickstart_reward_model") -> reward_model.RewardModelConfig:
    """A Bradley-Terry reward model on gold-labelled vowel pairs with 10% of the labels flipped."""
    return reward_model.RewardModelConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=4096, num_eval=256,
                        label_noise=0.1, max_len=32, batch_size=32, vowel=VOWEL),
        optim=_cosine(150), train=TrainConfig(steps=150, eval_every=150, eval_batches=8),
        checkpoint=_ONE_CHECKPOINT, logging=LOG,
    )


def vowel_ppo(name: str = "quickstart_ppo") -> rl.PPORunConfig:
    """PPO against the reward model (critic from it, as InstructGPT; KL in the reward, beta 0.2)."""
    return rl.PPORunConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=4096, num_eval=256,
                        max_len=32, batch_size=32, vowel=VOWEL),
        algorithm=PPOConfig(kl_coef=0.2, num_epochs=4, num_minibatches=2, vf_coef=0.5),
        rollout=RolloutConfig(max_new_tokens=24),
        rewards=RewardConfig(functions=("reward_model", "missing_eos")),
        value=rl.ValueConfig(init="reward_model", optim=OptimizerConfig(learning_rate=1e-3)),
        optim=OptimizerConfig(learning_rate=1e-4),
        train=TrainConfig(steps=15, eval_every=5, eval_batches=8),
        checkpoint=_ONE_CHECKPOINT, logging=LOG,
    )


def arithmetic_grpo(preset: str = "grpo", name: str = "quickstart_grpo") -> rl.GRPORunConfig:
    """A GRPO-family preset with the exact-match grader on additions (groups of 8; DAPO samples dynamically)."""
    return rl.GRPORunConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic", num_train=4096, num_eval=512,
                        max_len=16, batch_size=64, arithmetic=ARITHMETIC),
        algorithm=grpo_config(preset, group_size=8),
        rollout=RolloutConfig(max_new_tokens=4, dynamic_sampling=preset == "dapo"),
        rewards=RewardConfig(functions=("task",)),
        optim=OptimizerConfig(learning_rate=5e-4),
        train=TrainConfig(steps=120, eval_every=20, eval_batches=8),
        checkpoint=_ONE_CHECKPOINT, logging=LOG,
    )


def vowel_dpo(name: str = "dpo_tiny", algorithm=DPO(loss_type="sigmoid", beta=0.1, nll_weight=1.0),
              steps: int = 100) -> dpo.DPOConfig:
    """A DPO-family objective on gold-labelled vowel pairs (KTO: the pairs split into unpaired rows)."""
    return dpo.DPOConfig(
        name=name, model=model_preset("tiny"),
        data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=8192, num_eval=128,
                        max_len=32, batch_size=32),
        optim=OptimizerConfig(name="adamw", learning_rate=3e-4, warmup_steps=10),
        algorithm=algorithm, mesh=MeshConfig(strategy="dp"),
        sampling=dpo.SampleEvalConfig(num_prompts=64, max_new_tokens=24, temperature=1.0),
        train=TrainConfig(steps=steps, eval_every=25, eval_batches=4),
        checkpoint=CheckpointConfig(every=50, keep=1), logging=LoggingConfig(every=10),
    )


def probe_metric(config, policy: str | None, key: str, *, reference: str | None = None) -> dict[str, float]:
    """`rl.evaluate` of one policy (a checkpoint, or None for the random init) with the task's grader alone.

    Raises:
      KeyError: `key` is not among the metrics (e.g. `eval/accuracy` on the vowel task).
    """
    metrics = rl.evaluate(config, policies=[policy], reference=reference, reward_sources=[])[0]
    if key not in metrics:
        raise KeyError(f"{key} is not an evaluation metric of this task: {sorted(metrics)}")
    return metrics
