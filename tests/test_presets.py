"""Model presets: real-size parameter counts from shapes alone, and the registry's contract."""

import chex
import jax
import numpy as np
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.models.hf import config_to_hf
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
