"""Helpers shared by the benchmark scripts: machine quietness (WORKLOADS.md's rule), the worker-process
protocol (each measured run is its own process), result files, the torch model and the workloads'
tokenizer, and the matmul floor (a workload's matmul FLOPs over this machine's measured matmul
throughput).

Imported by `bench_*.py` as a sibling module (`python benchmarks/bench_x.py` puts this directory
on `sys.path`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace


def busy_cores(seconds: float = 2.0) -> float:
    """Cores busy on the whole machine (all processes) over `seconds`, from /proc/stat."""
    def sample():
        values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return sum(values) - values[3] - values[4], time.perf_counter()

    (busy0, t0) = sample()
    time.sleep(seconds)
    (busy1, t1) = sample()
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def wait_until_quiet(threshold: float = 0.15, max_wait_s: float = 300.0) -> float:
    """Block until fewer than `threshold` cores are busy (or `max_wait_s` passed); return the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_cores()
        if busy < threshold or time.monotonic() > deadline:
            return busy


def hf_llama(W, *, eos_token_id: int | None = None):
    """The workloads' Llama as a transformers `LlamaForCausalLM` (torch; seed `W.MODEL_INIT_SEED`).

    What TRL trains and samples with; used to calibrate this machine against PEERS.md, which was
    measured on another CPU.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = W.MODEL
    config = LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], head_dim=m["head_dim"],
        max_position_embeddings=m["max_position_embeddings"], rope_theta=m["rope_theta"],
        rms_norm_eps=m["rms_norm_eps"], tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        pad_token_id=W.PAD_ID, bos_token_id=W.BOS_ID,
        eos_token_id=W.EOS_ID if eos_token_id is None else eos_token_id,
    )
    torch.manual_seed(W.MODEL_INIT_SEED)
    return LlamaForCausalLM(config)


def matmul_flops(config, *, tokens: int, head_positions: int, attended_pairs: int) -> float:
    """Matmul FLOPs of one forward pass: `2 (L w tokens + E V head_positions) + 4 L H d attended_pairs`.

    `w` is one layer's weights (q, k, v, o and the three MLP matrices), `tokens` the positions run
    through the layers, `head_positions` those run through the LM head, and `attended_pairs` the
    (query, key) pairs that attention scores and sums per layer and head group: `T (T + 1) / 2` per
    causal row done exactly, `T^2` as a dense kernel computes it. A backward pass costs twice its
    forward (input and weight gradients). The embedding lookup is a gather: no FLOPs.
    """
    c = config
    layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
             + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    dense = 2 * (c.num_layers * layer * tokens + c.hidden_size * c.vocab_size * head_positions)
    return float(dense + 4 * c.num_layers * c.num_heads * c.head_dim * attended_pairs)


def causal_pairs(length: int, start: int = 0) -> int:
    """(query, key) pairs of causal attention for queries at positions `start .. length - 1`."""
    return sum(q + 1 for q in range(start, length))


def workload_model(W):
    """The workloads' model shapes (`W.MODEL`) under `matmul_flops`'s field names, without importing JAX."""
    m = W.MODEL
    return SimpleNamespace(hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                           num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
                           num_kv_heads=m["num_key_value_heads"], head_dim=m["head_dim"], vocab_size=m["vocab_size"])


def workload_flops(W, name: str) -> float:
    """The fewest matmul FLOPs one step (W1, W2, W4) or call (W3) of a WORKLOADS.md workload needs.

    Counted with exact causal attention, the LM head only where a token is predicted, and a forward +
    backward as 3 forwards:
    - W1: 8 x 256 tokens forward and backward; 255 predicted tokens per row.
    - W2: 16 x 256 tokens forward and backward, plus the reference forward; 192 predicted per row.
    - W3: 16 prompts of 64 prefilled, then 127 single-token steps for 16 rows (the last of the 128
      sampled tokens is never fed back).
    - W4: 4 prompts of 64 prefilled, 63 steps for 32 rows; then the reference forward and the policy
      forward + backward, each with a group's prompt run once and 32 rows x 63 completion tokens
      after it (a prompt shared by its 8 samples is the least any implementation must run).
    """
    m = workload_model(W)
    if name == "w1":
        b, t = W.W1["batch"], W.W1["seq_len"]
        return 3 * matmul_flops(m, tokens=b * t, head_positions=b * (t - 1), attended_pairs=b * causal_pairs(t))
    if name == "w2":
        rows, t = 2 * W.W2["batch_pairs"], W.W2["prompt_len"] + W.W2["completion_len"]
        forward = matmul_flops(m, tokens=rows * t, head_positions=rows * W.W2["completion_len"],
                               attended_pairs=rows * causal_pairs(t))
        return 4 * forward
    if name in ("w3", "w4"):
        spec = W.W3 if name == "w3" else W.W4
        prompts, p, new = spec["num_prompts"], spec["prompt_len"], spec["new_tokens"]
        rows = prompts * spec.get("num_generations", 1)
        prefill = matmul_flops(m, tokens=prompts * p, head_positions=prompts, attended_pairs=prompts * causal_pairs(p))
        steps = matmul_flops(m, tokens=rows * (new - 1), head_positions=rows * (new - 1),
                             attended_pairs=rows * causal_pairs(p + new - 1, start=p))
        generation = prefill + steps
        # W4's reference forward reads what generation read (prompt once, then the completions),
        # and the policy's forward + backward is three of those.
        return generation if name == "w3" else 5 * generation
    raise ValueError(f"workload_flops: unknown workload {name!r} (w1, w2, w3, w4)")


def wordlevel_tokenizer(W, *, bos_token: str | None = None):
    """The workloads' word-level tokenizer (id i <-> word "t{i}", specials registered, no post-processor).

    `bos_token` only names the special (nothing is ever prepended): W3's text API passes `"<bos>"`;
    W4's prompts are exactly 64 ids, so its runs leave it unset.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=W.wordlevel_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(W.SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token=bos_token,
                                   eos_token="<eos>", unk_token="<unk>")


def timed_calls(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (which blocks until its result is ready)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def matmul_probe(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """This machine's f32 matmul throughput right now: a `n^3` NumPy (BLAS, all cores) matmul, median.

    Returns `(GFLOP per wall second, GFLOP per CPU second of this process)`. Run after a worker's
    timed window (BLAS threads are not XLA's), the first says how fast the host was at that time:
    shared hosts drift over minutes (37 to 186 GFLOP/s on the 2-core machine). The second is what a
    CPU second of this process buys at the large-matmul rate; other processes on the host change it
    much less than the wall rate (they take cores away, not speed per CPU second).
    """
    import numpy as np

    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 2 * n**3 / sorted(times)[repeats // 2] / 1e9, 2 * n**3 / sorted(cpu)[repeats // 2] / 1e9


def peak_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP per wall second of `matmul_probe`."""
    return matmul_probe(n, repeats)[0]


def floor_figures(flops: float, step_s: float, target_s: float | None = None, cpu_s: float | None = None) -> dict:
    """A step's matmul floor: `flops / peak` with the peak measured now, and where the step and target sit.

    `floor_s` is what the step would take if every FLOP ran at the large-matmul rate and nothing else
    (norms, softmax, optimizer, data) took any time; a target below it cannot be met on this machine.
    With the step's CPU seconds `cpu_s`, also `cpu_over_floor`: `cpu_s` over the CPU seconds the
    probe needs for `flops` (`cpu_floor_s`), the same ratio in CPU time, which a shared host's load
    moves much less (on a quiet host it is close to `step_over_floor`).
    """
    gflops, cpu_gflops = matmul_probe()
    floor_s = flops / (gflops * 1e9)
    out = {"step_gflop": round(flops / 1e9, 2), "peak_matmul_gflops": round(gflops, 1), "floor_s": floor_s,
           "step_over_floor": step_s / floor_s}
    if target_s is not None:
        out["target_over_floor"] = target_s / floor_s
    if cpu_s is not None:
        out.update(cpu_matmul_gflops=round(cpu_gflops, 1), cpu_floor_s=flops / (cpu_gflops * 1e9),
                   cpu_over_floor=cpu_s * cpu_gflops * 1e9 / flops)
    return out


def floor_text(row: dict, what: str = "step") -> str:
    """`floor_figures` as one printed clause; `what` names the timed unit (a step, a call)."""
    text = (f"matmul floor {row['floor_s']:.3f} s ({row['step_gflop']:.1f} GFLOP at {row['peak_matmul_gflops']:.0f} "
            f"GFLOP/s measured), {what} = {row['step_over_floor']:.2f}x floor")
    if "target_over_floor" in row:
        text += f", target = {row['target_over_floor']:.2f}x floor"
    if "cpu_over_floor" in row:
        text += f"; in CPU time {what} = {row['cpu_over_floor']:.2f}x floor ({row['cpu_matmul_gflops']:.0f} GFLOP/CPU-s)"
    return text


RESULT_PREFIX = "RESULT "


def report_result(result: dict) -> None:
    """A worker process's last act: print its result row for `run_worker` to parse.

    Adds how rlhf_jax set up host memory in the worker (`rlhf_jax.host_memory.status()`), when the
    worker imported it.
    """
    memory = sys.modules.get("rlhf_jax.host_memory")
    if memory is not None:
        result = {**result, "host_memory": memory.status()}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one benchmark worker process and return its result row (`report_result`).

    Raises `RuntimeError` with the tail of the worker's output when it fails or reports nothing.
    """
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if out.returncode or line is None:
        raise RuntimeError(f"benchmark worker failed (exit {out.returncode}): {' '.join(cmd)}\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[len(RESULT_PREFIX):])


def write_json(path: str, value) -> None:
    """Write `value` as indented JSON to `path` (creating its folder) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    print(f"wrote {path}")


def op_kinds(hlo: str) -> dict[str, str]:
    """HLO instruction name -> its kind, from a compiled program's text (`compiled.as_text()`): "matmul
    fusion", "reduction fusion", "other fusion", "dot" (a dot outside any fusion), "while" or "copy"."""
    import re  # noqa: PLC0415

    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    kinds = {}
    for name, op, rest in re.findall(r"%([\w.\-]+) = [^\n]*? (fusion|dot|while|copy)\(([^\n]*)", hlo):
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            body = bodies.get(called.group(1), "") if called else ""
            op = "matmul fusion" if " dot(" in body else "reduction fusion" if " reduce(" in body else "other fusion"
        kinds[name] = op
    return kinds


def traced_op_times(call) -> dict[str, tuple[int, float]]:
    """Run `call()` (which blocks until its result is ready) under `jax.profiler.trace`; return, per HLO
    instruction name, (events, CPU-thread nanoseconds) from XLA:CPU's worker threads.

    XLA:CPU records one event per op only when the process started with
    `--xla_cpu_enable_xprof_traceme=true` in `XLA_FLAGS` (set it before JAX starts).
    """
    import collections  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import jax  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            call()
        profile = jax.profiler.ProfileData.from_file(
            next(os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".xplane.pb")))
    out = collections.defaultdict(lambda: [0, 0.0])
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):   # XLA:CPU's worker threads
                continue
            for event in line.events:
                out[event.name][0] += 1
                out[event.name][1] += event.duration_ns
    return {name: (count, ns) for name, (count, ns) in out.items()}
