"""Named model configurations: published architectures at full size, the benchmark model W1, and
`tiny`, a 2-layer model that runs in milliseconds on a CPU (tests, notebooks, the tiny experiments).

Shapes follow each model's Hugging Face `config.json`. Real-size presets train in mixed precision
(float32 parameters, bfloat16 compute); override any field with `get_config(name, **changes)`, e.g.
`get_config("qwen3-0.6b", param_dtype="bfloat16", remat="full")`. To fine-tune released weights,
load them with `rlhf_jax.models.hf.load_hf`, which reads the same architecture from the checkpoint.

Example:
  >>> config = get_config("llama-3.1-8b")
  >>> CausalLM(config).num_params()      # 8_030_261_248, from shapes alone (jax.eval_shape)
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from rlhf_jax.models.config import ModelConfig, RopeScaling

__all__ = ["PRESETS", "TINY_VOCAB_SIZE", "get_config", "register"]

_REGISTRY: dict[str, ModelConfig] = {}
# Read-only view of every registered preset, by name.
PRESETS: Mapping[str, ModelConfig] = types.MappingProxyType(_REGISTRY)


def register(name: str, config: ModelConfig) -> ModelConfig:
    """Add `config` to the registry under `name`; a name can be registered once only.

    Args:
      name: the preset's name, e.g. "llama-3.1-8b".
      config: its configuration.
    Returns:
      `config`, unchanged.
    Raises:
      ValueError: `name` is already registered (registries refuse duplicates).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"register: config for {name!r} must be a ModelConfig, got {type(config).__name__}")
    if name in _REGISTRY:
        raise ValueError(f"register: model preset {name!r} is already registered")
    _REGISTRY[name] = config
    return config


def get_config(name: str, **changes) -> ModelConfig:
    """The preset `name`, with any `ModelConfig` fields replaced by `changes`.

    Args:
      name: a key of `PRESETS`.
      **changes: fields to override (validated by `ModelConfig`).
    Returns:
      The `ModelConfig`.
    Raises:
      KeyError: unknown `name`, listing the known ones.
    """
    if name not in _REGISTRY:
        raise KeyError(f"get_config: unknown model preset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].replace(**changes) if changes else _REGISTRY[name]


_MIXED = dict(param_dtype="float32", dtype="bfloat16")

# Touvron et al. (2023), "Llama 2: Open Foundation and Fine-Tuned Chat Models".
register("llama-2-7b", ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096, rope_theta=10000.0,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **_MIXED,
))

# Grattafiori et al. (2024), "The Llama 3 Herd of Models"; 128k context through Llama 3 RoPE scaling.
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
register("llama-3.1-8b", ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_ROPE), rms_norm_eps=1e-5,
    bos_token_id=128000, eos_token_id=128001, **_MIXED,
))
register("llama-3.2-1b", ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
    num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_ROPE), rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=128000, eos_token_id=128001, **_MIXED,
))

# Jiang et al. (2023), "Mistral 7B" (v0.1: 4096-token sliding-window attention).
register("mistral-7b", ModelConfig(
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=10000.0,
    rms_norm_eps=1e-5, sliding_window=4096, bos_token_id=1, eos_token_id=2, **_MIXED,
))

# Qwen Team (2024), "Qwen2.5 Technical Report": q/k/v projections with bias.
register("qwen2.5-0.5b", ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
    num_heads=14, num_kv_heads=2, head_dim=64, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151643, **_MIXED,
))
# Qwen/Qwen2.5-1.5B's config.json says 131072 positions (its -Instruct model: 32768); 0.5B says 32768.
register("qwen2.5-1.5b", ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
    num_heads=12, num_kv_heads=2, head_dim=128, max_position_embeddings=131072, rope_theta=1000000.0,
    rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151643, **_MIXED,
))
register("qwen2.5-7b", ModelConfig(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
    num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=131072, rope_theta=1000000.0,
    rms_norm_eps=1e-6, attention_bias=True, bos_token_id=151643, eos_token_id=151643, **_MIXED,
))

# Qwen Team (2025), "Qwen3 Technical Report": RMSNorm on queries and keys, no biases.
register("qwen3-0.6b", ModelConfig(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
    rms_norm_eps=1e-6, qk_norm=True, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, **_MIXED,
))
register("qwen3-8b", ModelConfig(
    model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
    rms_norm_eps=1e-6, qk_norm=True, bos_token_id=151643, eos_token_id=151645, **_MIXED,
))

# The benchmark model of all peer workloads W1-W4 (../shared/bench/WORKLOADS.md): a 4-layer Llama
# with an untied LM head, float32 parameters and compute; 7,358,720 parameters.
register("w1", ModelConfig(
    model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
    num_heads=4, num_kv_heads=4, head_dim=64, max_position_embeddings=1024, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, param_dtype="float32", dtype="float32",
    # 4 layers: an unrolled loop compiles in seconds and runs ~10% faster than lax.scan on CPU
    # (no stacked-residual buffers to fill and slice); deep models keep scan for compile time.
    scan_layers=False,
))

# Room for every id of the offline tokenizer (`rlhf_jax.data.offline_tokenizer`, 104 ids) and of
# small test vocabularies.
TINY_VOCAB_SIZE = 256

# A 2-layer GQA Llama (4 query heads, 2 kv heads), hidden 64: 106,816 parameters, float32.
# `get_config("tiny", model_type="qwen3", qk_norm=True)` gives its other families.
register("tiny", ModelConfig(
    model_type="llama", vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
    rms_norm_eps=1e-6,
))
