"""PPO of Qwen2.5-1.5B-Instruct against a 1.5B reward model (InstructGPT's recipe), on a TPU v5p-16 slice.

    # on the pod, with local copies of the prompts, the policy and a reward model trained with
    # rlhf_jax's reward-model recipe (or any Hugging Face sequence-classification checkpoint):
    rlhf-jax run experiments/ppo_qwen2_5_1_5b.py \\
        --set data.train=data/ultrafeedback_prompts/train.jsonl --set data.eval=data/ultrafeedback_prompts/test.jsonl \\
        --set data.tokenizer=models/Qwen2.5-1.5B-Instruct \\
        --set checkpoint.init_from=models/Qwen2.5-1.5B-Instruct \\
        --set rewards.reward_model=runs/rm_qwen2_5_1_5b/checkpoints

    # before booking the slice: every program of the run compiled for it from this machine (libtpu)
    rlhf-jax compile experiments/ppo_qwen2_5_1_5b.py --topology v5p:2x2x2

    # the same three stages on a CPU in CI: SFT, reward model, PPO of a tiny model on the vowel task
    rlhf-jax run experiments/ppo_qwen2_5_1_5b.py:tiny

Data: JSONL prompts (`{"prompt": str}` or chat messages), rendered with the model's chat template,
kept to 512 tokens. The reward model scores prompt + completion at its last token; a completion
that does not end in EOS gets the "missing_eos" penalty. It reads the policy's token ids, so it must
use the policy's tokenizer: a tokenizer saved with it (in its directory, or `tokenizer/` beside a
run's checkpoints) is compared with the policy's, and one that differs is refused.

Recipe: 64 prompts per step, one completion each up to 512 tokens at temperature 1; PPO with GAE
(gamma 1, lambda 0.95), clip 0.2, value clip 0.2, KL to the initial policy in the reward (0.05),
4 epochs of 4 minibatches per rollout batch in 2 micro-batches each; a separate 1.5B critic
started from the reward model (its own AdamW, 1e-6); policy learning rate 1e-6, warmed up over the
first 10 rollout steps (160 optimizer updates). Four 1.5B models
live on the slice: policy + Adam (24 GB), critic + Adam (24 GB), reference (6 GB) and reward model
(6 GB), float32 weights with bfloat16 compute, every layer rematerialized, FSDP over the 8 chips
(7.6 GiB of weights and moments per chip). `rlhf-jax compile` on v5p:2x2x2 plans every program
(update with the old-policy and critic passes, weight hand-off, prefill, decode loop, reference
pass, reward-model scoring 1.90 GiB): the run peaks at 14.31 GiB per chip in the update, 15% of a
v5p chip's 95 GiB. The reference pass runs in the update's 8 micro-batches (at most 6.5 GiB per
chip by the 1- and 2-layer plans that tests/test_compile_tpu.py extrapolates to 28 layers).
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import PPOConfig
from rlhf_jax.train import reward_model, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.stages import Stage, run_stages

PRESET = "qwen2.5-1.5b"
TOPOLOGY = "v5p:2x2x2"  # the slice this config is planned for (tests/test_compile_tpu.py compiles it)
# Qwen2.5-*-Instruct's config.json ids (the base preset stops at <|endoftext|>): what the run checks
# against the checkpoint's vocabulary and what `rlhf-jax export` writes back into config.json.
INSTRUCT_TOKEN_IDS = dict(bos_token_id=151643, eos_token_id=151645)  # <|endoftext|>, <|im_end|>


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOTinyStages:
    """The tiny mode's stages (run directories `<workdir>/sft`, `reward_model`, `ppo`)."""

    workdir: str = "runs/ppo_qwen2_5_1_5b_tiny"
    sft: sft.SFTConfig
    reward_model: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig


def get_config(arg: str | None = None) -> rl.PPORunConfig | PPOTinyStages:
    """`None` / "full": the pod run; "tiny": SFT, reward model and PPO of a tiny model on CPU."""
    if arg in (None, "full"):
        return rl.PPORunConfig(
            name="ppo_qwen2_5_1_5b",
            model=model_preset(PRESET, remat="full", **INSTRUCT_TOKEN_IDS),
            data=DataConfig(train="data/ultrafeedback_prompts/train.jsonl",
                            eval="data/ultrafeedback_prompts/test.jsonl", tokenizer="models/Qwen2.5-1.5B-Instruct",
                            string_format="chat", max_len=1024, max_prompt_len=512, batch_size=64,
                            on_error="skip"),
            mesh=MeshConfig(data=1, fsdp=-1, tensor=1, strategy="fsdp"),
            algorithm=PPOConfig(kl_coef=0.05, num_epochs=4, num_minibatches=4, micro_batches=2, vf_coef=0.1),
            rollout=RolloutConfig(max_new_tokens=512, sampler_dtype="bfloat16"),
            rewards=RewardConfig(functions=("reward_model", "missing_eos"),
                                 reward_model="runs/rm_qwen2_5_1_5b/checkpoints", reward_model_batch_size=64),
            value=rl.ValueConfig(init="reward_model", optim=OptimizerConfig(learning_rate=1e-6)),
            # warm-up over the first 10 rollout steps: the schedule counts optimizer updates, 4 x 4 per step
            optim=OptimizerConfig(name="adamw", learning_rate=1e-6, warmup_steps=160, weight_decay=0.0,
                                  max_grad_norm=1.0),
            train=TrainConfig(steps=400, eval_every=50, eval_batches=4),
            checkpoint=CheckpointConfig(every=50, keep=2, init_from="models/Qwen2.5-1.5B-Instruct"),
            logging=LoggingConfig(every=1),
        )
    if arg == "tiny":
        ppo = tiny.vowel_ppo("ppo_qwen2_5_1_5b_tiny")
        return PPOTinyStages(
            sft=dataclasses.replace(tiny.vowel_sft("ppo_qwen2_5_1_5b_tiny_sft"), train=TrainConfig(steps=20)),
            reward_model=dataclasses.replace(tiny.vowel_reward_model("ppo_qwen2_5_1_5b_tiny_rm"),
                                             train=TrainConfig(steps=20, eval_every=20, eval_batches=2)),
            ppo=dataclasses.replace(ppo, train=TrainConfig(steps=3, eval_every=3, eval_batches=1)))
    raise ValueError(f"ppo_qwen2_5_1_5b: unknown mode {arg!r}; use full (default) or tiny")


def main(config: rl.PPORunConfig | PPOTinyStages) -> dict:
    """The pod run, or the tiny stages (resumed when done)."""
    if isinstance(config, rl.PPORunConfig):
        return rl.train(config)
    summaries = run_stages(config.workdir, [
        Stage("sft", config.sft), Stage("reward_model", config.reward_model),
        Stage("ppo", config.ppo, init_from="sft", reward_model="reward_model")])
    return {k: {"step": v["step"], "eval": v["eval"]} for k, v in summaries.items()}


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
