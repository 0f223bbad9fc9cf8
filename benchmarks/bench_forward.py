"""Forward-pass time of the W1 benchmark model on 8 x 256 tokens, in float32 and bfloat16.

    python benchmarks/bench_forward.py [--repeats 20] [--dtypes float32,bfloat16]

The model is the `w1` preset (../shared/bench/WORKLOADS.md: 4-layer Llama, 7,358,720 parameters);
the tokens are W1's first batch (uniform ids in [4, 8192), `np.random.default_rng(1001)`). Each
dtype is jitted once, called 3 times to warm up, then timed `--repeats` times (>= 10); each call
ends when the f32 logits [8, 256, 8192] are ready. "bfloat16" is the peers' pure-bf16 mode:
parameters cast to bf16 and compute in bf16 (logits still f32). It prints, per dtype, the compile
time, the median and minimum call time, tokens/s, achieved GFLOP/s, and how many CPU cores other
processes used during the timed calls (`foreign_cores`, only on Linux; above ~0.1 the figures are
disturbed by a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import matmul_flops

from rlhf_jax.models import CausalLM
from rlhf_jax.models.presets import get_config

BATCH, SEQ_LEN, DATA_SEED, FIRST_ID = 8, 256, 1001, 4


def _forward_flops(config) -> float:
    """The call's matmul FLOPs as the kernels run them: every position through the head, and the
    full `T x T` attention square (of which the causal half is useful)."""
    return matmul_flops(config, tokens=BATCH * SEQ_LEN, head_positions=BATCH * SEQ_LEN,
                        attended_pairs=BATCH * SEQ_LEN**2)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy, sum(int(x) for x in stat[11:15])


def bench(dtype: str, repeats: int) -> dict:
    """Compile, warm up and time the jitted forward pass of W1 in `dtype`."""
    config = get_config("w1", param_dtype=dtype, dtype=dtype)
    lm = CausalLM(config)
    params = jax.jit(lm.init)(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(DATA_SEED).integers(
        FIRST_ID, config.vocab_size, (BATCH, SEQ_LEN), dtype=np.int32))
    forward = jax.jit(lambda p, t: lm.forward(p, t).logits)

    start = time.perf_counter()
    jax.block_until_ready(forward(params, tokens))
    compile_s = time.perf_counter() - start
    for _ in range(3):
        jax.block_until_ready(forward(params, tokens))

    before, wall_start = _cpu_jiffies(), time.perf_counter()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = jax.block_until_ready(forward(params, tokens))
        times.append(time.perf_counter() - start)
    after, wall = _cpu_jiffies(), time.perf_counter() - wall_start
    foreign = None
    if before is not None and after is not None:
        ticks = 100.0  # USER_HZ on Linux
        foreign = ((after[0] - before[0]) - (after[1] - before[1])) / ticks / wall

    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, SEQ_LEN, config.vocab_size)
    median = statistics.median(times)
    return dict(dtype=dtype, params=lm.num_params(), compile_s=compile_s, median_s=median,
                min_s=min(times), tokens_per_s=BATCH * SEQ_LEN / median,
                gflops=_forward_flops(config) / median / 1e9, foreign_cores=foreign)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per dtype (>= 10)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10, got {args.repeats}")
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtypes: unknown dtype {dtype!r} (float32, bfloat16)")

    print(f"W1 forward, {BATCH}x{SEQ_LEN} tokens, jax {jax.__version__} on {jax.devices()[0].device_kind}")
    results = []
    for dtype in dtypes:
        r = bench(dtype, args.repeats)
        foreign = "n/a" if r["foreign_cores"] is None else f"{r['foreign_cores']:.2f}"
        print(f"{dtype:>9}: compile {r['compile_s']:.2f} s | median {r['median_s'] * 1e3:.1f} ms "
              f"(min {r['min_s'] * 1e3:.1f} ms, {args.repeats} calls) | {r['tokens_per_s']:,.0f} tokens/s | "
              f"{r['gflops']:.0f} GFLOP/s | foreign_cores {foreign}")
        results.append(r)
    return results


if __name__ == "__main__":
    from rlhf_jax import host_memory

    host_memory.configure_from_env()   # before JAX runs anything (importing rlhf_jax does not)
    main()
