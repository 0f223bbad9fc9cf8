"""rlhf_jax: JAX-native post-training of language models with human feedback.

The pure core is imported here; the heavier subpackages load on first use
(`rlhf_jax.models`, `rlhf_jax.data`, `rlhf_jax.sampling`, `rlhf_jax.steps`, ...).

Importing the package changes nothing process-wide (allocator, log levels, JAX listeners): entry
points do that, e.g. `rlhf_jax.host_memory.configure_from_env()` in the CLI and the benchmarks.
"""

import importlib

from rlhf_jax import advantages, logprobs, losses
from rlhf_jax.advantages import (
    adaptive_kl_controller,
    fixed_kl_controller,
    gae,
    group_normalized,
    leave_one_out,
    whiten,
)
from rlhf_jax.logprobs import (
    chunked_token_logprobs,
    next_token_targets,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)
from rlhf_jax.losses import aggregate, dpo_loss, kl_divergence, ppo_policy_loss, sft_loss

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint", "compile", "config", "data", "host_memory", "metrics", "models", "optim", "rewards",
    "sampling", "sharding", "state", "steps", "testing", "train",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"rlhf_jax.{name}")
    raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")


__all__ = [
    "adaptive_kl_controller", "advantages", "aggregate", "chunked_token_logprobs", "dpo_loss",
    "fixed_kl_controller", "gae", "group_normalized", "kl_divergence", "leave_one_out", "logprobs",
    "losses", "next_token_targets", "ppo_policy_loss", "sequence_logprobs", "sft_loss",
    "token_entropy", "token_logprobs", "whiten", *_SUBMODULES,
]
