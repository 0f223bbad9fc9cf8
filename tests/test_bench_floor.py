"""The benchmarks' shared helpers (benchmarks/bench_common.py): the matmul floor and the tokenizer.

`matmul_flops` is checked against XLA's own cost analysis of a compiled forward pass, and the
workload totals of WORKLOADS.md are pinned, so a change to either count shows up here. The
workloads' word-level tokenizer must map text to ids and back exactly and add no special tokens,
or the peers' runs (TRL's trainer sees text) would not see the ids ours do.
"""

import importlib.util
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.testing import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_common = _load("bench_common", os.path.join(ROOT, "benchmarks", "bench_common.py"))


def _workloads_stand_in():
    """A stand-in for shared/bench/workloads.py with WORKLOADS.md's model and workload constants."""
    model = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    return SimpleNamespace(
        MODEL=model,
        W1=dict(batch=8, seq_len=256),
        W2=dict(batch_pairs=8, prompt_len=64, completion_len=192),
        W3=dict(num_prompts=16, prompt_len=64, new_tokens=128),
        W4=dict(num_prompts=4, num_generations=8, prompt_len=64, new_tokens=64),
    )


def test_matmul_flops_matches_xla_cost_analysis_of_a_forward():
    config = tiny_config().replace(scan_layers=False)   # XLA counts a scan body once; unrolled it counts all
    lm = CausalLM(config)
    batch, length = 2, 32
    compiled = jax.jit(lambda p, t: lm.forward(p, t).logits).lower(
        lm.abstract_params(), jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = bench_common.matmul_flops(config, tokens=batch * length, head_positions=batch * length,
                                     attended_pairs=batch * length**2)   # a dense kernel scores the full square
    # XLA also counts the elementwise work (norms, RoPE, SiLU, softmax): a few percent on top.
    assert ours <= xla <= 1.08 * ours


def test_causal_pairs():
    assert bench_common.causal_pairs(4) == 1 + 2 + 3 + 4
    assert bench_common.causal_pairs(6, start=4) == 5 + 6
    assert bench_common.causal_pairs(3, start=3) == 0


def test_workload_flops_pinned():
    W = _workloads_stand_in()
    got = {name: bench_common.workload_flops(W, name) / 1e9 for name in ("w1", "w2", "w3", "w4")}
    assert got == pytest.approx({"w1": 67.759, "w2": 163.779, "w3": 29.118, "w4": 118.340}, abs=1e-3)
    # W1 by hand: 3 x (2 x (4 layers x 790,528 weights x 2,048 tokens + 256 x 8,192 x 2,040 head positions)
    #                  + 4 x 4 layers x 4 heads x 64 x 8 x 256 x 257 / 2 attended pairs)
    layer = 256 * 768 + 256 * 256 + 3 * 256 * 688
    by_hand = 3 * (2 * (4 * layer * 2048 + 256 * 8192 * 2040) + 4 * 4 * 4 * 64 * 8 * (256 * 257 // 2))
    assert bench_common.workload_flops(W, "w1") == by_hand
    with pytest.raises(ValueError, match="unknown workload 'w5'"):
        bench_common.workload_flops(W, "w5")


def test_wordlevel_tokenizer_round_trips_ids_and_adds_nothing():
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(4, 40)}
    W = SimpleNamespace(SPECIAL_TOKENS=specials, wordlevel_vocab=lambda: dict(vocab))
    ids = [4, 39, 17, 6, 8]
    text = " ".join(f"t{i}" for i in ids)
    for bos in (None, "<bos>"):
        tok = bench_common.wordlevel_tokenizer(W, bos_token=bos)
        assert tok(text)["input_ids"] == ids                       # no BOS/EOS added
        assert tok.decode(ids) == text
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 2, None if bos is None else 1)
    assert bench_common.wordlevel_tokenizer(W)("t5 t99")["input_ids"] == [5, 3]   # out of vocabulary -> <unk>
