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
over a KV cache) uses `chunked_cache_attention` for every impl but "reference".

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


def reference_attention(q, k, v, mask, *, kv_axes: str = "bskd"):
    """The einsum path: q [B, T, H, D]; k, v [B, S, Hkv, D] ("bskd") or [B, Hkv, S, D] ("bksd");
    mask bool [B, T, S]. Materialises the [B, Hkv, G, T, S] scores; returns [B, T, H, D]."""
    b, t, h, d = q.shape
    hkv = k.shape[2] if kv_axes == "bskd" else k.shape[1]
    q = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum(f"btkgd,{kv_axes}->bkgts", q, k, preferred_element_type=_F32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(_F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum(f"bkgts,{kv_axes}->btkgd", probs, v).reshape(b, t, h, d)


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
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, sliding_window=sliding_window, interpret=interpret)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"fused_attention: impl must be 'xla', 'cudnn' or 'splash', got {impl!r}")
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
    not all S slots, and no [.., S] score matrix is formed. Running max m, normaliser l and
    accumulator o are rescaled per chunk (Milakov & Gimelshein, 2018; FlashAttention, Dao et al., 2022):

        m' = max(m, max_s x_s),  l' = l e^{m - m'} + Σ_s e^{x_s - m'},  o' = o e^{m - m'} + Σ_s e^{x_s - m'} v_s.

    The trip count is data dependent (a `while` loop): for sampling, not for differentiation.
    """
    b, t, h, d = q.shape
    hkv, s = cache_k.shape[1], cache_k.shape[2]
    g = h // hkv
    c = min(chunk, s)
    qg = (q.astype(_F32) / math.sqrt(d)).astype(q.dtype).reshape(b, t, hkv, g, d)
    needed = (jnp.max(positions) // c + 1).astype(jnp.int32)
    needed = jnp.minimum(needed, -(-s // c))
    qpos = positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    neg = jnp.finfo(_F32).min

    def body(i, carry):
        m, l, o = carry
        start = jnp.minimum(i * c, s - c)  # the last chunk may overlap the previous one
        kc = jax.lax.dynamic_slice_in_dim(cache_k, start, c, axis=2).astype(q.dtype)
        vc = jax.lax.dynamic_slice_in_dim(cache_v, start, c, axis=2).astype(q.dtype)
        x = jnp.einsum("btkgd,bkcd->bkgtc", qg, kc, preferred_element_type=_F32)
        slot = start + jnp.arange(c)
        valid = (slot >= i * c) & (slot <= qpos)  # slots below i*c were counted by earlier chunks
        if sliding_window is not None:
            valid = valid & (qpos - slot < sliding_window)
        x = jnp.where(valid, x, neg)
        m_new = jnp.maximum(m, jnp.max(x, axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(x - m_new[..., None]), 0.0)
        l = l * scale + jnp.sum(p, axis=-1)
        o = o * scale[..., None] + jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(q.dtype), vc,
                                              preferred_element_type=_F32)
        return m_new, l, o

    init = (jnp.full((b, hkv, g, t), neg, _F32), jnp.zeros((b, hkv, g, t), _F32),
            jnp.zeros((b, hkv, g, t, d), _F32))
    _, l, o = jax.lax.fori_loop(0, needed, body, init)
    out = o / l[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
