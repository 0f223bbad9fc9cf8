"""The pure sampling program: prefill once, then decode one token per step inside `lax.while_loop`.

    state = prefill(model, params, prompts, lengths, max_new_tokens=C, num_samples=n, rng=key)
    state = decode(model, params, state, method=TopP(p=0.9), stop_ids=(eos,))
    out = finalize(state, prompts, lengths, num_samples=n)

Prefill runs the model once over the `B` right-padded prompts into a KV cache of `P` slots per
prompt; the `N = B * n` rows (a group of `n` samples per prompt) then share it: decoding keeps the
prompts' keys and values once (`SamplingState.prompt_k/prompt_v`, the model's `PrefixKVCache`) and
gives each row its own `C` slots for the tokens it feeds, so a group's rows read their prompt's
keys and values once per step (`attention.prefix_cache_attention`) and the cache holds
`B * P + N * C` slots, not `N * (P + C - 1)`. The prefill's logits are never used (XLA drops the LM head
and the last layer's MLP): every completion token, the first included, is sampled by the decode
step, which feeds a row's last token at its own position (`positions[b]`; the prompt's last token
at step 0, the prompt slots a row reads stopping before it), so right-padded prompts of different
lengths decode together and each row continues from its own length.

Decode layout: the loop carries one cache buffer per layer (`SamplingState.cache_k/cache_v`) and the
parameters may come with `params["layers"]` as a tuple of per-layer trees (`unstack_layers`). The
step re-stacks both before calling the model and unstacks the returned cache; with a model built
with `scan_layers=False` (whose layer loop indexes the stacks with constants), XLA folds every
stack/slice pair away, so each step updates each layer's cache in place and reads the weights where
they are. With stacked arrays XLA:CPU copies each layer's weights and cache slice before its
matmuls, at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.models.layers import padded_row_positions
from rlhf_jax.sampling.methods import SamplingMethod, suppress_stop_ids
from rlhf_jax.sampling.state import SampleOutput, SamplingState

__all__ = ["unstack_layers", "stack_layers", "row_uniforms", "prefill", "decode_step", "decode", "finalize"]


def unstack_layers(params: dict) -> dict:
    """Parameters with `params["layers"]` split into a tuple of per-layer trees (the decode layout).

    `unstack_layers(p)["layers"][i] = tree_map(lambda a: a[i], p["layers"])`; `stack_layers` inverts
    it. Already unstacked parameters are returned as they are.
    """
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers))}


def stack_layers(params: dict) -> dict:
    """Parameters with per-layer trees stacked back on a leading `layers` axis (the model's layout)."""
    layers = params["layers"]
    if not isinstance(layers, tuple):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def row_uniforms(rng: jax.Array, step: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One uniform number in [0, 1) per row for step `step`: `U(fold_in(fold_in(rng, step), row))`.

    Keyed by the global row index, so a row's draws are the same whichever device holds it.
    """
    key = jax.random.fold_in(rng, step)
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (), jnp.float32))(row_ids)


def prefill(
    model,
    params: dict,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    rng: jax.Array,
    pad_id: int = 0,
    cache_chunk: int | None = None,
    row_offset: int | jax.Array = 0,
) -> SamplingState:
    """Run the prompts through the model once and return the decode loop's initial state.

    The prompts' `P` cache slots are shared by their rows; each row gets its own slots for the
    `max_new_tokens` tokens it feeds (the prompt's last token, then all sampled tokens but the last).
    With `cache_chunk` the rows' cache starts with the slots of the first `cache_chunk` steps only
    and `decode` grows it by `cache_chunk` slots at a time, so early steps attend over fewer slots.
    Row `b * n + j` is sample `j` of prompt `b`.

    Args:
      model: a `CausalLM` with an LM head (use `scan_layers=False` for the fast decode layout).
      params: its parameters, stacked or in the decode layout (`unstack_layers`).
      prompt_tokens: int `[B, P]` right-padded prompts.
      prompt_lengths: int `[B]` real lengths, each in `[1, P]`.
      max_new_tokens: completion tokens to sample per row (`C >= 1`).
      num_samples: samples per prompt (`n >= 1`).
      rng: PRNG key of the whole call.
      pad_id: token written after a row stops.
      cache_chunk: grow the rows' cache in steps of this many slots (None: allocate all `C` now).
      row_offset: global index of this batch's first row (when each device prefills its own rows).

    Returns:
      A `SamplingState` with `N = B * n` rows at step 0.
    """
    b, p = prompt_tokens.shape
    n = num_samples
    lengths = prompt_lengths.astype(jnp.int32)
    # A length-dependent RoPE: the padding at the last real position (its keys land in slot len - 1, which no
    # row reads: the decode re-feeds the last prompt token), so a prompt is rotated as without its padding.
    positions = padded_row_positions(model.config, p, lengths - 1)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    filled = model.forward(stack_layers(params), prompt_tokens, positions, cache=model.init_cache(b, p),
                           prefill=True).cache
    last = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), (lengths - 1)[:, None], axis=1)[:, 0]
    group = lambda a: a if n == 1 else jnp.repeat(a, n, axis=0)  # noqa: E731
    num_layers = filled.k.shape[0]
    rows = b * n
    own = model.init_cache(rows, max_new_tokens if cache_chunk is None else min(max_new_tokens, cache_chunk))
    return SamplingState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=group(last),
        positions=group(lengths - 1),
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        done=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        prompt_k=tuple(filled.k[i] for i in range(num_layers)),
        prompt_v=tuple(filled.v[i] for i in range(num_layers)),
        cache_k=tuple(own.k[i] for i in range(num_layers)),
        cache_v=tuple(own.v[i] for i in range(num_layers)),
        rng=rng,
        row_ids=row_offset + jnp.arange(rows, dtype=jnp.int32),
    )


def decode_step(
    model,
    params: dict,
    state: SamplingState,
    *,
    method: SamplingMethod,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    logits_sharding: jax.sharding.Sharding | None = None,
    min_new_tokens: int = 0,
) -> SamplingState:
    """Feed each row's last token, sample the next one, and record it: one step of the loop.

    `logits = model(last_tokens at positions | cache)`, `token = method.select(logits, u)` with
    `u = row_uniforms(rng, step, row_ids)`,
    `logprob = log softmax(logits / T)[token]` (`rlhf_jax.logprobs.token_logprobs`, the trainer's
    function). Rows already done record `pad_id` and 0; a row becomes done when it samples a stop id.
    At steps `step < min_new_tokens` the method draws from the logits with the stop ids at -inf
    (`suppress_stop_ids`); the log-prob is still the unmasked one (`rlhf_jax.sampling.methods`).

    Args:
      model: the `CausalLM` of `prefill`.
      params: its parameters (stacked or decode layout).
      state: the loop state.
      method: a sampling method (`rlhf_jax.sampling.methods`).
      stop_ids: token ids that end a row (EOS and any others); empty = run to `max_new_tokens`.
      pad_id: token recorded for rows that are done.
      logits_sharding: where the step's logits `[N, V]` live before sampling, e.g. rows split and
        the vocabulary whole, so a vocab-parallel LM head is gathered once instead of every
        reduction of the sampler communicating (None: as the compiler propagates).
      min_new_tokens: no stop id is drawn before this many tokens (static; 0 = off: the step's
        program is then exactly the one without the option).

    Returns:
      The state after one more token.
    """
    out = model.forward(
        stack_layers(params), state.last_tokens[:, None], state.positions[:, None], cache=state.kv_cache()
    )
    logits = out.logits[:, 0]
    if logits_sharding is not None:
        logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
    drawn_from = logits
    if min_new_tokens and stop_ids:       # a trace-time no-op at 0
        drawn_from = suppress_stop_ids(logits, jnp.asarray(stop_ids, jnp.int32), state.step < min_new_tokens)
    token = method.select(drawn_from, row_uniforms(state.rng, state.step, state.row_ids))
    logprob = token_logprobs(logits, token, temperature=method.temperature)
    active = ~state.done
    token = jnp.where(active, token, jnp.int32(pad_id))
    logprob = jnp.where(active, logprob, 0.0)
    column = (jnp.int32(0), state.step)
    stopped = jnp.isin(token, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(active)
    num_layers = out.cache.k.shape[0]
    return state.replace(
        step=state.step + 1,
        last_tokens=token,
        positions=state.positions + 1,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], column),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], column),
        done=state.done | (active & stopped),
        lengths=state.lengths + active.astype(jnp.int32),
        cache_k=tuple(out.cache.k[i] for i in range(num_layers)),
        cache_v=tuple(out.cache.v[i] for i in range(num_layers)),
    )


def decode(
    model,
    params: dict,
    state: SamplingState,
    *,
    method: SamplingMethod,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    logits_sharding: jax.sharding.Sharding | None = None,
    min_new_tokens: int = 0,
) -> SamplingState:
    """Run `decode_step` in `lax.while_loop` until every row is done or has `max_new_tokens` tokens.

    When the rows' cache has fewer than `max_new_tokens` slots (`prefill(cache_chunk=k)`), the loop
    runs in phases of `k` steps: a phase's loop also stops when the next own slot is past the cache,
    the cache then grows by `k` slots (a copy), and the next phase continues; a finished state
    passes through the remaining phases without a step. Attention reads the slots the cache holds, so
    with `m` phases step `t` attends over about `P + t + k/2` slots on average instead of `P + C`.
    Each phase is its own loop in the compiled program.

    Args and returns as `decode_step`.
    """
    chunk = state.cache_len   # steps of the first phase

    def body(s: SamplingState):
        return decode_step(model, params, s, method=method, stop_ids=stop_ids, pad_id=pad_id,
                           logits_sharding=logits_sharding, min_new_tokens=min_new_tokens)

    while True:
        def cond(s: SamplingState):
            running = (s.step < s.max_new_tokens) & ~jnp.all(s.done)
            if s.cache_len == s.max_new_tokens:
                return running
            return running & (s.step < s.cache_len)

        state = jax.lax.while_loop(cond, body, state)
        if state.cache_len == state.max_new_tokens:
            return state
        state = state.grow_cache(min(state.cache_len + chunk, state.max_new_tokens))


def finalize(
    state: SamplingState, prompt_tokens: jax.Array, prompt_lengths: jax.Array, *, num_samples: int = 1
) -> SampleOutput:
    """Package a finished state with its prompts: masks, lengths and truncation flags.

    `completion_mask[r, t] = t < lengths[r]` (through the first stop token);
    `truncated[r] = no stop token in the row`.

    Args:
      state: the state after `decode`.
      prompt_tokens: int `[B, P]` the prompts given to `prefill`.
      prompt_lengths: int `[B]` their lengths.
      num_samples: `n` of `prefill`.

    Returns:
      A `SampleOutput` with `N = B * n` rows.
    """
    group = lambda a: a if num_samples == 1 else jnp.repeat(a, num_samples, axis=0)  # noqa: E731
    mask = jnp.arange(state.max_new_tokens, dtype=jnp.int32)[None, :] < state.lengths[:, None]
    return SampleOutput(
        prompt_tokens=group(prompt_tokens.astype(jnp.int32)),
        prompt_lengths=group(prompt_lengths.astype(jnp.int32)),
        completion_tokens=state.tokens,
        completion_mask=mask,
        logprobs=state.logprobs,
        lengths=state.lengths,
        truncated=~state.done,
    )
