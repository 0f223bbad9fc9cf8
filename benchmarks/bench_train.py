"""Benchmark: W1 (SFT) and W2 (DPO) step time of rlhf_jax against a hand-written jax + optax step.

    python benchmarks/bench_train.py                       # W1 + W2, f32 + bf16, 2 runs each
    python benchmarks/bench_train.py --workloads w1 --dtypes float32 --runs 1

Workloads are exactly those of ../shared/bench/WORKLOADS.md (data from its `workloads.py`): the
7.36 M-parameter Llama, W1 = 8 x 256 tokens of SFT, W2 = 8 DPO pairs (64 + 192 tokens) with a
reference forward every step, AdamW (clip 1.0), 13 steps of which the first 3 are warm-up.

Each (workload, implementation, dtype) runs in its own process, `--runs` times; a step's time is
measured from the previous step's completion to this step's completion (data slicing, transfer,
forward, backward, optimizer and fetching the step's metrics to the host, as a trainer's per-step
logging does). The reported value is the median over runs of the per-run median over steps 4-13.
Implementations:

- `plain`: a hand-written `jax.jit` step (same model forward, optax AdamW + clipping, full logits,
  `optax.softmax_cross_entropy_with_integer_labels` / a direct DPO loss) on one device.
- `rlhf_jax`: `make_sft_step` / `make_dpo_step` data parallel over 2 host devices
  (`--xla_force_host_platform_device_count=2`, so XLA:CPU runs one program per core). W2's pairs
  share their 64-token prompt, so the step runs it once per pair (`shared_prefix_len=64`;
  `--no-shared-prefix` runs each row whole, as before issue 23); the LM head runs on the 192
  completion positions only (the DPO step's default).
- `rlhf_jax_1dev`: the same steps on one device (the framework's overhead against `plain`).
- `torch` (opt-in: `--impls ...,torch`): transformers' LlamaForCausalLM with torch AdamW, what TRL
  runs; PEERS.md was measured on another CPU, so `rlhf_jax / torch` here against `0.45 / TRL` there
  is the cross-machine comparison.

bf16 rows use bf16 parameters, compute and optimizer state ("pure bf16", as WORKLOADS.md says).
The machine load (1-minute load average, and CPU used by other processes during the timed window)
is printed with every row: wall times taken on a busy machine are not comparable. `cpu` is the
process's CPU time per step (all its threads), less sensitive to other processes: on a quiet machine
a 2-device run's wall time is about half its CPU time.

Every row also prints its matmul floor (`bench_common.workload_flops` / `floor_figures`): the
fewest matmul FLOPs the step needs (W1 67.8, W2 163.8 GFLOP) over the f32 matmul rate a 2048^3
BLAS matmul reaches in the same process right after the timed steps, and where the step and the
target (W1 0.45 s, W2 1.0 s) sit as multiples of it. A target near 1x floor asks every FLOP of the
step, the small matmuls included, to run at the large-matmul rate with nothing else costing time.
`cpu_over_floor` is the same ratio in CPU time (the step's CPU seconds over the BLAS probe's for
the same FLOPs): on a host shared with other processes it moves much less than the wall-time ratio.
Figures taken: `benchmarks/CPU.md`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from bench_common import floor_figures, floor_text, hf_llama, report_result, run_worker, workload_flops, write_json

TARGET_S = {"w1": 0.45, "w2": 1.0}   # issue 5's targets on this machine
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(REPO), "shared", "bench")


def _batches(args, W, spec):
    """`batch_at(step) -> dict of NumPy arrays`: the workload's rows for a step (WORKLOADS.md)."""
    steps = spec["warmup_steps"] + spec["timed_steps"]
    if args.workload == "w1":
        data = W.sft_data(steps * spec["batch"]).astype(np.int32)

        def batch_at(s):
            tokens = data[s * spec["batch"]:(s + 1) * spec["batch"]]
            return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}
    else:
        raw = W.dpo_data(steps * spec["batch_pairs"])
        n_prompt, n_completion = spec["prompt_len"], spec["completion_len"]
        eos = np.full((len(raw["prompt"]), 1), W.EOS_ID, np.int64)
        seqs = {k: np.concatenate([raw["prompt"], raw[k][:, :n_completion - 1], eos], 1).astype(np.int32)
                for k in ("chosen", "rejected")}
        mask = np.zeros_like(seqs["chosen"])
        mask[:, n_prompt:] = 1

        def batch_at(s):
            rows = slice(s * spec["batch_pairs"], (s + 1) * spec["batch_pairs"])
            return {"chosen_tokens": seqs["chosen"][rows], "chosen_loss_mask": mask[rows],
                    "rejected_tokens": seqs["rejected"][rows], "rejected_loss_mask": mask[rows]}

    return batch_at


def _worker(args) -> dict:
    """One (workload, impl, dtype) run in this process; returns the result dict."""
    devices = 2 if args.impl == "rlhf_jax" else 1
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, args.bench_dir)
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    import optax
    import workloads as W

    from rlhf_jax import host_memory  # noqa: PLC0415

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    from rlhf_jax import sharding as sh
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.optim import OptimizerConfig, make_optimizer
    from rlhf_jax.state import create_train_state
    from rlhf_jax.steps import DPO, SFT_KEYS, dpo_batch_keys, jit_model_step, make_dpo_step, make_sft_step

    spec = W.W1 if args.workload == "w1" else W.W2
    config = get_config("w1", param_dtype=args.dtype, dtype=args.dtype)
    lm = CausalLM(config)
    opt_config = OptimizerConfig(name="adamw", learning_rate=spec["lr"], b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=0.0, max_grad_norm=spec["max_grad_norm"])
    tx = make_optimizer(opt_config)

    batch_at = _batches(args, W, spec)

    t_build = time.perf_counter()
    if args.impl == "plain":
        params = jax.jit(lm.init)(jax.random.key(W.MODEL_INIT_SEED))
        ref = jax.tree.map(jnp.copy, params) if args.workload == "w2" else None
        opt_state = jax.jit(tx.init)(params)

        if args.workload == "w1":
            def loss_fn(p, batch):
                logits = lm.forward(p, batch["tokens"]).logits[:, :-1]
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()
        else:
            def seq_logps(p, tokens, mask):
                logits = lm.forward(p, tokens).logits[:, :-1]
                logp = jax.nn.log_softmax(logits, axis=-1)
                tok = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
                return jnp.sum(tok * mask[:, 1:], axis=-1)

            def both(p, batch):
                tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
                mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
                out = seq_logps(p, tokens, mask)
                return out[:spec["batch_pairs"]], out[spec["batch_pairs"]:]

            def loss_fn(p, batch, r):
                pc, pr = both(p, batch)
                rc, rr = both(jax.lax.stop_gradient(r), batch)
                return -jax.nn.log_sigmoid(spec["beta"] * ((pc - rc) - (pr - rr))).mean()

        @jax.jit
        def plain_step(p, o, batch, *frozen):
            loss, grads = jax.value_and_grad(loss_fn)(p, batch, *frozen)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, {"loss": loss, "grad_norm": optax.global_norm(grads)}

        carry = [params, opt_state]
        frozen = (ref,) if ref is not None else ()

        def run_step(batch):
            carry[0], carry[1], metrics = plain_step(carry[0], carry[1], batch, *frozen)
            return _fetch(carry, metrics)
    else:
        mesh = sh.make_mesh({"data": jax.device_count()})
        strategy = "dp"
        state = create_train_state(lm.init, tx, rng=W.MODEL_INIT_SEED, logical_axes=lm.logical_axes, mesh=mesh,
                                   strategy=strategy)
        jit = dict(mesh=mesh, strategy=strategy)
        if args.workload == "w1":
            step = jit_model_step(make_sft_step(lm, opt_config, logits_chunk_size=args.chunk), lm, opt_config,
                                  batch_keys=SFT_KEYS, **jit)
            frozen = ()
        else:
            objective = DPO(beta=spec["beta"])
            # The W2 pairs share their 64-token prompt: it runs once per pair (prefix sharing).
            shared = {} if args.no_shared_prefix else {"shared_prefix_len": spec["prompt_len"]}
            step = jit_model_step(make_dpo_step(lm, opt_config, objective=objective, logits_chunk_size=args.chunk,
                                                **shared),
                                  lm, opt_config, batch_keys=dpo_batch_keys(objective), frozen_params=1, **jit)
            frozen = (jax.tree.map(jnp.copy, state.params),)
        holder = [state]

        def run_step(batch):
            holder[0], metrics = step(holder[0], batch, *frozen)
            return _fetch(holder[0], metrics)
    build_seconds = time.perf_counter() - t_build

    def _fetch(state, metrics) -> float:
        host = jax.device_get(metrics)  # per-step logging
        jax.block_until_ready(state)
        return float(host["loss"])

    return _measure(args, W, spec, run_step, batch_at, build_seconds, devices=jax.device_count())


def _measure(args, W, spec, run_step, batch_at, build_seconds: float, *, devices: int) -> dict:
    """Time `run_step(batch) -> loss (a host float)` over the workload's steps; the result row."""
    steps = spec["warmup_steps"] + spec["timed_steps"]
    times, cpu_times, losses = [], [], []
    watch = None
    last, last_cpu = time.perf_counter(), time.process_time()
    for s in range(steps):
        if s == spec["warmup_steps"]:
            watch = W.CpuWatch()
            last, last_cpu = time.perf_counter(), time.process_time()
        losses.append(run_step(batch_at(s)))
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(now_cpu - last_cpu)
        last, last_cpu = now, now_cpu
    timed = times[spec["warmup_steps"]:]
    med = statistics.median(timed)
    foreign = watch.result()   # the timed steps only, not the floor's matmuls below
    units = spec["batch"] * spec["seq_len"] if args.workload == "w1" else spec["batch_pairs"]
    cpu_s = statistics.median(cpu_times[spec["warmup_steps"]:])
    return {
        "workload": args.workload, "impl": args.impl, "dtype": args.dtype, "devices": devices,
        "median_s": med, "throughput": units / med,
        "cpu_s": cpu_s,
        "throughput_unit": "tokens/s" if args.workload == "w1" else "pairs/s",
        "first_step_s": times[0], "build_s": build_seconds, "loss_first": losses[0], "loss_last": losses[-1],
        "peak_rss_mib": round(W.peak_rss_mib(), 1), **foreign,
        "loadavg": open("/proc/loadavg").read().split()[:3],
        **floor_figures(workload_flops(W, args.workload), med, TARGET_S[args.workload], cpu_s=cpu_s),
    }


def _torch_worker(args) -> dict:
    """The workload as TRL runs it: transformers' LlamaForCausalLM, torch AdamW, `clip_grad_norm_`.

    A hand-written torch step (no TRL trainer around it, so slightly faster than TRL) with torch's
    default 2 threads; bf16 = autocast with float32 master weights (TRL's `bf16=True`). It calibrates
    this machine against PEERS.md's TRL column, which was measured on another CPU.
    """
    sys.path.insert(0, args.bench_dir)
    import torch
    import torch.nn.functional as F
    import workloads as W

    spec = W.W1 if args.workload == "w1" else W.W2
    t_build = time.perf_counter()
    model = hf_llama(W).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    batch_at = _batches(args, W, spec)
    if args.workload == "w2":
        reference = hf_llama(W).eval()
        reference.load_state_dict(model.state_dict())

    def sequence_logps(net, tokens, mask):
        logits = net(input_ids=tokens).logits[:, :-1].float()
        logps = torch.gather(F.log_softmax(logits, -1), 2, tokens[:, 1:, None])[..., 0]
        return (logps * mask[:, 1:]).sum(-1)

    def loss_of(batch):
        if args.workload == "w1":
            tokens = torch.from_numpy(batch["tokens"]).long()
            return model(input_ids=tokens, labels=tokens).loss
        tokens = torch.from_numpy(np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])).long()
        mask = torch.from_numpy(np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])).float()
        policy = sequence_logps(model, tokens, mask)
        with torch.no_grad():
            ref = sequence_logps(reference, tokens, mask)
        n = spec["batch_pairs"]
        margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
        return -F.logsigmoid(spec["beta"] * margin).mean()

    def run_step(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
        optimizer.step()
        return float(loss)

    row = _measure(args, W, spec, run_step, batch_at, time.perf_counter() - t_build, devices=1)
    return {**row, "threads": torch.get_num_threads()}


def _summary_row(runs: list[dict]) -> dict:
    """One implementation's row: the median over runs of each run's median step time; printed."""
    row = dict(runs[0])
    row["median_s"] = statistics.median(r["median_s"] for r in runs)
    row["runs_s"] = [round(r["median_s"], 4) for r in runs]
    row["throughput"] = (runs[0]["throughput"] * runs[0]["median_s"]) / row["median_s"]
    row["foreign_cpu_cores"] = max(r["foreign_cpu_cores"] for r in runs)
    row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    row["peak_matmul_gflops"] = statistics.median(r["peak_matmul_gflops"] for r in runs)
    row["floor_s"] = statistics.median(r["floor_s"] for r in runs)
    row["step_over_floor"] = statistics.median(r["step_over_floor"] for r in runs)
    row["target_over_floor"] = statistics.median(r["target_over_floor"] for r in runs)
    row["cpu_over_floor"] = statistics.median(r["cpu_over_floor"] for r in runs)
    row["cpu_matmul_gflops"] = statistics.median(r["cpu_matmul_gflops"] for r in runs)
    print(f"{row['workload']} {row['dtype']:8s} {row['impl']:14s} median {row['median_s']:.3f} s/step "
          f"(runs {row['runs_s']}), cpu {row['cpu_s']:.3f} s/step, {row['throughput']:.0f} "
          f"{row['throughput_unit']}, first step "
          f"{row['first_step_s']:.1f} s, rss {row['peak_rss_mib']:.0f} MiB, load {row['loadavg'][0]}, "
          f"foreign cpu {row['foreign_cpu_cores']:.2f}; {floor_text(row)}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="w1,w2")
    p.add_argument("--impls", default="plain,rlhf_jax,rlhf_jax_1dev")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None, help="logits_chunk_size of the rlhf_jax steps (default: full logits)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="W2: run each pair's prompt twice (make_dpo_step without shared_prefix_len)")
    p.add_argument("--bench-dir", default=os.environ.get("RLHF_JAX_BENCH_DIR", DEFAULT_BENCH_DIR),
                   help="folder holding workloads.py")
    p.add_argument("--json", default=os.path.join(REPO, "results", "bench_train.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        report_result(_torch_worker(args) if args.impl == "torch" else _worker(args))
        return 0
    if not os.path.exists(os.path.join(args.bench_dir, "workloads.py")):
        print(f"workloads.py not found in {args.bench_dir}; pass --bench-dir", file=sys.stderr)
        return 2
    rows = []
    impls = args.impls.split(",")
    for workload in args.workloads.split(","):
        for dtype in args.dtypes.split(","):
            # Runs interleaved across implementations (run 1 of each, then run 2, ...): the machine's
            # speed drifts over minutes, and back-to-back runs of one implementation would inherit it.
            runs = {impl: [] for impl in impls}
            for _ in range(args.runs):
                for impl in impls:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", workload, "--impl", impl,
                           "--dtype", dtype, "--bench-dir", args.bench_dir]
                    if args.chunk:
                        cmd += ["--chunk", str(args.chunk)]
                    if args.no_shared_prefix:
                        cmd += ["--no-shared-prefix"]
                    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
                    runs[impl].append(run_worker(cmd, env))
            for impl in impls:
                rows.append(_summary_row(runs[impl]))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
