"""Llama-family decoder-only transformers (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) in Flax NNX."""

from rlhf_jax.models.config import ModelConfig, RopeScaling
from rlhf_jax.models.transformer import (
    CausalLM, KVCache, ModelOutput, PrefixKV, PrefixKVCache, Transformer, attention_mask,
)
from rlhf_jax.models.heads import gather_last, init_scalar_head, last_token_index, scalar_head
from rlhf_jax.models.hf import HFCheckpointError, config_from_hf, config_to_hf, load_hf, save_hf
from rlhf_jax.models.presets import PRESETS, get_config
from rlhf_jax.models.lora import LoraConfig, LoraLM
