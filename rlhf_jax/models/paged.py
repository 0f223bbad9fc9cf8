"""Paged KV cache: one block pool per layer plus per-row block tables (vLLM's PagedAttention layout).

A row's logical cache slot `s` (= absolute position) lives in physical block `table[row, s // bs]`
at offset `s % bs` of the pool `[kv_heads, num_blocks, bs, head_dim]`, so memory follows the
tokens a row actually holds instead of `rows x max_len`, and rows may share blocks (a prompt's
blocks held once by the `n` samples of a group). Block `num_blocks - 1` is the *trash* block:
unallocated table entries point at it, so writes of padding or of idle rows land there and are never
read unmasked (a query at position `p` only sees logical slots `<= p`, which a row has allocated).

`CausalLM.forward(..., cache=PagedKVCache(...))` runs the same layers as with a `KVCache`:
attention writes the new keys/values through the table (one scatter, in place inside a loop) and
reads them in one of two ways:

- a prefill (or any step without a `route`): each row's logical view
  `[B, kv_heads, table_width * bs, head_dim]` gathered through its table, then the reference einsum
  (`rlhf_jax.models.attention.reference_attention`), so the numerics are the dense cache's; the view
  covers `table_width` blocks (pass a table cut to the blocks the batch needs);
- single-token decode with a `PoolRoute` (`pool_route`, the continuous batcher's decode read): every
  pool block is scored against the query of the one row that holds it (`routed_attention`): a
  batched matrix-vector product over the pool where it lies, the per-row softmax sums as one-hot
  matmuls over blocks; blocks shared by several rows (a group's prompt) are read once more per
  further row through a small gather. Work ~ pool size (not rows x pool, not rows x max_len).

Why not the gather on the decode path: XLA:CPU's gather is an indexed element copy; at W5 sizes (16
rows x 36 blocks of 16 x 4 heads x 64) gathering the views costs more than the attention over them
(measured in one process: view gather + einsum 23 ms per step for 4 layers, whole-pool matmul 9.6 ms,
dense 576-slot cache read 2.3 ms, routed read 1.1-1.5 ms; own CPU time on a contended 2-core host).
The routed read's dots keep XLA:CPU's operand order (batch axes first, the left operand contracted
on its last axis, the right one on its first): written the other way round XLA transposes the whole
pool (or the per-block outputs) at every step.

Kernels (`ModelConfig.paged_attention_impl`, `attention.resolve_paged_impl`): single-token decode
without a route reads through the block tables with JAX's Pallas paged-attention kernel of the
platform (`kernel_attention`; "auto": TPU `jax.experimental.pallas.ops.tpu.paged_attention`, GPU the
Triton `jax.experimental.pallas.ops.gpu.paged_attention`, for bf16/f16 compute). The pool layout is
theirs (`k_pages [kv_heads, pages, page_size, head_dim]`); block tables are their page indices and a
row's length is its query position + 1. `decode_kernel` says which read a config gets and why not a
kernel (`kernel_params`: TPU needs head_dim % 128 == 0; Triton power-of-two head_dim >= 16 and
page_size; neither takes a sliding window): "auto" then keeps the reference with a warning, an
explicit kernel name raises. On CPU (and in f32) the routed einsum above stays the reference; the
continuous batcher passes no route when a kernel is selected.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_integer, check_rank

__all__ = ["PagedKVCache", "PagedLayerKV", "PoolRoute", "paged_write", "paged_view", "pool_route", "routed_attention",
           "decode_kernel", "kernel_params", "kernel_attention"]


class PagedKVCache(NamedTuple):
    """Pools of every layer and the rows' block tables.

    Attributes:
      k, v: `[layers, kv_heads, num_blocks, block_size, head_dim]` (the last block is the trash block).
      block_tables: int32 `[B, W]` physical block of each row's logical block `0..W-1`.
      route: optional, single-token decode only: a `PoolRoute` (`pool_route`): each pool block is
        scored against its owner row's query only (`routed_attention`; the decode read of the
        continuous batcher), reading the pool where it lies instead of gathering each row's view (on
        XLA:CPU a gather, an indexed copy of `B x W x bs` positions per layer, k and v, costs more
        than the attention over the gathered view itself).
    """

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    route: PoolRoute | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        """Logical slots each row sees: `W * block_size` (the attention mask's key length)."""
        return self.block_tables.shape[1] * self.block_size


class PagedLayerKV(NamedTuple):
    """One layer's pools `[kv_heads, num_blocks, bs, head_dim]` with the rows' block tables (and decode route)."""

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    route: PoolRoute | None = None


def _check_tables(fn: str, tables, batch: int) -> None:
    check_rank(fn, "tables [B, W]", tables, 2)
    check_integer(fn, "tables", tables)
    if tables.shape[0] != batch:
        raise ValueError(f"{fn}: tables {tuple(tables.shape)} [B, W] must have a row per query row ({batch})")


def _check_pool(fn: str, q, pool_k, pool_v) -> None:
    """q [B, T, H, D] against pools `[kv_heads, num_blocks, bs, D]`: ranks, shapes, head_dim, H % kv_heads."""
    check_rank(fn, "q [B, T, H, D]", q, 4)
    check_rank(fn, "pool_k [kv_heads, num_blocks, block_size, head_dim]", pool_k, 4)
    if jnp.shape(pool_k) != jnp.shape(pool_v):
        raise ValueError(f"{fn}: pool_k and pool_v must have the same shape, got {tuple(pool_k.shape)} and "
                         f"{tuple(pool_v.shape)}")
    h, d = q.shape[2], q.shape[3]
    hkv, kd = pool_k.shape[0], pool_k.shape[3]
    if kd != d:
        raise ValueError(f"{fn}: q {tuple(q.shape)} has head_dim {d} but the pool {tuple(pool_k.shape)} "
                         f"[kv_heads, num_blocks, block_size, head_dim] has {kd}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{fn}: q's num_heads ({h}) must be a multiple of the pool's kv_heads ({hkv}); q "
                         f"{tuple(q.shape)} [B, T, H, D], pool {tuple(pool_k.shape)}")


def paged_write(pool: jax.Array, tables: jax.Array, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Write `new [B, T, kv_heads, D]` at logical slots `positions [B, T]` through `tables [B, W]`.

    Slot `s` of row `b` goes to `pool[:, tables[b, s // bs], s % bs]`; positions past the table's
    width go to the trash block (the pool's last).
    """
    fn = "paged_write"
    check_rank(fn, "new [B, T, kv_heads, D]", new, 4)
    if (new.shape[2], new.shape[3]) != (pool.shape[0], pool.shape[3]):
        raise ValueError(f"{fn}: new {tuple(new.shape)} [B, T, kv_heads, D] does not match the pool "
                         f"{tuple(pool.shape)} [kv_heads, num_blocks, block_size, D]")
    _check_tables(fn, tables, new.shape[0])
    check_integer(fn, "positions", positions)
    if tuple(jnp.shape(positions)) != tuple(new.shape[:2]):
        raise ValueError(f"{fn}: positions must be [B, T] = {tuple(new.shape[:2])} as new, got shape "
                         f"{tuple(jnp.shape(positions))}")
    bs = pool.shape[2]
    trash = pool.shape[1] - 1
    logical = positions // bs
    inside = logical < tables.shape[1]
    blocks = jnp.take_along_axis(tables, jnp.minimum(logical, tables.shape[1] - 1), axis=1)
    blocks = jnp.where(inside, blocks, trash)
    # pool[:, blocks, offsets] is [kv_heads, B, T, D]: the new values with heads first.
    return pool.at[:, blocks, positions % bs].set(jnp.moveaxis(new, 2, 0).astype(pool.dtype))


def paged_view(pool: jax.Array, tables: jax.Array) -> jax.Array:
    """Each row's logical cache `[B, kv_heads, W * bs, D]` gathered through `tables [B, W]`."""
    check_rank("paged_view", "tables [B, W]", tables, 2)
    h, _, bs, d = pool.shape
    b, w = tables.shape
    view = pool[:, tables]                                  # [kv_heads, B, W, bs, D]
    return jnp.swapaxes(view, 0, 1).reshape(b, h, w * bs, d)


class PoolRoute(NamedTuple):
    """Which row reads each pool block in a single-token decode step (`pool_route`; `routed_attention`).

    Attributes:
      owner: int32 `[N]` the row whose table holds block `n` (the lowest such row; -1: none, and the
        trash block); `owner_onehot`: f32 `[B, N]` its one-hot (zeros for unowned blocks).
      valid: bool `[N, bs]` pool position `(n, o)` is a logical slot `<= ` its owner's query position.
      extra_rows, extra_blocks: int32 `[E]` the other (row, block) reads: blocks shared by several
        rows (a group's prompt) are read once more for each further row, gathered; unused entries
        point at the trash block with `extra_valid` False. `E` (static) is 0 without sharing.
      extra_valid: bool `[E, bs]`.
    """

    owner: jax.Array
    owner_onehot: jax.Array
    valid: jax.Array
    extra_rows: jax.Array
    extra_blocks: jax.Array
    extra_valid: jax.Array


def pool_route(tables: jax.Array, positions: jax.Array, num_blocks: int, block_size: int,
               num_extra: int = 0, sliding_window: int | None = None) -> PoolRoute:
    """The `PoolRoute` of rows with block tables `tables [B, W]` and query positions `positions [B]`.

    `num_blocks` counts the pool's blocks, its last (the trash block) included. Entry `(b, w)` of the
    tables is logical slot range `[w * bs, (w + 1) * bs)` of row `b`; block `n`'s owner is the row of
    its lowest entry `(b, w)` (row-major), the other entries holding `n` are the extra reads, of which
    there must be at most `num_extra` (the caller counts them: `num_extra_reads`). `sliding_window`
    (the model's `ModelConfig.sliding_window`): a query at `p` sees only slots `s` with `p - s < window`,
    as `attention_mask` keeps them.
    """
    fn = "pool_route"
    check_rank(fn, "tables [B, W]", tables, 2)
    b, w = tables.shape
    if tuple(jnp.shape(positions)) != (b,):
        raise ValueError(f"{fn}: positions must be [B] = ({b},) (one query position per row of tables), got shape "
                         f"{tuple(jnp.shape(positions))}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"{fn}: sliding_window must be > 0 or None, got {sliding_window!r}")
    trash = num_blocks - 1
    entry = jnp.arange(b * w, dtype=jnp.int32).reshape(b, w)                 # row-major key r * W + c
    none = jnp.int32(b * w)
    first = jnp.full((num_blocks,), none, jnp.int32).at[tables].min(entry).at[trash].set(none)
    owner = jnp.where(first < none, first // w, -1)
    column = first % w
    owner_pos = jnp.where(owner >= 0, positions[jnp.maximum(owner, 0)], -1)
    offsets = jnp.arange(block_size, dtype=jnp.int32)

    def visible(slots, query):             # logical slots [M, bs] a query at position query [M] sees
        seen = slots <= query[:, None]
        return seen if sliding_window is None else seen & (query[:, None] - slots < sliding_window)

    valid = visible(column[:, None] * block_size + offsets[None, :], owner_pos)
    onehot = (owner[None, :] == jnp.arange(b, dtype=jnp.int32)[:, None]).astype(jnp.float32)
    if num_extra:
        extra = (tables != trash) & (first[tables] != entry)
        count = jnp.sum(extra)
        idx = jnp.nonzero(extra.reshape(-1), size=num_extra, fill_value=0)[0].astype(jnp.int32)
        used = jnp.arange(num_extra) < count
        rows = idx // w
        blocks = jnp.where(used, tables.reshape(-1)[idx], trash)
        extra_valid = used[:, None] & visible((idx % w)[:, None] * block_size + offsets[None, :], positions[rows])
    else:
        rows = blocks = jnp.zeros((0,), jnp.int32)
        extra_valid = jnp.zeros((0, block_size), bool)
    return PoolRoute(owner, onehot, valid, rows, blocks, extra_valid)


def num_extra_reads(tables, trash: int) -> int:
    """Host side (numpy): the extra reads `pool_route` makes for `tables` (table entries holding a
    block that a lower entry already holds)."""
    import numpy as np

    held = np.asarray(tables).reshape(-1)
    held = held[held != trash]
    return int(held.size - np.unique(held).size)


def routed_attention(q: jax.Array, pool_k: jax.Array, pool_v: jax.Array, route: PoolRoute) -> jax.Array:
    """Single-token decode attention of `q [B, 1, H, D]` over the pool `[kv_heads, N, bs, D]`, each
    block scored against its owner row's query only (`route`, from `pool_route`).

    The reference einsum's math per row b (`s = q_b . k / sqrt(D)` over the row's visible slots,
    `softmax(s) . v`, statistics in f32) regrouped by block: every block n gives partial scores
    `s_n = q_owner(n) . k_n` (one batched matrix-vector product over the pool as it lies: no gather,
    and 1/B of the work of every row's query against the whole pool), the row maximum `m_b = max over its blocks`, and
    `out_b = sum_n [owner(n) = b] exp(s_n - m_b) . v_n / sum_n [owner(n) = b] sum exp(s_n - m_b)`
    (the per-row sums as one-hot matmuls over blocks). Blocks shared by several rows are read once
    more per further row through a small gather (`route.extra_*`). Returns `[B, 1, H, D]`; a row that
    owns no visible slot gets zeros.
    """
    _check_pool("routed_attention", q, pool_k, pool_v)
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"routed_attention: single-token decode only, got {t} query tokens")
    if route.owner_onehot.shape != (b, pool_k.shape[1]):
        raise ValueError(f"routed_attention: route is for {route.owner_onehot.shape[0]} rows and "
                         f"{route.owner_onehot.shape[1]} pool blocks (`pool_route`), got q of {b} rows and a pool "
                         f"of {pool_k.shape[1]} blocks")
    hkv = pool_k.shape[0]
    g = h // hkv
    qg = jnp.transpose(q.reshape(b, hkv, g * d), (1, 0, 2))                     # [kv, B, g*d]
    scale = 1.0 / math.sqrt(d)
    f32 = jnp.float32

    # Operand orders below keep every dot in the form XLA:CPU runs without transposing an operand:
    # batch axes first, the left operand contracted on its last axis, the right one on its first.
    def partial(onehot, k, valid):
        """Scores of the blocks `k [kv_heads, M, bs, D]` against the rows of `onehot [B, M]`."""
        oh = jnp.broadcast_to(jnp.swapaxes(onehot, 0, 1)[None], (hkv,) + onehot.shape[::-1])   # [kv, M, B]
        qi = jnp.einsum("kmb,kbx->kmx", oh.astype(qg.dtype), qg).reshape(hkv, -1, g, d)   # each block's row query
        s = jnp.einsum("kmpd,kmgd->kmpg", k, qi, preferred_element_type=f32)
        s = jnp.swapaxes(jnp.where(valid[None, :, :, None], s * scale, -jnp.inf), 2, 3)
        return s, jnp.max(s, axis=-1)                                           # [kv, M, g, bs], [kv, M, g]

    owner = jnp.maximum(route.owner, 0)
    onehot = route.owner_onehot                                                 # [B, N]
    s, block_max = partial(onehot, pool_k, route.valid)
    row_max = jnp.max(jnp.where(onehot[None, :, :, None] > 0, block_max[:, None], -jnp.inf), axis=2)  # [kv, B, g]
    extra = route.extra_rows.shape[0] > 0
    if extra:
        ek = pool_k[:, route.extra_blocks]
        ev = pool_v[:, route.extra_blocks]
        e_onehot = (route.extra_rows[None, :] == jnp.arange(b)[:, None]) & jnp.any(route.extra_valid, -1)[None]
        es, e_max = partial(e_onehot.astype(f32), ek, route.extra_valid)
        row_max = jnp.maximum(row_max, jnp.max(jnp.where(e_onehot[None, :, :, None], e_max[:, None], -jnp.inf), 2))

    def reduce(s, v, valid, rows, onehot):
        m = row_max[:, rows]                                                     # [kv, M, g]
        p = jnp.where(valid[None, :, None, :], jnp.exp(s - m[..., None]), 0.0)
        o = jnp.einsum("kmgp,kmpd->kmgd", p.astype(v.dtype), v, preferred_element_type=f32)
        oh = jnp.broadcast_to(onehot[None], (hkv,) + onehot.shape)                # [kv, B, M]
        return (jnp.einsum("kbm,kmg->kbg", oh, jnp.sum(p, -1)),
                jnp.einsum("kbm,kmx->kbx", oh, o.reshape(hkv, -1, g * d)).reshape(hkv, b, g, d))

    denom, out = reduce(s, pool_v, route.valid, owner, onehot)
    if extra:
        e_den, e_out = reduce(es, ev, route.extra_valid, route.extra_rows, e_onehot.astype(f32))
        denom, out = denom + e_den, out + e_out
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return jnp.transpose(out, (1, 0, 2, 3)).reshape(b, 1, h, d).astype(q.dtype)


# ------------------------------------------------------------------------ Pallas paged-attention kernels

TPU_COMPUTE_TOKENS = 512   # keys per step of the TPU kernel's loop (pages_per_compute_block x page_size) at most
GPU_COMPUTE_TOKENS = 128   # keys per step of the Triton kernel's loop at most
GPU_MAX_SPLITS = 16        # partitions of a row's pages the Triton kernel runs in parallel (its default)


def kernel_params(impl: str, *, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                  pages_per_sequence: int, sliding_window: int | None = None) -> dict | str:
    """Keyword arguments of JAX's paged-attention kernel `impl` ("pallas_tpu" / "pallas_gpu") for these
    shapes, or a one-line reason why it does not take them.

    TPU (`ops/tpu/paged_attention`): `pages_per_compute_block` must divide `pages_per_sequence` (the
    largest divisor with at most `TPU_COMPUTE_TOKENS` keys); Mosaic needs `head_dim % 128 == 0` (the
    q/output blocks' last dimension; 64 fails to lower). GPU (`ops/gpu/paged_attention`, Triton):
    block shapes are powers of two, so head_dim (>= 16) and page_size are; `k_splits` divides
    `pages_per_sequence`, `pages_per_compute_block` (a power of two, >= 16 keys with the page)
    divides each split; `block_h` = 16 query heads per KV head (padded). Neither kernel has a
    sliding window.
    """
    if sliding_window is not None:
        return f"{impl} has no sliding window (sliding_window={sliding_window})"
    if num_heads % num_kv_heads:
        return f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    divisors = [n for n in range(1, pages_per_sequence + 1) if pages_per_sequence % n == 0]
    if impl == "pallas_tpu":
        if head_dim % 128:
            return f"pallas_tpu needs head_dim % 128 == 0 (Mosaic block layout), got head_dim={head_dim}"
        fit = [n for n in divisors if n * page_size <= TPU_COMPUTE_TOKENS]
        return dict(pages_per_compute_block=fit[-1] if fit else 1)
    if impl == "pallas_gpu":
        pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
        if not (pow2(head_dim) and head_dim >= 16):
            return f"pallas_gpu (Triton) needs a power-of-two head_dim >= 16, got {head_dim}"
        if not pow2(page_size):
            return f"pallas_gpu (Triton) needs a power-of-two page size (block_size), got {page_size}"
        best = None
        for splits in (n for n in divisors if n <= GPU_MAX_SPLITS):
            part = pages_per_sequence // splits
            block = part & -part                           # the largest power of two dividing a split
            while block > 1 and block * page_size > GPU_COMPUTE_TOKENS:
                block //= 2
            if block * page_size < 16:
                continue
            key = (block * page_size, splits)              # longest loop step, then most splits
            if best is None or key > best[0]:
                best = (key, dict(k_splits=splits, pages_per_compute_block=block, block_h=16))
        if best is None:
            return (f"pallas_gpu (Triton) needs >= 16 keys per step: no split of {pages_per_sequence} pages of "
                    f"{page_size} gives a power-of-two run of >= 16 positions")
        return best[1]
    raise ValueError(f"kernel_params: impl must be 'pallas_tpu' or 'pallas_gpu', got {impl!r}")


def decode_kernel(config, page_size: int, pages_per_sequence: int, platform: str | None = None) -> str:
    """The single-token paged decode read `config` (a `ModelConfig`) gets: "reference", "pallas_tpu" or
    "pallas_gpu" (`attention.resolve_paged_impl`, then `kernel_params`).

    Raises:
      ValueError: `config.paged_attention_impl` names a kernel that does not take these shapes ("auto"
        falls back to "reference" with a warning saying why).
    """
    from rlhf_jax.models.attention import _warn_once, resolve_paged_impl

    impl = resolve_paged_impl(config.paged_attention_impl, config.jnp_dtype, config.attention_impl, platform)
    if impl == "reference":
        return impl
    params = kernel_params(impl, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                           head_dim=config.head_dim, page_size=page_size, pages_per_sequence=pages_per_sequence,
                           sliding_window=config.sliding_window)
    if isinstance(params, dict):
        return impl
    if config.paged_attention_impl == "auto":
        _warn_once(f"paged decode attention: {params}; using the reference (routed einsum) read")
        return "reference"
    raise ValueError(f"ModelConfig.paged_attention_impl={impl!r}: {params}")


def kernel_attention(q: jax.Array, pool_k: jax.Array, pool_v: jax.Array, tables: jax.Array, positions: jax.Array,
                     *, impl: str, sliding_window: int | None = None, interpret: bool = False) -> jax.Array:
    """Single-token decode attention of `q [B, 1, H, D]` over the pool `[kv_heads, N, bs, D]` through
    `tables [B, W]` by JAX's Pallas paged-attention kernel `impl` ("pallas_tpu" / "pallas_gpu").

    The layouts map one to one: the pool is the kernels' `k_pages`/`v_pages`, `tables` their
    `page_indices`/`block_tables` (unallocated entries hold the trash block, a valid page), and a query
    at position `p` sees logical slots `0..p`, i.e. `lengths = p + 1` (clipped to `W * bs`: a row
    past its table, an idle slot, reads no page outside it). The kernels do not scale the logits:
    `q / sqrt(D)` goes in (f32 for the TPU kernel, which computes in f32 on bf16 k and v; the compute
    dtype for Triton, whose dots take one dtype). GQA: query head `h` reads KV head `h // (H / kv_heads)`,
    as in the reference. `interpret`: the Triton kernel in Pallas interpret mode (CPU tests); the TPU
    kernel is interpreted under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`.

    Raises:
      ValueError: the kernel does not take these shapes (`kernel_params`'s reason).
    """
    _check_pool("kernel_attention", q, pool_k, pool_v)
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"kernel_attention: single-token decode only, got {t} query tokens")
    _check_tables("kernel_attention", tables, b)
    check_integer("kernel_attention", "positions", positions)
    if jnp.size(positions) != b:
        raise ValueError(f"kernel_attention: positions must be [B, 1] or [B] with B = {b}, got shape "
                         f"{tuple(jnp.shape(positions))}")
    hkv, _, bs, _ = pool_k.shape
    w = tables.shape[1]
    params = kernel_params(impl, num_heads=h, num_kv_heads=hkv, head_dim=d, page_size=bs, pages_per_sequence=w,
                           sliding_window=sliding_window)
    if isinstance(params, str):
        raise ValueError(f"kernel_attention: {params}")
    lengths = jnp.clip(positions.reshape(b).astype(jnp.int32) + 1, 0, w * bs)
    tables = tables.astype(jnp.int32)
    q32 = q.reshape(b, h, d).astype(jnp.float32) * (1.0 / math.sqrt(d))
    if impl == "pallas_tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        out = paged_attention(q32, pool_k, pool_v, lengths, tables, **params)
    else:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        out = paged_attention(q32.astype(pool_k.dtype), pool_k, pool_v, tables, lengths, interpret=interpret,
                              **params)
    return out.reshape(b, 1, h, d).astype(q.dtype)
