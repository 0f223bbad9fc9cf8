"""Process reward models: a per-step classification loss at step ends, and step-score aggregation.

A process reward model (PRM; Lightman et al. 2023, "Let's Verify Step by Step"; Uesato et al. 2022)
scores every reasoning step. Its data are solutions split into steps, each step followed by a step
separator and labelled correct or not (PRM800K, Math-Shepherd; TRL's stepwise-supervision format).
The model reads the whole solution once; its score logit at the last token of each step's separator
classifies that step — as TRL's `PRMTrainer` labels exactly those positions (all others -100) for a
token-classification head.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import _checks

__all__ = ["process_reward_loss", "aggregate_step_scores", "StepAggregation"]

StepAggregation = Literal["min", "last", "prod", "mean"]


def process_reward_loss(step_logits: jax.Array, labels: jax.Array, step_mask: jax.Array) -> jax.Array:
    """Per-position binary cross-entropy at step ends (unreduced).

    `l_{b,t} = m_{b,t} * (-y_{b,t} log sigmoid(s_{b,t}) - (1 - y_{b,t}) log(1 - sigmoid(s_{b,t})))
             = m_{b,t} * (softplus(s_{b,t}) - y_{b,t} s_{b,t})`

    where `s` is the scalar head's logit, `y` the step label (1 = correct) and `m` marks the last
    token of each step (its separator). A scalar logit is TRL's two-class token classification with
    `s = logit_1 - logit_0` (softmax over two classes is the sigmoid of their difference). Reduce
    with `sum(l) / sum(m)` over the global batch for the step-mean loss.

    Args:
      step_logits: f32 `[B, T]` the score head's values.
      labels: `[B, T]` step labels in {0, 1} (read only where `step_mask`).
      step_mask: bool or {0, 1} `[B, T]`, 1 at step ends.

    Returns:
      f32 `[B, T]`, zero off step ends.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = process_reward_loss(jnp.array([[0.0, 2.0, -1.0]]), jnp.array([[1, 1, 0]]), jnp.array([[0, 1, 1]]))
      >>> [round(float(x), 4) for x in loss[0]]
      [0.0, 0.1269, 0.3133]
    """
    s = jnp.asarray(step_logits, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    m = jnp.asarray(step_mask, jnp.float32)
    if not s.shape == y.shape == m.shape:
        raise ValueError(f"process_reward_loss: step_logits {s.shape}, labels {y.shape} and step_mask {m.shape} "
                         "must have one shape [B, T]")
    y_np, m_np = _checks.host_values(labels), _checks.host_values(step_mask)
    if y_np is not None and m_np is not None:  # values on the host: checked without a device round trip
        bad = (m_np != 0) & (y_np != 0) & (y_np != 1)
        if np.any(bad):
            raise ValueError(f"process_reward_loss: labels must be 0 or 1 where step_mask is set, got "
                             f"{sorted(set(y_np[bad].tolist()))[:5]}")
    return _checks.apply_mask(jax.nn.softplus(s) - y * s, m)


def aggregate_step_scores(step_logits: jax.Array, step_mask: jax.Array, *, mode: StepAggregation = "min"
                          ) -> jax.Array:
    """One score per solution from its steps' probabilities `p_k = sigmoid(s_k)` (k over step ends).

    - `min`:  `min_k p_k` (the weakest step decides; Wang et al. 2024, "Math-Shepherd"),
    - `prod`: `prod_k p_k` (the probability that every step is correct; Lightman et al. 2023's
      solution score),
    - `last`: `p_K` (the final step's score),
    - `mean`: `(1/K) sum_k p_k`.

    The default is `min` (as `PRMAlgorithm.aggregation` and `rewards.prm_aggregation`). A solution
    without steps scores 0.

    Args:
      step_logits: f32 `[B, T]` the PRM's logits.
      step_mask: `[B, T]`, 1 at step ends.
      mode: the aggregation.

    Returns:
      f32 `[B]` in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> s, m = jnp.array([[2.0, 0.0, -2.0, 9.0]]), jnp.array([[1, 0, 1, 0]])
      >>> [round(float(aggregate_step_scores(s, m, mode=k)[0]), 4) for k in ("min", "prod", "last", "mean")]
      [0.1192, 0.105, 0.1192, 0.5]
    """
    fn = "aggregate_step_scores"
    _checks.check_rank(fn, "step_logits", step_logits, 2)
    _checks.check_rank(fn, "step_mask", step_mask, 2)
    _checks.check_same_shape(fn, step_logits=step_logits, step_mask=step_mask)
    p = jax.nn.sigmoid(jnp.asarray(step_logits, jnp.float32))
    m = jnp.asarray(step_mask) != 0
    any_step = jnp.any(m, axis=1)
    if mode == "min":
        out = jnp.min(jnp.where(m, p, 1.0), axis=1)
    elif mode == "prod":
        out = jnp.exp(jnp.sum(jnp.where(m, jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=1))
    elif mode == "last":
        t = jnp.arange(m.shape[1])
        last = jnp.max(jnp.where(m, t, -1), axis=1)
        out = jnp.take_along_axis(p, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    elif mode == "mean":
        out = jnp.sum(jnp.where(m, p, 0.0), axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
    else:
        raise ValueError(f"aggregate_step_scores: mode must be one of 'min', 'last', 'prod', 'mean', got {mode!r}")
    return jnp.where(any_step, out, 0.0)
