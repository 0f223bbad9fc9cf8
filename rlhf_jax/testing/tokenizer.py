"""The offline character-level chat tokenizer, for tests (it lives in `rlhf_jax.data.offline_tokenizer`)."""

from rlhf_jax.data.offline_tokenizer import (
    OFFLINE_CHAT_TEMPLATE,
    OFFLINE_SPECIAL_TOKENS,
    OFFLINE_VOCAB_SIZE,
    offline_tokenizer,
    save_offline_tokenizer,
)

__all__ = [
    "OFFLINE_VOCAB_SIZE",
    "OFFLINE_SPECIAL_TOKENS",
    "OFFLINE_CHAT_TEMPLATE",
    "offline_tokenizer",
    "save_offline_tokenizer",
]
