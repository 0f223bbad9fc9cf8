"""Llama-family decoder-only transformers (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) in Flax NNX."""

from rlhf_jax.models.config import ModelConfig, RopeScaling
from rlhf_jax.models.transformer import CausalLM, KVCache, ModelOutput, Transformer, attention_mask
