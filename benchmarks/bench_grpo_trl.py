"""W4 (GRPO step) with TRL's `GRPOTrainer` on this machine: the same-session baseline for `bench_grpo.py`.

    pip install trl==1.16.0        # in a separate venv; torch 2.13.0 (CPU) as for the tests
    python benchmarks/bench_grpo_trl.py --runs 2

PEERS.md's TRL figure (2.932 s/step) was measured on another CPU (an AVX-512 Xeon) than the one this
repository's benchmarks may run on, so the issue's target (<= 1.3 s, 2.25x faster than TRL) is only
checkable here as a ratio against TRL run on the same host in the same session. `bench_grpo.py
--trl` runs this script's worker right after its own runs and prints that ratio.

The workload, as WORKLOADS.md defines it and TRL's API can express it: `LlamaForCausalLM` with the
workloads' shapes (torch seed 0, `bench_common.hf_llama`), the word-level tokenizer, 13 steps of
4 prompts x 8 generations of exactly 64 new tokens (EOS suppressed with `min_new_tokens`), temperature
1 over the full vocabulary, reward `even_fraction` on the completion ids, `loss_type="grpo"`,
beta 0.04, epsilon 0.2, one iteration and one optimizer step per generation batch (32 completions),
AdamW lr 1e-6 with gradient clipping 1.0, float32 on the CPU with torch's default 2 threads, no
gradient checkpointing (TRL's GRPO turns it on by default; off is faster, so the baseline is the
harder one to beat). The
figure is the median, over steps 4..13, of the wall time from one step's end to the next
(`on_step_end` callbacks), and the median of that over `--runs` processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench_common import (floor_figures, hf_llama, report_result, run_worker, wait_until_quiet, wordlevel_tokenizer,
                          workload_flops)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "bench")
STEPS, WARMUP = 13, 3
PEER_TRL_S = 2.932   # PEERS.md, on its machine


def run_once(bench_dir: str) -> dict:
    """One TRL W4 run in this process; returns the step times and the machine's matmul floor."""
    sys.path.insert(0, bench_dir)
    import torch
    import workloads as W
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    w4 = W.W4
    group = w4["num_generations"]
    completions = w4["num_prompts"] * group
    prompts = [W.ids_to_text(row) for row in W.grpo_prompts(STEPS * w4["num_prompts"])]

    def even_fraction(completion_ids, **_):
        return [W.even_fraction_reward(ids) for ids in completion_ids]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.cpu = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends, self.cpu = [time.perf_counter()], [time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")   # TRL builds its reference model from the policy's path
        hf_llama(W).save_pretrained(model_dir)
        config = GRPOConfig(
            output_dir=os.path.join(tmp, "run"), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            logging_steps=1, max_steps=STEPS, per_device_train_batch_size=completions, gradient_accumulation_steps=1,
            steps_per_generation=1, num_generations=group, max_completion_length=w4["new_tokens"],
            generation_kwargs={"min_new_tokens": w4["new_tokens"]}, temperature=w4["temperature"],
            top_k=w4["top_k"], top_p=w4["top_p"], loss_type="grpo", beta=w4["beta"], epsilon=0.2,
            num_iterations=w4["num_iterations"], learning_rate=w4["lr"], lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=w4["max_grad_norm"], weight_decay=0.0, shuffle_dataset=False,
            seed=W.MODEL_INIT_SEED, dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=False,   # TRL's GRPO default is on; off is TRL's faster setting here
        )
        trainer = GRPOTrainer(model=model_dir, reward_funcs=even_fraction, args=config,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=wordlevel_tokenizer(W), callbacks=[clock])
        watch = W.CpuWatch()
        trainer.train()
        foreign = watch.result()
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    if len(steps) != STEPS:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {STEPS}")
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    if any(abs(n - w4["new_tokens"]) > 1e-6 for n in lengths):
        raise RuntimeError(f"TRL's completions were not all {w4['new_tokens']} tokens long: {lengths}")
    step_s = statistics.median(steps[WARMUP:])
    cpu_s = (clock.cpu[-1] - clock.cpu[WARMUP]) / (STEPS - WARMUP)   # CPU per timed step (all threads)
    return {"impl": "trl", "step_s": step_s, "first_step_s": steps[0], "steps_s": [round(s, 4) for s in steps],
            "completion_tokens_per_s": completions * w4["new_tokens"] / step_s, "threads": torch.get_num_threads(),
            "peak_rss_mib": round(W.peak_rss_mib(), 1), **foreign, **floor_figures(workload_flops(W, "w4"), step_s, cpu_s=cpu_s)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--bench-dir", default=DEFAULT_BENCH_DIR, help="directory of workloads.py")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        report_result(run_once(args.bench_dir))
        return
    rows = []
    for _ in range(args.runs):
        wait_until_quiet(0.15)   # WORKLOADS.md: each run starts on a quiet machine
        rows.append(run_worker([sys.executable, os.path.abspath(__file__), "--child", "--bench-dir", args.bench_dir]))
    for k, r in enumerate(rows):
        print(f"trl run {k}: {r['step_s']:.3f} s/step, first step {r['first_step_s']:.1f} s, foreign CPU "
              f"{r['foreign_cpu_cores']} cores, {r['step_over_floor']:.2f}x its matmul floor "
              f"({r['peak_matmul_gflops']:.0f} GFLOP/s)")
    median = statistics.median(r["step_s"] for r in rows)
    print(f"TRL W4 here: {median:.3f} s/step (PEERS.md's machine: {PEER_TRL_S}); this host runs TRL "
          f"{median / PEER_TRL_S:.2f}x as long")


if __name__ == "__main__":
    main()
