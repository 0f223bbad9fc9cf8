"""Rollout engine: a pure-JAX sampler with a KV cache that runs the trainer's own model code.

`Sampler` is the user-facing entry point; `prefill` / `decode_step` / `decode` / `finalize` are the
pure program it jits; the sampling methods are small frozen dataclasses. See `sampler.py` for the
design and `methods.py` for what the returned log-probs are with top-k / top-p / min-p (alone
or combined, `Filtered`).
"""

from rlhf_jax.sampling.continuous import ContinuousBatcher, ContinuousStats
from rlhf_jax.sampling.decode import (
    decode,
    decode_step,
    finalize,
    prefill,
    row_uniforms,
    stack_layers,
    unstack_layers,
)
from rlhf_jax.sampling.methods import (
    Categorical,
    Filtered,
    Greedy,
    MinP,
    SamplingMethod,
    TopK,
    TopP,
    make_method,
    sample_from_logits,
)
from rlhf_jax.sampling.metrics import logprob_mismatch
from rlhf_jax.sampling.requests import Request, RequestOutput
from rlhf_jax.sampling.sampler import (
    Sampler,
    SamplerParams,
    SamplerStats,
    SamplingConfig,
    default_prompt_buckets,
)
from rlhf_jax.sampling.state import SampleOutput, SamplingState

__all__ = [
    "Sampler",
    "Request",
    "RequestOutput",
    "ContinuousBatcher",
    "ContinuousStats",
    "SamplerParams",
    "SamplerStats",
    "SamplingConfig",
    "default_prompt_buckets",
    "SampleOutput",
    "SamplingState",
    "prefill",
    "decode_step",
    "decode",
    "finalize",
    "row_uniforms",
    "stack_layers",
    "unstack_layers",
    "Greedy",
    "Categorical",
    "TopK",
    "TopP",
    "MinP",
    "Filtered",
    "SamplingMethod",
    "make_method",
    "sample_from_logits",
    "logprob_mismatch",
]
