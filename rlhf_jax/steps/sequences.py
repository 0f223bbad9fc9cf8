"""From a batch of token rows to per-token and per-sequence log-probs, for any step.

Conventions (`rlhf_jax.data`): rows are right padded; `loss_mask[b, t]` marks token `t` as a
*target* (completion / assistant tokens and their EOS); packed rows carry `segment_ids` (0 =
padding, segments 1..S) and per-segment `positions`. The logit at position `t` predicts token
`t + 1`, so targets are `tokens[:, 1:]` under `loss_mask[:, 1:]`, never across a segment boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.logprobs import chunked_token_logprobs, token_logprobs
from rlhf_jax.models.lora import head_needs_logits

__all__ = [
    "Targets",
    "causal_targets",
    "forward_token_logps",
    "shifted_label_is_argmax",
    "shifted_token_logprobs",
    "interleave",
    "deinterleave",
    "pad_time",
    "side",
]


class Targets(NamedTuple):
    """Next-token targets of a `[B, T]` batch: all `[B, T - 1]`.

    labels: int token to predict at each position; mask: float32 1 where it is trained on;
    segments: int segment of the target (1 for unpacked rows, 0 where there is none).
    """

    labels: jax.Array
    mask: jax.Array
    segments: jax.Array


def causal_targets(tokens: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None) -> Targets:
    """Shift a batch into next-token targets, never predicting across segments.

    `labels = tokens[:, 1:]`; `mask_t = loss_mask_{t+1} * [seg_{t+1} = seg_t != 0]`.

    Args:
      tokens: int `[B, T]`.
      loss_mask: `[B, T]`, nonzero on target tokens.
      segment_ids: int `[B, T]` of packed rows, or None (one sequence per row).

    Returns:
      `Targets(labels, mask, segments)`, each `[B, T - 1]`.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"causal_targets: tokens must be [B, T] with T >= 2, got shape {tokens.shape}")
    if jnp.shape(loss_mask) != tokens.shape:
        raise ValueError(f"causal_targets: loss_mask shape {jnp.shape(loss_mask)} != tokens shape {tokens.shape}")
    mask = jnp.asarray(loss_mask)[:, 1:] != 0
    if segment_ids is None:
        segments = jnp.ones(mask.shape, jnp.int32)
    else:
        seg = jnp.asarray(segment_ids)
        if seg.shape != tokens.shape:
            raise ValueError(f"causal_targets: segment_ids shape {seg.shape} != tokens shape {tokens.shape}")
        segments = seg[:, 1:].astype(jnp.int32)
        mask = mask & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return Targets(tokens[:, 1:], mask.astype(jnp.float32), jnp.where(mask, segments, 0))


def shifted_token_logprobs(logits: jax.Array, labels: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """`token_logprobs(logits[:, :-1], labels)` for `logits [B, T, V]` and next-token `labels [B, T-1]`.

    Computed on all `T` positions (the last with a dummy label) and sliced afterwards: slicing the
    `[B, T]` log-probs is free, while slicing the `[B, T, V]` logits makes the backward pass pad
    the whole logits gradient (a full extra pass over `B·T·V` floats). Same values.
    """
    full = token_logprobs(logits, pad_time(labels, logits.shape[1]), temperature=temperature)
    return full[:, :-1]


def shifted_label_is_argmax(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Float `[B, T-1]`: 1 where the label's logit is the row's maximum (`argmax = label`, ties count).

    Compares with the row max (which the log-softmax computes anyway) instead of an arg-max scan.
    """
    full_labels = pad_time(labels, logits.shape[1])
    label_logit = jnp.take_along_axis(logits, full_labels[..., None], axis=-1)[..., 0]
    return (label_logit >= jnp.max(logits, axis=-1))[:, :-1].astype(jnp.float32)


def forward_token_logps(model, params, tokens: jax.Array, labels: jax.Array, *, positions=None, segment_ids=None,
                        chunk_size: int | None = None, temperature: float = 1.0, rng=None):
    """Run the model and return `(token_logps [B, T-1], output)` for `labels = tokens[:, 1:]`.

    With `chunk_size`, log-probs come from the final hidden states and the LM head weight chunk by
    chunk (`chunked_token_logprobs`: no `[B, T, V]` logits; XLA drops the unused full logits);
    otherwise from the full logits (`token_logprobs`). Both are float32. `rng`: the training key of
    the model's stochastic layers (LoRA dropout), None for a deterministic pass. A training pass
    with dropout on a LoRA `lm_head` adapter reads the full logits whatever `chunk_size`
    (`models.lora.head_needs_logits`: the merged head weight has no dropout).
    """
    out = model.forward(params, tokens, positions, segment_ids, rng=rng)
    if chunk_size is None or head_needs_logits(model, rng):
        logps = shifted_token_logprobs(out.logits, labels, temperature=temperature)
    else:
        logps = chunked_token_logprobs(out.hidden[:, :-1], model.lm_head_weight(params), labels,
                                       temperature=temperature, chunk_size=chunk_size)
    return logps, out


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[B, ...]`, `[B, ...]` -> `[2B, ...]` with rows a0, b0, a1, b1, ... (keeps data-parallel rows local)."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def deinterleave(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `interleave`."""
    pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def pad_time(x: jax.Array, length: int, value=0) -> jax.Array:
    """Right-pad the time axis (axis 1) of `x` to `length`."""
    extra = length - x.shape[1]
    if extra < 0:
        raise ValueError(f"pad_time: array of length {x.shape[1]} is longer than {length}")
    if extra == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), constant_values=value)


def side(batch: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array | None]:
    """The `tokens`, `loss_mask`, `positions`, `segment_ids` of one side of a batch (`"chosen_"`, `""`, ...)."""
    return {
        "tokens": batch[prefix + "tokens"],
        "loss_mask": batch[prefix + "loss_mask"],
        "positions": batch.get(prefix + "positions"),
        "segment_ids": batch.get(prefix + "segment_ids"),
    }
