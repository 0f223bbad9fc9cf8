"""Benchmark W5 (ragged generation, continuous batching) of ../shared/bench/WORKLOADS.md.

    python benchmarks/bench_w5.py --w5                 # W5 alone: continuous, static, HF generate
    python benchmarks/bench_w5.py --w5 --no-hf         # without HF (torch) generate
    python benchmarks/bench_w5.py --smoke              # tiny model, 12 requests: the script runs

W5: the 7.36 M-parameter Llama (`presets.get_config("w1")`, seed 0), 128 requests of 64 prompt
tokens (`workloads.ragged_prompts()`), each with its own `max_new_tokens` (`ragged_lengths()`: 15,039
new tokens in all), temperature 1 over the full vocabulary, no EOS; at most 16 requests decoding.
All in one process, one after the other, each: 1 warm-up call, then 3 timed calls, median:

- continuous: `Sampler.generate_requests(params, requests, num_slots=16, num_blocks=...)`, requests
  in the given order, a KV block pool of `--pool` x the static cache's 16 x 576 positions (default
  0.5, blocks of `--block-size` 64);
- static: the framework's batched call `Sampler.generate` on the same requests in batches of 16 in
  request order, each batch run to its longest request (its `max_new_tokens`);
- HF: transformers' `LlamaForCausalLM.generate` in the same batches of 16 (`max_new_tokens` = the
  batch's longest; EOS can never be sampled), torch's default threads.

Useful new tokens/s = 15,039 / call time for all three (a static or HF batch's tokens past a
request's own length are not useful). Printed: host round trips per continuous call, decode steps,
preemptions, peak blocks in use, compiled programs before and after the timed calls, and the CPU used
by other processes during the timed windows (a contended host makes the absolute figures
meaningless; the ratios are measured side by side in one process). The last line reads
`W5: continuous <r1>x static, <r2>x HF generate`.
"""

from __future__ import annotations

import argparse
import heapq
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(REPO), "shared", "bench")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--w5", action="store_true", help="run W5 alone (the default workload)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and 12 requests (seconds)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate")
    parser.add_argument("--pool", type=float, default=0.5, help="block pool / static cache positions")
    parser.add_argument("--block-size", type=int, default=64,
                        help="KV block positions (64: the routed pool read handles fewer, larger blocks faster on "
                             "XLA:CPU; on a quiet host W5 ran 2.25x static at 64 and 2.15x at 16)")
    parser.add_argument("--attention", default="pool", choices=("pool", "gather", "dense"),
                        help="ContinuousBatcher attention: paged pool / paged gather / dense slot rows (1.0x memory)")
    parser.add_argument("--timed", type=int, default=3)
    parser.add_argument("--requests", type=int, default=None, help="only the first N requests (a quick look)")
    parser.add_argument("--bench-dir", default=DEFAULT_BENCH_DIR, help="folder holding workloads.py")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, args.bench_dir)
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    from bench_common import timed_calls
    import jax
    import numpy as np
    import workloads as W

    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.sampling import Categorical, Request, Sampler

    spec = W.W5
    slots = spec["slots"]
    if args.smoke:
        from rlhf_jax.testing import tiny_config

        config = tiny_config()
        rng = np.random.default_rng(0)
        prompts = rng.integers(4, config.vocab_size, size=(12, 8))
        lengths = [int(x) for x in rng.integers(2, 24, size=12)]
        slots = 4
        args.block_size = 4
    else:
        config = get_config("w1")
        prompts = np.asarray(W.ragged_prompts())
        lengths = [int(x) for x in W.ragged_lengths()]
    if args.requests:
        prompts, lengths = prompts[: args.requests], lengths[: args.requests]
    useful = sum(lengths)
    prompt_len = prompts.shape[1]
    max_len = prompt_len + (max(lengths) if args.smoke else spec["max_new"])
    lm = CausalLM(config)
    params = jax.jit(lm.init)(jax.random.key(W.MODEL_INIT_SEED))
    sampler = Sampler(lm, max_len=max_len)
    sp = sampler.load_params(params)
    block = args.block_size
    static_positions = slots * max_len
    num_blocks = int(args.pool * static_positions) // block
    method = Categorical(temperature=spec.get("temperature", 1.0))
    seeds = iter(range(10_000, 20_000))

    def requests(seed):
        return [Request(prompt=prompts[i].tolist(), max_new_tokens=lengths[i], method=method, seed=seed * 1000 + i)
                for i in range(len(lengths))]

    def continuous():
        outs = sampler.generate_requests(sp, requests(next(seeds)), num_slots=slots, block_size=block,
                                         num_blocks=num_blocks, attention=args.attention)
        got = sum(len(o.tokens[0]) for o in outs)
        assert got == useful, (got, useful)

    batches = [list(range(i, min(i + slots, len(lengths)))) for i in range(0, len(lengths), slots)]

    def static():
        seed = next(seeds)
        for rows in batches:
            out = sampler.generate(sp, prompts[rows], max_new_tokens=max(lengths[i] for i in rows), method=method,
                                   rng=seed)
            np.asarray(out.completion_tokens), np.asarray(out.logprobs)

    free_at = [0] * slots                       # FIFO list scheduling: the continuous ideal
    for n in lengths:
        heapq.heapreplace(free_at, free_at[0] + n)
    print(f"W5: {len(lengths)} requests, {useful} useful new tokens, {slots} slots; ideal decode steps: "
          f"{sum(max(lengths[i] for i in rows) for rows in batches)} static vs {max(free_at)} continuous; "
          f"pool {num_blocks} blocks x {block} = {num_blocks * block} "
          f"positions ({num_blocks * block / static_positions:.2f}x the static {slots} x {max_len}); decode attention "
          f"{args.attention!r}" + (" (dense slot rows: 1.0x the static cache, the pool is not used)"
                                   if args.attention == "dense" else ""), flush=True)
    rows, cpu_per_call = {}, {}
    for name, fn in (("continuous", continuous), ("static", static)):
        before = sampler.num_compiled()
        first = timed_calls(fn, 1)[0]
        warm = sampler.num_compiled()
        watch = W.CpuWatch()
        own_cpu = time.process_time()
        times = timed_calls(fn, args.timed)
        cpu = watch.result()
        cpu_per_call[name] = (time.process_time() - own_cpu) / args.timed
        after = sampler.num_compiled()
        median = statistics.median(times)
        rows[name] = useful / median
        extra = ""
        if name == "continuous":
            st = sampler.continuous_stats()
            extra = (f"; round trips/call {st.host_round_trips}, decode steps {st.decode_steps}, admissions "
                     f"{st.admissions}, preemptions {st.preemptions}, peak blocks {st.peak_blocks_in_use}/"
                     f"{st.num_blocks}")
        print(f"{name:>10}: {rows[name]:8.1f} useful tok/s (median {median:.2f} s of {[round(t, 2) for t in times]}; "
              f"first call {first:.1f} s); compiled programs {before} -> {warm} after warm-up -> {after} after "
              f"the timed calls; foreign CPU {cpu.get('foreign_cpu_cores', float('nan')):.2f} cores{extra}",
              flush=True)

    hf_ratio = float("nan")
    if not args.no_hf and not args.smoke:
        import torch
        from bench_common import hf_llama

        model = hf_llama(W, eos_token_id=W.MODEL["vocab_size"]).eval()

        def hf():
            with torch.no_grad():
                for rows_ in batches:
                    p = torch.tensor(prompts[rows_])
                    n = max(lengths[i] for i in rows_)
                    model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, attention_mask=torch.ones_like(p), pad_token_id=W.PAD_ID)

        torch.manual_seed(0)
        timed_calls(lambda: model.generate(torch.tensor(prompts[:slots]), max_new_tokens=4, do_sample=True, top_k=0,
                                      pad_token_id=W.PAD_ID), 1)
        watch = W.CpuWatch()
        times = timed_calls(hf, args.timed)
        cpu = watch.result()
        median = statistics.median(times)
        rows["hf"] = useful / median
        hf_ratio = rows["continuous"] / rows["hf"]
        print(f"{'hf':>10}: {rows['hf']:8.1f} useful tok/s (median {median:.2f} s of {[round(t, 2) for t in times]}); "
              f"torch threads {torch.get_num_threads()}; foreign CPU {cpu.get('foreign_cpu_cores', float('nan')):.2f} "
              "cores", flush=True)
    print(f"own CPU seconds per call (less sensitive to a contended host than wall time): continuous "
          f"{cpu_per_call['continuous']:.1f}, static {cpu_per_call['static']:.1f} -> "
          f"{cpu_per_call['static'] / cpu_per_call['continuous']:.2f}x", flush=True)
    hf_text = "HF generate not run" if hf_ratio != hf_ratio else f"{hf_ratio:.2f}x HF generate"  # nan: skipped
    print(f"W5: continuous {rows['continuous'] / rows['static']:.2f}x static, {hf_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
