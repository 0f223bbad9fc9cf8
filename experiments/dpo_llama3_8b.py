"""DPO of Llama-3.1-8B-Instruct on UltraFeedback (binarized) from local files, on a TPU pod.

    # every worker of the pod runs the same command (tpu/launch.sh), with local copies of data and model:
    rlhf-jax run experiments/dpo_llama3_8b.py \\
        --set data.train=data/ultrafeedback_binarized/train_prefs.jsonl \\
        --set data.eval=data/ultrafeedback_binarized/test_prefs.jsonl \\
        --set data.tokenizer=models/Llama-3.1-8B-Instruct \\
        --set checkpoint.init_from=models/Llama-3.1-8B-Instruct
    rlhf-jax export runs/dpo_llama3_8b out/llama-3.1-8b-dpo

    # check the memory plan for the slice from this machine before booking it (needs libtpu)
    rlhf-jax compile experiments/dpo_llama3_8b.py --topology v5p:4x4x2

    # the same pipeline in minutes on a CPU (tiny Llama-3-shaped model, synthetic pairs, chat template)
    rlhf-jax run experiments/dpo_llama3_8b.py:tiny

Data: UltraFeedback-format JSONL as in `experiments/dpo_qwen2_5_0_5b.py` (conversations with the
prompt as their shared prefix, or TRL's explicit prompt/chosen/rejected messages), rendered with
Llama 3's chat template, prompts kept to 1024 tokens and sequences to 2048; malformed rows are
skipped and reported.

Recipe: sigmoid DPO, beta 0.1, learning rate 5e-7 (10% warm-up, linear decay), 128 pairs per step in
4 micro-batches (one pair per chip in each: 32 chips x 4 = 128), one epoch (about 480 steps),
float32 parameters with bfloat16 compute, every layer rematerialized, FSDP over all chips: the
policy's parameters and Adam moments (16 bytes per parameter, 128 GB) plus the frozen reference (32
GB) are spread over the slice, so 32 v5p chips (95 GB each) hold them with room for activations. It
shows DPO at 8B scale: held-out `eval/rewards/accuracies` above chance and growing
`eval/rewards/margins`. CI checks this config with `jax.eval_shape` at full size (8.03 B parameters)
and an ahead-of-time compile at reduced depth on a CPU mesh (tests/test_experiments.py).
"""

from __future__ import annotations

from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig, to_dict
from rlhf_jax.data.synthetic import VowelTask
from rlhf_jax.models.presets import get_config as model_preset
from rlhf_jax.optim import OptimizerConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import DPO
from rlhf_jax.train import dpo
from rlhf_jax.train.run_config import DataConfig
from rlhf_jax.train.results import write_json

PRESET = "llama-3.1-8b"
EXPECTED_PARAMS = 8_030_261_248
# Llama-3.1-8B-Instruct's config.json ids (the base preset stops at <|end_of_text|> only): what the run
# checks against the checkpoint's vocabulary and what `rlhf-jax export` writes back into config.json.
INSTRUCT_TOKEN_IDS = dict(bos_token_id=128000, eos_token_id=(128001, 128008, 128009))  # + <|eom_id|>, <|eot_id|>


def get_config(arg: str | None = None) -> dpo.DPOConfig:
    """`None` / "full": the pod run; "tiny": the same pipeline on CPU in about a minute."""
    if arg in (None, "full"):
        return dpo.DPOConfig(
            name="dpo_llama3_8b",
            model=model_preset(PRESET, remat="full", **INSTRUCT_TOKEN_IDS),
            data=DataConfig(train="data/ultrafeedback_binarized/train_prefs.jsonl",
                            eval="data/ultrafeedback_binarized/test_prefs.jsonl",
                            tokenizer="models/Llama-3.1-8B-Instruct", string_format="chat",
                            max_len=2048, max_prompt_len=1024, truncation="keep_end", batch_size=128,
                            on_error="skip"),
            mesh=MeshConfig(data=1, fsdp=-1, tensor=1, strategy="fsdp"),
            optim=OptimizerConfig(name="adamw", learning_rate=5e-7, warmup_steps=48, schedule="linear",
                                  decay_steps=432, weight_decay=0.0, max_grad_norm=1.0),
            algorithm=DPO(loss_type="sigmoid", beta=0.1),
            logits_chunk_size=512,
            sampling=dpo.SampleEvalConfig(num_prompts=0),
            train=TrainConfig(steps=480, eval_every=50, eval_batches=8, micro_batches=4),
            checkpoint=CheckpointConfig(every=100, keep=2, keep_best=1, best_metric="eval/rewards/accuracies",
                                        init_from="models/Llama-3.1-8B-Instruct"),
            logging=LoggingConfig(every=5),
        )
    if arg == "tiny":
        return dpo.DPOConfig(
            name="dpo_llama3_8b_tiny",
            model=model_preset("tiny", model_type="llama", rope_theta=500000.0, remat="full"),
            data=DataConfig(train="synthetic:vowel", eval="synthetic:vowel", num_train=2048, num_eval=64,
                            string_format="chat", max_len=40, batch_size=16, vowel=VowelTask()),
            optim=OptimizerConfig(name="adamw", learning_rate=3e-4, warmup_steps=5, schedule="linear",
                                  decay_steps=55),
            algorithm=DPO(loss_type="sigmoid", beta=0.1),
            sampling=dpo.SampleEvalConfig(num_prompts=32, max_new_tokens=24),
            train=TrainConfig(steps=60, eval_every=30, eval_batches=2, micro_batches=2),
            checkpoint=CheckpointConfig(every=30, keep=1),
            logging=LoggingConfig(every=10),
        )
    raise ValueError(f"dpo_llama3_8b: mode must be 'full' or 'tiny', got {arg!r}")


def main(config: dpo.DPOConfig) -> dict:
    """Train (or resume), then write `results.json` with the final held-out metrics."""
    summary = dpo.train(config)
    if not summary["stopped_by"]:
        write_json(f"{summary['run_dir']}/results.json", {**summary, "config": to_dict(config)})
    return summary


if __name__ == "__main__":
    import sys

    from rlhf_jax.cli import main as cli_main

    sys.exit(cli_main(["run", __file__, *sys.argv[1:]]))
