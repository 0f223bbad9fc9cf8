"""The sampler's data: `SamplingState` (the decode loop's carry) and `SampleOutput` (what a call returns).

Row layout: `N = B * n` rows for `B` prompts and `n` samples per prompt, the samples of prompt `b`
contiguous (rows `b*n .. b*n + n - 1`), as GRPO-style group estimators expect.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models import PrefixKV, PrefixKVCache

__all__ = ["SamplingState", "SampleOutput"]


_DATA_FIELDS = (
    "step", "last_tokens", "positions", "tokens", "logprobs", "done", "lengths", "prompt_k", "prompt_v",
    "cache_k", "cache_v", "rng", "row_ids",
)


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA_FIELDS, meta_fields=())
@dataclasses.dataclass(frozen=True)
class SamplingState:
    """Everything the decode loop carries, as one pytree (advanced by `decode_step`).

    Step `t` feeds `last_tokens` at position `positions` (per row), writing its keys and values to
    the rows' own cache slot `t`, samples completion token `t` from the resulting logits, and writes
    it to column `t` of `tokens`. Rows that already emitted a stop token keep running (a static
    batch) but record `pad_id` and log-prob 0.

    The cache is the model's `PrefixKVCache` split by layer: each prompt's keys and values once
    (`prompt_k`, `prompt_v`, shared by its `n` rows and never written) and each row's own slots
    (`cache_k`, `cache_v`), the first of which holds the prompt's last token (fed again at step 0).

    Attributes:
      step: int32 `[]`, completion tokens sampled so far (the same for every row).
      last_tokens: int32 `[N]`, the token fed at the next step.
      positions: int32 `[N]`, the absolute position of `last_tokens`.
      tokens: int32 `[N, C]` sampled completion tokens (`pad_id` after a row's stop token).
      logprobs: float32 `[N, C]` their log-probs under the tempered, untruncated distribution (stop ids
        not masked by `min_new_tokens`: the trainer's log-probs).
      done: bool `[N]`, the row has emitted a stop token.
      lengths: int32 `[N]` completion tokens so far, the stop token included.
      prompt_k, prompt_v: one `[B, kv_heads, P, head_dim]` array per layer, the `B = N / n`
        prompts' prefilled keys and values; prompt `b` is continued by rows `b*n .. b*n + n - 1`.
      cache_k, cache_v: one `[N, kv_heads, S, head_dim]` array per layer, the rows' own slots (the
        unstacked form, so the loop updates each layer's buffer in place and never slices a stack).
        `S <= C`: the cache may start shorter and grow to `C` slots (`grow_cache`), so that early
        steps attend over fewer slots.
      rng: PRNG key of the call.
      row_ids: int32 `[N]` global index of each row; row `r` draws its step-`t` uniform number from
        `fold_in(fold_in(rng, t), r)`, so samples do not depend on how rows are split over devices.
    """

    step: jax.Array
    last_tokens: jax.Array
    positions: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    lengths: jax.Array
    prompt_k: tuple[jax.Array, ...]
    prompt_v: tuple[jax.Array, ...]
    cache_k: tuple[jax.Array, ...]
    cache_v: tuple[jax.Array, ...]
    rng: jax.Array
    row_ids: jax.Array

    @property
    def max_new_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def cache_len(self) -> int:
        """Own slots the rows' cache has now (<= `max_new_tokens`)."""
        return self.cache_k[0].shape[2]

    def grow_cache(self, cache_len: int) -> "SamplingState":
        """The state with `cache_len` slots (new slots empty; they are written before being read)."""
        pad = ((0, 0), (0, 0), (0, cache_len - self.cache_len), (0, 0))
        return self.replace(cache_k=tuple(jnp.pad(a, pad) for a in self.cache_k),
                            cache_v=tuple(jnp.pad(a, pad) for a in self.cache_v))

    def kv_cache(self) -> PrefixKVCache:
        """The cache as the model's stacked `PrefixKVCache`, the next token going to own slot `step`; a
        row reads its prompt's slots before `positions - step` (its prompt's length - 1)."""
        prompts = PrefixKV(jnp.stack(self.prompt_k), jnp.stack(self.prompt_v), self.positions - self.step)
        return PrefixKVCache(prompts, jnp.stack(self.cache_k), jnp.stack(self.cache_v), self.step)

    def replace(self, **changes) -> "SamplingState":
        return dataclasses.replace(self, **changes)


class SampleOutput(NamedTuple):
    """Sampled completions with everything the trainer needs, one row per sample (`N = B * n`).

    The field names match the RL batch keys (`rlhf_jax.steps.RL_BATCH_KEYS`): pass `logprobs` as
    `sampler_logps`.

    Attributes:
      prompt_tokens: int32 `[N, P]` right-padded prompts (each prompt repeated for its `n` samples).
      prompt_lengths: int32 `[N]` real prompt lengths.
      completion_tokens: int32 `[N, C]` completions, `pad_id` after the stop token.
      completion_mask: bool `[N, C]`, True up to and including the first stop token.
      logprobs: float32 `[N, C]` log-probs of the tokens under `softmax(logits / T)` (0 off the mask).
      lengths: int32 `[N]` completion lengths (stop token included).
      truncated: bool `[N]`, no stop token within `max_new_tokens`.
    """

    prompt_tokens: jax.Array
    prompt_lengths: jax.Array
    completion_tokens: jax.Array
    completion_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    truncated: jax.Array
