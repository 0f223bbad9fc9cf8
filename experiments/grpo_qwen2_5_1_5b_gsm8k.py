"""GRPO of Qwen2.5-1.5B-Instruct on GSM8K with the math verifier, on a TPU v5p-16 slice (v5p:2x2x2).

    # on the pod (every worker runs the same command; see tpu/), with local copies of data and model:
    rlhf-jax run experiments/grpo_qwen2_5_1_5b_gsm8k.py \\
        --set data.train=data/gsm8k/train.jsonl --set data.eval=data/gsm8k/test.jsonl \\
        --set data.tokenizer=models/Qwen2.5-1.5B-Instruct \\
        --set checkpoint.init_from=models/Qwen2.5-1.5B-Instruct

    # before booking the slice: every program of the run compiled for it from this machine (libtpu)
    rlhf-jax compile experiments/grpo_qwen2_5_1_5b_gsm8k.py --topology v5p:2x2x2

    # the same pipeline on a CPU in CI (tiny Qwen2-shaped model, GSM8K-format rows it writes itself)
    rlhf-jax run experiments/grpo_qwen2_5_1_5b_gsm8k.py:tiny

Data: GSM8K's JSONL (`{"question": str, "answer": "... #### 72"}`, as `openai/gsm8k` main
writes it), read as prompt rows: `question` rendered with the model's chat template is the
prompt, the `answer` column reaches the reward. Reward: the built-in "math" verifier
(`rlhf_jax.rewards.math_answers`): the completion's final answer (`\\boxed{}`, "#### x", "the
answer is x") against the solution's "#### x", equivalence by math-verify; 1 or 0.

Recipe (DeepSeekMath's GRPO at this size, with its KL term: k3 estimator in the loss, coefficient
0.04): 64 prompts per step x 8 samples at temperature 1, completions up to 1,024 tokens,
group-normalised advantages, clipped ratio (0.2), learning rate 1e-6, one update epoch per rollout
batch in 8 micro-batches, float32 parameters with bfloat16 compute and sampling, every layer
rematerialized, FSDP over the 8 chips. The reference log-prob pass runs the 512 rollouts in the
update's 8 micro-batches (64 rows, 8 per chip, at a time); over the whole batch at once it needed
335 GiB per chip. `rlhf-jax compile` on v5p:2x2x2, every program planned at 1 and 2 layers and
extrapolated along that line to 28 (an upper bound; tests/test_compile_tpu.py), gives per chip at
most: update (with its old-policy log-prob pass) 16.6 GiB, reference pass 17.3 GiB (a 4.6 GiB
f32[8,1024,151936] logits block per micro-batch), sampler prefill 20.3 GiB, decode loop 8.5 GiB,
weight hand-off 3.4 GiB: the run fits a v5p chip's 95 GiB (at most 21%). A full-depth compile
without the KL term measured: parameters 0.72 GiB and Adam moments 1.44 GiB per chip, update 13.6
GiB, prefill 2.4 GiB, decode 5.3 GiB with a 1.31 GiB KV cache of 512 rows x 1,280 positions. Expect
held-out accuracy (`eval/reward`) to rise from the instruct model's level within a few hundred steps.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.rewards.registry import RewardConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import grpo_config
from rlhf_jax.train import rl
from rlhf_jax.train.rollouts import RolloutConfig
from rlhf_jax.train.run_config import DataConfig

PRESET = "qwen2.5-1.5b"
TOPOLOGY = "v5p:2x2x2"  # the slice this config is planned for (tests/test_compile_tpu.py compiles it)
# Qwen2.5-*-Instruct's config.json ids (the base preset stops at <|endoftext|>): what the run checks
# against the checkpoint's vocabulary and what `rlhf-jax export` writes back into config.json.
INSTRUCT_TOKEN_IDS = dict(bos_token_id=151643, eos_token_id=151645)  # <|endoftext|>, <|im_end|>


def get_config(arg: str | None = None) -> rl.GRPORunConfig:
    """`None` / "full": the pod run; "tiny": the same pipeline on CPU in about a minute."""
    if arg in (None, "full"):
        return rl.GRPORunConfig(
            name="grpo_qwen2_5_1_5b_gsm8k",
            model=model_preset(PRESET, remat="full", **INSTRUCT_TOKEN_IDS),
            data=DataConfig(train="data/gsm8k/train.jsonl", eval="data/gsm8k/test.jsonl",
                            tokenizer="models/Qwen2.5-1.5B-Instruct", string_format="chat",
                            max_len=1280, max_prompt_len=256, batch_size=64, on_error="skip"),
            mesh=MeshConfig(data=1, fsdp=-1, tensor=1, strategy="fsdp"),
            algorithm=grpo_config("grpo", group_size=8, kl_coef=0.04, num_epochs=1, micro_batches=8,
                                  temperature=1.0),
            rollout=RolloutConfig(max_new_tokens=1024, sampler_dtype="bfloat16"),
            rewards=RewardConfig(functions=("math",)),
            optim=OptimizerConfig(name="adamw", learning_rate=1e-6, warmup_steps=10, weight_decay=0.0,
                                  max_grad_norm=1.0),
            train=TrainConfig(steps=500, eval_every=50, eval_batches=4),
            checkpoint=CheckpointConfig(every=50, keep=2, init_from="models/Qwen2.5-1.5B-Instruct"),
            logging=LoggingConfig(every=1),
        )
    if arg == "tiny":
        return rl.GRPORunConfig(
            name="grpo_qwen2_5_1_5b_gsm8k_tiny",
            model=model_preset("tiny", model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
            data=DataConfig(train="<run_dir>/data/train.jsonl", eval="<run_dir>/data/test.jsonl", max_len=64,
                            max_prompt_len=56, batch_size=16),
            algorithm=grpo_config("grpo", group_size=4, kl_coef=0.0, num_epochs=1, micro_batches=2),
            rollout=RolloutConfig(max_new_tokens=8),
            rewards=RewardConfig(functions=("math",)),
            optim=OptimizerConfig(learning_rate=1e-3),
            train=TrainConfig(steps=4, eval_every=4, eval_batches=1),
            checkpoint=CheckpointConfig(every=0, keep=1),
            logging=LoggingConfig(every=1, tensorboard=False),
        )
    raise ValueError(f"grpo_qwen2_5_1_5b_gsm8k: unknown mode {arg!r}; use full (default) or tiny")


def write_gsm8k_rows(path: str, n: int, *, seed: int) -> str:
    """`n` GSM8K-format rows of single-digit sums (`{"question", "answer": "... #### 7"}`) at `path`."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 10, 2))
            f.write(json.dumps({"question": f"Tom has {a} apples and gets {b} more. How many apples?",
                                "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n")
    return path


def main(config: rl.GRPORunConfig) -> dict:
    """Train; a tiny run first writes its GSM8K-format files under its run directory (each split
    whose path is still the `<run_dir>/...` placeholder: a path given with --set is read as given)."""
    data = os.path.join(config.run_dir, "data")
    written = {}
    for split, name, n, seed in (("train", "train.jsonl", 256, 0), ("eval", "test.jsonl", 16, 1)):
        if str(getattr(config.data, split)).startswith("<run_dir>"):
            written[split] = write_gsm8k_rows(os.path.join(data, name), n, seed=seed)
    if written:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, **written))
    return rl.train(config)


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
