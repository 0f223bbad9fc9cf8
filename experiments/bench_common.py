"""Helpers shared by the benchmark scripts: machine quietness (WORKLOADS.md's rule) and the torch model.

Imported by `bench_*.py` as a sibling module (`python experiments/bench_x.py` puts this directory
on `sys.path`).
"""

from __future__ import annotations

import os
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
