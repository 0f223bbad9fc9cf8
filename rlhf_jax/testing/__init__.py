"""Tiny model configs, an offline tokenizer and fake data for tests, notebooks and the quickstart."""

from rlhf_jax.testing.models import TINY_VOCAB_SIZE, tiny_config
from rlhf_jax.testing.tokenizer import OFFLINE_VOCAB_SIZE, offline_tokenizer, save_offline_tokenizer
