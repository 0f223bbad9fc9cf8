"""Fused attention kernels against the einsum reference (values and gradients): XLA's
`jax.nn.dot_product_attention`, Splash attention in Pallas interpret mode (it runs on a CPU), the
chunked online-softmax decode over a KV cache, and the model and sampler with each implementation.
Tolerances (relative to the reference's largest magnitude): 1e-5 in float32, 2e-2 in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, attention_mask
from rlhf_jax.models import attention as A
from rlhf_jax.sampling.decode import decode, prefill
from rlhf_jax.sampling.methods import Greedy
from rlhf_jax.testing import tiny_config

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# Two rows: three packed segments then padding (segment 0, positions restarting per segment); one
# unpacked row. GQA: 4 query heads over 2 KV heads.
B, T, H, K, D = 2, 40, 4, 2, 16
SEGMENTS = np.array([[1] * 14 + [2] * 11 + [3] * 9 + [0] * 6, [1] * T], np.int32)
POSITIONS = np.array([list(range(14)) + list(range(11)) + list(range(9)) + list(range(6)), list(range(T))], np.int32)


def _qkv(dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, cotangent


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
def test_fused_attention_matches_reference(impl, dtype, window):
    if impl == "splash" and window is not None and dtype == jnp.bfloat16:
        pytest.skip("one splash sliding-window case (f32) keeps the interpret-mode time down")
    q, k, v, cot = _qkv(dtype)
    seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)
    mask = attention_mask(pos, seg, sliding_window=window)
    reference = lambda q, k, v: A.reference_attention(q, k, v, mask)  # noqa: E731
    expect = jax.jit(lambda q, k, v: _value_and_grads(reference, q, k, v, cot))(q, k, v)
    fused = lambda q, k, v: A.fused_attention(q, k, v, seg, impl=impl, sliding_window=window)  # noqa: E731
    got = jax.jit(lambda q, k, v: _value_and_grads(fused, q, k, v, cot))(q, k, v)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expect):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert _rel(g, e) <= TOL[dtype], (name, _rel(g, e))


def test_softmax_gradient_is_the_closed_form_rule_and_leaves_jax_config_alone():
    """`attention.softmax` and its VJP against float64 NumPy (`dS = P (dP - sum_s P dP)`), masked
    entries (the reference's `finfo.min` scores) included; JAX's global softmax flag is unchanged."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    scores[0, :, 4:] = np.finfo(np.float32).min        # masked slots, as `reference_attention` writes them
    dp = rng.normal(size=scores.shape).astype(np.float32)
    flag = jax.config.jax_softmax_custom_jvp
    probs, vjp = jax.vjp(jax.jit(A.softmax), jnp.asarray(scores))
    (ds,) = vjp(jnp.asarray(dp))
    x = scores.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    expect = p * (dp - (p * dp).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(probs), p, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ds), expect, atol=2e-6)
    assert np.all(np.asarray(ds)[0, :, 4:] == 0)       # no gradient reaches a masked score
    assert jax.config.jax_softmax_custom_jvp == flag


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_chunked_cache_attention_matches_reference(dtype):
    """Queries at different fills of a 300-slot cache, chunks of 128 (the last one overlapping),
    with and without a sliding window; the reference reads all 300 slots under the slot mask."""
    s = 300
    ks = jax.random.split(jax.random.key(1), 3)
    cache_k = jax.random.normal(ks[0], (B, K, s, D), jnp.float32).astype(dtype)
    cache_v = jax.random.normal(ks[1], (B, K, s, D), jnp.float32).astype(dtype)
    q = jax.random.normal(ks[2], (B, 1, H, D), jnp.float32).astype(dtype)

    @jax.jit
    def both(positions):
        out = []
        for window in (None, 40):
            mask = attention_mask(positions, cache_len=s, sliding_window=window)
            out.append((A.reference_attention(q, cache_k, cache_v, mask, kv_axes="bksd"),
                        A.chunked_cache_attention(q, cache_k, cache_v, positions, sliding_window=window, chunk=128)))
        return out

    for positions in ([[299], [0]], [[130], [127]], [[5], [256]]):
        positions = jnp.asarray(positions, jnp.int32)
        for window, (expect, got) in zip((None, 40), both(positions)):
            assert got.dtype == dtype
            assert _rel(got, expect) <= TOL[dtype], (positions.tolist(), window, _rel(got, expect))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_prefix_cache_attention_matches_a_per_row_cache(dtype):
    """The sampler's decode cache (`PrefixKVCache`): 2 prompts of 20 slots shared by 3 rows each, 12
    own slots per row. Both the einsum path and the chunked one (chunks of 8, the last overlapping)
    equal the reference over each row's own copy of `[visible prompt slots ; own slots]`, with one
    prompt seen from 0 slots (a one-token prompt) and one from 17, new tokens at own slots `start +
    t`, with and without a sliding window; own slots past the new tokens hold garbage, never read."""
    from rlhf_jax.models.transformer import prefix_attention_mask

    groups, r, p, s = 2, 3, 20, 12
    n = groups * r
    ks = jax.random.split(jax.random.key(2), 5)
    prefix_k = jax.random.normal(ks[0], (groups, K, p, D), jnp.float32).astype(dtype)
    prefix_v = jax.random.normal(ks[1], (groups, K, p, D), jnp.float32).astype(dtype)
    own_k = jax.random.normal(ks[2], (n, K, s, D), jnp.float32).astype(dtype)
    own_v = jax.random.normal(ks[3], (n, K, s, D), jnp.float32).astype(dtype)
    prefix_lengths = np.repeat([0, 17], r).astype(np.int32)

    def per_row_cache(cache, own):
        full = np.zeros((n, K, p + s, D), np.float32)
        for b, length in enumerate(prefix_lengths):
            full[b, :, :length] = np.asarray(cache[b // r], np.float32)[:, :length]
            full[b, :, length:length + s] = np.asarray(own[b], np.float32)
        return jnp.asarray(full, dtype)

    full_k, full_v = per_row_cache(prefix_k, own_k), per_row_cache(prefix_v, own_v)
    for start, t in ((0, 1), (5, 1), (11, 1), (4, 3)):
        q = jax.random.normal(jax.random.fold_in(ks[4], start), (n, t, H, D), jnp.float32).astype(dtype)
        positions = jnp.asarray(prefix_lengths[:, None] + start + np.arange(t)[None, :], jnp.int32)
        lengths = jnp.asarray(prefix_lengths)
        for window in (None, 6):
            @jax.jit   # every array an argument, as in the sampler's program (no constant folding)
            def three(q, positions, start, lengths, prefix_k, prefix_v, own_k, own_v, full_k, full_v):
                expect = A.reference_attention(q, full_k, full_v, attention_mask(
                    positions, cache_len=p + s, sliding_window=window), kv_axes="bksd")
                mask = prefix_attention_mask(positions, lengths, p, own_len=s, start=start, sliding_window=window)
                einsum = A.prefix_cache_attention(q, prefix_k, prefix_v, own_k, own_v, mask)
                chunked = A.chunked_prefix_cache_attention(q, prefix_k, prefix_v, lengths, own_k, own_v, positions,
                                                           start, sliding_window=window, chunk=8)
                return expect, einsum, chunked

            expect, einsum, chunked = three(q, positions, jnp.int32(start), lengths, prefix_k, prefix_v, own_k,
                                            own_v, full_k, full_v)
            for name, got in (("einsum", einsum), ("chunked", chunked)):
                assert got.dtype == dtype and got.shape == expect.shape
                assert _rel(got, expect) <= TOL[dtype], (name, start, t, window, _rel(got, expect))


def test_resolve_impl_by_platform():
    assert A.resolve_impl("auto", jnp.bfloat16, "cpu") == "reference"
    assert A.resolve_impl("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert A.resolve_impl("auto", jnp.float32, "gpu") == "xla"   # cuDNN's flash kernel is 16-bit only
    assert A.resolve_impl("auto", jnp.bfloat16, "tpu") == "splash"
    assert A.resolve_impl("xla", jnp.float32, "tpu") == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        A.resolve_impl("flash", jnp.float32)
    with pytest.raises(ValueError, match="ModelConfig.attention_impl must be one of"):
        tiny_config(attention_impl="flash")


def test_model_and_sampler_with_fused_attention():
    """The tiny model with `attention_impl="xla"`: packed training forward (logits and parameter
    gradients), a prefill (`prefill=True`) and greedy decoding (chunked cache attention) equal the
    reference implementation's in float32."""
    ref_lm = CausalLM(tiny_config(attention_impl="reference"))
    lm = CausalLM(tiny_config(attention_impl="xla"))
    params = ref_lm.init(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (B, T)), jnp.int32)
    seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)

    def loss(model):
        return lambda p: jnp.mean(model.forward(p, tokens, pos, seg).logits ** 2)

    (l_ref, g_ref), (l_got, g_got) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (ref_lm, lm))
    assert abs(float(l_got) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for path, g, e in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        assert _rel(g, e) <= 1e-5, (jax.tree_util.keystr(path[0]), _rel(g, e))

    prompts = tokens[:, :12]
    lengths = jnp.asarray([12, 7], jnp.int32)

    def generate(model):
        state = prefill(model, params, prompts, lengths, max_new_tokens=9, rng=jax.random.key(1))
        out = decode(model, params, state, method=Greedy())
        return out.tokens, out.logprobs

    (tok_ref, lp_ref), (tok_got, lp_got) = (jax.jit(lambda: generate(m))() for m in (ref_lm, lm))
    np.testing.assert_array_equal(tok_got, tok_ref)
    np.testing.assert_allclose(lp_got, lp_ref, rtol=1e-5, atol=1e-5)


def test_cudnn_without_cudnn_falls_back_to_xla():
    """Where cuDNN's kernel cannot run (no GPU here; on a GPU, a shape or dtype it refuses), the XLA
    attention computes the same result, with a warning naming why."""
    q, k, v, _ = _qkv(jnp.bfloat16)
    seg = jnp.asarray(SEGMENTS)
    with pytest.warns(UserWarning, match="cuDNN attention unavailable .* using the XLA attention"):
        got = A.fused_attention(q, k, v, seg, impl="cudnn")
    np.testing.assert_array_equal(got, A.fused_attention(q, k, v, seg, impl="xla"))


def test_splash_under_activation_sharding_runs_per_batch_shard():
    """Inside a step's `activation_sharding` context (data parallel over 2 devices) the Pallas kernel,
    which XLA cannot partition, runs on each device's rows (`jax.shard_map`): same values."""
    from rlhf_jax import sharding as sh

    q, k, v, _ = _qkv(jnp.float32)
    seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)
    mesh = sh.make_mesh({"data": 2}, devices=jax.devices()[:2])
    assert sh.active_batch_split(B) is None
    with sh.activation_sharding(mesh, "dp"):
        assert sh.active_batch_split(B)[1] == ("data",) and sh.active_batch_split(3) is None
        got = jax.jit(lambda q, k, v: A.fused_attention(q, k, v, seg, impl="splash"))(q, k, v)
    expect = A.reference_attention(q, k, v, attention_mask(pos, seg))
    assert _rel(got, expect) <= 1e-5


# ---------------------------------------------------------------- every path against float64 NumPy

def _np_attention(q, k, v, mask, cotangent):
    """softmax(q k^T / sqrt(d) + mask) v in float64, and its VJP (dq, dk, dv) for `cotangent`; q
    [B, T, H, D], k, v [B, S, Hkv, D] (query head h reads KV head h // (H / Hkv)), mask bool [B, T, S];
    a query row with no visible key gets zeros."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, cotangent))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for head in range(h):
        kh, vh, qh = k[:, :, head // g], v[:, :, head // g], q[:, :, head]
        s = np.where(mask, np.einsum("btd,bsd->bts", qh, kh) / np.sqrt(d), -np.inf)
        top = np.max(s, axis=-1, keepdims=True)
        e = np.where(mask, np.exp(s - np.where(np.isfinite(top), top, 0)), 0)
        p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
        out[:, :, head] = np.einsum("bts,bsd->btd", p, vh)
        dp = np.einsum("btd,bsd->bts", dout[:, :, head], vh)
        ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True)) / np.sqrt(d)
        dq[:, :, head] = np.einsum("bts,bsd->btd", ds, kh)
        dk[:, :, head // g] += np.einsum("bts,btd->bsd", ds, qh)
        dv[:, :, head // g] += np.einsum("bts,btd->bsd", p, dout[:, :, head])
    return out, dq, dk, dv


def _np_self_mask(segments, window):
    """Causal by index, within a segment (packing; 0 = padding, attending among itself), and a query
    at position p sees keys at p' with p - p' < window (transformers' Mistral/Qwen2 rule), positions
    restarting per segment: written out with loops, sharing nothing with `attention_mask`."""
    b, t = segments.shape
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(i + 1):
                mask[r, i, j] = segments[r, i] == segments[r, j] and (window is None or i - j < window)
    return mask


# Packed (three segments), left-padded (segment 0 first) and right-padded rows; positions restart per segment.
NP_SEGMENTS = np.array([[1] * 9 + [2] * 12 + [3] * 9, [0] * 7 + [1] * 23, [1] * 19 + [0] * 11], np.int32)
NP_POSITIONS = np.array([[i - np.flatnonzero(row == row[i])[0] for i in range(len(row))] for row in NP_SEGMENTS],
                        np.int32)


@pytest.mark.parametrize("impl", ["reference", "xla", "splash"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa3", "mqa"])
@pytest.mark.parametrize("window", [None, 1, 3], ids=["causal", "window1", "window3"])
def test_every_path_matches_float64_numpy(impl, heads, window):
    """Values and q/k/v gradients of each path against the float64 formula on packed, left- and
    right-padded rows, GQA ratios 1, 3 and 4, windows of 1 (only itself) and 3 (p - p' <= 2), and
    head_dim 12 (not a power of two), within 1e-5 of the largest magnitude in float32."""
    h, hkv = heads
    b, t = NP_SEGMENTS.shape
    r = np.random.default_rng(7)
    q, cot = (r.standard_normal((b, t, h, 12)).astype(np.float32) for _ in range(2))
    k, v = (r.standard_normal((b, t, hkv, 12)).astype(np.float32) for _ in range(2))
    mask = _np_self_mask(NP_SEGMENTS, window)
    seg, pos = jnp.asarray(NP_SEGMENTS), jnp.asarray(NP_POSITIONS)
    np.testing.assert_array_equal(attention_mask(pos, seg, sliding_window=window), mask)
    if impl == "reference":
        ref_mask = attention_mask(pos, seg, sliding_window=window)
        fn = lambda q, k, v: A.reference_attention(q, k, v, ref_mask)  # noqa: E731
    else:
        fn = lambda q, k, v: A.fused_attention(q, k, v, seg, impl=impl, sliding_window=window)  # noqa: E731
    got = jax.jit(lambda *a: _value_and_grads(fn, *a))(*map(jnp.asarray, (q, k, v, cot)))
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, _np_attention(q, k, v, mask, cot)):
        assert g.shape == e.shape, name
        err = float(np.max(np.abs(np.asarray(g, np.float64) - e)) / max(np.max(np.abs(e)), 1.0))  # window 1: dq = 0
        assert err <= 1e-5, (name, err)


def test_query_rows_that_see_no_key_stay_finite():
    """A query row whose mask is all False (a padding row under a caller's mask): the einsum path
    gives the mean of v, as transformers' eager attention, with finite gradients that reach no score;
    the chunked decode gives zeros for a query at position -1 (an idle row), as the routed paged read,
    not 0 / 0 = NaN; the other rows are unchanged."""
    r = np.random.default_rng(8)
    q = jnp.asarray(r.standard_normal((2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(2))
    mask = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)
    mask[0, 2] = False
    out, vjp = jax.vjp(lambda q, k, v: A.reference_attention(q, k, v, jnp.asarray(mask)), q, k, v)
    grads = vjp(jnp.ones_like(out))
    np.testing.assert_allclose(out[0, 2], jnp.repeat(jnp.mean(v[0], axis=0), 2, axis=0), rtol=1e-6, atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.max(jnp.abs(grads[0][0, 2]))) == 0.0          # no gradient to the row's query

    cache_k, cache_v = (jnp.asarray(r.standard_normal((3, 2, 20, 8)), jnp.float32) for _ in range(2))
    q1 = q[:, :1].repeat(2, axis=0)[:3]
    positions = jnp.asarray([[-1], [4], [19]], jnp.int32)
    got = A.chunked_cache_attention(q1, cache_k, cache_v, positions, chunk=8)
    np.testing.assert_array_equal(got[0], 0.0)
    expect = A.reference_attention(q1, cache_k, cache_v, attention_mask(positions, cache_len=20), kv_axes="bksd")
    assert _rel(got[1:], expect[1:]) <= 1e-6


@pytest.mark.parametrize("window", [None, 1, 7])
def test_chunked_decode_equals_float64_attention_over_the_prefix(window):
    """The chunked decode (one or three new tokens per row) over a 50-slot cache in chunks of 16 (50
    is not a multiple; the last chunk overlaps) equals softmax attention over each row's filled prefix,
    rows at different fills (first slot, mid-chunk, a chunk boundary, the last slots)."""
    r = np.random.default_rng(9)
    s, h, hkv, d = 50, 6, 2, 8
    cache_k, cache_v = (r.standard_normal((4, hkv, s, d)).astype(np.float32) for _ in range(2))
    for t in (1, 3):
        q = r.standard_normal((4, t, h, d)).astype(np.float32)
        positions = (np.array([0, 6, 16, s - t])[:, None] + np.arange(t)[None]).astype(np.int32)
        visible = np.arange(s)[None, None, :] <= positions[:, :, None]
        if window is not None:
            visible &= positions[:, :, None] - np.arange(s)[None, None, :] < window
        expect = _np_attention(q, cache_k.transpose(0, 2, 1, 3), cache_v.transpose(0, 2, 1, 3), visible,
                               np.zeros_like(q))[0]
        got = A.chunked_cache_attention(*map(jnp.asarray, (q, cache_k, cache_v, positions)), sliding_window=window,
                                        chunk=16)
        assert _rel(got, expect) <= 1e-6, (t, _rel(got, expect))


def _bad_inputs():
    r = np.random.default_rng(0)
    x = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
    q, k, v = x(2, 6, 4, 8), x(2, 6, 2, 8), x(2, 6, 2, 8)
    mask, seg = jnp.ones((2, 6, 6), bool), jnp.ones((2, 6), jnp.int32)
    cache, pos = x(2, 2, 20, 8), jnp.zeros((2, 1), jnp.int32)
    return {
        "heads": (lambda: A.reference_attention(x(2, 6, 3, 8), k, v, mask),
                  r"reference_attention: q's num_heads \(3\) must be a multiple of k's num_kv_heads \(2\)"),
        "head_dim": (lambda: A.reference_attention(x(2, 6, 4, 4), k, v, mask),
                     r"reference_attention: q \(2, 6, 4, 4\) has head_dim 4 but k \(2, 6, 2, 8\)"),
        "k_v": (lambda: A.reference_attention(q, k, x(2, 7, 2, 8), mask), r"k and v must have the same shape"),
        "batch": (lambda: A.reference_attention(q, x(1, 6, 2, 8), x(1, 6, 2, 8), mask), r"has batch 2 but k"),
        "mask_2d": (lambda: A.reference_attention(q, k, v, jnp.ones((2, 6), bool)),
                    r"mask must be \[B, T, S\] = \(2, 6, 6\) .* got shape \(2, 6\)"),
        "mask_float": (lambda: A.reference_attention(q, k, v, jnp.zeros((2, 6, 6))),
                       r"mask must be boolean \(True = attend\), got dtype float32"),
        "fused_heads": (lambda: A.fused_attention(x(2, 6, 3, 8), k, v, seg, impl="splash"),
                        r"fused_attention: q's num_heads \(3\) must be a multiple"),
        "segment_ids": (lambda: A.fused_attention(q, k, v, jnp.ones((1, 6), jnp.int32), impl="xla"),
                        r"fused_attention: segment_ids must be \[B, T\] = \(2, 6\) .* got shape \(1, 6\)"),
        "segment_ids_splash": (lambda: A.fused_attention(q, k, v, jnp.ones((2, 7), jnp.int32), impl="splash"),
                               r"fused_attention: segment_ids must be \[B, T\] = \(2, 6\) .* got shape \(2, 7\)"),
        "segment_ids_float": (lambda: A.fused_attention(q, k, v, seg.astype(jnp.float32), impl="xla"),
                              r"segment_ids must be an integer array"),
        "self_attention": (lambda: A.fused_attention(q, x(2, 8, 2, 8), x(2, 8, 2, 8), seg, impl="xla"),
                           r"causal self-attention needs k, v with as many positions as q \(6\)"),
        "window": (lambda: A.fused_attention(q, k, v, seg, impl="splash", sliding_window=0),
                   r"fused_attention: sliding_window must be > 0, got 0"),
        "impl": (lambda: A.fused_attention(q, k, v, seg, impl="flash"),
                 r"fused_attention: impl must be 'xla', 'cudnn' or 'splash', got 'flash'"),
        "decode_positions": (lambda: A.chunked_cache_attention(x(2, 1, 4, 8), cache, cache, jnp.zeros((2,), jnp.int32)),
                             r"chunked_cache_attention: positions must be \[B, T\] = \(2, 1\)"),
        "decode_layout": (lambda: A.chunked_cache_attention(x(2, 1, 4, 8), x(2, 20, 2, 8), x(2, 20, 2, 8), pos),
                          r"cache_k's num_kv_heads \(20\) .* cache_k \(2, 20, 2, 8\) \[B, Hkv, S, D\]"),
        "decode_window": (lambda: A.chunked_cache_attention(x(2, 1, 4, 8), cache, cache, pos, sliding_window=0),
                          r"chunked_cache_attention: sliding_window must be > 0"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, message = _bad_inputs()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        fn()
