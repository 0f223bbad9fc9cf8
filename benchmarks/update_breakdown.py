"""Where W4's GRPO update and reference pass spend their CPU time (issue 23).

    python benchmarks/update_breakdown.py [--rounds 12] [--hlo DIR]
    python benchmarks/update_breakdown.py --ops [--only step]   # CPU time per HLO op of one traced call

One device's share of W4 (`bench_grpo.py --devices 2`): 16 rows = 2 prompts x 8 samples,
64-token prompts, 64-token completions, the W1 model (`presets.get_config("w1")`), the GRPO step
of `bench_grpo.py` (`grpo_config("grpo", group_size=8, kl_coef=0.04, clip_eps=0.2)`, AdamW, clip
1.0), each prompt run once into a KV cache (`group_size` 8), on one host device. Every variant is
compiled once and all are interleaved in one process (rounds x variants); each figure is the
median CPU ms per call:

  step              the whole update program (loss, gradients, AdamW, guard, metrics)
  grad              `value_and_grad` of the step's loss (no optimizer)
  layers_grad       gradient of the layers alone (hidden states -> a linear functional; no head)
  head_grad         the LM head + log-softmax (+ entropy metric) and their gradient, from hidden states
  head_grad_noent   the same without the entropy metric
  optimizer         `apply_gradients` alone (global norm, clip, AdamW, NaN guard)
  reference         the reference pass (`rl._reference_logps`, forward only, no entropy)
  ref_layers        its layers alone (hidden states)
  matmuls_update    the update's matmuls alone (forward + backward shapes, no other op)
  matmuls_reference the reference's matmuls alone

`step` and `optimizer` donate their state, as `jit_step` does in W4 (each call takes the state the
last one returned). Until 2026-12-06 they did not, and XLA fuses those programs differently: the
figures below are undonated (the optimizer with the NaN guard's old select read 27 CPU ms undonated
and 33-34 donated, as W4 ran it; with the guard's `lax.cond`, 26-27 donated).
CPU time, not wall time: the host is shared (see CPU.md). `--hlo DIR` writes each program's
optimized HLO there. `--only a,b` runs only those variants (no matmul chains). The process keeps
freed host memory (`rlhf_jax.host_memory`, as `bench_grpo.py` runs W4); before 2026-12-05's last
sitting it did not, and every large temporary was faulted in afresh per call, which inflated the
elementwise figures below (e.g. the head's [1024, 8192] passes) against the matmuls.

Figures with freed memory kept, matmul chains with the model's real shapes (2026-12-05, quiet
host, 8 rounds): step 484, grad 452, layers_grad 309, head_grad 144 (136 without the entropy
metric), optimizer 27, reference 141 (ref_layers 96), matmuls_update 345 (34.7 GFLOP),
matmuls_reference 111: the update is 1.40x its matmuls, the reference 1.27x. (Until that sitting
the chains counted q, k, v, o as an [e, 4e] *and* a [4e, e] matmul, 21% too many FLOPs: they read
432 and 142, and the update looked 1.13x its matmuls, the reference 1.04x.)

`--ops` traces one call per variant (`jax.profiler`; XLA:CPU's per-op events, which need
`--xla_cpu_enable_xprof_traceme=true`, set by the script) and prints the call's CPU ms, its ops'
summed durations per kind of op and the costliest ops (2026-12-05, quiet host: layers_grad 311 CPU
ms, ops 256: matmul fusions 188, other fusions 47, batched dots 15, reductions 6; CPU.md).

Earlier figures, without it (loaded AVX2 host, median CPU ms over 8-10 rounds; CPU.md has the table):
before issue 23's update fixes step 663, grad 607, layers_grad 405, head_grad 217 (216 -> 179
without the entropy metric), optimizer 86, reference 166 (ref_layers 111), matmuls_update 453,
matmuls_reference 141; after (`logprobs_and_entropy`, the guard's select) step 631, head_grad 192,
optimizer 31, the rest unchanged. What is left over the matmuls (~175 ms of the step) is mostly the
layers' elementwise work (RMSNorm, RoPE, SwiGLU, residuals and their gradients, layout copies:
~140 ms forward + backward, ~35 ms of it the KV-cache route of the prefix sharing), spread over
~660 small fusions with no single large one.
Since 9f90d7e the completions attend over their group's prompt keys and values concatenated
with their own (no per-row cache): step 601 -> 562, layers_grad 386 -> 376 (one process).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--ops" in sys.argv:   # XLA:CPU records one trace event per op only with this flag
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

from rlhf_jax import host_memory  # noqa: E402

host_memory.configure_from_env()   # as the W4 benchmark runs (before JAX starts): freed memory is kept

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_common import op_kinds, traced_op_times  # noqa: E402
from rlhf_jax.models import CausalLM, presets  # noqa: E402
from rlhf_jax.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rlhf_jax.rollout import completion_hidden, head_logprobs  # noqa: E402
from rlhf_jax.state import RLState, TrainState  # noqa: E402
from rlhf_jax.steps import grpo_config, make_grpo_step  # noqa: E402
from rlhf_jax.steps.common import apply_gradients  # noqa: E402

GROUP, PROMPTS, PROMPT_LEN, NEW = 8, 2, 64, 64
DONATED = ("step", "optimizer")   # the state is donated, as `jit_step` does in W4
ROWS = GROUP * PROMPTS


def batch_of(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, 8192, size=(PROMPTS, PROMPT_LEN))
    return {
        "prompt_tokens": jnp.asarray(np.repeat(prompts, GROUP, axis=0), jnp.int32),
        "prompt_lengths": jnp.full((ROWS,), PROMPT_LEN, jnp.int32),
        "completion_tokens": jnp.asarray(rng.integers(4, 8192, size=(ROWS, NEW)), jnp.int32),
        "completion_mask": jnp.ones((ROWS, NEW), jnp.int32),
        "scores": jnp.asarray(rng.random(ROWS), jnp.float32),
        "sampler_logps": jnp.asarray(-9.0 - rng.random((ROWS, NEW)), jnp.float32),
        "ref_logps": jnp.asarray(-9.0 - rng.random((ROWS, NEW)), jnp.float32),
    }


def build(model=None):
    lm = model or CausalLM(presets.get_config("w1"))
    params = lm.init(jax.random.key(0))
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-6, max_grad_norm=1.0))
    config = grpo_config("grpo", group_size=GROUP, kl_coef=0.04, clip_eps=0.2, num_epochs=1, temperature=1.0)
    policy = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(jax.random.key(1)))
    state = RLState(policy, params, None, None)
    return lm, params, tx, config, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--hlo", help="write each program's optimized HLO to this directory")
    parser.add_argument("--only", help="comma-separated variants")
    parser.add_argument("--ops", action="store_true",
                        help="trace one call of each compiled variant: CPU time per kind of op and the costliest ops")
    args = parser.parse_args()
    lm, params, tx, config, state = build()
    batch = batch_of(0)
    e, v = lm.config.hidden_size, lm.config.vocab_size
    step = make_grpo_step(lm, tx, config=config)

    from rlhf_jax.train.rl import _reference_logps  # noqa: PLC0415
    reference = _reference_logps(lm, config)

    def layers_loss(p, b):
        h = completion_hidden(lm, p, b["prompt_tokens"], b["prompt_lengths"], b["completion_tokens"], group_size=GROUP)
        return jnp.sum(h * b["probe"])

    def head_loss(h, w, b, entropy=True):
        logps, ent = head_logprobs(h, w, b["completion_tokens"], with_entropy=entropy)
        return jnp.sum(logps * b["sampler_logps"]), (None if ent is None else jnp.mean(ent))

    hidden = jax.random.normal(jax.random.key(2), (ROWS, NEW, e), jnp.float32)
    probe = jax.random.normal(jax.random.key(3), (ROWS, NEW, e), jnp.float32) * 1e-3
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    def matmul_chain(ws, x, shapes):
        """Each (M, K, N) matmul of `shapes` once, results folded into a scalar (no other op)."""
        out = jnp.zeros((), jnp.float32)
        for (m, k, n), w in zip(shapes, ws, strict=True):
            out = out + jnp.sum(x[:m, :k] @ w[:k, :n])
        return out

    t = ROWS * NEW + PROMPTS * PROMPT_LEN   # token positions through the layers
    c = lm.config
    qkv, heads = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.num_heads * c.head_dim
    layer = [(t, e, qkv), (t, heads, e), (t, e, 2 * c.intermediate_size), (t, c.intermediate_size, e)]
    # forward: q,k,v (one [t,e]x[e,qkv]), o, gate+up, down; head [ROWS*NEW, e] x [e, V]. (Before
    # 2026-12-05's 13:00 sitting q,k,v,o were counted as [e,4e] *and* [4e,e]: 21% too many FLOPs.)
    fwd = layer * lm.config.num_layers + [(ROWS * NEW, e, v)]
    # backward: per forward matmul [M,K]x[K,N], dX [M,N]x[N,K] and dW [K,M]x[M,N]
    bwd = [(m, n, k) for m, k, n in fwd] + [(k, m, n) for m, k, n in fwd]
    big = max(max(s) for s in fwd + bwd)
    xbig = jax.random.normal(jax.random.key(4), (big, big), jnp.float32)

    def make_ws(shapes):
        return [jax.random.normal(jax.random.key(5 + i), (k, n), jnp.float32) * 0.01
                for i, (_, k, n) in enumerate(shapes)]

    def matmul_variant(shapes):
        ws = make_ws(shapes)
        fn = jax.jit(lambda ws, x: matmul_chain(ws, x, shapes)).lower(ws, xbig).compile()
        return fn, (ws, xbig)

    def grad_fn(p, b):
        from rlhf_jax.rollout import completion_logprobs  # noqa: PLC0415
        from rlhf_jax.steps.grpo import grpo_objective  # noqa: PLC0415

        def loss(p):
            logps, ent = completion_logprobs(lm, p, b["prompt_tokens"], b["prompt_lengths"], b["completion_tokens"],
                                             with_entropy=True, group_size=GROUP)
            out, metrics = grpo_objective(logps, jax.lax.stop_gradient(logps), b["advantages"], b["completion_mask"],
                                          config=config, ref_logps=b["ref_logps"], entropy=ent)
            return out, metrics
        return jax.value_and_grad(loss, has_aux=True)(p)

    gbatch = dict(batch, advantages=batch["scores"] - 0.5)
    own = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    pieces = {   # DONATED ones take a copy of the state: donation deletes the buffers they are given
        "step": (jax.jit(step, donate_argnums=(0,)), (own(state), batch)),
        "grad": (jax.jit(grad_fn), (params, gbatch)),
        "layers_grad": (jax.jit(jax.grad(layers_loss)), (params, dict(batch, probe=probe))),
        "head_grad": (jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)),
                      (hidden, params["lm_head"], batch)),
        "head_grad_noent": (jax.jit(jax.value_and_grad(lambda h, w, b: head_loss(h, w, b, False)[0], argnums=(0, 1))),
                            (hidden, params["lm_head"], batch)),
        "optimizer": (jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(1.0), tx), donate_argnums=(0,)),
                      (own(state.policy), grads)),
        "reference": (lambda p, b: reference(p, b["prompt_tokens"], b["prompt_lengths"], b["completion_tokens"],
                                             group_size=GROUP), (params, batch)),
        "ref_layers": (jax.jit(lambda p, b: completion_hidden(lm, p, b["prompt_tokens"], b["prompt_lengths"],
                                                              b["completion_tokens"], group_size=GROUP)),
                       (params, batch)),
    }
    if args.only:
        keep = args.only.split(",")
        pieces = {k: v for k, v in pieces.items() if k in keep}
    programs = {}
    for name, (fn, a) in pieces.items():
        if name == "reference":
            programs[name] = (fn, a)
            jax.block_until_ready(fn(*a))
            if args.hlo:
                text = reference.lower(params, batch["prompt_tokens"], batch["prompt_lengths"],
                                       batch["completion_tokens"], group_size=GROUP).compile().as_text()
                _write(args.hlo, name, text)
            continue
        compiled = fn.lower(*a).compile()
        if args.hlo:
            _write(args.hlo, name, compiled.as_text())
        programs[name] = (compiled, a)
    if args.ops:
        for name, (program, a) in programs.items():
            if name != "reference":
                op_profile(name, program, a, donated=name in DONATED)
        return
    if not args.only:
        programs["matmuls_update"] = matmul_variant(fwd + bwd)
        ref_shapes = [(ROWS * NEW + PROMPTS * PROMPT_LEN, k, n) for _, k, n in layer] * lm.config.num_layers \
            + [(ROWS * NEW, e, v)]
        programs["matmuls_reference"] = matmul_variant(ref_shapes)
    times = {k: [] for k in programs}
    for _ in range(args.rounds):
        for name, (program, a) in programs.items():
            jax.block_until_ready(a)
            start = time.process_time()
            out = jax.block_until_ready(program(*a))
            times[name].append((time.process_time() - start) * 1e3)
            if name in DONATED:
                programs[name] = (program, (out[0],) + a[1:])
    flops = lambda shapes: sum(2 * m * k * n for m, k, n in shapes)  # noqa: E731
    print(f"update matmul GFLOP {flops(fwd + bwd) / 1e9:.2f}")
    for name, ts in times.items():
        print(f"{name:>18}: {np.median(ts):8.2f} CPU ms  (q25 {np.percentile(ts, 25):.2f}, q75 "
              f"{np.percentile(ts, 75):.2f})")


def op_profile(name: str, program, args, top: int = 25, donated: bool = False) -> None:
    """`--ops`: one traced call of `program` (after 3 warm calls): its CPU ms (untraced), the ops'
    summed thread time per kind of op, then the `top` costliest ops with their HLO lines. Events that
    are not HLO ops (the runtime's `ThunkExecutor::Execute`, which wraps the ops, and its waits) are
    left out of the sums. A `donated` program's next call takes the state its last call returned."""

    def call():
        nonlocal args
        out = jax.block_until_ready(program(*args))
        if donated:
            args = (out[0],) + args[1:]

    for _ in range(3):
        call()
    start = time.process_time()
    call()
    cpu_ms = (time.process_time() - start) * 1e3
    hlo = program.as_text()
    kinds = op_kinds(hlo)
    times = {op: t for op, t in traced_op_times(call).items() if op in kinds}
    lines = {m.group(1): m.group(0) for m in re.finditer(r"%([\w.\-]+) = [^\n]*", hlo)}
    per_kind = {}
    for op, (count, ns) in times.items():
        n, t = per_kind.get(kinds[op], (0, 0.0))
        per_kind[kinds[op]] = (n + count, t + ns)
    total = sum(t for _, t in per_kind.values())
    print(f"{name}: {cpu_ms:.1f} CPU ms per call; its ops' thread time {total / 1e6:.1f} ms in "
          f"{sum(n for n, _ in per_kind.values())} op events")
    for kind, (count, ns) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:>18}: {ns / 1e6:8.2f} ms ({100 * ns / total:4.1f}%), {count} ops")
    for op, (count, ns) in sorted(times.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {ns / 1e6:7.2f} ms  {kinds[op]:>16}  {lines.get(op, op)[:150]}")


def _write(directory: str, name: str, text: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.hlo.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
