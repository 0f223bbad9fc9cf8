"""JAX's Pallas paged-attention kernels (TPU and GPU/Triton) read the paged pool as the reference does.

On CPU the kernels run in Pallas interpret mode (the Triton kernel with `interpret=True`, the TPU
kernel under `pltpu.force_tpu_interpret_mode()`), against the reference decode read (the owner-routed
einsum, `routed_attention`) on the same pool, block tables and positions: GQA, rows of different
lengths, a block shared by two rows, a row at position 0. And the model's decode step with the TPU
kernel compiles for a TPU (libtpu's compile-only devices; skipped without libtpu); the Triton kernel
lowers for CUDA (no GPU needed for the lowering).
"""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM
from rlhf_jax.models import attention as A
from rlhf_jax.models.paged import (PagedKVCache, decode_kernel, kernel_attention, kernel_params, num_extra_reads,
                                   pool_route, routed_attention)
from rlhf_jax.testing import tiny_config


def _case(head_dim, page_size, width, dtype, seed=0):
    """4 rows, 2 KV heads x 2 query heads each; row 1 shares row 0's first block; row 3 at position 0."""
    r = np.random.default_rng(seed)
    n = 4 * width + 1                                         # the last block is the trash block
    tables = np.full((4, width), n - 1, np.int32)
    blocks = r.permutation(n - 1)
    used = [width, width - 1, 2, 1]                           # blocks each row holds
    k = 0
    for row, m in enumerate(used):
        tables[row, :m] = blocks[k:k + m]
        k += m
    tables[1, 0] = tables[0, 0]                               # a group's shared prompt block
    pos = np.asarray([width * page_size - 1, (width - 1) * page_size - 3, page_size + 1, 0], np.int32)
    pk, pv = (jnp.asarray(r.standard_normal((2, n, page_size, head_dim)), dtype) for _ in range(2))
    q = jnp.asarray(r.standard_normal((4, 1, 4, head_dim)), dtype)
    return q, pk, pv, jnp.asarray(tables), jnp.asarray(pos)


def _reference(q, pk, pv, tables, pos):
    """The CPU decode read: each pool block against its owner row's query (+ the shared block's extra read)."""
    n, bs = pk.shape[1], pk.shape[2]
    extra = num_extra_reads(tables, n - 1)
    assert extra == 1
    read = jax.jit(lambda *a: routed_attention(*a[:3], pool_route(*a[3:], n, bs, extra)))
    return read(q, pk, pv, tables, pos)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want)), np.max(np.abs(got - want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_equals_reference(dtype):
    """The Triton kernel (interpret mode), with its sequence split in 2 partitions (`k_splits`)."""
    q, pk, pv, tables, pos = _case(head_dim=16, page_size=32, width=8, dtype=dtype)
    params = kernel_params("pallas_gpu", num_heads=4, num_kv_heads=2, head_dim=16, page_size=32,
                           pages_per_sequence=8)
    assert params == dict(k_splits=2, pages_per_compute_block=4, block_h=16)
    out = jax.jit(lambda *a: kernel_attention(*a, impl="pallas_gpu", interpret=True))(q, pk, pv, tables, pos)
    _close(out, _reference(q, pk, pv, tables, pos), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_equals_reference(dtype):
    """The TPU kernel (TPU interpret mode), 2 compute blocks of 2 pages per row. It computes in f32 on
    bf16 keys and values (its loader casts them), so an f32 pool is compared with the reference on the
    bf16-rounded pool."""
    from jax.experimental.pallas import tpu as pltpu

    q, pk, pv, tables, pos = _case(head_dim=128, page_size=8, width=4, dtype=dtype)
    assert kernel_params("pallas_tpu", num_heads=4, num_kv_heads=2, head_dim=128, page_size=8,
                         pages_per_sequence=4) == dict(pages_per_compute_block=4)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(lambda *a: kernel_attention(*a, impl="pallas_tpu"))(q, pk, pv, tables, pos)
    rounded = [x.astype(jnp.bfloat16).astype(dtype) for x in (pk, pv)]
    _close(out, _reference(q, *rounded, tables, pos), dtype)


def test_selection_by_platform_and_constraints():
    """"auto" = the platform's kernel for bf16/f16 compute, the reference on CPU, in f32 and under
    attention_impl="reference"; shapes a kernel refuses: "auto" warns and keeps the reference, a
    named kernel raises."""
    r = A.resolve_paged_impl
    assert [r("auto", jnp.bfloat16, platform=p) for p in ("cpu", "tpu", "gpu")] == [
        "reference", "pallas_tpu", "pallas_gpu"]
    assert r("auto", jnp.float32, platform="tpu") == "reference"
    assert r("auto", jnp.bfloat16, "reference", platform="gpu") == "reference"
    assert r("pallas_gpu", jnp.float32, platform="cpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="paged_attention_impl must be one of"):
        r("triton", jnp.float32)
    with pytest.raises(ValueError, match="ModelConfig.paged_attention_impl must be one of"):
        tiny_config(paged_attention_impl="flash")

    assert "head_dim % 128" in kernel_params("pallas_tpu", num_heads=4, num_kv_heads=2, head_dim=64,
                                             page_size=16, pages_per_sequence=36)
    # W5's table (36 blocks of 16): 9 splits of 4 pages, 64 keys per step.
    assert kernel_params("pallas_gpu", num_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
                         pages_per_sequence=36) == dict(k_splits=9, pages_per_compute_block=4, block_h=16)
    assert "power-of-two head_dim" in kernel_params("pallas_gpu", num_heads=4, num_kv_heads=2, head_dim=96,
                                                    page_size=16, pages_per_sequence=36)
    assert ">= 16 keys" in kernel_params("pallas_gpu", num_heads=4, num_kv_heads=2, head_dim=64, page_size=4,
                                         pages_per_sequence=6)
    assert "sliding window" in kernel_params("pallas_tpu", num_heads=4, num_kv_heads=2, head_dim=128,
                                             page_size=16, pages_per_sequence=4, sliding_window=8)

    auto = tiny_config(dtype="bfloat16")                                     # head_dim 16
    assert decode_kernel(auto, 16, 36, platform="gpu") == "pallas_gpu"
    with pytest.warns(UserWarning, match="head_dim % 128"):
        assert decode_kernel(auto, 16, 36, platform="tpu") == "reference"
    with pytest.raises(ValueError, match=r"paged_attention_impl='pallas_tpu': pallas_tpu needs head_dim % 128"):
        decode_kernel(tiny_config(paged_attention_impl="pallas_tpu"), 16, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_kernel(tiny_config(), 16, 36) == "reference"           # CPU, f32: no warning


def _count_pallas_calls(jaxpr) -> int:
    """Pallas kernel calls in a jaxpr, nested jits and loop bodies included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "pallas_call"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    n += _count_pallas_calls(getattr(sub, "jaxpr", sub))
    return n


def _kernel_model():
    """The tiny model, one layer, head_dim 128 (the TPU kernel's multiple), bf16, the TPU kernel named."""
    return CausalLM(tiny_config(num_layers=1, head_dim=128, dtype="bfloat16", paged_attention_impl="pallas_tpu"))


def _decode_inputs(c, num_blocks=9, bs=8):
    pool = jnp.zeros((c.num_layers, c.num_kv_heads, num_blocks, bs, c.head_dim), c.jnp_dtype)
    tables = jnp.asarray([[6, 1, 3], [0, 7, 8]], jnp.int32)                  # row 1's last entry: trash
    tokens = jnp.asarray([[5, 9, 33, 2, 70, 1, 4, 8, 9, 10], [8, 8, 40, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    return pool, tables, tokens


def test_model_decode_step_with_tpu_kernel_equals_routed_read():
    """`CausalLM.forward` with a paged cache and one new token per row, no route: the layers call the
    TPU kernel (interpret mode); logits equal the routed reference read's (bf16: 2e-2 of their range)."""
    from jax.experimental.pallas import tpu as pltpu

    lm = _kernel_model()
    c = lm.config
    params = lm.init(jax.random.key(0))
    pool, tables, tokens = _decode_inputs(c)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    step, at = jnp.asarray([[11], [4]], jnp.int32), jnp.asarray([[10], [3]], jnp.int32)

    @jax.jit
    def run(params):
        filled = lm.forward(params, tokens, pos, cache=PagedKVCache(pool, pool, tables)).cache
        kernel = lm.forward(params, step, at, cache=filled).logits
        routed = lm.forward(params, step, at, cache=filled._replace(route=pool_route(tables, at[:, 0], 9, 8))).logits
        return kernel, routed

    assert _count_pallas_calls(jax.make_jaxpr(run)(params).jaxpr) == 1     # the kernel step's (in the layer scan)
    with pltpu.force_tpu_interpret_mode():
        kernel, routed = run(params)
    _close(kernel, routed, jnp.bfloat16)


def test_gpu_kernel_lowers_to_triton_for_cuda():
    """The Triton kernel at bench_accelerator's shapes (12 query / 2 KV heads of 128, 1,024 positions in
    blocks of 16: 8 splits of 8 pages) lowers for CUDA from this host (Pallas -> Triton IR; the PTX
    compile needs a GPU). Pallas' Triton lowering wants power-of-two loads: what `kernel_params` checks.
    With no GPU attached, JAX >= 0.11 takes the target GPU from the abstract mesh's device (0.10 fell
    back to compute capability 9.0 by itself): an H200, the chip bench_accelerator is sized for."""
    h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    spec = jax.ShapeDtypeStruct
    pool = spec((2, 1025, 16, 128), jnp.bfloat16)
    args = (spec((64, 1, 12, 128), jnp.bfloat16), pool, pool, spec((64, 64), jnp.int32), spec((64,), jnp.int32))
    assert kernel_params("pallas_gpu", num_heads=12, num_kv_heads=2, head_dim=128, page_size=16,
                         pages_per_sequence=64) == dict(k_splits=8, pages_per_compute_block=8, block_h=16)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=h200)):
        text = jax.jit(lambda *a: kernel_attention(*a, impl="pallas_gpu")).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_decode_step_with_tpu_kernel_compiles_for_tpu():
    """The model's paged decode step with the TPU kernel lowers (Mosaic) and compiles for a v5e chip
    (libtpu's compile-only devices, as `rlhf-jax compile --topology` uses)."""
    from rlhf_jax.targets import tpu_topology_devices

    device = tpu_topology_devices("v5e:2x2")[0]
    lm = _kernel_model()
    c = lm.config
    pool, tables, _ = _decode_inputs(c)
    params = jax.eval_shape(lm.init, jax.random.key(0))
    on_tpu = jax.sharding.SingleDeviceSharding(device)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_tpu)  # noqa: E731

    def step(params, pool_k, pool_v, tables, token, at):
        return lm.forward(params, token, at, cache=PagedKVCache(pool_k, pool_v, tables)).logits

    args = (jax.tree.map(spec, params), spec(pool), spec(pool), spec(tables),
            spec(jnp.zeros((2, 1), jnp.int32)), spec(jnp.zeros((2, 1), jnp.int32)))
    lowered = jax.jit(step).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()
    compiled = lowered.compile()
    assert compiled.memory_analysis() is not None


def test_continuous_batcher_decodes_through_the_kernel():
    """With a kernel selected the batcher's segment reads through the block tables: no route, no
    shared-read bucket, one table width, and the kernel in its decode step (traced, not run: a run in
    TPU interpret mode takes ~20 s; the model test above checks the numbers). On CPU "auto" keeps the
    routed read."""
    from rlhf_jax.sampling import Sampler

    for lm, read, calls in ((_kernel_model(), "pallas_tpu", 1),
                            (CausalLM(tiny_config(head_dim=128, dtype="bfloat16")), "reference", 0)):
        b = Sampler(lm, max_len=32, prompt_buckets=(8,), pad_id=0).continuous_batcher(num_slots=2, block_size=8)
        assert (b.decode_read, b.view_widths) == (read, (4,) if read != "reference" else b.view_widths)
        s = b.session(lm.init(jax.random.key(0)))
        traced = b._segment.trace(s._p, s._state, s._tables, np.zeros((b.num_blocks,), np.int32), np.int32(4),
                                  s._max_steps, kinds=(0,), width=b.max_blocks, extra=0)
        assert _count_pallas_calls(traced.jaxpr.jaxpr) == calls * lm.config.num_layers  # the sampler unrolls layers


# ------------------------------------------------ boundaries against float64 NumPy, and bad inputs

def _edge_case(head_dim, page_size, width, seed=3):
    """6 rows over a pool with unused blocks: row 0 fills its whole table (last slot), row 1 holds one
    block at position 0 (length 1), row 2 at position `page_size` (the first slot of its second
    block), row 3 at `page_size - 1` (a block's last slot, length exactly one block), row 4 shares
    row 0's first block, row 5 has no block and position -1 (length 0); unallocated entries hold the
    trash block (the pool's last)."""
    r = np.random.default_rng(seed)
    n = 4 * width + 1
    tables = np.full((6, width), n - 1, np.int32)
    blocks = r.permutation(n - 1)
    tables[0] = blocks[:width]
    tables[1, :1] = blocks[width:width + 1]
    tables[2, :2] = blocks[width + 1:width + 3]
    tables[3, :1] = blocks[width + 3:width + 4]
    tables[4, :3] = blocks[width + 4:width + 7]
    tables[4, 0] = tables[0, 0]
    pos = np.array([width * page_size - 1, 0, page_size, page_size - 1, 2 * page_size, -1], np.int32)
    pk, pv = (r.standard_normal((2, n, page_size, head_dim)).astype(np.float32) for _ in range(2))
    q = r.standard_normal((6, 1, 4, head_dim)).astype(np.float32)
    return q, pk, pv, tables, pos


def _np_paged(q, pk, pv, tables, pos, window=None):
    """float64 softmax attention of each row's query over its logical slots `0..pos` (gathered through
    its table; `pos - s < window`); zeros for a row that sees no slot."""
    q, pk, pv = (np.asarray(x, np.float64) for x in (q, pk, pv))
    out = np.zeros(q.shape)
    for b, (row, p) in enumerate(zip(tables, pos)):
        keys = np.concatenate([pk[:, blk] for blk in row], axis=1)      # [kv_heads, W * bs, D]
        values = np.concatenate([pv[:, blk] for blk in row], axis=1)
        slots = np.arange(keys.shape[1])
        seen = (slots <= p) & (True if window is None else p - slots < window)
        if not seen.any():
            continue
        for h in range(q.shape[2]):
            kv = h // (q.shape[2] // keys.shape[0])
            s = keys[kv, seen] @ q[b, 0, h] / np.sqrt(q.shape[-1])
            e = np.exp(s - s.max())
            out[b, 0, h] = e @ values[kv, seen] / e.sum()
    return out


@pytest.mark.parametrize("window", [None, 1, 5])
def test_routed_read_at_block_boundaries_equals_float64(window):
    """The routed reference read: rows of length 1, exactly one block, one block + 1, the full table,
    length 0 (zeros), a shared block and unused (trash) entries, with and without a sliding window."""
    q, pk, pv, tables, pos = _edge_case(head_dim=8, page_size=4, width=5)
    route = pool_route(jnp.asarray(tables), jnp.asarray(pos), pk.shape[1], 4, num_extra_reads(tables, pk.shape[1] - 1),
                       sliding_window=window)
    got = routed_attention(*map(jnp.asarray, (q, pk, pv)), route)
    want = _np_paged(q, pk, pv, tables, pos, window)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[5], 0.0)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_kernels_at_block_boundaries_equal_float64(impl):
    """Both Pallas kernels (interpret mode, f32) on the same edge rows: lengths 0 (zeros), 1, one
    block, one block + 1, the full table; the TPU kernel rounds k and v to bf16, so its reference does."""
    from jax.experimental.pallas import tpu as pltpu

    head_dim, page_size = (16, 16) if impl == "pallas_gpu" else (128, 8)
    q, pk, pv, tables, pos = _edge_case(head_dim=head_dim, page_size=page_size, width=4)
    args = tuple(map(jnp.asarray, (q, pk, pv, tables, pos[:, None])))
    if impl == "pallas_gpu":
        got = jax.jit(lambda *a: kernel_attention(*a, impl=impl, interpret=True))(*args)
    else:
        with pltpu.force_tpu_interpret_mode():
            got = jax.jit(lambda *a: kernel_attention(*a, impl=impl))(*args)
        pk, pv = (np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)) for x in (pk, pv))
    np.testing.assert_allclose(np.asarray(got), _np_paged(q, pk, pv, tables, pos), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[5], 0.0)


def test_paged_bad_inputs_raise_naming_the_argument():
    """Shapes that used to fail deep inside an einsum or a reshape, or (positions of one row for two)
    write silently, raise a ValueError naming the argument."""
    from rlhf_jax.models.paged import paged_view, paged_write

    r = np.random.default_rng(0)
    x = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
    pk = x(2, 9, 16, 16)
    tables = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
    pos = jnp.asarray([5, 20], jnp.int32)
    route = pool_route(tables, pos, 9, 16)
    cases = [
        (lambda: routed_attention(x(2, 1, 3, 16), pk, pk, route),
         r"routed_attention: q's num_heads \(3\) must be a multiple of the pool's kv_heads \(2\)"),
        (lambda: routed_attention(x(2, 1, 4, 8), pk, pk, route), r"routed_attention: q \(2, 1, 4, 8\) has head_dim 8"),
        (lambda: routed_attention(x(3, 1, 4, 16), pk, pk, route), r"route is for 2 rows and 9 pool blocks"),
        (lambda: kernel_attention(x(2, 1, 4, 8), pk, pk, tables, pos, impl="pallas_gpu", interpret=True),
         r"kernel_attention: q \(2, 1, 4, 8\) has head_dim 8 but the pool"),
        (lambda: kernel_attention(x(2, 1, 4, 16), pk, pk, tables[:1], pos, impl="pallas_gpu", interpret=True),
         r"kernel_attention: tables \(1, 4\) \[B, W\] must have a row per query row \(2\)"),
        (lambda: kernel_attention(x(2, 1, 4, 16), pk, pk, tables, pos[:1], impl="pallas_gpu", interpret=True),
         r"kernel_attention: positions must be \[B, 1\] or \[B\] with B = 2"),
        (lambda: paged_write(pk, tables, pos[:1, None], x(2, 1, 2, 16)),
         r"paged_write: positions must be \[B, T\] = \(2, 1\) as new, got shape \(1, 1\)"),
        (lambda: paged_write(pk, tables, pos[:, None], x(2, 1, 2, 8)), r"paged_write: new \(2, 1, 2, 8\)"),
        (lambda: paged_view(pk, tables[0]), r"paged_view: tables \[B, W\] must have rank 2"),
        (lambda: pool_route(tables, pos[:, None], 9, 16), r"pool_route: positions must be \[B\] = \(2,\)"),
        (lambda: pool_route(tables, pos, 9, 16, sliding_window=0), r"pool_route: sliding_window must be > 0"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
