"""rlhf_jax: JAX-native post-training of language models with human feedback."""

__version__ = "0.1.0"
