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
