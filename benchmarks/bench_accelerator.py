"""Benchmark on one accelerator (GPU or TPU), JAX against torch + transformers on the same chip, one command.

    python benchmarks/bench_accelerator.py                  # full size: well inside 8 min on one H200
    python benchmarks/bench_accelerator.py --smoke          # tiny shapes, any CPU, seconds (in the tests)
    python benchmarks/bench_accelerator.py --parts sft,decode,torch --out results/accel.json

Model: Qwen2.5-1.5B-shaped (`presets.get_config("qwen2.5-1.5b")`: 28 layers, hidden 1536, 12 query /
2 KV heads of 128, vocabulary 151,936, tied embeddings), random init rounded to bfloat16 values,
float32 master weights, bfloat16 compute, attention by `ModelConfig.attention_impl` (default "auto":
cuDNN flash attention on GPU, Splash on TPU). Parts (`--parts`, all by default):

1. `sft`: `make_sft_step`, AdamW (clip 1.0), 8 x 2,048 tokens: s/step, tokens/s and MFU = model
   FLOPs (`bench_common.matmul_flops`: 6 x the layers' and LM head's weights per token, the embedding
   lookup not counted, plus exact causal attention, 6 x layers x heads x head_dim x (T + 1) per token,
   half of PaLM's non-causal 12 L H Q T as in MaxText) per second over the bf16 matmul peak measured
   here (an 8192^3 bf16 matmul chain, median). The step is
   compiled first and run without remat if XLA's memory analysis of it fits the chip (`fit_step`:
   ~102 GiB at this size, by a TPU v5p compile with Splash attention: an H200, not an H100), else with
   `remat="dots"` (~37 GiB), which the row reports (`remat`, `program_gib`); `--remat` forces one.
2. `dpo`: `make_dpo_step` (sigmoid DPO, reference model pass every step), 8 pairs of 2 x 1,024 tokens
   (256 prompt + 768 completion): s/step; its remat chosen as the SFT step's.
3. `decode`: `Sampler.generate`, 64 prompts x 512 tokens prefilled, 512 new tokens each (categorical,
   T = 1, no stop): new tokens/s of the decode loop (the call less a 1-token call's prefill) and the
   fraction of the HBM floor: every step must read the bf16 weights once and each row's filled KV
   slots, `Σ_steps (weights + rows · layers · 2 · kv_heads · head_dim · 2 B · filled) / copy bandwidth`,
   the bandwidth measured here (10 in-place `x + 1` passes over a 2 GiB random bf16 array, each its own
   program, counting bytes read + written).
4. `grpo`: `rlhf_jax.train.rl.train` (the real loop) for GRPO, 16 prompts x 8 samples, 128-token
   prompts, 512 new tokens, reward `even_fraction`, k3 KL to a frozen reference, each group's prompt
   run once (`share_prompt`), layers rematerialised (`remat="full"`: 67k tokens through the update),
   LM head in chunks: s/step and the phase split (weight hand-off, generate, reward, reference,
   update), median of the steps after the first (compiling) one.
5. `torch`: the same SFT step (same weights and batch: the JAX worker writes its initial weights as a
   Hugging Face checkpoint) through transformers' `AutoModelForCausalLM` (SDPA attention, bf16 autocast,
   float32 master weights, `torch.optim.AdamW` fused, clip 1.0) and the same decode through HF
   `generate` (bf16 weights, static cache, `min_new_tokens` = 512; on CUDA HF compiles its decode step,
   and a full-length call is run first so that compiling is not timed; if compiling fails, the eager
   decode is timed and the row says so): the baseline for the ratios. The step-1 SFT losses of both
   must agree within bf16 tolerance (2e-2 relative); since a random model's loss is near ln(vocab)
   whatever its weights, torch also scores 4 of the JAX decode's sampled rows, and its log-probs must
   agree with the JAX sampler's (mean |difference| <= 0.25 x their standard deviation): the check that
   both hold the same weights.

Opt-in (`--parts paged`, not in the default run): 6. `paged`: continuous batching over the paged KV
cache (`Sampler.generate_requests`), the decode workload's prompts with ragged budgets (new tokens
drawn in [new/8, new]) through 16 slots, once with the decode read `ModelConfig.paged_attention_impl`
"auto" selects (JAX's Pallas paged-attention kernel on GPU / TPU: the Triton kernel here on a GPU) and
once with the routed einsum "reference", same process: useful new tokens/s of each (median of the
timed calls), the ratio, the selected read, and how far the two agree (requests with identical tokens;
log-probs over each request's common prefix).

Each framework runs in its own process, so neither holds the other's memory: a JAX worker for SFT,
DPO and decode, then the torch worker, then a JAX worker for GRPO (the longest part and the hardest to
predict runs last, so a run cut short keeps the others). The parent prints each worker's result as it
ends and keeps `--out` (JSON) up to date (marked "partial" until the end); each worker writes the rows
it has finished to `--out`.<worker>.partial as it goes, so a worker that dies (or a run that is killed)
still leaves them. The parent prints one table last. A part that fails is reported as a row with its
error and the other parts still run. Figures taken are recorded in benchmarks/ACCELERATORS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

from bench_common import causal_pairs, matmul_flops, report_result, run_worker, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PARTS = ("sft", "dpo", "decode", "grpo", "torch")
JAX_PARTS = ("sft", "dpo", "decode", "paged", "grpo")   # the order the JAX parts run in
TORCH_ROWS = ("sft", "decode")
OPT_IN_PARTS = ("paged",)
LOSS_RTOL = 2e-2   # JAX vs torch SFT loss at step 1, both bf16 compute
# torch's log-probs of the JAX decode's samples against the JAX sampler's: mean |difference| at most this
# fraction of the log-probs' standard deviation (bf16 rounding: a few %; other weights: over 100%).
LOGPROB_REL = 0.25

FULL = dict(
    sft=dict(batch=8, seq_len=2048), dpo=dict(pairs=8, seq_len=1024, prompt_len=256),
    decode=dict(rows=64, prompt_len=512, new_tokens=512), paged=dict(slots=16, block_size=16),
    grpo=dict(prompts=16, group=8, prompt_len=128, new_tokens=512, steps=3, warmup=1),
    warmup=1, timed=4, matmul_n=8192, copy_mib=2048, torch_decode_calls=1,
)
SMOKE = dict(
    sft=dict(batch=2, seq_len=32), dpo=dict(pairs=2, seq_len=32, prompt_len=8),
    decode=dict(rows=4, prompt_len=8, new_tokens=8), paged=dict(slots=2, block_size=4),
    grpo=dict(prompts=2, group=2, prompt_len=8, new_tokens=8, steps=2, warmup=1),
    warmup=1, timed=1, matmul_n=256, copy_mib=8, torch_decode_calls=1,
)


def sizes(smoke: bool) -> dict:
    return SMOKE if smoke else FULL


def model_config(smoke: bool, attention_impl: str = "auto"):
    """The benchmark model: Qwen2.5-1.5B's shapes, or a 2-layer miniature of them for `--smoke`."""
    from rlhf_jax.models.presets import get_config
    from rlhf_jax.testing import tiny_config

    if smoke:
        return tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=True, rope_theta=1e6,
                           param_dtype="float32", dtype="bfloat16", attention_impl=attention_impl)
    return get_config("qwen2.5-1.5b", attention_impl=attention_impl)


def tokens_rng(shape, vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


def _timed_steps(run, warmup: int, timed: int) -> tuple[list[float], list]:
    """Call `run(i) -> host value` warmup + timed times; each call's wall time (completion to completion)."""
    times, values = [], []
    for i in range(warmup + timed):
        start = time.perf_counter()
        values.append(run(i))
        times.append(time.perf_counter() - start)
    return times, values


# ---------------------------------------------------------------------------------------- JAX worker


def _peak_bf16_tflops(jax, jnp, n: int, repeats: int = 5) -> float:
    """bf16 matmul throughput of this chip: a chain of 8 n^3 matmuls in one program (random operands,
    the matrix an argument, not a constant baked into the program), median of `repeats` after a warm-up."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16) / math.sqrt(n)

    @jax.jit
    def chain(x, m):
        return jax.lax.fori_loop(0, 8, lambda _, y: y @ m, x)

    jax.block_until_ready(chain(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(a, a))
        times.append(time.perf_counter() - start)
    return 8 * 2 * n**3 / statistics.median(times) / 1e12


def _copy_gbps(jax, jnp, mib: int, repeats: int = 5, passes: int = 10) -> float:
    """Memory bandwidth: bytes read + written by `passes` calls of a jitted, in-place `x + 1` over a
    `mib` MiB bf16 array of random values, median of `repeats`. Each pass is its own program, so no
    compiler can fuse the passes into one read and one write."""
    add = jax.jit(lambda y: y + 1, donate_argnums=0)
    x = jax.random.normal(jax.random.key(1), (mib * 2**20 // 2,), jnp.bfloat16)
    nbytes = x.nbytes
    x = jax.block_until_ready(add(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            x = add(x)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - start)
    return passes * 2 * nbytes / statistics.median(times) / 1e9


def _decode_seconds(call_s: float, prefill_s: float) -> float | None:
    """The decode loop's time: a full call less a 1-token call (prefill + one step); None when that
    difference is under a tenth of the call (too small to resolve, as at `--smoke` size)."""
    decode_s = call_s - prefill_s
    return decode_s if decode_s > 0.1 * call_s else None


def _decode_floor_bytes(config, num_params: int, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes the decode loop must read: bf16 weights once per step, plus each row's filled KV slots.

    Step i (i = 1 .. new - 1; the first new token comes from the prefill) feeds one token per row that
    attends over prompt_len + i slots, each `layers · 2 (k, v) · kv_heads · head_dim` bf16 values.
    """
    slot = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    kv = sum(rows * slot * (prompt_len + i) for i in range(1, new_tokens))
    return (new_tokens - 1) * num_params * 2 + kv


def _jax_worker(args) -> dict:
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # This process has the chip to itself (torch runs after it): let XLA take 92% of the memory, not 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.attention import resolve_impl

    S = sizes(args.smoke)
    parts = set(args.parts.split(","))
    config = model_config(args.smoke, args.attention)
    lm = CausalLM(config)
    device = jax.devices()[0]
    out = {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
           "attention_impl": resolve_impl(config.attention_impl, config.jnp_dtype),
           "num_params": lm.num_params(), "rows": {}}
    try:
        import flax
        out["flax"] = flax.__version__
    except ImportError:
        pass
    params = None
    if parts & {"sft", "dpo", "decode", "paged", "torch"}:   # a GRPO-only worker needs neither
        out["peak_bf16_tflops"] = _peak_bf16_tflops(jax, jnp, S["matmul_n"])
        out["copy_gbps"] = _copy_gbps(jax, jnp, S["copy_mib"])
        params = jax.jit(_init_fn(lm))(jax.random.key(0))
    if "torch" in parts:
        from rlhf_jax.models.hf import save_hf

        start = time.perf_counter()
        save_hf(os.path.join(args.dir, "weights"), config,
                jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), overwrite=True)
        out["save_weights_s"] = time.perf_counter() - start

    for part in JAX_PARTS:
        if part not in parts:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:   # e.g. cuDNN attention refused: XLA's used
            warnings.simplefilter("default")
            try:
                row = {"sft": _jax_sft, "dpo": _jax_dpo, "decode": _jax_decode, "grpo": _jax_grpo,
                       "paged": _jax_paged}[part](args, S, lm, params, out)
            except Exception as e:  # noqa: BLE001 - one failed part is a row, the others still run
                row = {"error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-3000:]}
        row["part_wall_s"] = time.perf_counter() - start
        if caught:
            row["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:400] for w in caught})[:20]
        out["rows"][part] = row
        if args.partial:   # what the parent keeps if this process dies or the run is cut short later
            _write_json_atomic(args.partial, out)
    return out


def _write_json_atomic(path: str, value) -> None:
    """`value` as JSON at `path`, replaced in one step: a process killed meanwhile leaves the old file whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def _init_fn(lm):
    """key -> initial weights: `lm.init`, rounded to bf16 values (exactly representable in both frameworks)."""
    import jax
    import jax.numpy as jnp

    return lambda key: jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), lm.init(key))


def _train_setup(lm, opt_config, params):
    """A train state around a copy of `params`, the worker's initial weights (those saved for torch and
    the DPO reference): the step donates its state, so `params` itself stays valid for the later parts."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax import sharding as sh
    from rlhf_jax.optim import make_optimizer
    from rlhf_jax.state import train_state_from_params

    mesh = sh.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = make_optimizer(opt_config)
    state = train_state_from_params(jax.tree.map(jnp.copy, params), tx, rng=0, logical_axes=lm.logical_axes,
                                    mesh=mesh, strategy="dp")
    return mesh, state


def _opt_config():
    from rlhf_jax.optim import OptimizerConfig

    return OptimizerConfig(name="adamw", learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                           max_grad_norm=1.0)


def _run_train_steps(step, state, batch, frozen, S):
    import jax

    holder = [state]

    def run(_):
        holder[0], metrics = step(holder[0], batch, *frozen)
        loss = float(jax.device_get(metrics["loss"]))
        jax.block_until_ready(holder[0])
        return loss

    times, losses = _timed_steps(run, S["warmup"], S["timed"])
    return times, losses


def program_bytes(compiled) -> int:
    """Device memory a compiled program needs while it runs, by XLA's analysis: its arguments, outputs
    and temporaries, less the outputs written into donated arguments."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def fit_step(make_step, lm, step_args, limit: int | None, remat: str = "auto"):
    """The train step compiled for `step_args`, with the least rematerialisation that fits `limit` bytes.

    `make_step(model) -> jitted step`. With `remat="auto"` the layers are first compiled with no remat,
    then, while the program XLA compiled needs more than `limit` (`program_bytes`, known before anything
    runs), with "dots" (matmul outputs kept, the rest recomputed) and "full"; the last is kept even if
    it does not fit (its run then fails with the device's out-of-memory error). A named remat is
    compiled as given; `limit` None (no memory figure for the device) keeps the first. Returns
    `(compiled step, remat, bytes needed)`.
    """
    from rlhf_jax.models import CausalLM

    choices = ("none", "dots", "full") if remat == "auto" else (remat,)
    for choice in choices:
        model = lm if choice == lm.config.remat else CausalLM(lm.config.replace(remat=choice))
        compiled = make_step(model).lower(*step_args).compile()
        need = program_bytes(compiled)
        if limit is None or need <= limit:
            break
    return compiled, choice, need


def _fitted(args, lm, make_step, step_args) -> tuple:
    """`fit_step` under the worker's `--remat` and memory limit (`--memory-limit-gib`, else the chip's
    memory as `rlhf-jax compile` reads it: XLA's `bytes_limit` on a GPU); the compiled step and the
    row's fields."""
    import jax

    from rlhf_jax.targets import device_memory

    start = time.perf_counter()
    limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else device_memory(jax.devices()[:1])
    resident = _resident_bytes(step_args)
    if limit:
        limit -= resident   # arrays the worker keeps on the device beside the step (the initial weights)
    compiled, remat, need = fit_step(make_step, lm, step_args, limit, args.remat)
    return compiled, {"remat": remat, "program_gib": need / 2**30, "compile_s": time.perf_counter() - start,
                      "resident_gib": resident / 2**30, **({"memory_limit_gib": limit / 2**30} if limit else {})}


def _resident_bytes(step_args) -> int:
    """Bytes of the device arrays alive now that are not among `step_args` (whose bytes XLA's analysis of
    the step already counts as arguments)."""
    import jax

    args = {id(x) for x in jax.tree.leaves(step_args) if isinstance(x, jax.Array)}
    return sum(x.nbytes for x in jax.live_arrays() if id(x) not in args)


def _jax_sft(args, S, lm, params, info) -> dict:
    import numpy as np

    from rlhf_jax.steps import SFT_KEYS, jit_model_step, make_sft_step

    b, t = S["sft"]["batch"], S["sft"]["seq_len"]
    tokens = tokens_rng((b, t), lm.config.vocab_size, seed=1)
    opt_config = _opt_config()
    mesh, state = _train_setup(lm, opt_config, params)
    batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens)}
    step, fit = _fitted(args, lm, lambda m: jit_model_step(
        make_sft_step(m, opt_config, logits_chunk_size=args.logits_chunk), m, opt_config, batch_keys=SFT_KEYS,
        mesh=mesh, strategy="dp"), (state, batch))
    times, losses = _run_train_steps(step, state, batch, (), S)
    step_s = statistics.median(times[S["warmup"]:])
    flops = 3 * matmul_flops(lm.config, tokens=b * t, head_positions=b * (t - 1), attended_pairs=b * causal_pairs(t))
    tflops = flops / step_s / 1e12
    return {"step_s": step_s, "tokens_per_s": b * t / step_s, "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": tflops, "mfu": tflops / info["peak_bf16_tflops"], "first_step_s": times[0],
            "loss_step1": losses[0], "loss_last": losses[-1], "losses_finite": bool(np.isfinite(losses).all()), **fit}


def _jax_dpo(args, S, lm, params, info) -> dict:
    import jax
    import numpy as np

    from rlhf_jax.steps import DPO, dpo_batch_keys, jit_model_step, make_dpo_step

    n, t, p = S["dpo"]["pairs"], S["dpo"]["seq_len"], S["dpo"]["prompt_len"]
    prompt = tokens_rng((n, p), lm.config.vocab_size, seed=2)
    chosen = np.concatenate([prompt, tokens_rng((n, t - p), lm.config.vocab_size, seed=3)], 1)
    rejected = np.concatenate([prompt, tokens_rng((n, t - p), lm.config.vocab_size, seed=4)], 1)
    mask = np.zeros_like(chosen)
    mask[:, p:] = 1
    batch = {"chosen_tokens": chosen, "chosen_loss_mask": mask, "rejected_tokens": rejected,
             "rejected_loss_mask": mask}
    opt_config = _opt_config()
    mesh, state = _train_setup(lm, opt_config, params)
    objective = DPO(beta=0.1)
    frozen = (jax.tree.map(lambda x: x.copy(), params),)
    step, fit = _fitted(args, lm, lambda m: jit_model_step(
        make_dpo_step(m, opt_config, objective=objective, logits_chunk_size=args.logits_chunk), m, opt_config,
        batch_keys=dpo_batch_keys(objective), frozen_params=1, mesh=mesh, strategy="dp"), (state, batch, *frozen))
    times, losses = _run_train_steps(step, state, batch, frozen, S)
    step_s = statistics.median(times[S["warmup"]:])
    rows = 2 * n
    forward = matmul_flops(lm.config, tokens=rows * t, head_positions=rows * (t - p),
                           attended_pairs=rows * causal_pairs(t))
    flops = 4 * forward   # policy forward + backward (3) and the reference forward (1)
    tflops = flops / step_s / 1e12
    return {"step_s": step_s, "pairs_per_s": n / step_s, "achieved_tflops": tflops,
            "mfu": tflops / info["peak_bf16_tflops"], "first_step_s": times[0], "loss_step1": losses[0],
            "losses_finite": bool(np.isfinite(losses).all()), **fit}


def _jax_decode(args, S, lm, params, info) -> dict:
    import numpy as np

    from rlhf_jax.sampling import Categorical, Sampler, SamplingConfig

    rows, p, new = S["decode"]["rows"], S["decode"]["prompt_len"], S["decode"]["new_tokens"]
    prompts = tokens_rng((rows, p), lm.config.vocab_size, seed=5)
    sampler = Sampler(lm, max_len=p + new, prompt_buckets=(p,), dtype="bfloat16")
    sp = sampler.load_params(params)
    config = SamplingConfig(max_new_tokens=new, method=Categorical(temperature=1.0))
    seeds = iter(range(10_000))

    def call(new_tokens):
        def run(_):
            o = sampler.generate(sp, prompts, config, max_new_tokens=new_tokens, rng=next(seeds))
            return np.asarray(o.completion_tokens), np.asarray(o.logprobs)
        return run

    prefill_times, _ = _timed_steps(call(1), 1, 2)
    call_times, outs = _timed_steps(call(new), 1, 2)
    prefill_s = statistics.median(prefill_times[1:])
    call_s = statistics.median(call_times[1:])
    decode_s = _decode_seconds(call_s, prefill_s)
    tokens, logps = outs[-1]
    np.save(os.path.join(args.dir, "decode_tokens.npy"), tokens)     # for the torch worker to score
    np.save(os.path.join(args.dir, "decode_logprobs.npy"), logps)
    floor_bytes = _decode_floor_bytes(lm.config, lm.num_params(), rows, p, new)
    floor_s = floor_bytes / (info["copy_gbps"] * 1e9)
    return {"call_s": call_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": None if decode_s is None else rows * (new - 1) / decode_s,
            "call_tokens_per_s": rows * new / call_s, "hbm_floor_s": floor_s,
            "floor_fraction": None if decode_s is None else floor_s / decode_s, "floor_gb_read": floor_bytes / 1e9,
            "tokens_shape": list(tokens.shape), "logprobs_finite": bool(np.isfinite(logps).all()),
            "first_call_s": call_times[0]}


def _jax_paged(args, S, lm, params, info) -> dict:
    """Continuous batching through the paged cache: the kernel read "auto" selects against the reference."""
    import numpy as np

    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.paged import decode_kernel
    from rlhf_jax.sampling import Categorical, Request, Sampler

    rows, p, new = S["decode"]["rows"], S["decode"]["prompt_len"], S["decode"]["new_tokens"]
    slots, bs = S["paged"]["slots"], S["paged"]["block_size"]
    prompts = tokens_rng((rows, p), lm.config.vocab_size, seed=5)
    budgets = np.random.default_rng(6).integers(max(1, new // 8), new + 1, rows)
    requests = [Request(prompt=prompts[i].tolist(), max_new_tokens=int(budgets[i]),
                        method=Categorical(temperature=1.0), seed=i) for i in range(rows)]
    out, results = {}, {}
    for name, impl in (("auto", "auto"), ("reference", "reference")):
        model = CausalLM(lm.config.replace(paged_attention_impl=impl))
        sampler = Sampler(model, max_len=p + new, prompt_buckets=(p,), dtype="bfloat16")
        sp = sampler.load_params(params)
        read = decode_kernel(model.config, bs, -(-(p + new) // bs))
        times, outs = _timed_steps(lambda _: sampler.generate_requests(sp, requests, num_slots=slots, block_size=bs),
                                   1, 2)
        call_s = statistics.median(times[1:])
        made = sum(len(o.tokens[0]) for o in outs[-1])
        out[name] = {"read": read, "call_s": call_s, "new_tokens_per_s": made / call_s, "first_call_s": times[0],
                     "host_round_trips": sampler.continuous_stats().host_round_trips}
        results[name] = outs[-1]
    same, diff = 0, 0.0
    for a, b in zip(results["auto"], results["reference"]):
        ta, tb = a.tokens[0], b.tokens[0]
        n = min(len(ta), len(tb))
        k = n if np.array_equal(ta[:n], tb[:n]) else int(np.argmax(ta[:n] != tb[:n]))
        same += int(len(ta) == len(tb) and k == n)
        if k:
            diff = max(diff, float(np.max(np.abs(a.logprobs[0][:k] - b.logprobs[0][:k]))))
    return {"read": out["auto"]["read"], "new_tokens_per_s": out["auto"]["new_tokens_per_s"],
            "reference_new_tokens_per_s": out["reference"]["new_tokens_per_s"],
            "speedup_vs_reference": out["reference"]["call_s"] / out["auto"]["call_s"], "runs": out,
            "requests_identical": f"{same}/{rows}", "logprob_max_diff_common_prefix": diff,
            "logprobs_finite": all(bool(np.isfinite(o.logprobs[0]).all()) for o in results["auto"])}


def _jax_grpo(args, S, lm, params, info) -> dict:
    import jax
    import numpy as np

    from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
    from rlhf_jax.metrics import read_jsonl
    from rlhf_jax.optim import OptimizerConfig
    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.steps import grpo_config
    from rlhf_jax.train import rl
    from rlhf_jax.train.run_config import DataConfig

    g = S["grpo"]
    vocab = lm.config.vocab_size
    tok_dir = os.path.join(args.dir, "tokenizer")
    _wordlevel_tokenizer(vocab).save_pretrained(tok_dir)
    prompts_file = os.path.join(args.dir, "grpo_prompts.jsonl")
    rows = tokens_rng((g["steps"] * g["prompts"], g["prompt_len"]), vocab, seed=6)
    with open(prompts_file, "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in row)}) + "\n")
    config = rl.GRPORunConfig(
        name="bench_accelerator_grpo", workdir=os.path.join(args.dir, "grpo_run"), seed=0,
        model=lm.config.replace(remat="full"),   # 16 x 128 + 128 x 512 tokens through the update
        data=DataConfig(train=prompts_file, eval=None, tokenizer=tok_dir, max_prompt_len=g["prompt_len"],
                        max_len=g["prompt_len"] + g["new_tokens"], batch_size=g["prompts"], shuffle=False),
        mesh=MeshConfig(data=-1, strategy="dp"),   # data parallel over every device of the process
        optim=OptimizerConfig(name="adamw", learning_rate=1e-6, max_grad_norm=1.0),
        algorithm=grpo_config("grpo", group_size=g["group"], kl_coef=0.04, clip_eps=0.2, num_epochs=1,
                              temperature=1.0),
        rollout=rl.RolloutConfig(max_new_tokens=g["new_tokens"], ignore_eos=True, sampler_dtype="bfloat16"),
        rewards=rl.RewardConfig(functions=("even_fraction",)),
        train=TrainConfig(steps=g["steps"]),
        checkpoint=CheckpointConfig(every=0, async_save=True),
        logging=LoggingConfig(every=1, console=False, tensorboard=False),
    )
    rl.train(config)
    records = [r for r in read_jsonl(os.path.join(args.dir, "grpo_run", "metrics.jsonl")) if "time/step" in r]
    timed = [r for r in records if r["step"] > g["warmup"]] or records[-1:]
    med = lambda key: statistics.median(r[key] for r in timed if key in r)  # noqa: E731
    phases = {p: med(f"time/{p}") for p in ("weight_handoff", "generate", "reward", "reference", "update")
              if any(f"time/{p}" in r for r in timed)}
    step_s = med("time/between_steps") if any("time/between_steps" in r for r in timed) else med("time/step")
    completions = g["prompts"] * g["group"]
    return {"step_s": step_s, "devices": jax.device_count(), "step_s_inside": med("time/step"),
            "first_step_s": records[0]["time/step"],
            "completion_tokens_per_s": completions * g["new_tokens"] / step_s, "phases_s": phases,
            "sampler_logprob_diff_max": max(r.get("sampler_logprob_diff/max", float("nan")) for r in timed),
            "losses_finite": bool(np.isfinite([r.get("loss", 0.0) for r in records]).all())}


def _wordlevel_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` ids ("t{i}" <-> i; 0 <pad>, 1 <eos>, 2 <unk>): any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# -------------------------------------------------------------------------------------- torch worker


def _torch_worker(args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    S = sizes(args.smoke)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.smoke:
        raise SystemExit("bench_accelerator: torch sees no CUDA device; run without the torch part (--parts "
                         "sft,dpo,decode,grpo) on a TPU VM or a machine without CUDA")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "rows": {}}
    import transformers
    out["transformers"] = transformers.__version__
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.dir, "weights"), dtype=torch.float32,
                                                 attn_implementation="sdpa").to(dev)
    try:
        start = time.perf_counter()
        b, t = S["sft"]["batch"], S["sft"]["seq_len"]   # the JAX SFT batch: same shape, seed and values
        tokens = torch.from_numpy(tokens_rng((b, t), model.config.vocab_size, seed=1)).long().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                fused=dev == "cuda")
        model.train()

        def run(_):
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = loss.item()
            sync()
            return value

        times, losses = _timed_steps(run, S["warmup"], S["timed"])
        step_s = statistics.median(times[S["warmup"]:])
        out["rows"]["sft"] = {"step_s": step_s, "tokens_per_s": b * t / step_s, "loss_step1": losses[0],
                              "first_step_s": times[0], "losses_finite": bool(np.isfinite(losses).all()),
                              "part_wall_s": time.perf_counter() - start}
        del opt
    except Exception as e:  # noqa: BLE001
        out["rows"]["sft"] = {"error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-3000:]}
    if args.partial:
        _write_json_atomic(args.partial, out)
    if "decode" in args.parts.split(","):
        try:
            start = time.perf_counter()
            model = model.to(torch.bfloat16).eval()
            if dev == "cuda":
                torch.cuda.empty_cache()
            rows, p, new = S["decode"]["rows"], S["decode"]["prompt_len"], S["decode"]["new_tokens"]
            # The JAX decode's prompts: same shape, seed and values.
            prompts = torch.from_numpy(tokens_rng((rows, p), model.config.vocab_size, seed=5)).long().to(dev)

            compile_error = None

            def gen(new_tokens):
                def run(_):
                    with torch.no_grad():
                        o = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                           top_k=0, top_p=1.0, temperature=1.0, cache_implementation="static",
                                           pad_token_id=0, **({"disable_compile": True} if compile_error else {}))
                    sync()
                    return tuple(o.shape)
                return run

            # On CUDA, HF compiles the decode step of a static-cache `generate` at its first decode step
            # (a 1-token call has none) for the cache's length (prompt + new): the full-length call is
            # warmed up too, so neither the compilation nor the CUDA-graph capture is timed. If
            # compiling fails, HF's eager decode is timed instead, and the row says why.
            try:
                first_s = _timed_steps(gen(new), 0, 1)[0][0]
            except Exception as e:  # noqa: BLE001 - e.g. no C compiler for inductor on the machine
                compile_error = f"{type(e).__name__}: {e}"[:600]
                first_s = _timed_steps(gen(new), 0, 1)[0][0]
            prefill_times, _ = _timed_steps(gen(1), 1, 1)
            call_times, shapes = _timed_steps(gen(new), 0, S["torch_decode_calls"])
            call_s = statistics.median(call_times)
            decode_s = _decode_seconds(call_s, prefill_times[-1])
            out["rows"]["decode"] = {"call_s": call_s, "prefill_s": prefill_times[-1], "decode_s": decode_s,
                                     "decode_tokens_per_s": None if decode_s is None else rows * (new - 1) / decode_s,
                                     "call_tokens_per_s": rows * new / call_s, "shape": list(shapes[-1]),
                                     "first_call_s": first_s, "part_wall_s": time.perf_counter() - start,
                                     **({"compile_error": compile_error} if compile_error else {}),
                                     **_score_jax_samples(torch, model, prompts, args.dir)}
        except Exception as e:  # noqa: BLE001
            out["rows"]["decode"] = {"error": f"{type(e).__name__}: {e}"[:600],
                                     "traceback": traceback.format_exc()[-3000:]}
    return out


def _score_jax_samples(torch, model, prompts, folder: str, rows: int = 4) -> dict:
    """The torch model's log-probs of the JAX decode's sampled tokens (its first `rows` rows), against the
    JAX sampler's own: far below the log-probs' spread only when both hold the same weights (the SFT
    loss of a random model, near ln(vocab), is nearly the same for any weights of the same init)."""
    import numpy as np

    files = [os.path.join(folder, f"decode_{name}.npy") for name in ("tokens", "logprobs")]
    if not all(os.path.exists(f) for f in files):
        return {}
    tokens, jax_logps = (np.load(f)[:rows] for f in files)
    p = prompts.shape[1]
    ids = torch.cat([prompts[:len(tokens)], torch.from_numpy(tokens).long().to(prompts.device)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, p - 1:-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None])[..., 0].cpu().numpy()
    diff = np.abs(logps - jax_logps)
    return {"logprob_vs_jax_mean_abs_diff": float(diff.mean()), "logprob_vs_jax_max_abs_diff": float(diff.max()),
            "jax_logprob_std": float(jax_logps.std()), "logprobs_finite": bool(np.isfinite(logps).all())}


# -------------------------------------------------------------------------------------------- parent


def _read_partial(path: str) -> dict:
    """A dead worker's `--partial` file (the rows it finished), or no rows."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"rows": {}}


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def summarize(jax_out: dict, torch_out: dict | None) -> dict:
    """The headline figures and acceptance checks from both workers' rows."""
    rows = jax_out.get("rows", {})
    trows = (torch_out or {}).get("rows", {})
    s = {}
    sft, tsft = rows.get("sft", {}), trows.get("sft", {})
    if "step_s" in sft and "step_s" in tsft:
        s["sft_speedup_vs_torch"] = tsft["step_s"] / sft["step_s"]
        s["sft_loss_step1_jax"], s["sft_loss_step1_torch"] = sft["loss_step1"], tsft["loss_step1"]
        s["sft_loss_rel_diff"] = abs(sft["loss_step1"] - tsft["loss_step1"]) / abs(tsft["loss_step1"])
        s["sft_losses_equal"] = s["sft_loss_rel_diff"] <= LOSS_RTOL
    dec, tdec = rows.get("decode", {}), trows.get("decode", {})
    if dec.get("decode_tokens_per_s") and tdec.get("decode_tokens_per_s"):
        s["decode_speedup_vs_hf"] = dec["decode_tokens_per_s"] / tdec["decode_tokens_per_s"]
    if "call_tokens_per_s" in dec and "call_tokens_per_s" in tdec:
        s["call_speedup_vs_hf"] = dec["call_tokens_per_s"] / tdec["call_tokens_per_s"]
    if "logprob_vs_jax_mean_abs_diff" in tdec:
        s["decode_logprob_mean_abs_diff"] = tdec["logprob_vs_jax_mean_abs_diff"]
        s["decode_logprobs_agree"] = tdec["logprob_vs_jax_mean_abs_diff"] <= LOGPROB_REL * tdec["jax_logprob_std"]
    s["all_finite"] = all(r.get("losses_finite", True) and r.get("logprobs_finite", True)
                          for r in (*rows.values(), *trows.values()) if "error" not in r)
    s["errors"] = {f"{who}/{k}": r["error"] for who, rs in (("jax", rows), ("torch", trows))
                   for k, r in rs.items() if "error" in r}
    return s


def table(jax_out: dict, torch_out: dict | None, summary: dict) -> str:
    rows = jax_out.get("rows", {})
    trows = (torch_out or {}).get("rows", {})
    fell_back = any("cuDNN attention unavailable" in w for r in rows.values() for w in r.get("warnings", ()))
    head = (f"{jax_out.get('device_kind')} ({jax_out.get('platform')}), jax {jax_out.get('jax')}, attention "
            f"{jax_out.get('attention_impl')}{' (XLA where cuDNN refused: see warnings)' if fell_back else ''}, torch {(torch_out or {}).get('torch', '-')}, transformers "
            f"{(torch_out or {}).get('transformers', '-')}; {jax_out.get('num_params', 0) / 1e9:.3f} B params; "
            f"measured bf16 matmul {_fmt(jax_out.get('peak_bf16_tflops'))} TFLOP/s, copy "
            f"{_fmt(jax_out.get('copy_gbps'))} GB/s")
    lines = [head, f"{'part':<10} {'jax':>12} {'torch':>12} {'ratio':>7}  detail"]

    def line(name, j, t, unit, detail, higher_better=False):
        ratio = None if j is None or t is None else (j / t if higher_better else t / j)
        ratio_text = _fmt(ratio, ".2f") if ratio else "-"
        lines.append(f"{name:<10} {_fmt(j):>12} {_fmt(t):>12} {ratio_text:>7}  {unit}; {detail}")

    sft, tsft = rows.get("sft", {}), trows.get("sft", {})
    line("sft", sft.get("step_s"), tsft.get("step_s"), "s/step",
         f"{_fmt(sft.get('tokens_per_s'))} tok/s, MFU {_fmt(sft.get('mfu'), '.1%') if 'mfu' in sft else '-'}, "
         f"loss@1 {_fmt(sft.get('loss_step1'), '.5g')} vs {_fmt(tsft.get('loss_step1'), '.5g')}, "
         f"remat {sft.get('remat', '-')}, {_fmt(sft.get('program_gib'))} GiB")
    dpo = rows.get("dpo", {})
    line("dpo", dpo.get("step_s"), None, "s/step", f"MFU {_fmt(dpo.get('mfu'), '.1%') if 'mfu' in dpo else '-'}, "
         f"remat {dpo.get('remat', '-')}, {_fmt(dpo.get('program_gib'))} GiB")
    dec, tdec = rows.get("decode", {}), trows.get("decode", {})
    line("decode", dec.get("decode_tokens_per_s"), tdec.get("decode_tokens_per_s"), "new tok/s",
         f"{_fmt(dec.get('floor_fraction'), '.1%') if dec.get('floor_fraction') else '-'} of HBM floor, prefill "
         f"{_fmt(dec.get('prefill_s'))} s" + ("; HF decode eager: its compile failed" if tdec.get("compile_error")
                                               else ""), higher_better=True)
    grpo = rows.get("grpo", {})
    phases = ", ".join(f"{k} {v:.3g}" for k, v in grpo.get("phases_s", {}).items())
    line("grpo", grpo.get("step_s"), None, "s/step",
         (phases or "-") + (f"; {grpo['devices']} devices" if grpo.get("devices", 1) > 1 else ""))
    if "paged" in rows:
        pg = rows["paged"]
        line("paged", pg.get("new_tokens_per_s"), None, "new tok/s",
             f"read {pg.get('read')}: {_fmt(pg.get('speedup_vs_reference'), '.2f')}x the reference read "
             f"({_fmt(pg.get('reference_new_tokens_per_s'))} tok/s), identical {pg.get('requests_identical')}, "
             f"log-prob diff {_fmt(pg.get('logprob_max_diff_common_prefix'))}")
    for name, err in summary.get("errors", {}).items():
        lines.append(f"ERROR {name}: {err.splitlines()[0][:200]}")
    lines.append(f"checks: SFT loss@1 rel diff {_fmt(summary.get('sft_loss_rel_diff'))} (<= {LOSS_RTOL}: "
                 f"{summary.get('sft_losses_equal', '-')}), decode log-probs torch vs JAX mean |diff| "
                 f"{_fmt(summary.get('decode_logprob_mean_abs_diff'))} (<= {LOGPROB_REL} std: "
                 f"{summary.get('decode_logprobs_agree', '-')}), all finite {summary.get('all_finite')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, seconds)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (opt-in: {','.join(OPT_IN_PARTS)})")
    p.add_argument("--attention", default="auto", help="ModelConfig.attention_impl of the JAX model")
    p.add_argument("--logits-chunk", type=int, default=None, help="logits_chunk_size of the SFT and DPO steps")
    p.add_argument("--remat", default="auto", choices=("auto", "none", "dots", "full"),
                   help="the SFT and DPO steps' layer remat; auto: none unless the compiled step needs more "
                        "memory than the chip has (then dots, then full)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="device memory the SFT and DPO steps may use (default: what XLA reports for the chip)")
    p.add_argument("--out", default=None, help="write all figures as JSON here")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--partial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS) - set(OPT_IN_PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {PARTS + OPT_IN_PARTS}")
    if args.worker == "jax":
        report_result(_jax_worker(args))
        return 0
    if args.worker == "torch":
        report_result(_torch_worker(args))
        return 0

    started = time.perf_counter()
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_accel_") as tmp:
        base = [sys.executable, os.path.abspath(__file__), "--dir", tmp, "--attention", args.attention] + (
            ["--smoke"] if args.smoke else [])
        if args.logits_chunk:
            base += ["--logits-chunk", str(args.logits_chunk)]
        base += ["--remat", args.remat] + (["--memory-limit-gib", str(args.memory_limit_gib)]
                                           if args.memory_limit_gib else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

        def worker(name, worker_parts, rows):
            """One worker's result; if it dies, the rows it finished (its `--partial` file, kept beside
            `--out` while it runs) and an error row for each of `rows` it did not finish."""
            partial = f"{args.out}.{name}.partial" if args.out else os.path.join(tmp, f"{name}.partial")
            cmd = base + ["--worker", name.split("_")[0], "--parts", ",".join(worker_parts), "--partial", partial]
            try:
                result = run_worker(cmd, env=env)
            except RuntimeError as e:
                result = _read_partial(partial)
                for row in rows:
                    result["rows"].setdefault(row, {"error": f"{name} worker died: " + str(e)[-3000:]})
            if os.path.exists(partial):
                os.remove(partial)
            print(f"{name} worker: " + json.dumps(result, default=str), flush=True)   # kept if the run is cut short
            return result

        def keep(partial_result):
            if args.out:
                write_json(args.out, {"partial": True, **partial_result})

        # JAX first (SFT, DPO, decode), then torch (the baseline for the ratios), then GRPO in a JAX worker
        # of its own: the longest and least predictable part runs last, so a run cut short keeps the others.
        first = [p for p in parts if p not in ("grpo",)]
        jax_out = worker("jax", first, [p for p in first if p in JAX_PARTS]) if first else {"rows": {}}
        keep({"jax": jax_out})
        torch_out = None
        if "torch" in parts:
            torch_out = worker("torch", parts, TORCH_ROWS if "decode" in parts else ("sft",))
            keep({"jax": jax_out, "torch": torch_out})
        if "grpo" in parts:
            grpo_out = worker("jax_grpo", ["grpo"], ["grpo"])
            jax_out = {**grpo_out, **jax_out, "rows": {**jax_out["rows"], **grpo_out["rows"]}}
    summary = summarize(jax_out, torch_out)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.smoke,
              "wall_s": time.perf_counter() - started, "jax": jax_out, "torch": torch_out, "summary": summary}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(summary, indent=1, default=str))
    print(table(jax_out, torch_out, summary))
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
