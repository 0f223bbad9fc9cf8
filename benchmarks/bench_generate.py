"""Benchmark W3 (generation) of ../shared/bench/WORKLOADS.md with `rlhf_jax.sampling.Sampler`.

    python benchmarks/bench_generate.py                           # 1 and 2 devices, f32 + bf16, 2 runs
    python benchmarks/bench_generate.py --devices 2 --dtypes float32 --runs 1

W3: the 7.36 M-parameter Llama (`presets.get_config("w1")`, seed 0), 16 prompts x 64 tokens
(`workloads.gen_prompts()`), exactly 128 new tokens each, temperature 1 over the full vocabulary, no
EOS stop, KV cache on. One warm-up call (its time, compilation included, is the "first call"), then
5 timed calls; the reported figure is the median over `--runs` processes of each run's median call.
A timed call is the user-facing API as a notebook uses it: `sampler.generate(params, prompts_array,
max_new_tokens=128, rng=seed)` on host numpy prompts, plus fetching the completions and log-probs to
host numpy. The text API (`generate_text` with the W3 word-level tokenizer, tokenize + detokenize
included) is timed the same way and reported beside it.

Also printed, per run:
- the parameter hand-off (cast + reshard + layer split on device, `Sampler.load_params`), warm;
- the prefill and the decode loop as separate programs, and the decode step = loop time / 128;
- the FLOP floor of the mean decode step: the loop's matmul FLOPs (`bench_common.matmul_flops` of
  128 single-token steps per row, each attending the slots filled so far) / 128, divided by the
  matmul throughput measured in the same process (a 2048^3 f32 matmul, on one device, and split
  over the devices when there are two);
- the decode step's weight matmuls alone (`_weight_matmuls_step_s`: the same matmuls at the same
  rows per device, in a loop of their own, no attention or sampling), against the step the target
  leaves once this run's prefill is paid: when the matmuls alone take longer, no sampler built on
  XLA:CPU's kernels reaches the target on this host at this time;
- the number of compiled programs after the warm-up and after all calls (it must not grow);
- the whole call's matmul floor (`bench_common.workload_flops`, 29.1 GFLOP, over a BLAS matmul's
  rate measured after the timed calls), with the call and the target (6,400 tok/s) as multiples of it.

`--devices 2` runs with `--xla_force_host_platform_device_count=2` and a data-parallel mesh: each
core runs its own prefill and decode loop on 8 of the 16 rows (`Sampler.per_device_loops`;
`--strategy tp` runs tensor-parallel weights instead, one SPMD loop whose per-layer all-reduces are
slow on XLA:CPU).

`--hf` adds Hugging Face transformers' `generate` (what TRL calls) on the same workload, to
calibrate this machine against PEERS.md, which was measured on another CPU: every row's tokens/s
over HF's, in the same session, is printed against the 6,400 / 1,582 = 4.05 the target implies.

Before each run the script waits until fewer than `--quiet` cores are busy, as WORKLOADS.md's
driver does. The machine load and the CPU used by other processes during the timed window are
printed with every row: numbers from a busy machine are not comparable (WORKLOADS.md re-runs when
foreign CPU > 0.1 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench_common import (causal_pairs, floor_figures, floor_text, hf_llama, matmul_flops, report_result,
                          run_worker, timed_calls, wait_until_quiet, wordlevel_tokenizer, workload_flops, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(REPO), "shared", "bench")
TARGET_TOKENS_PER_S = 6400   # issue 6's target on this machine
PEER_HF_TOKENS_PER_S = 1582  # TRL's generate (HF transformers) on PEERS.md's machine


def _matmul_gflops(jax, jnp, mesh) -> float:
    """f32 GFLOP/s of a 2048^3 matmul, rows split over all of `mesh`'s devices when given (median of 5)."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.full((n, n), 1e-3, jnp.float32)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        split = tuple(name for name in mesh.axis_names if mesh.shape[name] > 1)
        a = jax.device_put(a, NamedSharding(mesh, PartitionSpec(split)))
        b = jax.device_put(b, NamedSharding(mesh, PartitionSpec()))
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, b))
    seconds = statistics.median(timed_calls(lambda: jax.block_until_ready(mm(a, b)), 5))
    return 2 * n**3 / seconds / 1e9


def _weight_matmuls_step_s(jax, jnp, config, rows: int, devices, steps: int) -> float:
    """Seconds per decode step of the step's weight matmuls alone, on `rows` rows per device (median of 5).

    Every decode step multiplies its rows by each layer's q, k, v, o, gate, up and down weights and
    by the LM head. This loop does exactly those matmuls (plus RMS norms, SiLU and residual adds, so
    each depends on the last) for `steps` steps, one loop per device at once, as the sampler's
    per-device loops run: no attention, no KV cache, no sampling. It is what XLA:CPU's matmul kernels
    allow a decode step at these shapes on this host now, before any of the sampler's own work.
    """
    import numpy as np

    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    rng = np.random.default_rng(0)
    host = {"layers": [[rng.normal(0, 0.02, s).astype(np.float32) for s in shapes] for _ in range(config.num_layers)],
            "head": rng.normal(0, 0.02, (d, v)).astype(np.float32), "x": rng.normal(0, 1, (rows, d)).astype(np.float32)}

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    @jax.jit
    def loop(tree):
        def step(_, x):
            for wq, wk, wv, wo, wg, wu, wd in tree["layers"]:
                h = rms(x)
                x = x + (h @ wq + jnp.pad(h @ wk + h @ wv, ((0, 0), (0, q - kv)))) @ wo
                h = rms(x)
                x = x + (jax.nn.silu(h @ wg) * (h @ wu)) @ wd
            return x + jnp.max(rms(x) @ tree["head"], axis=-1, keepdims=True) * 1e-6
        return jax.lax.fori_loop(0, steps, step, tree["x"])

    trees = [jax.device_put(host, device) for device in devices]
    run = lambda: jax.block_until_ready([loop(t) for t in trees])  # noqa: E731  (the devices run at once)
    run()
    return statistics.median(timed_calls(run, 5)) / steps


def _call_floor(W, call_s: float) -> dict:
    """The whole call's matmul floor (`bench_common.workload_flops`), with the call and the target against it."""
    spec = W.W3
    return floor_figures(workload_flops(W, "w3"), call_s, spec["num_prompts"] * spec["new_tokens"] / TARGET_TOKENS_PER_S)


def _hf_worker(args) -> dict:
    """The same workload with Hugging Face transformers' `generate` (torch, its default 2 threads).

    TRL's trainers call this `generate`; it calibrates this machine against PEERS.md, which was
    measured on another CPU.
    """
    sys.path.insert(0, args.bench_dir)
    import torch
    import workloads as W

    spec = W.W3
    model = hf_llama(W, eos_token_id=W.MODEL["vocab_size"]).eval()   # EOS can never be sampled
    prompts = torch.tensor(W.gen_prompts())
    kwargs = dict(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], do_sample=True,
                  temperature=spec["temperature"], top_k=0, top_p=1.0, attention_mask=torch.ones_like(prompts),
                  pad_token_id=W.PAD_ID)

    def call():
        with torch.no_grad():
            return model.generate(prompts, **kwargs).numpy()

    first_s = timed_calls(call, 1)[0]
    watch = W.CpuWatch()
    times = timed_calls(call, spec["timed_calls"])
    median = statistics.median(times)
    rows, new = spec["num_prompts"], spec["new_tokens"]
    return {"workload": "w3", "impl": "hf_generate", "dtype": "float32", "devices": 1, "median_s": median,
            "new_tokens_per_s": rows * new / median, "times_s": [round(t, 4) for t in times],
            "first_call_s": first_s, "threads": torch.get_num_threads(), **watch.result(),
            **_call_floor(W, median),
            "peak_rss_mib": round(W.peak_rss_mib(), 1), "loadavg": open("/proc/loadavg").read().split()[:3]}


def _worker(args) -> dict:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, args.bench_dir)
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import workloads as W

    from rlhf_jax import host_memory  # noqa: PLC0415

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    from rlhf_jax import sharding as shd
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.sampling import Categorical, Sampler, SamplingConfig

    spec = W.W3
    rows, new, prompt_len = spec["num_prompts"], spec["new_tokens"], spec["prompt_len"]
    t_build = time.perf_counter()
    lm = CausalLM(get_config("w1"))
    params = jax.jit(lm.init)(jax.random.key(W.MODEL_INIT_SEED))
    axis = "tensor" if args.strategy == "tp" else "data"
    mesh = shd.make_mesh({axis: args.devices}) if args.devices > 1 else None
    sampler = Sampler(lm, max_len=prompt_len + new, mesh=mesh, strategy=args.strategy,
                      dtype=None if args.dtype == "float32" else args.dtype)
    prompts = W.gen_prompts()
    config = SamplingConfig(max_new_tokens=new, method=Categorical(temperature=spec["temperature"]))
    build_s = time.perf_counter() - t_build

    sampler.load_params(params)                      # compiles the hand-off
    handoff_first_s = sampler.stats.handoff_seconds
    sp = sampler.load_params(params)
    handoff_s = sampler.stats.handoff_seconds

    seeds = iter(range(spec["sample_seed"], spec["sample_seed"] + 1000))

    def call():
        out = sampler.generate(sp, prompts, config, rng=next(seeds))
        return np.asarray(out.completion_tokens), np.asarray(out.logprobs)

    first_s = timed_calls(call, 1)[0]
    compiled_after_warmup = sampler.num_compiled()
    watch = W.CpuWatch()
    times = timed_calls(call, spec["timed_calls"])
    cpu = watch.result()
    tokens, logps = call()
    assert tokens.shape == (rows, new) and np.isfinite(logps).all() and (logps < 0).all()

    tok = wordlevel_tokenizer(W, bos_token="<bos>")
    texts = [W.ids_to_text(p) for p in prompts]

    def text_call():
        return sampler.generate_text(sp, texts, config, tokenizer=tok, rng=next(seeds), eos_id=None)[0]

    text_first_s = timed_calls(text_call, 1)[0]
    text_times = timed_calls(text_call, spec["timed_calls"])
    compiled_after_all = sampler.num_compiled()

    # The two programs of a call, timed separately (warm).
    prompt_tokens, lengths, _ = sampler._prepare_prompts(prompts, None, new)
    if mesh is not None:
        prompt_tokens, lengths = jax.device_put((prompt_tokens, lengths), shd.batch_sharding(mesh, args.strategy))
    key = jax.random.key(0)

    def run_prefill():
        return jax.block_until_ready(
            sampler._prefill(sp.tree, prompt_tokens, lengths, key, max_new_tokens=new, num_samples=1)
        )

    def run_decode(state):
        return jax.block_until_ready(sampler._decode(sp.tree, state, prompt_tokens, lengths, method=config.method,
                                                     stop_ids=(), num_samples=1))

    prefill_s, decode_s = [], []
    for _ in range(5):
        start = time.perf_counter()
        state = run_prefill()
        mid = time.perf_counter()
        run_decode(state)
        prefill_s.append(mid - start)
        decode_s.append(time.perf_counter() - mid)
    step_s = statistics.median(decode_s) / new
    devices = list(mesh.devices.flat) if mesh is not None and sampler.per_device_loops else [jax.devices()[0]]
    matmuls_step_s = _weight_matmuls_step_s(jax, jnp, lm.config, rows // len(devices), devices, new)
    # The decode step the target leaves: the target call time less this run's prefill, over 128 steps.
    budget_step_s = (rows * new / TARGET_TOKENS_PER_S - statistics.median(prefill_s)) / new

    # The loop feeds each row's last prompt token, then its first 127 sampled tokens: step t attends
    # the prompt_len + t slots filled so far. The mean step is what step_s measures.
    loop_pairs = rows * causal_pairs(prompt_len + new - 1, start=prompt_len - 1)
    step_flops = matmul_flops(lm.config, tokens=rows * new, head_positions=rows * new, attended_pairs=loop_pairs) / new
    gflops_1 = _matmul_gflops(jax, jnp, None)
    gflops_all = _matmul_gflops(jax, jnp, mesh) if mesh is not None else gflops_1
    floor_s = step_flops / (gflops_all * 1e9)
    median = statistics.median(times)
    return {
        "workload": "w3", "impl": f"rlhf_jax_{args.strategy}" if args.devices > 1 else "rlhf_jax_1dev",
        "dtype": args.dtype,
        "devices": jax.device_count(), "median_s": median, "new_tokens_per_s": rows * new / median,
        "times_s": [round(t, 4) for t in times], "first_call_s": first_s, "build_s": build_s,
        "text_median_s": statistics.median(text_times), "text_first_call_s": text_first_s,
        "handoff_first_s": handoff_first_s, "handoff_s": handoff_s,
        "prefill_s": statistics.median(prefill_s), "decode_loop_s": statistics.median(decode_s),
        "decode_step_ms": step_s * 1e3, "decode_step_gflop": step_flops / 1e9,
        "matmul_gflops_1dev": gflops_1, "matmul_gflops_all": gflops_all, "decode_floor_ms": floor_s * 1e3,
        "decode_vs_floor": step_s / floor_s,
        "weight_matmuls_step_ms": matmuls_step_s * 1e3, "target_step_budget_ms": budget_step_s * 1e3,
        "compiled_after_warmup": compiled_after_warmup, "compiled_after_all": compiled_after_all,
        "peak_rss_mib": round(W.peak_rss_mib(), 1), **cpu, "loadavg": open("/proc/loadavg").read().split()[:3],
        **_call_floor(W, median),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="2,1", help="comma list of host device counts to run")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--strategy", default="dp", choices=("dp", "tp"),
                   help="sampler strategy with 2 devices: data-parallel rows or tensor-parallel weights")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--quiet", type=float, default=0.15,
                   help="before each run, wait until fewer than this many cores are busy (WORKLOADS.md rule)")
    p.add_argument("--max-wait", type=float, default=1800.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--hf", action="store_true",
                   help="also time Hugging Face transformers' generate (torch) on this machine, for calibration")
    p.add_argument("--bench-dir", default=os.environ.get("RLHF_JAX_BENCH_DIR", DEFAULT_BENCH_DIR),
                   help="folder holding workloads.py")
    p.add_argument("--json", default=os.path.join(REPO, "results", "bench_generate.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.devices = int(args.devices)
        result = _hf_worker(args) if args.dtype == "hf" else _worker(args)
        report_result(result)
        return 0
    if not os.path.exists(os.path.join(args.bench_dir, "workloads.py")):
        print(f"workloads.py not found in {args.bench_dir}; pass --bench-dir", file=sys.stderr)
        return 2
    results = []
    configs = [(dtype, devices) for dtype in args.dtypes.split(",") for devices in args.devices.split(",")]
    if args.hf:
        configs.append(("hf", "1"))
    for dtype, devices in configs:
        runs = []
        for _ in range(args.runs):
            busy = wait_until_quiet(args.quiet, args.max_wait)
            if busy >= args.quiet:
                print(f"warning: machine still busy ({busy:.2f} cores) after {args.max_wait:.0f} s", file=sys.stderr)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--devices", devices, "--dtype", dtype,
                   "--strategy", args.strategy, "--bench-dir", args.bench_dir]
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            runs.append(run_worker(cmd, env))
        row = dict(runs[0])
        for key in ("median_s", "text_median_s", "decode_step_ms", "prefill_s", "handoff_s", "first_call_s",
                    "decode_vs_floor", "decode_floor_ms", "floor_s", "step_over_floor", "target_over_floor",
                    "weight_matmuls_step_ms", "target_step_budget_ms"):
            if key in row:
                row[key] = statistics.median(r[key] for r in runs)
        row["runs_median_s"] = [round(r["median_s"], 4) for r in runs]
        row["new_tokens_per_s"] = 16 * 128 / row["median_s"]
        row["foreign_cpu_cores"] = max(r["foreign_cpu_cores"] for r in runs)
        results.append(row)
        if dtype == "hf":
            print(f"w3 float32  hf_generate    {row['median_s']:.3f} s/call = {row['new_tokens_per_s']:,.0f} new "
                  f"tok/s (runs {row['runs_median_s']}); first call {row['first_call_s']:.1f} s; load "
                  f"{row['loadavg'][0]}, foreign cpu {row['foreign_cpu_cores']:.2f}; {floor_text(row, 'call')}", flush=True)
            continue
        print(
            f"w3 {dtype:8s} {row['impl']:14s} {row['median_s']:.3f} s/call = "
            f"{row['new_tokens_per_s']:,.0f} new tok/s "
            f"(runs {row['runs_median_s']}); text API {row['text_median_s']:.3f} s; first call "
            f"{row['first_call_s']:.1f} s; prefill {row['prefill_s'] * 1e3:.1f} ms; decode step "
            f"{row['decode_step_ms']:.3f} ms = {row['decode_vs_floor']:.2f} x floor "
            f"{row['decode_floor_ms']:.3f} ms "
            f"({row['matmul_gflops_all']:.0f} GFLOP/s matmul), its weight matmuls alone "
            f"{row['weight_matmuls_step_ms']:.3f} ms, the target's step budget {row['target_step_budget_ms']:.3f} ms; "
            f"hand-off {row['handoff_s'] * 1e3:.1f} ms; "
            f"compiled {row['compiled_after_warmup']} -> {row['compiled_after_all']}; rss "
            f"{row['peak_rss_mib']:.0f} MiB; load {row['loadavg'][0]}, foreign cpu {row['foreign_cpu_cores']:.2f}; "
            f"{floor_text(row, 'call')}",
            flush=True,
        )
    hf = next((r for r in results if r["impl"] == "hf_generate"), None)
    if hf is not None:
        needed = TARGET_TOKENS_PER_S / PEER_HF_TOKENS_PER_S
        for row in results:
            if row is not hf:
                row["over_hf_generate"] = row["new_tokens_per_s"] / hf["new_tokens_per_s"]
                print(f"same session: {row['impl']} {row['dtype']} is {row['over_hf_generate']:.2f}x HF generate's "
                      f"tokens/s; the target, {TARGET_TOKENS_PER_S:,} tok/s against TRL's {PEER_HF_TOKENS_PER_S:,} on "
                      f"PEERS.md's machine, is {needed:.2f}x: {'met' if row['over_hf_generate'] >= needed else 'not met'}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
