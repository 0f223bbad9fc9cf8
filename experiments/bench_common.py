"""Helpers shared by the benchmark scripts: machine quietness (WORKLOADS.md's rule), the worker-process
protocol (each measured run is its own process), result files, and the torch model.

Imported by `bench_*.py` as a sibling module (`python experiments/bench_x.py` puts this directory
on `sys.path`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


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
