"""Benchmark: W1 (SFT step) with LoRA (rank 16 on q, k, v, o, gate, up, down) against full fine-tuning.

    python benchmarks/bench_lora.py                 # 3 interleaved runs of each, float32
    python benchmarks/bench_lora.py --runs 5 --dtypes float32,bfloat16

W1 exactly as `benchmarks/bench_train.py` runs it (../shared/bench/WORKLOADS.md: the 7.36 M-parameter
Llama, 8 x 256 tokens of SFT, AdamW with clipping, 13 steps of which 3 warm up; `make_sft_step`
data parallel over 2 host devices), once training every weight and once training LoRA adapters
(Hu et al. 2021; alpha 32) on the frozen base. Each run is its own process, full and LoRA
alternating in the same sitting (`--runs` pairs), so both see the same machine. Reported per mode:
the median step time (median over runs of the per-run median over steps 4-13) and the optimizer
state's bytes (AdamW's moments: of every weight, or of the adapters alone), and the ratios
LoRA / full. The acceptance: optimizer-state bytes <= 5% of full fine-tuning's.

Why the step is not 3x faster: LoRA removes the weight gradients `xᵀ·dy` of the frozen kernels
(a third of a full step's matmul FLOPs) and AdamW's work on 96% of the parameters, but keeps the
forward, the input gradients `dy·Wᵀ` through every layer, and the LM head's full cost (W1's
vocabulary of 8192 makes the head 40% of the model's FLOPs), and adds the rank-16 matmuls.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

from bench_common import report_result, run_worker, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(REPO), "shared", "bench")
RANK = 16


def _worker(args) -> dict:
    """One W1 run (`args.mode` full or lora) in this process; returns the result row."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, args.bench_dir)
    sys.path.insert(0, REPO)
    import jax
    import workloads as W

    from rlhf_jax import host_memory  # noqa: PLC0415

    host_memory.configure_from_env()   # before JAX runs anything
    from bench_train import _batches, _measure  # noqa: PLC0415 -- W1's data and timing, shared

    from rlhf_jax import sharding as sh
    from rlhf_jax.models import CausalLM, LoraConfig, LoraLM
    from rlhf_jax.models.lora import LAYER_TARGETS
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.state import create_train_state
    from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step

    spec = W.W1
    lm = CausalLM(get_config("w1", param_dtype=args.dtype, dtype=args.dtype))
    if args.mode == "lora":
        lm = LoraLM(lm, LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=LAYER_TARGETS))
    opt_config = OptimizerConfig(name="adamw", learning_rate=spec["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                 max_grad_norm=spec["max_grad_norm"])
    tx = make_optimizer(opt_config)
    bench_args = argparse.Namespace(workload="w1", impl=f"rlhf_jax_{args.mode}", dtype=args.dtype)
    batch_at = _batches(bench_args, W, spec)
    t_build = time.perf_counter()
    mesh = sh.make_mesh({"data": jax.device_count()})
    state = create_train_state(lm.init, tx, rng=W.MODEL_INIT_SEED, logical_axes=lm.logical_axes, mesh=mesh,
                               strategy="dp")
    step = jit_model_step(make_sft_step(lm, opt_config), lm, opt_config, batch_keys=SFT_KEYS, mesh=mesh,
                          strategy="dp")
    holder = [state]

    def run_step(batch):
        holder[0], metrics = step(holder[0], batch)
        host = jax.device_get(metrics)  # per-step logging, as a trainer does
        jax.block_until_ready(holder[0])
        return float(host["loss"])

    row = _measure(bench_args, W, spec, run_step, batch_at, time.perf_counter() - t_build, devices=jax.device_count())
    optimizer_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.opt_state)
                          if getattr(x, "ndim", 0) > 0)
    trainable = lm.num_trainable_params() if args.mode == "lora" else lm.num_params()
    return {**row, "mode": args.mode, "optimizer_state_bytes": optimizer_bytes, "trainable_params": trainable}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved full / LoRA process pairs")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--bench-dir", default=DEFAULT_BENCH_DIR, help="where WORKLOADS.md's workloads.py lives")
    parser.add_argument("--json", default=os.path.join(REPO, "runs", "bench", "lora_w1.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("full", "lora"), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        report_result(_worker(args))
        return 0
    summary = []
    for dtype in args.dtypes.split(","):
        rows: dict[str, list[dict]] = {"full": [], "lora": []}
        for run in range(args.runs):
            for mode in ("full", "lora"):
                row = run_worker([sys.executable, __file__, "--worker", "--mode", mode, "--dtype", dtype,
                                  "--bench-dir", args.bench_dir])
                rows[mode].append(row)
                print(f"[{dtype} run {run + 1}/{args.runs}] {mode:4s}: median step {row['median_s'] * 1e3:7.1f} ms, "
                      f"cpu {row['cpu_s'] * 1e3:7.1f} ms, optimizer state {row['optimizer_state_bytes'] / 2**20:6.2f} "
                      f"MiB, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}", flush=True)
        med = {m: statistics.median(r["median_s"] for r in rows[m]) for m in rows}
        cpu = {m: statistics.median(r["cpu_s"] for r in rows[m]) for m in rows}
        opt = {m: rows[m][0]["optimizer_state_bytes"] for m in rows}
        result = {"dtype": dtype, "runs": args.runs, "rank": RANK, "median_step_s": med, "median_cpu_s": cpu,
                  "step_time_ratio": med["lora"] / med["full"], "cpu_time_ratio": cpu["lora"] / cpu["full"],
                  "optimizer_state_bytes": opt, "optimizer_state_ratio": opt["lora"] / opt["full"],
                  "trainable_params": {m: rows[m][0]["trainable_params"] for m in rows}, "rows": rows}
        summary.append(result)
        print(f"W1 {dtype}: full {med['full'] * 1e3:.1f} ms, LoRA r={RANK} {med['lora'] * 1e3:.1f} ms per step "
              f"(LoRA / full = {result['step_time_ratio']:.3f}; CPU time {result['cpu_time_ratio']:.3f}); "
              f"optimizer state {opt['full'] / 2**20:.2f} -> {opt['lora'] / 2**20:.2f} MiB "
              f"({100 * result['optimizer_state_ratio']:.2f}% of full, acceptance <= 5%)")
    write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
