"""Paged KV cache: one block pool per layer plus per-row block tables (vLLM's PagedAttention layout).

A row's logical cache slot `s` (= absolute position) lives in physical block `table[row, s // bs]`
at offset `s % bs` of the pool `[kv_heads, num_blocks, bs, head_dim]`, so memory follows the
tokens a row actually holds instead of `rows x max_len`, and rows may share blocks (a prompt's
blocks held once by the `n` samples of a group). Block `num_blocks - 1` is the *trash* block:
unallocated table entries point at it, so writes of padding or of idle rows land there and are never
read unmasked (a query at position `p` only sees logical slots `<= p`, which a row has allocated).

`CausalLM.forward(..., cache=PagedKVCache(...))` runs the same layers as with a `KVCache`:
attention writes the new keys/values through the table (one scatter) and reads each row's logical
view `[B, kv_heads, table_width * bs, head_dim]` through it (a gather), then the reference einsum
(`rlhf_jax.models.attention.reference_attention`), so the numerics are the dense cache's. The view
covers `table_width` blocks: pass a table cut to the blocks the batch needs (the continuous batcher
picks the width per decode segment).

Kernels: JAX ships a Pallas paged-attention kernel for TPU only
(`jax.experimental.pallas.ops.tpu.paged_attention`, decode, pool layout
`[kv_heads, pages, page_size, head_dim]` as here); none for GPU (cuDNN's paged attention is not
exposed by `jax.nn.dot_product_attention`). This module uses the gather + einsum path on every
platform; the pool layout is the TPU kernel's so that it can be selected there later.
"""

from __future__ import annotations

from typing import NamedTuple

import math

import jax
import jax.numpy as jnp

__all__ = ["PagedKVCache", "PagedLayerKV", "paged_write", "paged_view", "pool_visibility", "pool_attention"]


class PagedKVCache(NamedTuple):
    """Pools of every layer and the rows' block tables.

    Attributes:
      k, v: `[layers, kv_heads, num_blocks, block_size, head_dim]` (the last block is the trash block).
      block_tables: int32 `[B, W]` physical block of each row's logical block `0..W-1`.
      pool_mask: optional bool `[B, num_blocks * block_size]` (single-token decode): which pool
        positions each row's query sees (`pool_visibility`); attention then reads the whole pool as
        one matmul operand (`pool_attention`) instead of gathering each row's view. On XLA:CPU the
        gather (an indexed copy of `B x W x bs` positions per layer, k and v) costs several times a
        dense cache read; the pool read is one dense matmul whose cost follows the pool size.
    """

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    pool_mask: jax.Array | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        """Logical slots each row sees: `W * block_size` (the attention mask's key length)."""
        return self.block_tables.shape[1] * self.block_size


class PagedLayerKV(NamedTuple):
    """One layer's pools `[kv_heads, num_blocks, bs, head_dim]` with the rows' block tables (and pool mask)."""

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    pool_mask: jax.Array | None = None


def paged_write(pool: jax.Array, tables: jax.Array, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Write `new [B, T, kv_heads, D]` at logical slots `positions [B, T]` through `tables [B, W]`.

    Slot `s` of row `b` goes to `pool[:, tables[b, s // bs], s % bs]`; positions past the table's
    width go to the trash block (the pool's last).
    """
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
    h, _, bs, d = pool.shape
    b, w = tables.shape
    view = pool[:, tables]                                  # [kv_heads, B, W, bs, D]
    return jnp.swapaxes(view, 0, 1).reshape(b, h, w * bs, d)


def pool_visibility(tables: jax.Array, positions: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
    """bool `[B, num_blocks * bs]`: pool position `(n, o)` is row b's logical slot `w * bs + o` for the
    `w` with `tables[b, w] = n`, and that slot is `<= positions[b]` (the query's position).

    Blocks shared by several rows (a group's prompt) are visible to each; the trash block to none.
    """
    b, w = tables.shape
    logical = jnp.full((b, num_blocks), -1, jnp.int32)
    logical = logical.at[jnp.arange(b)[:, None], tables].set(jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w)))
    logical = logical.at[:, num_blocks - 1].set(-1)                      # the trash block
    slot = logical[:, :, None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return ((logical[:, :, None] >= 0) & (slot <= positions[:, None, None])).reshape(b, num_blocks * block_size)


def pool_attention(q: jax.Array, pool_k: jax.Array, pool_v: jax.Array, pool_mask: jax.Array) -> jax.Array:
    """Attention of `q [B, 1, H, D]` over the whole pool `[kv_heads, N, bs, D]` under `pool_mask [B, N*bs]`.

    The reference einsum's math (scores / sqrt(D), masked to the dtype's minimum, softmax in f32)
    with the pool as the key/value operand shared by all rows; returns `[B, 1, H, D]`.
    """
    b, t, h, d = q.shape
    hkv = pool_k.shape[0]
    k = pool_k.reshape(hkv, -1, d)
    v = pool_v.reshape(hkv, -1, d)
    q = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,kpd->kgbtp", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(pool_mask[None, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("kgbtp,kpd->btkgd", probs, v).reshape(b, t, h, d)
