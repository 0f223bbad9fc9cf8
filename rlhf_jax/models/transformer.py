"""The decoder-only transformer and its pure, trainer-facing surface `CausalLM`.

`Transformer` is a Flax NNX module. `CausalLM` splits it once into a static graph and a parameter
pytree (a plain nested dict of arrays), so that training, sampling and sharding code only ever sees
pure functions: `lm.forward(params, tokens, positions, segment_ids) -> ModelOutput`.

KV cache: a fixed-size `KVCache` pytree with one slot per position. A forward pass with a cache
writes each token's key/value at slot `positions[b, t]` and lets it attend to the slots
`<= positions[b, t]`. Right-padded prompts of different lengths therefore prefill together: a
row's padding lands in slots its own later tokens overwrite before any query can see them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import SCALAR_HEAD_AXES, scalar_head
from rlhf_jax.models.attention import PrefixLayerCache, PrefixLayerKV
from rlhf_jax.models.paged import PagedKVCache, PagedLayerKV
from rlhf_jax.models.layers import Block, RMSNorm, dense, init_params_from_metadata, low_rank, param, rope_angles
from rlhf_jax.sharding import constrain_activations

_F32 = jnp.float32
Head = Literal["lm", "scalar"]


class KVCache(NamedTuple):
    """Keys and values of every layer: k, v each [layers, batch, kv_heads, max_len, head_dim].

    Heads come before slots so that decoding attends over the cache with a plain batched matmul.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class PrefixKV(NamedTuple):
    """Keys and values of shared prompts, read (never updated) by the rows that continue them.

    k, v [layers, groups, kv_heads, P, head_dim]: `groups` prompts (e.g. a prefilled `KVCache` of P
    slots), prompt `i` continued by the `N / groups` contiguous rows `i * N / groups, ...` of the
    forward pass it is given to; lengths int [N]: row b sees the prompt's slots `< lengths[b]`. The
    rows' tokens attend to those slots and causally to each other (`attention.prefix_attention`);
    their positions go on from the prompt's (`rlhf_jax.rollout.completion_hidden`).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array


class PrefixKVCache(NamedTuple):
    """The decode cache of rows continuing shared prompts (the sampler's layout): each group's prompt
    once (`prefix`, a `PrefixKV`, read only) and each row's own slots k, v [layers, N, kv_heads, S,
    head_dim]. A forward pass writes its T new tokens at own slots `start .. start + T - 1` of every
    row (the same slots for all rows) and lets them attend to the prompt's slots `< prefix.lengths[b]`
    and to own slots `<= start + t`; own slot s of row b holds position `positions[b, 0] - start + s`.
    A group's `N / groups` rows read its prompt's keys and values once (`attention.prefix_cache_attention`),
    and the cache holds `groups * P + N * S` slots, not a copy of the prompt's `P` per row.
    """

    prefix: PrefixKV
    k: jax.Array
    v: jax.Array
    start: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def prefix_attention_mask(positions, prefix_lengths, prefix_len: int, *, own_len: int | None = None, start=0,
                          sliding_window=None):
    """Boolean [N, T, P + S] mask of rows continuing shared prompts (`PrefixKV`, `PrefixKVCache`): the
    prompt's slots `s < prefix_lengths[b]` (slot s holding position s), then the row's own S slots,
    the T new tokens at own slots `start + t` attending to own slots `<= start + t` (S = T, start = 0:
    causally to each other)."""
    n, t = positions.shape
    own_len = t if own_len is None else own_len
    slots = jnp.arange(prefix_len)
    prefix = jnp.broadcast_to(slots[None, None, :] < prefix_lengths[:, None, None], (n, t, prefix_len))
    own_slots = jnp.arange(own_len)
    own = jnp.broadcast_to(own_slots[None, :] <= start + jnp.arange(t)[:, None], (n, t, own_len))
    mask = jnp.concatenate([prefix, own], axis=-1)
    if sliding_window is not None:
        own_positions = positions[:, :1] - start + own_slots[None, :]
        key_positions = jnp.concatenate([jnp.broadcast_to(slots, (n, prefix_len)), own_positions], axis=1)
        mask = mask & (positions[:, :, None] - key_positions[:, None, :] < sliding_window)
    return mask


class ModelOutput(NamedTuple):
    """logits f32[B, T, V] (LM head) or None; values f32[B, T] (scalar head) or None;
    hidden [B, T, E] final-normed hidden states; cache the updated KVCache or None."""

    logits: jax.Array | None
    values: jax.Array | None
    hidden: jax.Array
    cache: KVCache | None


def attention_mask(positions, segment_ids=None, *, cache_len=None, sliding_window=None):
    """Boolean [B, T, S] mask of which keys each query may attend to.

    Without a cache, S = T: causal by index within a row, and, when `segment_ids` are given, never
    across segments (packing). With a cache, S = cache_len slots, slot s holding position s: a query
    at position p sees slots s <= p. A sliding window further requires p - p_key < window.
    """
    if cache_len is None:
        t = positions.shape[1]
        idx = jnp.arange(t)
        mask = (idx[None, :] <= idx[:, None])[None]
        key_positions = positions[:, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
        key_positions = jnp.arange(cache_len)[None, None, :]
        mask = key_positions <= positions[:, :, None]
    if sliding_window is not None:
        mask = mask & (positions[:, :, None] - key_positions < sliding_window)
    return mask


class Transformer(nnx.Module):
    """Llama-family decoder: embed → N pre-norm blocks (stacked on a `layers` axis) → RMSNorm → head.

    `head="lm"` ends in the LM head (tied to the embedding when `tie_word_embeddings`);
    `head="scalar"` ends in a scalar `score` head instead (values per token, rewards at the last
    token), as Hugging Face's `*ForSequenceClassification` with one label.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, head: Head = "lm"):
        if head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")
        c = config
        self.config = c
        self.head = head
        self.embed = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(c, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(c.hidden_size, "embed", c)
        if head == "lm" and not c.tie_word_embeddings:
            self.lm_head = param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c)
        if head == "scalar":
            self.score = param(rngs, (c.hidden_size,), SCALAR_HEAD_AXES, c)

    def lm_head_weight(self):
        """The [E, V] output projection (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def __call__(self, tokens, positions, segment_ids=None, cache: KVCache | None = None, adapters=None,
                 dropout=None, layer_weights=None, prefill=False):
        """`adapters`: LoRA adapters applied unmerged (`rlhf_jax.models.lora`): `layers` (per projection
        name, stacked on the layer axis), `embed`, `lm_head`, each `{a, b}` with the scale in `b`;
        `dropout`: `(rate, key)` of the adapters' input dropout, or None; `layer_weights`: a function
        of one layer's parameter state applied inside the layer loop (QLoRA's dequantization); `prefill`:
        see `CausalLM.forward`."""
        c = self.config
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        adapters = adapters or {}
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c.jnp_dtype)
        if adapters.get("embed") is not None:  # PEFT's Embedding: x += A[tokens] · B, no dropout
            a, b = adapters["embed"]["a"], adapters["embed"]["b"]
            x = x + dense(jnp.take(a, tokens, axis=0).astype(x.dtype), b.astype(x.dtype))
        cos, sin = rope_angles(positions, c)
        prefix = cache if isinstance(cache, PrefixKV) else None
        prefix_cache = cache if isinstance(cache, PrefixKVCache) else None
        if prefix is not None:
            mask = prefix_attention_mask(positions, prefix.lengths, prefix.k.shape[3],
                                         sliding_window=c.sliding_window)
        elif prefix_cache is not None:
            mask = prefix_attention_mask(positions, prefix_cache.prefix.lengths, prefix_cache.prefix.k.shape[3],
                                         own_len=prefix_cache.max_len, start=prefix_cache.start,
                                         sliding_window=c.sliding_window)
        else:
            mask = attention_mask(
                positions, segment_ids,
                cache_len=None if cache is None else cache.max_len,
                sliding_window=c.sliding_window,
            )
        layer_graph, layer_params = nnx.split(self.layers)
        layer_adapters = adapters.get("layers")
        rate, layer_keys = (None, None) if dropout is None else (dropout[0], jax.random.split(dropout[1], c.num_layers))

        tables = cache.block_tables if isinstance(cache, PagedKVCache) else None

        def layer(x, xs):
            params, kv, ad, key = xs
            if layer_weights is not None:
                params = layer_weights(params)
            if tables is not None:  # a paged cache: this layer's pools read through the block tables
                kv = PagedLayerKV(*kv, tables, cache.route)
            elif prefix is not None:  # shared prompts' keys and values, read only
                kv = PrefixLayerKV(*kv)
            elif prefix_cache is not None:  # shared prompts' keys and values, and the rows' own slots
                kv = PrefixLayerCache(*kv, prefix_cache.start, prefix_cache.prefix.lengths)
            x = constrain_activations(x)  # batch-split residual stream under a step's sharding context
            x, kv = nnx.merge(layer_graph, params)(x, cos, sin, mask, kv, positions, ad,
                                                   None if key is None else (rate, key), segment_ids, prefill)
            if prefix is not None:
                return x, None
            return x, kv if tables is None and prefix_cache is None else (kv.k, kv.v)

        if c.remat != "none":
            policy = None if c.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            layer = jax.checkpoint(layer, policy=policy)

        if prefix_cache is not None:
            kv_stack = (prefix_cache.prefix.k, prefix_cache.prefix.v, prefix_cache.k, prefix_cache.v)
        else:
            kv_stack = None if cache is None else (cache.k, cache.v)
        if c.scan_layers:
            x, kv_stack = jax.lax.scan(layer, x, (layer_params, kv_stack, layer_adapters, layer_keys))
        else:
            new_kv = []
            for i in range(c.num_layers):
                x, kv = layer(x, jax.tree.map(lambda a: a[i], (layer_params, kv_stack, layer_adapters, layer_keys)))
                new_kv.append(kv)
            if cache is not None and prefix is None:
                kv_stack = tuple(jnp.stack(parts) for parts in zip(*new_kv))
        if cache is None or prefix is not None:
            new_cache = None
        elif tables is None and prefix_cache is None:
            new_cache = KVCache(*kv_stack)
        else:
            new_cache = cache._replace(k=kv_stack[0], v=kv_stack[1])

        hidden = self.final_norm(x)
        logits = values = None
        if self.head == "lm":
            w = self.lm_head_weight().astype(c.jnp_dtype)
            logits = dense(hidden, w, _F32)
            if adapters.get("lm_head") is not None:
                head_dropout = None if dropout is None else (rate, jax.random.fold_in(dropout[1], c.num_layers))
                logits = logits + low_rank(hidden, adapters["lm_head"], head_dropout, _F32)
        else:
            values = scalar_head(self.score[...], hidden)
        return ModelOutput(logits, values, hidden, new_cache)


class CausalLM:
    """Pure functional surface of a `Transformer`: params are a plain nested dict of arrays.

    Example:
        >>> lm = CausalLM(rlhf_jax.testing.tiny_config())
        >>> params = lm.init(jax.random.key(0))
        >>> out = jax.jit(lm.forward)(params, tokens)          # out.logits: f32[B, T, V]
    """

    def __init__(self, config: ModelConfig, *, head: Head = "lm"):
        self.config = config
        self.head = head
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), head=head))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        self._abstract_params = nnx.to_pure_dict(self._abstract_state)
        self.logical_axes = _logical_axes(self._abstract_state)

    def init(self, rng) -> dict:
        """Random parameters: weights ~ N(0, initializer_range²) truncated at ±2σ, norms at one.

        Weights come from one flat draw (`init_params_from_metadata`), so `jax.jit(lm.init)`
        compiles a single random kernel; jit it with `out_shardings` to materialize sharded.
        """
        return init_params_from_metadata(self._abstract_state, rng)

    def abstract_params(self) -> dict:
        """`jax.ShapeDtypeStruct`s of the parameters, without allocating them."""
        return self._abstract_params

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self._abstract_params))

    def module(self, params) -> Transformer:
        """The NNX module holding `params` (for notebook use; the trainer calls `forward`)."""
        return nnx.merge(self.graphdef, nnx.State(params))

    def forward(self, params, tokens, positions=None, segment_ids=None, *, cache=None, adapters=None,
                dropout=None, rng=None, layer_weights=None, prefill=False) -> ModelOutput:
        """Run the model on right-padded `tokens` [B, T].

        Args:
          params: the parameter dict of `init`.
          tokens: int [B, T].
          positions: int [B, T]; defaults to arange(T). With packing, restart at 0 per segment;
            with a cache, the absolute position (= cache slot) of each token.
          segment_ids: int [B, T] for packed rows (0 = padding); attention stays within a segment.
          cache: a `KVCache` from `init_cache` to read and update (prefill or decode), a `PrefixKV`
            of shared prompts that the rows continue (read only; the output's cache is None), or a
            `PrefixKVCache` (shared prompts and the rows' own slots, updated: the sampler's decode).
          adapters: LoRA adapters applied unmerged (`rlhf_jax.models.lora.LoraLM` passes them).
          dropout: `(rate, key)` of the adapters' input dropout, or None.
          rng: the training steps' key for stochastic layers; unused (this model has none; the
            training losses pass it to any model, and `LoraLM` draws its adapters' dropout from it).
          layer_weights: applied to each layer's parameters inside the layer loop, e.g. QLoRA's
            dequantization (`rlhf_jax.models.qlora`), so that one layer at a time is in full precision.
          prefill: the `cache` is empty and `positions` are 0..T-1 in every row (a prompt prefill):
            the new tokens then attend only to each other, so a fused attention kernel runs on them
            (`config.attention_impl`) before they are written to the cache. The result is the same.
        Returns:
          `ModelOutput(logits, values, hidden, cache)`.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        # Trace-time checks on static shapes and dtypes only (nothing is added to the program).
        if not jnp.issubdtype(tokens.dtype, jnp.integer):  # bool is not an integer dtype here
            raise TypeError(f"CausalLM.forward: tokens must be integer token ids, got dtype {tokens.dtype}")
        if 0 in tokens.shape:
            raise ValueError(f"CausalLM.forward: tokens must have at least one row and one position, got shape "
                             f"{tokens.shape}")
        _check_embed(params, self.config)
        _check_head(params, self.config, self.head)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        elif jnp.shape(positions) != tokens.shape:
            raise ValueError(f"positions shape {jnp.shape(positions)} != tokens shape {tokens.shape}")
        if segment_ids is not None and jnp.shape(segment_ids) != tokens.shape:
            raise ValueError(f"segment_ids shape {jnp.shape(segment_ids)} != tokens shape {tokens.shape}")
        del rng
        if prefill and cache is None:
            raise ValueError("prefill=True needs a cache to fill")
        prompts = cache.prefix if isinstance(cache, PrefixKVCache) else cache
        if isinstance(prompts, PrefixKV):
            _check_prefix(type(cache).__name__, prompts, cache, tokens.shape[0])
        return self.module(params)(tokens, positions, segment_ids, cache, adapters, dropout, layer_weights, prefill)

    def lm_head_weight(self, params):
        """The [E, V] output projection, for chunked log-probs from hidden states."""
        if self.config.tie_word_embeddings:
            return params["embed"].T
        return params["lm_head"]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache of `max_len` slots (default dtype: the compute dtype)."""
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        dtype = c.jnp_dtype if dtype is None else dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @functools.cached_property
    def cache_logical_axes(self) -> KVCache:
        """Logical axis names of a KVCache (for placing it on a mesh)."""
        axes = ("layers", "batch", "kv_heads", "cache_len", "head_dim")
        return KVCache(axes, axes)


def check_param_shapes(params, abstract, *, caller: str, error: type[Exception] = ValueError) -> None:
    """`params` against `abstract` (e.g. `CausalLM.abstract_params()`) leaf by leaf, by path and shape.

    Raises `error` naming the first leaf (as "a/b/c") that `params` lacks, that the model does not
    define, or whose shape differs, with both shapes. Dtypes are not compared (callers cast them).
    """
    def shapes(tree) -> dict[str, tuple[int, ...]]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(jnp.shape(v)) for k, v in leaves}

    want, got = shapes(abstract), shapes(params)
    for path in want:
        if path not in got:
            raise error(f"{caller}: params lack {path} required by the model's config")
    for path in got:
        if path not in want:
            raise error(f"{caller}: params have {path}, which the model's config does not define")
    for path, shape in want.items():
        if got[path] != shape:
            raise error(f"{caller}: param {path} has shape {got[path]}, but the model's config wants {shape}: "
                        "these params were built for another config")


def _check_embed(params, config: ModelConfig) -> None:
    """The embedding of `params` against `config` (vocab, hidden): params built for another model
    would otherwise run (a wider vocabulary samples ids the tokenizer lacks). Static shapes only."""
    if not isinstance(params, Mapping):
        return
    if "embed" not in params:
        raise KeyError(f"CausalLM.forward: params lack 'embed'; they have {sorted(map(str, params))} (pass the "
                       "parameter dict of CausalLM.init for this config)")
    shape = getattr(params["embed"], "shape", None)
    want = (config.vocab_size, config.hidden_size)
    if shape is not None and tuple(shape) != want:
        raise ValueError(f"CausalLM.forward: params['embed'] has shape {tuple(shape)}, but the model's config wants "
                         f"[vocab_size, hidden_size] = {list(want)}: these params were built for another config")


def _check_head(params, config: ModelConfig, head: Head) -> None:
    """The output head of `params` is there: a backbone without one (a bare `*Model` checkpoint loaded with
    `load_hf(..., allow_headless=True)`) would otherwise fail deep inside the module."""
    name = "score" if head == "scalar" else None if config.tie_word_embeddings else "lm_head"
    if isinstance(params, Mapping) and name is not None and name not in params:
        raise KeyError(f"CausalLM.forward: params lack {name!r}, the {'scalar' if head == 'scalar' else 'untied LM'} "
                       "head of this model (a backbone loaded without a head needs one first, e.g. "
                       "heads.init_scalar_head for a reward model)")


def _check_prefix(kind: str, prefix: PrefixKV, cache, rows: int) -> None:
    """Shapes of a `PrefixKV` (or a `PrefixKVCache`'s) against the `rows` continuing its prompts."""
    if prefix.k.ndim != 5 or prefix.v.shape != prefix.k.shape:
        raise ValueError(f"{kind}: prefix k and v must both be [layers, groups, kv_heads, P, head_dim], got "
                         f"{prefix.k.shape} and {prefix.v.shape}")
    groups = prefix.k.shape[1]
    if rows % groups:
        raise ValueError(f"{kind}: {rows} rows of tokens do not split into the prefix's {groups} groups")
    if jnp.shape(prefix.lengths) != (rows,):
        raise ValueError(f"{kind}: prefix lengths must be [rows] = ({rows},), got {jnp.shape(prefix.lengths)}")
    if isinstance(cache, PrefixKVCache) and (cache.k.shape[:3] != (prefix.k.shape[0], rows, prefix.k.shape[2])
                                             or cache.v.shape != cache.k.shape):
        raise ValueError(f"{kind}: the rows' own k and v must both be [layers, {rows}, kv_heads, S, head_dim] as "
                         f"the prefix's layers and kv heads, got {cache.k.shape} and {cache.v.shape}")


def _logical_axes(abstract_state) -> dict:
    """Nested dict like the params whose leaves are tuples of logical axis names."""
    axes = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        names = variable.get_metadata().get("out_sharding")
        if names is None or len(names) != variable.get_value().ndim:
            raise ValueError(f"parameter {'/'.join(map(str, path))} lacks logical axis names")
        node[path[-1]] = tuple(names)
    return axes
