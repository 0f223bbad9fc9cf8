"""Transformer building blocks in Flax NNX, every parameter annotated with logical axis names.

Logical axes (mapped to mesh axes by `rlhf_jax.sharding`, never here): `vocab`, `embed`, `mlp`,
`q_heads`, `kv_heads`, `head_dim`, and `layers` for the stacked layer dimension.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models import attention, paged
from rlhf_jax.models.config import LENGTH_DEPENDENT_ROPE_TYPES, ModelConfig

_F32 = jnp.float32


def param(rngs: nnx.Rngs | None, shape, axes, config: ModelConfig, *, init="normal", std=None):
    """A parameter with logical axis names `axes` (placed later by a sharding rule table).

    `init` is "normal" (truncated at ±2σ, σ = `std` or `config.initializer_range`), "ones" or
    "zeros"; it is kept in the variable's metadata (`init_std`, 0 for constants) so that
    `init_params_from_metadata` can redraw all weights at once.
    """
    dtype = config.jnp_param_dtype
    if init == "ones":
        value, std = jnp.ones(shape, dtype), 0.0
    elif init == "zeros":
        value, std = jnp.zeros(shape, dtype), 0.0
    else:
        std = config.initializer_range if std is None else std
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, _F32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, init=init, init_std=std)


def init_params_from_metadata(abstract_state: nnx.State, rng) -> dict:
    """Fresh parameters (a plain nested dict) for an abstract state, all random weights from ONE draw.

    Each random op costs a threefry kernel to compile (~0.3 s on a CPU); a model has a dozen
    parameter kinds, so one flat draw sliced per parameter compiles an order of magnitude faster
    than per-parameter draws, with the same distribution (w = σ · z, z ~ N(0, 1) truncated at ±2).
    """
    flat = nnx.to_flat_state(abstract_state)
    random = [v for _, v in flat if v.get_metadata().get("init") == "normal"]
    total = sum(v.get_value().size for v in random)
    draws = jax.random.truncated_normal(rng, -2.0, 2.0, (total,), _F32)
    params, offset = {}, 0
    for path, variable in flat:
        meta = variable.get_metadata()
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if meta.get("init") == "normal":
            size = math.prod(shape)
            value = meta["init_std"] * draws[offset:offset + size].reshape(shape)
            offset += size
        elif meta.get("init") == "ones":
            value = jnp.ones(shape, _F32)
        elif meta.get("init") == "zeros":
            value = jnp.zeros(shape, _F32)
        else:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no init metadata")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.astype(dtype)
    return params


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, out_dtype=None):
    """y = x · w, contracting x's last axis with w's first: x [..., K], w [K, N] -> y [..., N].

    The same value and gradient as `x @ w`; the gradient is computed in the layout XLA:CPU's fast
    matmul kernels take. Autodiff's weight gradient `dw = xᵀ · dy` contracts the token axis, which
    is the leading axis of both operands, and XLA:CPU runs that form on a generic kernel at about
    half the speed; here `xᵀ` is materialised first (a copy of the small [tokens, K] operand), so
    that the weight gradient is a plain row-major matmul. `out_dtype` is the accumulation and
    output dtype (e.g. float32 logits from bfloat16 weights); default the operands' dtype.
    """
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _dense_fwd(x, w, out_dtype):
    return dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, residuals, dy):
    x, w = residuals
    dx = jnp.matmul(dy, w.T, preferred_element_type=_F32).astype(x.dtype)
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [K, tokens], row-major
    dw = jnp.matmul(x_t, dy.reshape(-1, dy.shape[-1]).astype(x.dtype), preferred_element_type=_F32)
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def rms_norm(x, scale, eps):
    """y = x / sqrt(mean(x²) + eps) · scale, statistics in float32 (Zhang & Sennrich, 2019)."""
    x32 = x.astype(_F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis_name: str, config: ModelConfig):
        self.scale = param(None, (dim,), (axis_name,), config, init="ones")
        self.eps = config.rms_norm_eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


def rope_inverse_frequencies(config: ModelConfig, seq_len=None):
    """inv_freq_i = θ^(-2i/d), scaled by `config.rope_scaling` ("llama3", "linear", "yarn", "longrope", "dynamic").

    Follows transformers' `modeling_rope_utils` (`_compute_llama3_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_yarn_parameters`, `_compute_longrope_parameters`,
    `_compute_dynamic_ntk_parameters`), so that the model's logits equal theirs; the cos / sin scale is
    `rope_attention_factor`.

    Args:
      config: the model configuration.
      seq_len: for the length-dependent types ("longrope", "dynamic"), int lengths of shape [..., 1] of the
        sequences being rotated (a row's largest position + 1); the result then has shape [..., d/2]. None:
        a sequence within the original context (unused by the other types).
    Returns:
      f32[d/2], or f32[..., d/2] for a length-dependent type given `seq_len`.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=_F32) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":  # position interpolation (Chen et al., 2023): positions / factor
        return inv_freq / s.factor
    if s.rope_type == "yarn":
        return _yarn_inverse_frequencies(config)
    if s.rope_type == "longrope":
        return _longrope_inverse_frequencies(config, seq_len)
    if s.rope_type == "dynamic":
        return _dynamic_ntk_inverse_frequencies(config, seq_len)
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    interpolated = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def _longrope_inverse_frequencies(config: ModelConfig, seq_len):
    """LongRoPE (Ding et al., 2024; transformers' `_compute_longrope_parameters`): 1 / (ext_i · θ^(2i/d)), the
    rescale factors ext = `long_factor` for a sequence longer than `original_max_position_embeddings`,
    `short_factor` otherwise (and for `seq_len` None)."""
    s, d = config.rope_scaling, config.head_dim
    pos_freqs = config.rope_theta ** (jnp.arange(0, d, 2, dtype=_F32) / d)
    short = 1.0 / (jnp.asarray(s.short_factor, _F32) * pos_freqs)
    if seq_len is None:
        return short
    long = 1.0 / (jnp.asarray(s.long_factor, _F32) * pos_freqs)
    return jnp.where(seq_len > s.original_max_position_embeddings, long, short)


def _dynamic_ntk_inverse_frequencies(config: ModelConfig, seq_len):
    """Dynamic NTK scaling (transformers' `_compute_dynamic_ntk_parameters`): θ^(-2i/d) for a sequence of
    length L <= M = `max_position_embeddings` (and for `seq_len` None), else the same with the base
    θ' = θ · (factor · L / M - (factor - 1))^(d / (d - 2))."""
    s, d, m = config.rope_scaling, config.head_dim, config.max_position_embeddings
    exponents = jnp.arange(0, d, 2, dtype=_F32) / d
    unscaled = 1.0 / (config.rope_theta ** exponents)
    if seq_len is None:
        return unscaled
    base = config.rope_theta * ((s.factor * seq_len.astype(_F32) / m) - (s.factor - 1)) ** (d / (d - 2))
    return jnp.where(seq_len > m, 1.0 / (base ** exponents), unscaled)


def _yarn_inverse_frequencies(config: ModelConfig):
    """YaRN's "NTK-by-parts" frequencies (Peng et al., 2023, eq. 18-19; transformers' `_compute_yarn_parameters`).

    Dimension pair i keeps θ^(-2i/d) (extrapolation) where it turns more than `beta_fast` times within
    the original context L, is divided by `factor` (interpolation) where it turns fewer than `beta_slow`
    times, and is blended linearly in between. Pair index of r turns: d·ln(L / (2π·r)) / (2·ln θ);
    `truncate` floors the fast end and ceils the slow end; both are clipped to [0, d - 1].
    """
    s, d, base = config.rope_scaling, config.head_dim, config.rope_theta

    def pair_index(rotations):
        return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index(s.beta_fast), pair_index(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(d // 2, dtype=_F32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (jnp.arange(0, d, 2, dtype=_F32) / d)
    extrapolation = 1 - ramp
    return 1.0 / (s.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: YaRN's √(1/t) = 0.1·ln(s) + 1 (Peng et al., 2023, eq. 22),
    LongRoPE's √(1 + ln(s) / ln(L)) (L the original context), 1 for the other types.

    As transformers' `_compute_yarn_parameters` and `_compute_longrope_parameters`: an explicit
    `attention_factor` wins; a LongRoPE factor s <= 1 gives 1; with both `mscale` and `mscale_all_dim`
    set (nonzero) YaRN's is mscale(s, mscale) / mscale(s, mscale_all_dim), where mscale(s, m) =
    0.1·m·ln(s) + 1 for s > 1 and 1 otherwise (`yarn_get_mscale`).
    """
    s = config.rope_scaling
    if s is None or s.rope_type not in ("yarn", "longrope"):
        return 1.0
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.rope_type == "longrope":
        original = s.original_max_position_embeddings
        return 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(original))

    def mscale(m):
        return 1.0 if s.factor <= 1 else 0.1 * m * math.log(s.factor) + 1.0

    if s.mscale and s.mscale_all_dim:
        return mscale(s.mscale) / mscale(s.mscale_all_dim)
    return mscale(1.0)


def rope_length_threshold(config: ModelConfig) -> int | None:
    """The length past which a length-dependent RoPE switches its frequencies (`rope_angles`): LongRoPE's
    `original_max_position_embeddings`, dynamic NTK's `max_position_embeddings`; None for the other types."""
    s = config.rope_scaling
    if s is None or s.rope_type not in LENGTH_DEPENDENT_ROPE_TYPES:
        return None
    return s.original_max_position_embeddings if s.rope_type == "longrope" else config.max_position_embeddings


def padded_row_positions(config: ModelConfig, width: int, last):
    """Positions of right-padded rows whose real tokens end at index `last` (int [B]), or None for the
    default `arange(width)` (`CausalLM.forward`'s, so the program is unchanged).

    With a length-dependent RoPE (`rope_length_threshold` not None) the padding's positions are lowered
    to `last`, int32 [B, width] = `min(arange(width), last)`: `rope_angles` takes a row's length from its
    largest position, so a row is then rotated as it is alone (transformers' result for the sequence
    without its padding), whatever width the batch is padded to. The padding's outputs are unused.
    """
    if rope_length_threshold(config) is None:
        return None
    return jnp.minimum(jnp.arange(width, dtype=jnp.int32)[None, :], jnp.asarray(last, jnp.int32)[:, None])


def rope_angles(positions, config: ModelConfig):
    """(cos, sin) of shape [B, T, head_dim] for integer positions [B, T] (Su et al., 2021), each times
    `rope_attention_factor` (YaRN's, LongRoPE's). The one place RoPE is computed: training, sampling and
    the paged decode all rotate q and k with these.

    The length-dependent scalings ("longrope", "dynamic") take a row's length as its largest position + 1,
    as transformers' `dynamic_rope_update` takes `max(position_ids) + 1`, but per row rather than per batch,
    so that a row's logits never depend on the rows beside it (nor on how a batch is split over devices or
    micro-batches); a batch whose rows are all on one side of the threshold gets transformers' result.
    Padding must not raise a row's largest position: the sampler and the trainer's passes give right-padded
    rows `padded_row_positions`.
    With a KV cache the keys keep the frequencies of the forward pass that wrote them, as in transformers'
    `generate`: a row decoded one token at a time past the threshold switches at the step that crosses it.
    """
    s = config.rope_scaling
    seq_len = None
    if s is not None and s.rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        seq_len = jnp.max(positions, axis=-1, keepdims=True)[..., None] + 1  # [B, 1, 1]
    freqs = positions.astype(_F32)[..., None] * rope_inverse_frequencies(config, seq_len)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    scale = rope_attention_factor(config)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate halves: x·cos + rotate_half(x)·sin on x [B, T, H, D], computed in float32."""
    x32 = x.astype(_F32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def adapted_dense(x, w, adapter=None, dropout=None):
    """y = x·W + (drop(x)·A)·B: a dense layer with an unmerged low-rank adapter (LoRA; Hu et al. 2021).

    Args:
      x: [..., K] activations.
      w: [K, N] frozen kernel (compute dtype).
      adapter: None (y = x·W) or a mapping with `a` [K, r] and `b` [r, N], the LoRA scale already
        folded into `b` (`rlhf_jax.models.lora`); both are cast to `x`'s dtype.
      dropout: None or `(rate, key)`: inverted dropout on the adapter's input only (PEFT's
        `lora_dropout`); the frozen path always sees `x`.

    Returns:
      [..., N] in `x`'s dtype. Computing `x·W` and the rank-r path separately never forms
      `W + A·B` and never needs the gradient of `W` (a frozen weight costs no `xᵀ·dy` matmul).
    """
    y = dense(x, w)
    if adapter is None:
        return y
    return y + low_rank(x, adapter, dropout)


def low_rank(x, adapter, dropout=None, out_dtype=None):
    """The adapter's update alone: (drop(x)·A)·B, `adapter` = {`a` [K, r], `b` [r, N]} (scale in `b`)."""
    if dropout is not None:
        rate, key = dropout
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    return dense(dense(x, adapter["a"].astype(x.dtype)), adapter["b"].astype(x.dtype), out_dtype)


def _flat_adapter(adapter):
    """An adapter of a multi-axis kernel (`a` [in..., r], `b` [r, out...]) as 2-D `a` [K, r], `b` [r, N]."""
    if adapter is None:
        return None
    a, b = adapter["a"], adapter["b"]
    return {"a": a.reshape(-1, a.shape[-1]), "b": b.reshape(b.shape[0], -1)}


def _dropout(dropout, name: str):
    """The `(rate, key)` of one adapted projection (an independent mask per projection, as PEFT)."""
    if dropout is None:
        return None
    rate, key = dropout
    return rate, jax.random.fold_in(key, _PROJECTIONS.index(name))


_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def _project_heads(x, w, adapter=None, dropout=None):
    """x [B, T, E] · w [E, H, D] -> [B, T, H, D] (one [E, H·D] matmul), plus an adapter's update."""
    e, h, d = w.shape
    return adapted_dense(x, w.reshape(e, h * d), _flat_adapter(adapter), dropout).reshape(*x.shape[:-1], h, d)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias (Qwen2), o bias (with q/k/v bias: Llama's and
    Qwen3's `attention_bias`) and q/k RMSNorm (Qwen3)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = param(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), c)
        self.k_proj = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), c)
        self.v_proj = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), c)
        self.o_proj = param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), c)
        if c.attention_bias:
            self.q_bias = param(None, (h, d), ("q_heads", "head_dim"), c, init="zeros")
            self.k_bias = param(None, (k, d), ("kv_heads", "head_dim"), c, init="zeros")
            self.v_bias = param(None, (k, d), ("kv_heads", "head_dim"), c, init="zeros")
        if c.attention_out_bias:
            self.o_bias = param(None, (e,), ("embed",), c, init="zeros")
        if c.qk_norm:
            self.q_norm = RMSNorm(d, "head_dim", c)
            self.k_norm = RMSNorm(d, "head_dim", c)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_positions=None, adapters=None, dropout=None,
                 segment_ids=None, prefill=False):
        """x [B, T, E]; mask bool [B, T, S]; kv_cache (k, v) each [B, Hkv, S, D] or None.

        The cache keeps heads before slots so that attention over it is a plain batched matmul
        (batch dims b, k leading) with no per-step transpose of the cache. `adapters`: this layer's
        LoRA adapters by projection name (`q`, `k`, `v`, `o`), see `adapted_dense`.
        `config.attention_impl` picks the kernel (`rlhf_jax.models.attention`): the einsum over
        `mask` ("reference"), or a fused kernel from `segment_ids` (no cache, or `prefill`: an empty
        cache filled at positions 0..T-1, so the new tokens attend only to each other), or the
        chunked decode over the cache (a cache and T = 1).
        """
        c = self.config
        dt = c.jnp_dtype
        adapters = adapters or {}
        q = _project_heads(x, self.q_proj[...].astype(dt), adapters.get("q"), _dropout(dropout, "q"))
        k = _project_heads(x, self.k_proj[...].astype(dt), adapters.get("k"), _dropout(dropout, "k"))
        v = _project_heads(x, self.v_proj[...].astype(dt), adapters.get("v"), _dropout(dropout, "v"))
        if c.attention_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if c.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        b, t = q.shape[:2]
        impl = attention.resolve_impl(c.attention_impl, dt)
        out = None
        if impl != "reference" and (kv_cache is None or prefill):
            out = attention.fused_attention(q, k, v, segment_ids, impl=impl, sliding_window=c.sliding_window)
        kv_axes = "bskd"
        if isinstance(kv_cache, attention.PrefixLayerKV):
            # Rows continuing shared prompts (`transformer.PrefixKV`): attention over the group's prompt
            # keys and values followed by the rows' own (concatenated; no cache is written).
            out = attention.prefix_attention(q, k, v, kv_cache.k.astype(dt), kv_cache.v.astype(dt), mask)
        elif isinstance(kv_cache, attention.PrefixLayerCache):
            # The sampler's decode (`transformer.PrefixKVCache`): the new tokens go to the same own slots
            # of every row; attention reads the group's prompt block once and each row's own block.
            start = kv_cache.start
            own_k = jax.lax.dynamic_update_slice_in_dim(kv_cache.k, jnp.swapaxes(k, 1, 2).astype(kv_cache.k.dtype),
                                                        start, axis=2)
            own_v = jax.lax.dynamic_update_slice_in_dim(kv_cache.v, jnp.swapaxes(v, 1, 2).astype(kv_cache.v.dtype),
                                                        start, axis=2)
            kv_cache = kv_cache._replace(k=own_k, v=own_v)
            prefix_k, prefix_v = kv_cache.prefix_k.astype(dt), kv_cache.prefix_v.astype(dt)
            if impl == "reference":
                out = attention.prefix_cache_attention(q, prefix_k, prefix_v, own_k.astype(dt), own_v.astype(dt),
                                                       mask)
            else:
                out = attention.chunked_prefix_cache_attention(
                    q, prefix_k, prefix_v, kv_cache.prefix_lengths, own_k, own_v, cache_positions, start,
                    sliding_window=c.sliding_window)
        elif isinstance(kv_cache, paged.PagedLayerKV):
            # Paged cache (rlhf_jax.models.paged): write through the block tables, read each row's view.
            pool_k = paged.paged_write(kv_cache.k, kv_cache.block_tables, cache_positions, k)
            pool_v = paged.paged_write(kv_cache.v, kv_cache.block_tables, cache_positions, v)
            kv_cache = kv_cache._replace(k=pool_k, v=pool_v)
            tables = kv_cache.block_tables
            if kv_cache.route is not None:
                out = paged.routed_attention(q, pool_k.astype(dt), pool_v.astype(dt), kv_cache.route)
            elif t == 1 and (kernel := paged.decode_kernel(c, pool_k.shape[2], tables.shape[1])) != "reference":
                # Decode by JAX's Pallas paged-attention kernel (TPU / GPU; `paged_attention_impl`).
                out = paged.kernel_attention(q, pool_k, pool_v, tables, cache_positions, impl=kernel)
            else:
                k = paged.paged_view(pool_k, kv_cache.block_tables).astype(dt)
                v = paged.paged_view(pool_v, kv_cache.block_tables).astype(dt)
                out = attention.reference_attention(q, k, v, mask, kv_axes="bksd")
        elif kv_cache is not None:
            cache_k, cache_v = kv_cache
            # Row b's token t goes to slot cache_positions[b, t] (an in-place scatter in a loop).
            write = jax.vmap(lambda buf, pos, new: buf.at[:, pos].set(jnp.swapaxes(new, 0, 1).astype(buf.dtype)))
            cache_k = write(cache_k, cache_positions, k)
            cache_v = write(cache_v, cache_positions, v)
            k, v = cache_k.astype(dt), cache_v.astype(dt)
            kv_cache = (cache_k, cache_v)
            kv_axes = "bksd"
            if out is None and impl != "reference" and t == 1:
                out = attention.chunked_cache_attention(q, cache_k, cache_v, cache_positions,
                                                        sliding_window=c.sliding_window)
        if out is None:
            out = attention.reference_attention(q, k, v, mask, kv_axes=kv_axes)
        o_proj = self.o_proj[...].astype(dt)
        out = adapted_dense(out.reshape(b, t, -1), o_proj.reshape(-1, o_proj.shape[-1]),
                            _flat_adapter(adapters.get("o")), _dropout(dropout, "o"))
        if c.attention_out_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, kv_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x·W_gate) ⊙ x·W_up) (Shazeer, 2020), each projection with a bias when
    `config.mlp_bias` (Llama's `mlp_bias`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.config = config
        self.gate_proj = param(rngs, (e, f), ("embed", "mlp"), config)
        self.up_proj = param(rngs, (e, f), ("embed", "mlp"), config)
        self.down_proj = param(rngs, (f, e), ("mlp", "embed"), config)
        if config.mlp_bias:
            self.gate_bias = param(None, (f,), ("mlp",), config, init="zeros")
            self.up_bias = param(None, (f,), ("mlp",), config, init="zeros")
            self.down_bias = param(None, (e,), ("embed",), config, init="zeros")

    def __call__(self, x, adapters=None, dropout=None):
        dt = self.config.jnp_dtype
        adapters = adapters or {}

        def proj(name, h):
            w = getattr(self, f"{name}_proj")[...].astype(dt)
            y = adapted_dense(h, w, adapters.get(name), _dropout(dropout, name))
            return y + getattr(self, f"{name}_bias")[...].astype(dt) if self.config.mlp_bias else y

        return proj("down", jax.nn.silu(proj("gate", x)) * proj("up", x))


class Block(nnx.Module):
    """Pre-norm decoder layer: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, "embed", config)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, "embed", config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_positions=None, adapters=None, dropout=None,
                 segment_ids=None, prefill=False):
        """`adapters`: this layer's LoRA adapters by projection name; `dropout`: `(rate, key)` or None;
        `segment_ids`, `prefill`: for the fused attention kernels (see `Attention`)."""
        attn_out, kv_cache = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, cache_positions,
                                       adapters, dropout, segment_ids, prefill)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), adapters, dropout)
        return x, kv_cache
