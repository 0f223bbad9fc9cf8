"""Attention kernels selected by platform: the einsum reference, `jax.nn.dot_product_attention`
(cuDNN flash attention on GPU, XLA elsewhere), Pallas Splash attention on TPU, and a chunked
online-softmax decode over the KV cache.

All paths compute, per query head `h` of KV group `k = h // G` (grouped-query attention),

    out[b, t, h] = Σ_s softmax_s(q[b, t, h] · k[b, s, k] / √d + mask[b, t, s]) v[b, s, k]

(Vaswani et al., 2017); softmax statistics in float32. The mask is causal by index within a row,
never across packed segments (`segment_ids`, 0 = padding), and optionally a sliding window of
`window` positions. The fused paths assume what every caller passes: positions that increase by
one along a row within a segment (arange, or restarting at 0 per packed segment).

`ModelConfig.attention_impl` chooses: "auto" (default) = "cudnn" on GPU when the compute dtype is
bf16/f16 ("xla" for f32, which cuDNN's flash kernel does not take), "splash" on TPU, "reference"
elsewhere (CPU: the einsum stays the reference and the tested path). Decode (one new token per row
over a KV cache) uses `chunked_cache_attention` for every impl but "reference"; the sampler's cache
of rows sharing a prompt (`transformer.PrefixKVCache`) `prefix_cache_attention` (einsum) or
`chunked_prefix_cache_attention` (online softmax over the prompt block and the row's block, merged).

Decode over a *paged* cache (`rlhf_jax.models.paged`) has its own knob, `ModelConfig.
paged_attention_impl` (`resolve_paged_impl`): "auto" = JAX's Pallas paged-attention kernel of the
platform ("pallas_tpu" on TPU, "pallas_gpu", Triton, on GPU) when the compute dtype is bf16/f16,
else the reference (the owner-routed einsum over the pool; CPU, f32, or `attention_impl="reference"`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_integer, check_positive, check_rank

_F32 = jnp.float32
AttentionImpl = Literal["auto", "reference", "xla", "cudnn", "splash"]
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "splash")
PagedAttentionImpl = Literal["auto", "reference", "pallas_tpu", "pallas_gpu"]
PAGED_ATTENTION_IMPLS = ("auto", "reference", "pallas_tpu", "pallas_gpu")
DECODE_CHUNK = 256  # KV-cache slots per step of the online-softmax decode loop


def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
    """The concrete attention implementation for `impl` on `platform` (default: JAX's default backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    if platform == "tpu":
        return "splash"
    return "reference"


def resolve_paged_impl(impl: str, dtype, attention_impl: str = "auto", platform: str | None = None) -> str:
    """The paged-cache decode read for `ModelConfig.paged_attention_impl = impl` on `platform`
    (default: JAX's default backend): "reference" (`rlhf_jax.models.paged.routed_attention` or the
    gathered view + einsum), "pallas_tpu" or "pallas_gpu" (`rlhf_jax.models.paged.kernel_attention`).

    "auto" picks the platform's kernel when `dtype` (the compute dtype) is bf16/f16, as "auto" picks
    cuDNN for `attention_impl`: in f32 the kernels round (the TPU kernel casts k and v to bf16, the
    Triton kernel's dots run in TF32), so f32 keeps the reference; so does an explicit
    `attention_impl="reference"` (the einsum everywhere). Whether a kernel takes the shapes is
    `rlhf_jax.models.paged.kernel_params`'s question.
    """
    if impl not in PAGED_ATTENTION_IMPLS:
        raise ValueError(f"paged_attention_impl must be one of {PAGED_ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if attention_impl == "reference" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "reference"
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if platform == "tpu":
        return "pallas_tpu"
    return "reference"


def _check_qkv(fn: str, q, k, v, *, kv_axes: str = "bskd", k_name: str = "k", v_name: str = "v") -> tuple[int, int]:
    """Trace-time checks of q [B, T, H, D] against k, v [B, S, Hkv, D] ("bskd") or [B, Hkv, S, D]
    ("bksd"): ranks, equal k/v shapes, batch, head_dim, and H a multiple of Hkv (grouped-query
    attention). Raises ValueError naming the argument; returns (S, Hkv)."""
    if kv_axes not in ("bskd", "bksd"):
        raise ValueError(f"{fn}: kv_axes must be 'bskd' or 'bksd', got {kv_axes!r}")
    layout = "[B, S, Hkv, D]" if kv_axes == "bskd" else "[B, Hkv, S, D]"
    check_rank(fn, "q [B, T, H, D]", q, 4)
    check_rank(fn, f"{k_name} {layout}", k, 4)
    if jnp.shape(k) != jnp.shape(v):
        raise ValueError(f"{fn}: {k_name} and {v_name} must have the same shape {layout}, "
                         f"got {tuple(jnp.shape(k))} and {tuple(jnp.shape(v))}")
    b, _, h, d = q.shape
    kb, s, hkv, kd = (k.shape[0], k.shape[1], k.shape[2], k.shape[3]) if kv_axes == "bskd" else (
        k.shape[0], k.shape[2], k.shape[1], k.shape[3])
    if kb != b:
        raise ValueError(f"{fn}: q {tuple(q.shape)} has batch {b} but {k_name} {tuple(k.shape)} {layout} has {kb}")
    if kd != d:
        raise ValueError(f"{fn}: q {tuple(q.shape)} has head_dim {d} but {k_name} {tuple(k.shape)} {layout} has {kd}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{fn}: q's num_heads ({h}) must be a multiple of {k_name}'s num_kv_heads ({hkv}) for "
                         f"grouped-query attention; q {tuple(q.shape)} [B, T, H, D], "
                         f"{k_name} {tuple(k.shape)} {layout}")
    return s, hkv


def _check_window(fn: str, sliding_window) -> None:
    if sliding_window is not None:
        check_positive(fn, "sliding_window", sliding_window)


def _check_segment_ids(fn: str, segment_ids, q) -> None:
    if segment_ids is None:
        return
    check_integer(fn, "segment_ids", segment_ids)
    if tuple(jnp.shape(segment_ids)) != tuple(q.shape[:2]):
        raise ValueError(f"{fn}: segment_ids must be [B, T] = {tuple(q.shape[:2])} as q {tuple(q.shape)}, "
                         f"got shape {tuple(jnp.shape(segment_ids))}")


def reference_attention(q, k, v, mask, *, kv_axes: str = "bskd"):
    """The einsum path: q [B, T, H, D]; k, v [B, S, Hkv, D] ("bskd") or [B, Hkv, S, D] ("bksd");
    mask bool [B, T, S] (True = attend; B and T may be 1, broadcast). Materialises the
    [B, Hkv, G, T, S] scores; returns [B, T, H, D]. A query row with no True key gets the mean of v
    (finite, no NaN in the gradient), as Hugging Face's eager attention."""
    s, hkv = _check_qkv("reference_attention", q, k, v, kv_axes=kv_axes)
    b, t, h, d = q.shape
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"reference_attention: mask must be boolean (True = attend), got dtype "
                        f"{jnp.result_type(mask)}; an additive float mask (0 / -inf) would be read the other way round")
    if jnp.ndim(mask) != 3 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, t) or mask.shape[2] != s:
        raise ValueError(f"reference_attention: mask must be [B, T, S] = {(b, t, s)} (B, T may be 1), "
                         f"got shape {tuple(jnp.shape(mask))}")
    q = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum(f"btkgd,{kv_axes}->bkgts", q, k, preferred_element_type=_F32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(_F32).min)
    probs = softmax(scores).astype(q.dtype)
    return jnp.einsum(f"bkgts,{kv_axes}->btkgd", probs, v).reshape(b, t, h, d)


def softmax(scores: jax.Array) -> jax.Array:
    """`softmax` over the last axis, differentiated by its closed-form rule `dS = P (dP - Σ_s P dP)`.

    `jax.nn.softmax` uses that rule only under `jax.softmax_custom_jvp(True)` (off by default in
    JAX 0.10); otherwise autodiff goes through the exponential, the row sum and the division, which
    keeps the unnormalised scores and their sums for the backward pass and spends more elementwise
    passes over `[.., T, S]` in it. Same forward values. The flag is set for this call only, so
    nothing changes process-wide. (XLA:CPU, in one process: W2's DPO step 5-6% less CPU time, W1's
    SFT step 3%, W4's GRPO update 2%; the 8B DPO update on TPU 0.1 GiB less per chip; CPU.md.)
    """
    with jax.softmax_custom_jvp(True):
        return jax.nn.softmax(scores, axis=-1)


class PrefixLayerKV(NamedTuple):
    """One layer's keys and values of shared prompts: k, v [groups, Hkv, P, D], each group's prompt
    continued by `N / groups` contiguous rows (`rlhf_jax.models.transformer.PrefixKV`)."""

    k: jax.Array
    v: jax.Array


def prefix_attention(q, k, v, prefix_k, prefix_v, mask):
    """Attention of rows that continue a shared prompt, over the prompt's keys and their own.

    q [N, T, H, D] and k, v [N, T, Hkv, D] are the rows' own tokens; prefix_k, prefix_v
    [groups, Hkv, P, D] the prompts', row b continuing prompt `b // (N / groups)`; mask bool
    [N, T, P + T] (prompt slots first). One softmax over both key blocks,

        out[b, t] = Σ_s softmax_s([q·K_prefix(b) ; q·K_b] / √d + mask) [V_prefix(b) ; V_b],

    i.e. `reference_attention` over the concatenation `[prompt ; row]` of P + T keys: the same
    numbers as over a cache holding the prompt and the row (up to the summation order), without
    writing the row's keys into a per-row cache (a scatter, and a gather in the gradient) and with
    no unfilled slots. (Two blocks, the prompt's one batched matmul per group over its rows, merged
    by one softmax: same numbers, 40% slower forward on XLA:CPU at W4's sizes.)
    """
    r = q.shape[0] // prefix_k.shape[0]

    # [N, Hkv, P + T, D] (the cache's layout): each group's block repeated for its r rows, then the row's own
    keys = jnp.concatenate([jnp.repeat(prefix_k, r, axis=0), jnp.swapaxes(k, 1, 2)], axis=2)
    values = jnp.concatenate([jnp.repeat(prefix_v, r, axis=0), jnp.swapaxes(v, 1, 2)], axis=2)
    return reference_attention(q, keys, values, mask, kv_axes="bksd")


def fused_attention(q, k, v, segment_ids=None, *, impl: str, sliding_window: int | None = None,
                    interpret: bool | None = None):
    """Causal self-attention by a fused kernel: q [B, T, H, D], k, v [B, T, Hkv, D] -> [B, T, H, D].

    Args:
      impl: "xla" or "cudnn" (`jax.nn.dot_product_attention`) or "splash" (Pallas, TPU).
      segment_ids: int [B, T] or None; tokens attend only within their segment.
      sliding_window: keys at most `window - 1` positions back, or None.
      interpret: run a Pallas kernel in interpret mode (default: when not on a TPU), for CPU tests.
    """
    if impl not in ("xla", "cudnn", "splash"):
        raise ValueError(f"fused_attention: impl must be 'xla', 'cudnn' or 'splash', got {impl!r}")
    _check_self_attention("fused_attention", q, k, v, segment_ids, sliding_window)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, sliding_window=sliding_window, interpret=interpret)
    mask = None
    if segment_ids is not None:  # cuDNN takes it as a bias (the causal part stays in the kernel)
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    call = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, is_causal=True,
                             local_window_size=window)
    if impl == "cudnn":
        try:
            return call(implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:  # shapes/dtypes cuDNN's kernel refuses
            _warn_once(f"cuDNN attention unavailable for q {q.shape} {q.dtype} ({type(e).__name__}: {e}); "
                       "using the XLA attention")
    return call(implementation="xla")


def _check_self_attention(fn: str, q, k, v, segment_ids, sliding_window) -> None:
    """The fused kernels' inputs: q [B, T, H, D]; k, v [B, T, Hkv, D] (the same T: causal self-attention)."""
    s, _ = _check_qkv(fn, q, k, v)
    if s != q.shape[1]:
        raise ValueError(f"{fn}: causal self-attention needs k, v with as many positions as q ({q.shape[1]}), "
                         f"got k {tuple(k.shape)} [B, T, Hkv, D]")
    _check_segment_ids(fn, segment_ids, q)
    _check_window(fn, sliding_window)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def splash_attention(q, k, v, segment_ids=None, *, sliding_window: int | None = None,
                     interpret: bool | None = None, block: int = 512):
    """Splash attention (Pallas TPU kernel; block-sparse causal/local mask, segment ids, GQA).

    Layouts as `fused_attention`. The sequence is padded at the end to a multiple of the block
    (a multiple of 128): padded keys come after every real query, so the causal mask hides them.
    Under an `activation_sharding` context the kernel runs per batch shard (`jax.shard_map`).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    from rlhf_jax.sharding import active_batch_split

    _check_self_attention("splash_attention", q, k, v, segment_ids, sliding_window)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, t, h, d = q.shape
    block = min(block, 128 * -(-t // 128))
    padded = block * -(-t // block)
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    # [B, H, T, D] layout; the kernel does not scale the logits.
    qh = jnp.pad(q * jnp.asarray(1 / math.sqrt(d), q.dtype), pad).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    if sliding_window is None:
        head_mask = sa.CausalMask((padded, padded))
    else:
        head_mask = sa.LocalMask((padded, padded), window_size=(sliding_window - 1, 0), offset=0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * h), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - t)], constant_values=-1)

    def run(qh, kh, vh, seg):
        if seg is None:
            return jax.vmap(kernel)(qh, kh, vh)
        return jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, sa.SegmentIds(s_, s_)))(qh, kh, vh, seg)

    split = active_batch_split(b)
    if split is not None:
        mesh, axes = split
        spec = jax.sharding.PartitionSpec(axes)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, None if seg is None else spec),
                            out_specs=spec, check_vma=False)
    out = run(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]


def chunked_cache_attention(q, cache_k, cache_v, positions, *, sliding_window: int | None = None,
                            chunk: int = DECODE_CHUNK):
    """Attention of a few new queries over a KV cache, one chunk of slots at a time (online softmax).

    q [B, T, H, D]; cache_k, cache_v [B, Hkv, S, D] (slot s holds position s, the new tokens already
    written); positions int [B, T]. A query at position p sees slots s <= p (and p - s < window).
    Only the chunks up to the largest position in the batch are read: the filled prefix of the cache,
    not all S slots, and no [.., S] score matrix is formed (`_online_softmax`).
    The trip count is data dependent (a `while` loop): for sampling, not for differentiation.
    """
    fn = "chunked_cache_attention"
    _, hkv = _check_qkv(fn, q, cache_k, cache_v, kv_axes="bksd", k_name="cache_k", v_name="cache_v")
    b, t, h, d = q.shape
    check_integer(fn, "positions", positions)
    if tuple(jnp.shape(positions)) != (b, t):
        raise ValueError(f"{fn}: positions must be [B, T] = {(b, t)} as q {tuple(q.shape)}, "
                         f"got shape {tuple(jnp.shape(positions))}")
    _check_window(fn, sliding_window)
    check_positive(fn, "chunk", chunk)
    qg = q.reshape(b, t, hkv, h // hkv, d)
    m, l, o = _online_softmax(qg, cache_k, cache_v, positions, positions, jnp.zeros((b,), jnp.int32),
                              sliding_window=sliding_window, chunk=chunk)
    # A query that sees no slot (a position < 0: an idle row) gets zeros, as `paged.routed_attention`, not 0 / 0.
    return _normalise((m, jnp.where(l > 0, l, 1.0), o), q.dtype)


def _online_softmax(qg, cache_k, cache_v, last_slot, query_positions, slot_offset, *,
                    sliding_window: int | None, chunk: int):
    """Unnormalised attention of grouped queries qg [B, T, Hkv, G, D] over slots s <= last_slot[b, t]
    of cache_k, cache_v [B, Hkv, S, D], one chunk of slots at a time; slot s of row b holds position
    `s + slot_offset[b]`, and a sliding window keeps `query_positions[b, t] - (s + slot_offset[b]) < window`.

    Returns the running statistics (m, l, o) of the online softmax (Milakov & Gimelshein, 2018;
    FlashAttention, Dao et al., 2022), [B, Hkv, G, T] (and [.., D] for o), per chunk of scores x_s:

        m' = max(m, max_s x_s),  l' = l e^{m - m'} + Σ_s e^{x_s - m'},  o' = o e^{m - m'} + Σ_s e^{x_s - m'} v_s,

    so that `o / l` is the attention and two blocks of keys merge by `_merge`. Only the chunks up to
    the largest `last_slot` are read.
    """
    b, t, hkv, g, d = qg.shape
    s = cache_k.shape[2]
    c = min(chunk, s)
    qg = (qg.astype(_F32) / math.sqrt(d)).astype(qg.dtype)
    needed = (jnp.max(last_slot) // c + 1).astype(jnp.int32)
    needed = jnp.clip(needed, 0, -(-s // c))
    limit = last_slot[:, None, None, :, None]  # [B, 1, 1, T, 1]
    neg = jnp.finfo(_F32).min

    def body(i, carry):
        m, l, o = carry
        start = jnp.minimum(i * c, s - c)  # the last chunk may overlap the previous one
        kc = jax.lax.dynamic_slice_in_dim(cache_k, start, c, axis=2).astype(qg.dtype)
        vc = jax.lax.dynamic_slice_in_dim(cache_v, start, c, axis=2).astype(qg.dtype)
        x = jnp.einsum("btkgd,bkcd->bkgtc", qg, kc, preferred_element_type=_F32)
        slot = start + jnp.arange(c)
        valid = (slot >= i * c) & (slot <= limit)  # slots below i*c were counted by earlier chunks
        if sliding_window is not None:
            key_positions = slot + slot_offset[:, None, None, None, None]
            valid = valid & (query_positions[:, None, None, :, None] - key_positions < sliding_window)
        x = jnp.where(valid, x, neg)
        m_new = jnp.maximum(m, jnp.max(x, axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(x - m_new[..., None]), 0.0)
        l = l * scale + jnp.sum(p, axis=-1)
        o = o * scale[..., None] + jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(qg.dtype), vc,
                                              preferred_element_type=_F32)
        return m_new, l, o

    init = (jnp.full((b, hkv, g, t), neg, _F32), jnp.zeros((b, hkv, g, t), _F32),
            jnp.zeros((b, hkv, g, t, d), _F32))
    return jax.lax.fori_loop(0, needed, body, init)


def _merge(a, b):
    """Online-softmax statistics (m, l, o) of two blocks of keys merged into those of their union."""
    (m1, l1, o1), (m2, l2, o2) = a, b
    m = jnp.maximum(m1, m2)
    s1, s2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * s1 + l2 * s2, o1 * s1[..., None] + o2 * s2[..., None]


def _normalise(stats, dtype):
    """`o / l` of online-softmax statistics [B, Hkv, G, T, D] as attention output [B, T, H, D]."""
    _, l, o = stats
    b, hkv, g, t, d = o.shape
    return (o / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, d).astype(dtype)


class PrefixLayerCache(NamedTuple):
    """One layer's decode cache of rows continuing shared prompts (`rlhf_jax.models.transformer.PrefixKVCache`):
    the prompts' keys and values `prefix_k, prefix_v [groups, Hkv, P, D]` (read only; row b sees slots
    `< prefix_lengths[b]`) and the rows' own `k, v [N, Hkv, S, D]`, the new tokens written at own
    slots `start .. start + T - 1`."""

    prefix_k: jax.Array
    prefix_v: jax.Array
    k: jax.Array
    v: jax.Array
    start: jax.Array
    prefix_lengths: jax.Array


def prefix_cache_attention(q, prefix_k, prefix_v, k, v, mask):
    """Decode attention of rows continuing shared prompts: one softmax over the group's prompt block,
    read once for the group's rows, and the row's own block of cached slots.

    q [N, T, H, D]; prefix_k, prefix_v [groups, Hkv, P, D], row b continuing prompt `b // (N / groups)`;
    k, v [N, Hkv, S, D] the rows' own slots; mask bool [N, T, P + S] (prompt slots first). As
    `prefix_attention`,

        out[b, t] = Σ_s softmax_s([q·K_prefix(b) ; q·K_b] / √d + mask) [V_prefix(b) ; V_b],

    but the prompt block is one batched matmul per group over its rows' queries (no per-row copy of
    the prompt's keys: the sampler's decode reads each prompt's keys and values once per step, not
    once per sample).
    """
    n, t, h, d = q.shape
    groups, hkv, p, _ = prefix_k.shape
    r, g = n // groups, h // hkv
    batched = (((3,), (2,)), ((0, 1), (0, 1)))   # [groups, Hkv, M, K] x [groups, Hkv, K, N]
    # Per group and kv head, the group's r * g * T queries are the rows of one matmul with the prompt's
    # keys (written as a plain [M, D] x [D, P] product, the form XLA:CPU's kernels run fastest).
    q_prefix = q.reshape(groups, r, t, hkv, g, d).transpose(0, 3, 1, 4, 2, 5).reshape(groups, hkv, r * g * t, d)
    x_prefix = jax.lax.dot_general(q_prefix, jnp.swapaxes(prefix_k, 2, 3), batched, preferred_element_type=_F32)
    x_prefix = x_prefix.reshape(groups, hkv, r, g, t, p).transpose(0, 2, 1, 3, 4, 5).reshape(n, hkv, g, t, p)
    x_own = jnp.einsum("ntkgd,nksd->nkgts", q.reshape(n, t, hkv, g, d), k, preferred_element_type=_F32)
    scores = jnp.concatenate([x_prefix, x_own], axis=-1) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(_F32).min)
    probs = softmax(scores).astype(q.dtype)
    p_prefix = probs[..., :p].reshape(groups, r, hkv, g, t, p).transpose(0, 2, 1, 3, 4, 5).reshape(
        groups, hkv, r * g * t, p)
    # The weighted sums in the compute dtype, as `reference_attention` (XLA:CPU has no bf16 x bf16 -> f32
    # batched dot), added in float32.
    out_prefix = jax.lax.dot_general(p_prefix, prefix_v, batched)
    out_prefix = out_prefix.reshape(groups, hkv, r, g, t, d).transpose(0, 2, 4, 1, 3, 5).reshape(n, t, hkv, g, d)
    out_own = jnp.einsum("nkgts,nksd->ntkgd", probs[..., p:], v)
    return (out_prefix.astype(_F32) + out_own.astype(_F32)).reshape(n, t, h, d).astype(q.dtype)


def chunked_prefix_cache_attention(q, prefix_k, prefix_v, prefix_lengths, k, v, positions, start, *,
                                   sliding_window: int | None = None, chunk: int = DECODE_CHUNK):
    """`prefix_cache_attention` without any [.., P + S] score matrix: the group's prompt block and the
    row's own block each by the chunked online softmax (`_online_softmax`), merged by their statistics.

    prefix_lengths int [N]: row b sees prompt slots `< prefix_lengths[b]` (equal within a group);
    positions int [N, T] the new tokens' positions, written at own slots `start + t`; own slot s of row
    b holds position `positions[b, 0] - start + s` (for the sliding window).
    """
    n, t, h, d = q.shape
    groups, hkv, p, _ = prefix_k.shape
    r, g = n // groups, h // hkv
    # The prompt block: a group's r rows x T tokens are one batch of queries over its prompt's slots.
    q_prefix = q.reshape(groups, r * t, hkv, g, d)
    last_prompt_slot = jnp.broadcast_to((prefix_lengths[::r] - 1)[:, None], (groups, r * t))
    m, l, o = _online_softmax(q_prefix, prefix_k, prefix_v, last_prompt_slot, positions.reshape(groups, r * t),
                              jnp.zeros((groups,), jnp.int32), sliding_window=sliding_window, chunk=chunk)
    regroup = lambda a: jnp.moveaxis(a.reshape(groups, hkv, g, r, t, *a.shape[4:]), 3, 1).reshape(  # noqa: E731
        n, hkv, g, t, *a.shape[4:])
    prefix_stats = (regroup(m), regroup(l), regroup(o))
    own_last = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (n, t))
    own_stats = _online_softmax(q.reshape(n, t, hkv, g, d), k, v, own_last, positions, positions[:, 0] - start,
                                sliding_window=sliding_window, chunk=chunk)
    return _normalise(_merge(prefix_stats, own_stats), q.dtype)
