"""Model presets: real-size parameter counts from shapes alone, and the registry's contract."""

import chex
import jax
import numpy as np
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.models.hf import config_to_hf
from rlhf_jax.models.hf_config import config_from_hf
from rlhf_jax.models.presets import PRESETS, get_config, register

# Parameter counts as published (model cards / safetensors index totals); W1 from WORKLOADS.md.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "w1": 7_358_720,
}


# The architecture fields of each model's Hugging Face `config.json` (the file at
# huggingface.co/<repo>/blob/main/config.json, named per entry), as published; what `get_config`
# must reproduce. Values cross-checked against public copies of those files (transformers-based
# projects that quote them, litgpt's configs citing the same URLs). Only the fields rlhf-jax reads.
_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
OFFICIAL = {
    # meta-llama/Llama-2-7b-hf (rms_norm_eps 1e-05 since the July 2023 config fix; 1e-06 before).
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=None, rms_norm_eps=1e-05, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=1, eos_token_id=2, initializer_range=0.02),
    # meta-llama/Llama-3.1-8B (the base model: eos 128001; the Instruct model lists 128001, 128008, 128009).
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-05, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=128000, eos_token_id=128001, initializer_range=0.02),
    # meta-llama/Llama-3.2-1B: head_dim 64 (= 2048 / 32), RoPE factor 32, tied head.
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), rms_norm_eps=1e-05,
        tie_word_embeddings=True, attention_bias=False, bos_token_id=128000, eos_token_id=128001,
        initializer_range=0.02),
    # mistralai/Mistral-7B-v0.1: vocab 32000 and a 4096-token sliding window (v0.3: 32768, no window).
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
        rms_norm_eps=1e-05, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.02),
    # Qwen/Qwen2.5-0.5B: q/k/v bias (implied by model_type qwen2), tied head, no sliding window in use.
    "qwen2.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-06, sliding_window=32768, use_sliding_window=False, max_window_layers=24,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, initializer_range=0.02),
    # Qwen/Qwen2.5-1.5B (the base model: max_position_embeddings 131072; Qwen2.5-1.5B-Instruct: 32768).
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1000000.0,
        rms_norm_eps=1e-06, sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, initializer_range=0.02),
    # Qwen/Qwen2.5-7B: untied head and vocab 152064 (the smaller Qwen2.5 models: 151936, tied).
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1000000.0,
        rms_norm_eps=1e-06, sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643, initializer_range=0.02),
    # Qwen/Qwen3-0.6B: head_dim 128 (not 1024 / 16), q/k RMSNorm (implied by qwen3), tied head.
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000, rope_scaling=None, rms_norm_eps=1e-06, sliding_window=None,
        use_sliding_window=False, attention_bias=False, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151645, initializer_range=0.02),
    # Qwen/Qwen3-8B: untied head.
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000, rope_scaling=None, rms_norm_eps=1e-06, sliding_window=None,
        use_sliding_window=False, attention_bias=False, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645, initializer_range=0.02),
}


def _count_by_hand(c) -> int:
    """Σ of every weight matrix, bias and norm scale, written out from the architecture."""
    e, f, d, h, k = c.hidden_size, c.intermediate_size, c.head_dim, c.num_heads, c.num_kv_heads
    attention = e * (h + 2 * k) * d + h * d * e
    if c.attention_bias:
        attention += (h + 2 * k) * d
    if c.qk_norm:
        attention += 2 * d
    layer = attention + 3 * e * f + 2 * e
    embeddings = c.vocab_size * e * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_layers * layer + e


def test_every_preset_is_covered():
    assert set(PRESETS) == set(PUBLISHED) | {"tiny"}


def test_tiny_preset_is_the_test_model():
    """`get_config("tiny")`: what `rlhf_jax.testing.tiny_config` returns, with room for the offline tokenizer."""
    from rlhf_jax.data.offline_tokenizer import OFFLINE_VOCAB_SIZE
    from rlhf_jax.testing import TINY_VOCAB_SIZE, tiny_config

    c = get_config("tiny")
    assert c == tiny_config() and c.vocab_size == TINY_VOCAB_SIZE == 256 >= OFFLINE_VOCAB_SIZE == 104
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_layers) == ("llama", 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (4, 2, 16, 512)
    assert (c.param_dtype, c.dtype) == ("float32", "float32")
    # 2 x 256 x 64 embeddings and head, 2 layers of (attention 12,288 + MLP 24,576 + norms 128), final norm.
    assert CausalLM(c).num_params() == _count_by_hand(c) == 106_816
    assert get_config("tiny", model_type="qwen3", qk_norm=True) == tiny_config(model_type="qwen3", qk_norm=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_from_eval_shape(name):
    config = get_config(name)
    lm = CausalLM(config)
    shapes = jax.eval_shape(lm.init, jax.random.key(0))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, lm.abstract_params())
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == lm.num_params() == _count_by_hand(config)
    assert abs(count - PUBLISHED[name]) <= 1e-3 * PUBLISHED[name]
    assert count == PUBLISHED[name]  # in fact exact



def test_every_published_model_has_its_official_config():
    assert set(OFFICIAL) == set(PUBLISHED) - {"w1"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_fields_are_the_official_config(name):
    """Each field against config.json read by hand (not through rlhf-jax's loader), then the whole config."""
    hf, c = OFFICIAL[name], get_config(name)
    rope = hf.get("rope_scaling")
    window = hf.get("sliding_window") if hf["model_type"] == "mistral" or hf.get("use_sliding_window") else None
    assert {
        "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "initializer_range": c.initializer_range,
        "rope_scaling": None if c.rope_scaling is None else c.rope_scaling.hf_parameters(),
        "sliding_window": c.sliding_window, "qkv_bias": c.attention_bias, "qk_norm": c.qk_norm,
    } == {
        **{k: hf[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rope_theta",
                              "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                              "initializer_range")},
        "head_dim": hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        "rope_scaling": rope,
        "sliding_window": window, "qkv_bias": hf["model_type"] == "qwen2", "qk_norm": hf["model_type"] == "qwen3",
    }
    # and what loading that config.json gives, in the preset's mixed precision (float32 weights, bf16 compute)
    assert c == config_from_hf(hf).replace(param_dtype="float32", dtype="bfloat16")


def test_transformers_counts_the_same_parameters():
    """transformers builds each preset (on torch's meta device, no memory) with our counts."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in sorted(PUBLISHED):
        hf = config_to_hf(get_config(name))
        hf_config = transformers.AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                                            if k != "model_type"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name], name


def test_w1_matches_the_benchmark_definition():
    c = get_config("w1")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (8192, 256, 688, 4)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (4, 4, 64, 1024)
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (10000.0, 1e-6, False)
    assert not c.attention_bias and not c.qk_norm and c.rope_scaling is None
    assert (c.param_dtype, c.dtype) == ("float32", "float32")


def test_family_features():
    assert get_config("mistral-7b").sliding_window == 4096
    assert get_config("llama-3.1-8b").rope_scaling.factor == 8.0
    assert get_config("llama-3.2-1b").rope_scaling.factor == 32.0
    # Qwen/Qwen2.5-1.5B's config.json: 131072 (it was 32768, the -Instruct model's value)
    assert get_config("qwen2.5-1.5b").max_position_embeddings == get_config("qwen2.5-7b").max_position_embeddings == 131072
    assert all(get_config(n).attention_bias for n in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"))
    assert all(get_config(n).qk_norm for n in ("qwen3-0.6b", "qwen3-8b"))
    assert [n for n in sorted(PRESETS) if get_config(n).tie_word_embeddings] == [
        "llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen3-0.6b"]


def test_get_config_overrides_and_errors():
    config = get_config("qwen3-0.6b", param_dtype="bfloat16", remat="full")
    assert (config.param_dtype, config.remat) == ("bfloat16", "full")
    assert PRESETS["qwen3-0.6b"].param_dtype == "float32"  # the registry is untouched
    with pytest.raises(KeyError, match="unknown model preset 'llama-5'.*qwen3-8b"):
        get_config("llama-5")
    with pytest.raises(ValueError, match="remat"):
        get_config("w1", remat="sometimes")


def test_registry_refuses_duplicates_and_is_read_only():
    with pytest.raises(ValueError, match="'w1' is already registered"):
        register("w1", get_config("w1"))
    with pytest.raises(TypeError):
        PRESETS["w2"] = get_config("w1")
    with pytest.raises(TypeError, match="must be a ModelConfig"):
        register("not-a-config", {"vocab_size": 8})
    assert "not-a-config" not in PRESETS
