"""Tiny model configs and the offline tokenizer for tests and notebooks.

Library code does not import this package: the tiny model is the `tiny` preset
(`rlhf_jax.models.presets.get_config("tiny")`) and the tokenizer is `rlhf_jax.data.offline_tokenizer`;
the names here re-export them.
"""

from rlhf_jax.testing.models import TINY_VOCAB_SIZE, tiny_config
from rlhf_jax.testing.tokenizer import OFFLINE_VOCAB_SIZE, offline_tokenizer, save_offline_tokenizer
