"""Trainer-side views of sampled completions: joined sequences, completion log-probs, values, scores.

The sampler returns right-padded prompts `[N, P]` (real lengths `prompt_lengths`) and completions
`[N, C]` (masked up to and including the first EOS). The trainer, the reference policy, the value
model and the reward model all read the same *joined* sequence per row,

    joined[b] = prompt[b, :len_b] ++ completion[b] ++ padding          (length P + C),

so right padding holds and positions are `arange(P + C)` (with a length-dependent RoPE the padding's
are lowered to the row's last real one, `models.layers.padded_row_positions`, as the sampler's prompt
padding). The token `completion[b, i]` sits at index `len_b + i` of the joined row and is predicted
by the hidden state at `len_b - 1 + i`; the helpers below gather those `C` hidden states, so every
per-token result comes back in the sampler's `[N, C]` layout, aligned with its log-probs and masks.
Only the completion positions go through the LM head (one matmul, or chunked within each row when
rows are longer than the chunk size), never a `[N, P + C, V]` logits array.

When the `G` samples of a prompt fill `G` contiguous rows (GRPO groups), `group_size=G` runs each
prompt once into a KV cache and the completions on top of it (`completion_hidden`): the same
numbers, with the prompt's share of the FLOPs divided by `G`, forward and backward.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import _checks
from rlhf_jax import sharding as sh
from rlhf_jax.logprobs import (
    DEFAULT_CHUNK_SIZE,
    _check_chunked,
    chunked_logprobs_and_entropy,
    chunked_token_logprobs,
    logprobs_and_entropy,
    token_logprobs,
)
from rlhf_jax.models.heads import scalar_head
from rlhf_jax.models.layers import dense, padded_row_positions, rope_length_threshold
from rlhf_jax.models.lora import head_needs_logits
from rlhf_jax.models.transformer import PrefixKV

__all__ = [
    "join_sequences",
    "completion_index",
    "completion_hidden",
    "completion_outputs",
    "shared_prompt_forward",
    "completion_logprobs",
    "completion_logprobs_and_hidden",
    "completion_logprob_pass",
    "logits_logprobs",
    "head_logprobs",
    "completion_values",
    "sequence_scores",
]


def _check_rollout(fn: str, prompt_tokens, prompt_lengths, completion_tokens) -> None:
    _checks.check_rank(fn, "prompt_tokens", prompt_tokens, 2)
    _checks.check_rank(fn, "completion_tokens", completion_tokens, 2)
    _checks.check_rank(fn, "prompt_lengths", prompt_lengths, 1)
    _checks.check_integer(fn, "prompt_tokens", prompt_tokens)
    _checks.check_integer(fn, "completion_tokens", completion_tokens)
    _checks.check_integer(fn, "prompt_lengths", prompt_lengths)
    n = prompt_tokens.shape[0]
    if completion_tokens.shape[0] != n or prompt_lengths.shape[0] != n:
        raise ValueError(
            f"{fn}: prompt_tokens {list(prompt_tokens.shape)}, prompt_lengths {list(prompt_lengths.shape)} "
            f"and completion_tokens {list(completion_tokens.shape)} must have the same number of rows"
        )
    check_prompt_lengths(fn, prompt_tokens, prompt_lengths)


def check_prompt_lengths(fn: str, prompt_tokens, prompt_lengths) -> None:
    """Integer `prompt_lengths` in `[1, P]` (P = `prompt_tokens`' width), the values checked when
    on the host (`_checks.host_values`: not traced, not on an accelerator); raise naming the first bad row."""
    _checks.check_integer(fn, "prompt_lengths", prompt_lengths)
    lengths = _checks.host_values(prompt_lengths)
    if lengths is not None and lengths.size:
        p = jnp.shape(prompt_tokens)[1]
        bad = (lengths < 1) | (lengths > p)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{fn}: prompt_lengths[{i}] = {int(lengths[i])} is outside [1, P={p}] (each row's real "
                             "prompt length, at least one token)")


def check_group_prompts(fn: str, prompt_tokens, prompt_lengths, group_size: int) -> None:
    """Rows of each group of `group_size` contiguous rows must share one prompt (the shared-prompt
    forward prefills the group's first row only). Checked on host values (`_checks.host_values`); others pass."""
    tokens, lengths = _checks.host_values(prompt_tokens), _checks.host_values(prompt_lengths)
    if tokens is None or lengths is None or group_size <= 1 or tokens.shape[0] % group_size:
        return
    g = group_size
    lengths = lengths.reshape(-1, g)
    same_len = lengths == lengths[:, :1]
    width = np.arange(tokens.shape[1])
    grouped = tokens.reshape(-1, g, tokens.shape[1])
    same_tokens = np.all((grouped == grouped[:, :1]) | (width >= lengths[:, :1, None]), axis=2)
    bad = ~(same_len & same_tokens)
    if bad.any():
        group, row = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"{fn}: rows of a group must share one prompt (group_size={g}), but row {group * g + row} "
                         f"of group {group} differs from the group's first row {group * g} in its prompt "
                         f"(prompt_lengths {int(lengths[group, row])} vs {int(lengths[group, 0])})")


def join_sequences(
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    *,
    pad_id: int = 0,
) -> jax.Array:
    """Concatenate each row's real prompt tokens with its completion, right-padded.

    `joined[b, j] = prompt[b, j]` for `j < len_b`, `completion[b, j - len_b]` for
    `len_b <= j < len_b + C`, and `pad_id` after.

    Args:
      prompt_tokens: int `[N, P]` right-padded prompts.
      prompt_lengths: int `[N]` real prompt lengths, in `[1, P]`.
      completion_tokens: int `[N, C]` completions.
      pad_id: id written after each row's completion.

    Returns:
      int32 `[N, P + C]`.
    """
    _check_rollout("join_sequences", prompt_tokens, prompt_lengths, completion_tokens)
    p, c = prompt_tokens.shape[1], completion_tokens.shape[1]
    j = jnp.arange(p + c, dtype=jnp.int32)[None, :]
    lengths = prompt_lengths.astype(jnp.int32)[:, None]
    from_prompt = j < lengths
    ci = j - lengths
    prompt_part = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), jnp.clip(j, 0, p - 1), axis=1)
    completion_part = jnp.take_along_axis(completion_tokens.astype(jnp.int32), jnp.clip(ci, 0, c - 1), axis=1)
    joined = jnp.where(from_prompt, prompt_part, completion_part)
    return jnp.where(from_prompt | (ci < c), joined, jnp.int32(pad_id))


def completion_index(prompt_lengths: jax.Array, num_completion_tokens: int) -> jax.Array:
    """Index of the hidden state that predicts each completion token: `len_b - 1 + i`, int32 `[N, C]`."""
    return prompt_lengths.astype(jnp.int32)[:, None] - 1 + jnp.arange(num_completion_tokens, dtype=jnp.int32)[None, :]


def completion_hidden(
    model, params, prompt_tokens, prompt_lengths, completion_tokens, *, group_size: int = 1, rng=None
) -> jax.Array:
    """Final hidden states at the positions that predict each completion token.

    `h[b, i] = hidden(joined[b, : len_b + i])[-1]`, i.e. the state after reading the prompt and the
    first `i` completion tokens (the state in which token `i` is chosen).

    With `group_size = G > 1` the rows come in groups of `G` contiguous rows that share one prompt
    (GRPO's samples of a prompt; only each group's first row's prompt is read): every prompt is run
    once into a KV cache of `P` slots, and only the completions are run on top of it, each row
    attending to its group's prompt keys and values followed by its own (`models.transformer.PrefixKV`:
    one softmax over the prompt block and the row's causal block; no scatter of the completions'
    keys into a per-row `P + C`-slot cache, and no unfilled slots). Same result (up to float rounding), with
    `N / G * P + N * C` instead of `N * (P + C)` token positions through the model, forward and
    backward (gradients from all `G` completions meet in the shared prompt computation).

    Args:
      model: a `CausalLM` (LM or scalar head; only its hidden states are read).
      params: its parameters.
      prompt_tokens: int `[N, P]`; prompt_lengths: int `[N]` (>= 1); completion_tokens: int `[N, C]`.
      group_size: rows per shared prompt (1 = no sharing).
      rng: the training key of the model's stochastic layers (LoRA dropout); None = deterministic.

    Returns:
      `[N, C, E]` hidden states in the model's compute dtype.
    """
    (hidden,) = completion_outputs(model, params, prompt_tokens, prompt_lengths, completion_tokens, ("hidden",),
                                   group_size=group_size, rng=rng)
    return hidden


def completion_outputs(model, params, prompt_tokens, prompt_lengths, completion_tokens, fields: tuple[str, ...], *,
                       group_size: int = 1, rng=None) -> tuple[jax.Array, ...]:
    """`completion_hidden`'s forward pass, returning the `ModelOutput` fields named in `fields`
    (`"hidden"`, `"logits"`) at the completion positions, each `[N, C, ...]` (one forward for all)."""
    if group_size == 1:
        joined = join_sequences(prompt_tokens, prompt_lengths, completion_tokens)
        last = prompt_lengths.astype(jnp.int32) + completion_tokens.shape[1] - 2  # the last token fed
        positions = padded_row_positions(model.config, joined.shape[1] - 1, last)
        out = model.forward(params, joined[:, :-1], positions, rng=rng)
        index = completion_index(prompt_lengths, completion_tokens.shape[1])[:, :, None]
        return tuple(jnp.take_along_axis(getattr(out, f), index, axis=1) for f in fields)
    out = shared_prompt_forward(model, params, prompt_tokens, prompt_lengths, completion_tokens,
                                group_size=group_size, rng=rng)
    return tuple(getattr(out, f) for f in fields)


def shared_prompt_forward(model, params, prompt_tokens, prompt_lengths, completion_tokens, *, group_size: int,
                          rng=None):
    """`completion_hidden` with `group_size = G > 1` (its docstring has the layout), returned whole:
    the `ModelOutput` `[N, C, ...]` of the rows' pass over their group's prompt, i.e. `hidden` and,
    with an LM head, `logits` (unused ones cost nothing under `jit`). DPO's pairs are groups of 2."""
    _check_rollout("shared_prompt_forward", prompt_tokens, prompt_lengths, completion_tokens)
    (n, p), c = prompt_tokens.shape, completion_tokens.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"shared_prompt_forward: {n} rows do not split into groups of group_size={group_size}")
    check_group_prompts("shared_prompt_forward", prompt_tokens, prompt_lengths, group_size)
    groups = n // group_size
    positions = padded_row_positions(model.config, p, prompt_lengths[::group_size].astype(jnp.int32) - 1)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (groups, p))
    prefill = model.forward(params, prompt_tokens[::group_size], positions, cache=model.init_cache(groups, p),
                            rng=rng, prefill=True)
    lengths = prompt_lengths.astype(jnp.int32)[:, None]
    last_prompt_token = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), lengths - 1, axis=1)
    inputs = jnp.concatenate([last_prompt_token, completion_tokens[:, :-1].astype(jnp.int32)], axis=1)
    # The rows read their group's prompt keys and values (slots < len - 1; the last prompt token is
    # re-run as the row's first input) next to their own, with no per-row cache to scatter into.
    prefix = PrefixKV(prefill.cache.k, prefill.cache.v, lengths[:, 0] - 1)
    return model.forward(params, inputs, completion_index(prompt_lengths, c), cache=prefix,
                         rng=None if rng is None else jax.random.fold_in(rng, 1))


def completion_logprobs(
    model,
    params,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    completion_tokens: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    group_size: int = 1,
    rng=None,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs (and optionally entropies) of the completion tokens under a policy.

    `log pi(y_i | x, y_<i)` with `pi = softmax(logits / temperature)`, computed by
    `rlhf_jax.logprobs` exactly as the sampler computes its own, in the `[N, C]` completion layout.

    Args:
      model: a `CausalLM` with an LM head.
      params: its parameters (policy, old policy or reference).
      prompt_tokens, prompt_lengths, completion_tokens: the rollout (see `join_sequences`).
      temperature: the sampling temperature.
      with_entropy: also return the entropy of each predictive distribution.
      chunk_size: tokens per LM-head chunk (within a row).
      group_size: rows per shared prompt (see `completion_hidden`).
      rng: the training key of stochastic layers (LoRA dropout); None = deterministic.

    Returns:
      `(logps, entropy)`: float32 `[N, C]` each; `entropy` is None unless asked for. Positions past
      a completion's end hold the log-prob of whatever token is there; mask them.

    The LM head runs on the completions' hidden states with `model.lm_head_weight`, except in a
    training pass with dropout on a LoRA `lm_head` adapter (`models.lora.head_needs_logits`: the
    merged weight has no dropout), which reads the forward's own logits at those positions.
    """
    logps, entropy, _ = completion_logprobs_and_hidden(
        model, params, prompt_tokens, prompt_lengths, completion_tokens, temperature=temperature,
        with_entropy=with_entropy, chunk_size=chunk_size, group_size=group_size, rng=rng)
    return logps, entropy


def completion_logprob_pass(model, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                            pieces: int = 1, mesh=None, strategy=None):
    """`completion_logprobs` as one jitted pass `(params, prompts, lengths, completions, group_size=1) -> [N, C]`:
    the reference (and, where needed, the policy's) log-probs of sampled rows in the RL and online-DPO runs.

    With `pieces > 1` the rows go through the model in that many pieces, one after another under
    `lax.map` inside the one program, so it holds the activations of one piece at a time (the RL
    update's micro-batches: `num_minibatches * micro_batches`). A piece takes whole groups of
    `group_size` rows (rows sharing a prompt), interleaved as the update's micro-batches are
    (`split_micro_batches`: every piece takes rows from every data-parallel device); when groups
    cannot split evenly the rows go one by one (`group_size` 1, same values), and when the rows do
    not split into `pieces` they go in one piece. Each row's log-probs depend on that row alone, so
    the result equals the one-piece pass. With a `mesh` the pass is traced in the activation-sharding
    context of `strategy`, as the update step is, so its rows split over the batch axes whatever
    layout they arrive in (`rlhf-jax compile` plans this same function).
    """
    def logps(params, pt, pl, ct, group_size):
        return completion_logprobs(model, params, pt, pl, ct, temperature=temperature, chunk_size=chunk_size,
                                   group_size=group_size)[0]

    def run(params, pt, pl, ct, group_size=1):
        with contextlib.nullcontext() if mesh is None else sh.activation_sharding(mesh, strategy):
            n = ct.shape[0]
            if pieces == 1 or n % pieces:
                return logps(params, pt, pl, ct, group_size)
            g = group_size if n % (pieces * group_size) == 0 else 1
            split = [_split_groups(x, pieces, g) for x in (pt, pl, ct)]
            out = jax.lax.map(lambda xs: logps(params, *xs, g), split)  # [pieces, n / pieces, C]
            return _merge_groups(out, g)

    return jax.jit(run, static_argnames="group_size")


def _split_groups(x, pieces: int, group: int):
    """`[N, ...]` -> `[pieces, N / pieces, ...]`: piece k holds groups k, k + pieces, ... of `group` rows."""
    n = x.shape[0]
    y = x.reshape((n // (group * pieces), pieces, group) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape((pieces, n // pieces) + x.shape[1:])


def _merge_groups(y, group: int):
    """The inverse of `_split_groups`."""
    pieces, rows = y.shape[:2]
    x = y.reshape((pieces, rows // group, group) + y.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((pieces * rows,) + y.shape[2:])


def completion_logprobs_and_hidden(model, params, prompt_tokens, prompt_lengths, completion_tokens, *,
                                   temperature: float | jax.Array = 1.0, with_entropy: bool = False,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE, group_size: int = 1, rng=None):
    """`completion_logprobs` with the `[N, C, E]` hidden states of the same forward pass (for a value
    head on the policy's backbone): `(logps, entropy or None, hidden)`."""
    if head_needs_logits(model, rng):
        hidden, logits = completion_outputs(model, params, prompt_tokens, prompt_lengths, completion_tokens,
                                            ("hidden", "logits"), group_size=group_size, rng=rng)
        return (*logits_logprobs(logits, completion_tokens, temperature=temperature, with_entropy=with_entropy),
                hidden)
    hidden = completion_hidden(model, params, prompt_tokens, prompt_lengths, completion_tokens, group_size=group_size,
                               rng=rng)
    return (*head_logprobs(hidden, model.lm_head_weight(params), completion_tokens, temperature=temperature,
                           with_entropy=with_entropy, chunk_size=chunk_size), hidden)


def logits_logprobs(logits: jax.Array, labels: jax.Array, *, temperature: float | jax.Array = 1.0,
                    with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """`(log softmax(z / T)[y], entropy or None)` of `[N, C, V]` logits, float32 `[N, C]` each."""
    labels = labels.astype(jnp.int32)
    if with_entropy:  # one exp pass and a fused gradient for both (W4's update: -30 CPU ms of ~215)
        return logprobs_and_entropy(logits, labels, temperature=temperature)
    return token_logprobs(logits, labels, temperature=temperature), None


def head_logprobs(
    hidden: jax.Array,
    lm_head_weight: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs (and entropies) of `labels` from hidden states, row by row.

    `log softmax(h W / T)[y]` at every position. Rows longer than `chunk_size` go through
    `rlhf_jax.logprobs.chunked_*` row by row (`vmap` over the batch), so chunks never mix rows: a
    batch split over data-parallel devices stays split (no gather of the hidden states), and at
    most `[N, chunk_size, V]` logits exist at once. Rows of at most `chunk_size` tokens are one
    chunk each, computed as a single `[N, C, V]` matmul without rematerialisation.

    Args:
      hidden: `[N, C, E]` hidden states; lm_head_weight: `[E, V]`; labels: int `[N, C]`.
      temperature: the sampling temperature.
      with_entropy: also return the entropies.
      chunk_size: tokens per chunk within a row.

    Returns:
      `(logps, entropy or None)`, float32 `[N, C]`.
    """
    labels = labels.astype(jnp.int32)
    if hidden.ndim == 3 and hidden.shape[1] <= chunk_size:
        # One chunk per row: the [N, C, V] logits exist at once either way, so take them in one
        # matmul (`dense`, whose weight gradient runs on the fast kernel) and skip the chunk loop's
        # rematerialisation, which would run the head's forward a second time in the backward pass.
        _check_chunked("head_logprobs", hidden, lm_head_weight, chunk_size)
        z = dense(hidden, lm_head_weight.astype(hidden.dtype), jnp.float32)
        return logits_logprobs(z, labels, temperature=temperature, with_entropy=with_entropy)
    kw = dict(temperature=temperature, chunk_size=chunk_size)
    if with_entropy:
        return jax.vmap(lambda h, y: chunked_logprobs_and_entropy(h, lm_head_weight, y, **kw))(hidden, labels)
    return jax.vmap(lambda h, y: chunked_token_logprobs(h, lm_head_weight, y, **kw))(hidden, labels), None


def completion_values(value_model, value_params, prompt_tokens, prompt_lengths, completion_tokens, *,
                      rng=None) -> jax.Array:
    """A scalar-head model's value of the state in which each completion token is chosen.

    `V[b, i] = w . h[b, i]` with `h` from `completion_hidden` and `w` the model's `score` kernel.

    Args:
      value_model: a `CausalLM(config, head="scalar")` (a reward model's copy by default).
      value_params: its parameters.
      prompt_tokens, prompt_lengths, completion_tokens: the rollout.

    Returns:
      float32 `[N, C]`.
    """
    hidden = completion_hidden(value_model, value_params, prompt_tokens, prompt_lengths, completion_tokens, rng=rng)
    return scalar_head(value_params["score"], hidden)


def sequence_scores(
    reward_model, reward_params, prompt_tokens, prompt_lengths, completion_tokens, completion_mask
) -> jax.Array:
    """A reward model's score of each prompt + completion, read at the last real token.

    `r_b = w . hidden(joined_b)[len_b + n_b - 1]` with `n_b = sum_i completion_mask[b, i]`
    (the EOS token when the completion has one); an empty completion is scored at the prompt's end.

    Args:
      reward_model: a `CausalLM(config, head="scalar")`.
      reward_params: its parameters.
      prompt_tokens, prompt_lengths, completion_tokens: the rollout; completion_mask: `[N, C]`.

    Returns:
      float32 `[N]`.
    """
    _check_rollout("sequence_scores", prompt_tokens, prompt_lengths, completion_tokens)
    _checks.check_same_shape("sequence_scores", completion_tokens=completion_tokens, completion_mask=completion_mask)
    joined = join_sequences(prompt_tokens, prompt_lengths, completion_tokens)

    def last():  # the scored token's index (traced after the forward pass unless its positions need it)
        return prompt_lengths.astype(jnp.int32) + jnp.sum(completion_mask != 0, axis=1, dtype=jnp.int32) - 1

    positions = None
    if rope_length_threshold(reward_model.config) is not None:
        positions = padded_row_positions(reward_model.config, joined.shape[1], last())
    values = reward_model.forward(reward_params, joined, positions).values
    return jnp.take_along_axis(values, last()[:, None], axis=1)[:, 0]
