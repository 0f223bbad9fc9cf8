"""Tiny model configurations that run in milliseconds on a CPU (the `tiny` model preset)."""

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.presets import TINY_VOCAB_SIZE, get_config

__all__ = ["TINY_VOCAB_SIZE", "tiny_config"]


def tiny_config(**overrides) -> ModelConfig:
    """`rlhf_jax.models.presets.get_config("tiny", **overrides)`: a 2-layer GQA Llama, hidden 64.

    Any `ModelConfig` field can be overridden, e.g. `tiny_config(model_type="qwen3", qk_norm=True)`.
    """
    return get_config("tiny", **overrides)
