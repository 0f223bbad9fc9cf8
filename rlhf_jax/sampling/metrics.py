"""The sampler/trainer log-prob mismatch statistic for RL metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import _checks

__all__ = ["logprob_mismatch"]


def logprob_mismatch(sampler_logps: jax.Array, trainer_logps: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How far the sampler's log-probs are from the trainer's recomputation of the same tokens.

    `d = |log pi_trainer(y_t) - log pi_sampler(y_t)|` over completion tokens (`mask`); both sides use
    `rlhf_jax.logprobs` at the sampling temperature, so on the same parameters `d` is float rounding
    only (<= 1e-5 in float32). A larger value means a stale or differently cast sampler (e.g. a
    bfloat16 sampler for a float32 trainer), which biases on-policy importance ratios (Yao et al.,
    2025, "Your efficient RL framework secretly brings you off-policy RL training").

    Args:
      sampler_logps: float `[N, C]` log-probs returned by the sampler (`SampleOutput.logprobs`).
      trainer_logps: float `[N, C]` the trainer's log-probs of the same completion tokens.
      mask: bool or 0/1 `[N, C]` completion mask.

    Returns:
      `{"sampler_logprob_diff/mean": mean d, "sampler_logprob_diff/max": max d}` over the mask (0 for
      an empty mask); the names match the RL step's metrics.
    """
    fn = "logprob_mismatch"
    _checks.check_rank(fn, "sampler_logps", sampler_logps, 2)
    _checks.check_same_shape(fn, sampler_logps=sampler_logps, trainer_logps=trainer_logps, mask=mask)
    diff = jnp.abs(_checks.f32(trainer_logps) - _checks.f32(sampler_logps))
    return {
        "sampler_logprob_diff/mean": _checks.masked_mean(diff, mask),
        "sampler_logprob_diff/max": jnp.max(_checks.apply_mask(diff, mask)),
    }
