"""Tiny model configs, an offline tokenizer and fake data for tests, notebooks and the quickstart."""

from rlhf_jax.testing.models import TINY_VOCAB_SIZE, tiny_config
