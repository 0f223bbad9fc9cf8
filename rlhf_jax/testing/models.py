"""Tiny model configurations that run in milliseconds on a CPU."""

from rlhf_jax.models.config import ModelConfig

# Room for every id of the offline tokenizer (`OFFLINE_VOCAB_SIZE` = 104) and of small test vocabularies.
TINY_VOCAB_SIZE = 256


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA Llama (4 query heads, 2 kv heads) with the offline tokenizer's vocabulary.

    Any `ModelConfig` field can be overridden, e.g. `tiny_config(model_type="qwen3", qk_norm=True)`.
    """
    fields = dict(
        model_type="llama",
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    )
    fields.update(overrides)
    return ModelConfig(**fields)
