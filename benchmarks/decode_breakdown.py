"""Where the static sampler's decode step spends its CPU time at W4 shapes (issue 23).

    python benchmarks/decode_breakdown.py [--rounds 12]
    python benchmarks/decode_breakdown.py --ops      # the real step's time per kind of HLO op

One device's share of W4's generation (`bench_grpo.py --devices 2`): 2 prompts x 8 samples = 16
rows, 64-token prompts, 64 new tokens, the W1 model (`presets.get_config("w1")`), categorical
sampling at T = 1, the decode loop as `Sampler` runs it (`cache_chunk` 32 = 2 cache phases).
Each variant is the same `decode` program compiled with one piece stubbed out, all variants
interleaved in one process (rounds x variants), each figure the median CPU ms per decode step:

  full              the real program
  no_attention      attention over the cache replaced by the query (cache writes kept)
  qk_only           only the q.k scores dot (no softmax, no p.v dot)
  argmax_sampling   `Categorical.select` replaced by argmax (the inverse CDF's cost, sign only)
  no_logprob        the per-step `token_logprobs` replaced by a gather of one logit
  matmuls_only      the same weights' projections, MLP and LM head for 16 rows, 64 steps in a
                    `fori_loop`: the decode step's matmuls alone
  matmuls_one_layer the same chain with layer 0's weights in all four layers: the same FLOPs, but
                    11.6 MB of weights read per step instead of 21.0 (what streaming them costs)
  matmuls_2x16_rows the chain for W4's 32 rows as W4 runs them: 16 rows on each of two devices at
                    once, each device reading its own copy of the weights (CPU ms for both devices)
  matmuls_1x32_rows the chain for the 32 rows on one device (one copy of the weights read)

`--ops` instead traces the real program (`jax.profiler`, XLA:CPU's per-thunk events, which it
turns on itself) and sums the time per kind of op: the weight matmuls (XLA:CPU runs them as YNNPACK
fusions), the attention dots over the cache (Eigen batched mat-vecs), reductions, the other
fusions, copies and loops.

Stubbed variants change the tokens drawn; they are for timing only. CPU time, not wall time: the
host is shared (see CPU.md). The process keeps freed host memory (`rlhf_jax.host_memory`), as
`bench_grpo.py` runs W4. Figures (2026-12-05, issue 23, 6 rounds, CPU ms per step): full 4.65,
no_attention 3.84, qk_only 4.22, argmax_sampling 5.18, no_logprob 4.61, matmuls_only 3.18.
2026-12-06 (quiet AVX-512 host, 10 rounds): full 4.51, no_attention 3.57, matmuls_only 2.96,
matmuls_one_layer 2.29, matmuls_2x16_rows 5.72, matmuls_1x32_rows 4.91 (CPU.md: the bytes read).
`--ops` (2026-12-05, 3 traces, loaded host): weight matmuls 3.22-3.35 ms per step (70%, 29 ops),
attention dots 0.60-0.65 (13%, 8), other fusions 0.37-0.40 (8%, 118), reductions 0.26-0.30 (6%, 27),
copies and the loop the rest.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):   # matmuls_2x16_rows
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
if "--ops" in sys.argv:   # XLA:CPU records one trace event per op only with this flag
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

from rlhf_jax import host_memory  # noqa: E402

host_memory.configure_from_env()   # as the W4 benchmark runs (before JAX starts): freed memory is kept

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rlhf_jax.models.attention as attention  # noqa: E402
import rlhf_jax.sampling.methods as methods  # noqa: E402
from bench_common import op_kinds, traced_op_times  # noqa: E402
from rlhf_jax.models import CausalLM, presets  # noqa: E402

D = importlib.import_module("rlhf_jax.sampling.decode")   # the module (the package re-exports a function `decode`)
ROWS_PER_PROMPT, PROMPTS, PROMPT_LEN, NEW = 8, 2, 64, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--ops", action="store_true", help="trace the real step: time per kind of HLO op")
    args = parser.parse_args()
    lm = CausalLM(presets.get_config("w1").replace(scan_layers=False, remat="none"))
    params = D.unstack_layers(lm.init(jax.random.key(0)))
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, 8192, size=(PROMPTS, PROMPT_LEN)), jnp.int32)
    prefill = jax.jit(lambda p, t, r: D.prefill(lm, p, t, jnp.full((PROMPTS,), PROMPT_LEN), max_new_tokens=NEW,
                                                num_samples=ROWS_PER_PROMPT, rng=r, cache_chunk=NEW // 2))
    state0 = prefill(params, prompts, jax.random.key(0))
    real = (attention.prefix_cache_attention, methods.Categorical.select, D.token_logprobs)

    def qk_only(q, prefix_k, prefix_v, k, v, mask):
        n, t, h, d = q.shape
        groups, hkv, p, _ = prefix_k.shape
        qg = q.reshape(groups, n // groups, hkv, h // hkv, d)
        scores = (jnp.sum(jnp.einsum("brkgd,bkpd->brkgp", qg, prefix_k), -1).reshape(n, 1, h, 1)
                  + jnp.sum(jnp.einsum("nkgd,nksd->nkgs", qg.reshape(n, hkv, h // hkv, d), k), -1).reshape(n, 1, h, 1))
        return q + 0 * scores + 0 * jnp.sum(v[:, :, :1, :1]) + 0 * jnp.sum(prefix_v[:, :, :1, :1])

    def build(attn=None, select=None, logprobs=None):
        attention.prefix_cache_attention = attn or real[0]
        methods.Categorical.select = select or real[1]
        D.token_logprobs = logprobs or real[2]
        try:
            fn = jax.jit(lambda p, s: D.decode(lm, p, s, method=methods.Categorical()))
            return fn.lower(params, state0).compile()
        finally:
            attention.prefix_cache_attention, methods.Categorical.select, D.token_logprobs = real

    def matmuls(p, x, layers=None):
        def body(i, x):
            for layer in layers or p["layers"]:
                a, m, e = layer["attn"], layer["mlp"], x.shape[-1]
                qkv = x @ a["q_proj"].reshape(e, -1) + x @ a["k_proj"].reshape(e, -1) + x @ a["v_proj"].reshape(e, -1)
                x = x + (qkv * 1e-3) @ a["o_proj"].reshape(-1, e)
                x = x + ((x @ m["gate_proj"]) * (x @ m["up_proj"]) * 1e-3) @ m["down_proj"]
            return x + (x @ p["lm_head"])[:, :e] * 1e-6
        return jax.lax.fori_loop(0, NEW, body, x)

    if args.ops:
        op_profile(build(), params, lambda r: prefill(params, prompts, jax.random.key(r)))
        return
    rows = jnp.ones((PROMPTS * ROWS_PER_PROMPT, lm.config.hidden_size), jnp.float32)
    rows32 = jnp.ones((2 * PROMPTS * ROWS_PER_PROMPT, lm.config.hidden_size), jnp.float32)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    on_both = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    two_devices = (jax.device_put(params, on_both), jax.device_put(rows32, split))
    variants = {
        "full": build(),
        "no_attention": build(attn=lambda q, pk, pv, k, v, mask: q + 0 * jnp.sum(k[:, :, :1, :1])),
        "qk_only": build(attn=qk_only),
        "argmax_sampling": build(select=lambda self, logits, u: jnp.argmax(logits, -1).astype(jnp.int32)),
        "no_logprob": build(logprobs=lambda logits, tokens, temperature=1.0: logits[:, 0]),
        "matmuls_only": jax.jit(matmuls).lower(params, rows).compile(),
        "matmuls_one_layer": jax.jit(lambda p, x: matmuls(p, x, (p["layers"][0],) * len(p["layers"])))
                             .lower(params, rows).compile(),
        "matmuls_2x16_rows": jax.jit(matmuls, out_shardings=split).lower(*two_devices).compile(),
        "matmuls_1x32_rows": jax.jit(matmuls).lower(params, rows32).compile(),
    }
    inputs = {"matmuls_only": (params, rows), "matmuls_one_layer": (params, rows),
              "matmuls_2x16_rows": two_devices, "matmuls_1x32_rows": (params, rows32)}
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, program in variants.items():
            state = prefill(params, prompts, jax.random.key(r))
            jax.block_until_ready(state)
            start = time.process_time()
            jax.block_until_ready(program(*inputs[name]) if name in inputs else program(params, state))
            times[name].append((time.process_time() - start) / NEW * 1e3)
    for name, t in times.items():
        print(f"{name:>16}: {np.median(t):.3f} CPU ms per step  (q25 {np.percentile(t, 25):.3f}, q75 "
              f"{np.percentile(t, 75):.3f})")


def op_profile(program, params, make_state) -> None:
    """`--ops`: one traced call of the decode program; CPU-thread time per kind of op, per decode step."""
    for r in range(3):   # warm
        jax.block_until_ready(program(params, make_state(r)))
    state = make_state(9)
    jax.block_until_ready(state)
    times = traced_op_times(lambda: jax.block_until_ready(program(params, state)))
    kinds, per_kind = op_kinds(program.as_text()), collections.defaultdict(lambda: [0, 0.0])
    for name, (count, ns) in times.items():
        kind = kinds.get(name)
        if kind is not None:
            kind = "attention dot (batched, over the cache)" if kind == "dot" else kind
            per_kind[kind][0] += count
            per_kind[kind][1] += ns
    total = sum(ns for _, ns in per_kind.values())
    for kind, (count, ns) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{kind:>40}: {ns / 1e6 / NEW:.3f} ms per step ({100 * ns / total:4.1f}%), {count / NEW:.1f} ops per step")


if __name__ == "__main__":
    main()
