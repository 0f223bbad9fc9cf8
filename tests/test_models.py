"""The transformer and its heads: an independent NumPy reference, KV-cache and packing invariances,
layer execution modes, dtypes, logical axes and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import CausalLM, KVCache, ModelConfig, RopeScaling, attention_mask
from rlhf_jax.models.heads import (SCALAR_HEAD_AXES, gather_last, init_scalar_head, last_token_index,
                                   scalar_head)
from rlhf_jax.testing import tiny_config

LOGICAL_AXES = {"vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "layers"}


def _params(config, seed=0, head="lm"):
    """Random parameters with norm scales near 1 and nonzero biases, so that every one matters."""
    rng = np.random.default_rng(seed)
    abstract = CausalLM(config, head=head).abstract_params()

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray((base + rng.normal(0.0, 0.15, s.shape)).astype(s.dtype))

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _tokens(shape, seed=1, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ------------------------------------------------------------------------ NumPy reference


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_inv_freq(c):
    inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    s = c.rope_scaling
    if s is None:
        return inv
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return np.array(out)


def _np_rope(x, positions, c):
    """x [B, T, H, D] rotated by angle p·inv_freq_i on the pairs (x_i, x_{i + D/2})."""
    angles = positions[..., None] * _np_inv_freq(c)  # [B, T, D/2]
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x[..., : c.head_dim // 2], x[..., c.head_dim // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_forward(c, params, tokens, positions, segment_ids):
    """Float64 forward pass written from the papers: GQA by repeating kv heads, explicit masks."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    layers = p["layers"]
    x = p["embed"][tokens]
    t = tokens.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if c.sliding_window is not None:
        allowed &= positions[:, :, None] - positions[:, None, :] < c.sliding_window
    for i in range(c.num_layers):
        a = jax.tree.map(lambda v: v[i], layers)
        h = _np_rms(x, a["input_norm"]["scale"], c.rms_norm_eps)
        q = np.einsum("bte,ehd->bthd", h, a["attn"]["q_proj"])
        k = np.einsum("bte,ehd->bthd", h, a["attn"]["k_proj"])
        v = np.einsum("bte,ehd->bthd", h, a["attn"]["v_proj"])
        if c.attention_bias:
            q, k, v = q + a["attn"]["q_bias"], k + a["attn"]["k_bias"], v + a["attn"]["v_bias"]
        if c.qk_norm:
            q = _np_rms(q, a["attn"]["q_norm"]["scale"], c.rms_norm_eps)
            k = _np_rms(k, a["attn"]["k_norm"]["scale"], c.rms_norm_eps)
        q, k = _np_rope(q, positions, c), _np_rope(k, positions, c)
        groups = c.num_heads // c.num_kv_heads
        k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
        scores = np.where(allowed[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + np.einsum("bthd,hde->bte", attn, a["attn"]["o_proj"])
        h = _np_rms(x, a["post_attn_norm"]["scale"], c.rms_norm_eps)
        gate = h @ a["mlp"]["gate_proj"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ a["mlp"]["up_proj"])) @ a["mlp"]["down_proj"]
    hidden = _np_rms(x, p["final_norm"]["scale"], c.rms_norm_eps)
    head = p["embed"].T if c.tie_word_embeddings else p["lm_head"]
    return hidden @ head


REFERENCE_CONFIGS = {
    "llama-gqa": tiny_config(),
    "qwen2-bias-tied-window": tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                                          sliding_window=3),
    "qwen3-qknorm-llama3rope": tiny_config(model_type="qwen3", qk_norm=True, head_dim=32, rope_theta=500000.0,
                                           rope_scaling=RopeScaling(original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_forward_matches_numpy_reference(name):
    c = REFERENCE_CONFIGS[name]
    params = _params(c)
    tokens = _tokens((2, 9))
    segment_ids = np.array([[1] * 9, [1, 1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
    positions = np.array([np.arange(9) + 90, [0, 1, 2, 3, 0, 1, 2, 0, 0]], np.int32)
    out = jax.jit(CausalLM(c).forward)(params, tokens, positions, segment_ids)
    ref = _np_forward(c, params, tokens, positions, segment_ids)
    valid = segment_ids > 0
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------ KV cache


CACHE_CONFIGS = {
    "scan": tiny_config(),
    "loop": tiny_config(scan_layers=False),
    "window": tiny_config(model_type="mistral", sliding_window=3),
}


@pytest.mark.parametrize("name", sorted(CACHE_CONFIGS))
def test_cached_decoding_equals_full_forward(name):
    """Token-by-token decoding from an empty cache, and a right-padded prefill (prompt lengths 6 and
    3) followed by decoding from each row's own length, both give the full forward's logits."""
    c = CACHE_CONFIGS[name]
    lm = CausalLM(c)
    params = _params(c)
    lengths = np.array([6, 3])
    prompts = _tokens((2, 6), seed=2)
    prompts[1, 3:] = 0  # right padding
    continuation = _tokens((2, 4), seed=3)
    # Reference: each row's prompt + continuation, right-padded to 10 tokens.
    sequences = np.zeros((2, 10), np.int32)
    for b in range(2):
        sequences[b, :lengths[b] + 4] = np.concatenate([prompts[b, :lengths[b]], continuation[b]])
    full = np.asarray(jax.jit(lm.forward)(params, sequences).logits)

    run = jax.jit(lambda p, tok, pos, cache: lm.forward(p, tok, pos, cache=cache))
    cache = lm.init_cache(2, 12)
    assert isinstance(cache, KVCache) and cache.max_len == 12
    assert dict(zip(lm.cache_logical_axes.k, cache.k.shape)) == {
        "layers": c.num_layers, "batch": 2, "cache_len": 12, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim}
    for t in range(10):
        out = run(params, sequences[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        cache = out.cache
        for b in range(2):
            if t < lengths[b] + 4:
                np.testing.assert_allclose(np.asarray(out.logits[b, 0]), full[b, t], atol=1e-5, rtol=0)

    out = run(params, prompts, np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6)), lm.init_cache(2, 12))
    for b in range(2):
        np.testing.assert_allclose(np.asarray(out.logits[b, :lengths[b]]), full[b, :lengths[b]], atol=1e-5, rtol=0)
    cache = out.cache
    for s in range(4):
        out = run(params, continuation[:, s:s + 1], (lengths + s)[:, None].astype(np.int32), cache)
        cache = out.cache
        for b in range(2):
            np.testing.assert_allclose(np.asarray(out.logits[b, 0]), full[b, lengths[b] + s], atol=1e-5, rtol=0)


# -------------------------------------------------------------------- execution modes, dtypes


def test_scan_loop_and_remat_agree():
    """The unrolled loop computes the scan's logits; rematerialization keeps values and gradients.

    Equal up to float32 rounding: XLA fuses the unrolled or rematerialized programs differently.
    """
    base = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    params = _params(base)
    tokens = _tokens((2, 8), vocab=64)

    def logits_and_grads(config):
        lm = CausalLM(config)

        def loss(p):
            logits = lm.forward(p, tokens).logits
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), grads

    ref_logits, ref_grads = logits_and_grads(base)
    loop_logits = jax.jit(CausalLM(base.replace(scan_layers=False)).forward)(params, tokens).logits
    np.testing.assert_allclose(np.asarray(loop_logits), ref_logits, atol=1e-5, rtol=1e-5)
    for remat in ("full", "dots"):
        logits, grads = logits_and_grads(base.replace(remat=remat))
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5, err_msg=remat)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-4, err_msg=remat)


def test_bf16_compute_gives_f32_logits():
    c32 = tiny_config()
    params = _params(c32)
    tokens = _tokens((2, 8))
    ref = np.asarray(jax.jit(CausalLM(c32).forward)(params, tokens).logits)
    mixed = CausalLM(c32.replace(dtype="bfloat16"))
    out = jax.jit(mixed.forward)(params, tokens)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.logits) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()

    pure = CausalLM(c32.replace(param_dtype="bfloat16", dtype="bfloat16"))
    bf16_params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    assert all(s.dtype == jnp.bfloat16 for s in jax.tree.leaves(pure.abstract_params()))
    out = jax.jit(pure.forward)(bf16_params, tokens)
    assert out.logits.dtype == jnp.float32
    assert np.abs(np.asarray(out.logits) - ref).max() < 0.05 * np.abs(ref).max()


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = tiny_config(num_heads=4, num_kv_heads=2)
    params = _params(gqa)
    mha = gqa.replace(num_kv_heads=4)
    repeated = jax.tree.map(lambda x: x, params)
    for name in ("k_proj", "v_proj"):
        repeated["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 2, axis=2)
    tokens = _tokens((2, 8))
    a = jax.jit(CausalLM(gqa).forward)(params, tokens).logits
    b = jax.jit(CausalLM(mha).forward)(repeated, tokens).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- masks and packing


def test_attention_mask_golden():
    positions = jnp.arange(5)[None]
    causal = np.tril(np.ones((5, 5), bool))
    np.testing.assert_array_equal(attention_mask(positions)[0], causal)
    window = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(attention_mask(positions, sliding_window=2)[0], window)
    segments = jnp.array([[1, 1, 2, 2, 0]])
    packed = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(attention_mask(jnp.array([[0, 1, 0, 1, 0]]), segments)[0], packed)
    # With a cache of 4 slots, a query at position 2 sees slots 0..2; with window 2, slots 1..2.
    np.testing.assert_array_equal(attention_mask(jnp.array([[2]]), cache_len=4)[0, 0], [1, 1, 1, 0])
    np.testing.assert_array_equal(
        attention_mask(jnp.array([[2]]), cache_len=4, sliding_window=2)[0, 0], [0, 1, 1, 0])


def test_sliding_window_limits_what_a_token_sees():
    """One layer, window 3: logits at t depend on tokens t-2..t and not on token t-3."""
    c = tiny_config(num_layers=1, sliding_window=3, model_type="mistral")
    params = _params(c)
    fwd = jax.jit(CausalLM(c).forward)
    tokens = _tokens((1, 8))
    base = np.asarray(fwd(params, tokens).logits)[0, 6]
    outside, inside = tokens.copy(), tokens.copy()
    outside[0, 3] = (outside[0, 3] + 1) % 256
    inside[0, 4] = (inside[0, 4] + 1) % 256
    np.testing.assert_array_equal(np.asarray(fwd(params, outside).logits)[0, 6], base)
    assert np.abs(np.asarray(fwd(params, inside).logits)[0, 6] - base).max() > 1e-3


def test_packed_segments_equal_separate_sequences():
    c = tiny_config()
    lm = CausalLM(c)
    params = _params(c)
    a, b = _tokens((1, 5), seed=4), _tokens((1, 4), seed=5)
    packed = np.concatenate([a, b, np.full((1, 3), 7, np.int32)], axis=1)
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0, 0, 0]], np.int32)
    out = np.asarray(jax.jit(lm.forward)(params, packed, positions, segment_ids).logits)[0]
    separate = np.concatenate([a, np.concatenate([b, [[0]]], axis=1)])  # b right-padded to 5
    alone = np.asarray(jax.jit(lm.forward)(params, separate).logits)
    np.testing.assert_allclose(out[:5], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[5:9], alone[1, :4], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- logical axes


@pytest.mark.parametrize("changes, head", [
    (dict(), "lm"),
    (dict(tie_word_embeddings=True), "lm"),
    (dict(model_type="qwen2", attention_bias=True), "scalar"),
    (dict(model_type="qwen3", qk_norm=True), "lm"),
])
def test_every_parameter_has_logical_axes(changes, head):
    c = tiny_config(**changes)
    lm = CausalLM(c, head=head)
    abstract = lm.abstract_params()
    axes = lm.logical_axes
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(abstract) == jax.tree.structure(axes, is_leaf=is_axes)
    for shape, names in zip(jax.tree.leaves(abstract), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(names) == len(shape.shape) and set(names) <= LOGICAL_AXES
    for names, shape in zip(jax.tree.leaves(axes["layers"], is_leaf=is_axes), jax.tree.leaves(abstract["layers"])):
        assert names[0] == "layers" and shape.shape[0] == c.num_layers
    assert ("lm_head" in abstract) == (head == "lm" and not c.tie_word_embeddings)
    if head == "scalar":
        assert axes["score"] == SCALAR_HEAD_AXES


# ----------------------------------------------------------------------------- heads


def test_last_token_index_and_gather_last_golden():
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [True, False, True, False]])
    np.testing.assert_array_equal(last_token_index(mask), [1, 3, 0, 2])
    assert last_token_index(mask).dtype == jnp.int32
    values = jnp.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(gather_last(values, mask), [1.0, 7.0, 8.0, 14.0])
    hidden = jnp.arange(32.0).reshape(4, 4, 2)
    np.testing.assert_array_equal(gather_last(hidden, mask), [[2, 3], [14, 15], [16, 17], [28, 29]])
    with pytest.raises(ValueError, match="values must be"):
        gather_last(values[:, :3], mask)
    with pytest.raises(ValueError, match="mask must have rank 2"):
        last_token_index(mask[0])


def test_scalar_head_math_and_dtype():
    kernel = jnp.array([1.0, -2.0, 0.5])
    hidden = jnp.arange(12.0).reshape(1, 4, 3)
    expected = np.arange(12.0).reshape(4, 3) @ np.array([1.0, -2.0, 0.5])
    np.testing.assert_array_equal(scalar_head(kernel, hidden)[0], expected)
    out = scalar_head(kernel, hidden.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    with pytest.raises(ValueError, match="hidden size 3 != kernel size 2"):
        scalar_head(kernel[:2], hidden)


def test_init_scalar_head():
    c = tiny_config(param_dtype="bfloat16")
    w = init_scalar_head(c, jax.random.key(0))
    assert w.shape == (c.hidden_size,) and w.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(w.astype(jnp.float32)))) <= 2 * c.initializer_range * 1.01
    np.testing.assert_array_equal(w, init_scalar_head(c, jax.random.key(0)))
    assert float(jnp.std(init_scalar_head(c, jax.random.key(1), std=1.0).astype(jnp.float32))) > 0.5
    with pytest.raises(ValueError, match="std must be > 0"):
        init_scalar_head(c, jax.random.key(0), std=0.0)


def test_reward_model_reads_last_real_token():
    c = tiny_config()
    rm = CausalLM(c, head="scalar")
    params = _params(c, head="scalar")
    tokens = _tokens((2, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    fwd = jax.jit(rm.forward)
    out = fwd(params, tokens)
    assert out.logits is None and out.values.dtype == jnp.float32
    np.testing.assert_allclose(out.values, scalar_head(params["score"], out.hidden), atol=1e-6)
    reward = np.asarray(gather_last(out.values, mask))
    np.testing.assert_allclose(reward[0], np.asarray(out.values)[0, 3], atol=0)
    other_padding = np.where(mask, tokens, 5)
    np.testing.assert_array_equal(gather_last(fwd(params, other_padding).values, mask), reward)


def test_value_head_on_shared_backbone():
    c = tiny_config()
    lm = CausalLM(c)
    params = _params(c)
    out = jax.jit(lm.forward)(params, _tokens((2, 5)))
    kernel = init_scalar_head(c, jax.random.key(3))
    values = scalar_head(kernel, out.hidden)
    np.testing.assert_allclose(values, np.asarray(out.hidden) @ np.asarray(kernel), atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_naming_the_argument():
    c = tiny_config()
    lm = CausalLM(c)
    params = _params(c)
    tokens = _tokens((2, 4))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, time\]"):
        lm.forward(params, tokens[0])
    with pytest.raises(ValueError, match="positions shape"):
        lm.forward(params, tokens, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="segment_ids shape"):
        lm.forward(params, tokens, None, np.ones((1, 4), np.int32))
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a KV cache"):
        lm.forward(params, tokens, None, np.ones((2, 4), np.int32), cache=lm.init_cache(2, 4))
    # Rows continuing shared prompts: 2 groups of one row each.
    from rlhf_jax.models import PrefixKV, PrefixKVCache
    prompts = lm.init_cache(2, 3)
    prefix = PrefixKV(prompts.k, prompts.v, np.full((2,), 3, np.int32))
    own = lm.init_cache(2, 4)
    assert lm.forward(params, tokens, cache=PrefixKVCache(prefix, own.k, own.v, np.int32(0))).logits.shape[:2] == (2, 4)
    with pytest.raises(ValueError, match="3 rows of tokens do not split into the prefix's 2 groups"):
        lm.forward(params, _tokens((3, 4)), cache=prefix)
    with pytest.raises(ValueError, match=r"prefix lengths must be \[rows\] = \(2,\), got \(3,\)"):
        lm.forward(params, tokens, cache=prefix._replace(lengths=np.ones((3,), np.int32)))
    with pytest.raises(ValueError, match="PrefixKVCache: the rows' own k and v must both be"):
        lm.forward(params, tokens, cache=PrefixKVCache(prefix, own.k[:, :1], own.v[:, :1], np.int32(0)))
    with pytest.raises(ValueError, match="head must be"):
        CausalLM(c, head="value")
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="ModelConfig.dtype must be one of"):
        tiny_config(dtype="float16")
    with pytest.raises(TypeError):
        ModelConfig(vocab_size=8)


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": -1.0}, "rope_theta must be a finite number > 0, got -1.0"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0, got nan"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be a finite number >= 0, got inf"),
    ({"initializer_range": -0.1}, "initializer_range must be a finite number >= 0, got -0.1"),
    ({"bos_token_id": -1}, r"bos_token_id must be a token id \(an int >= 0\) or None, got -1"),
    ({"pad_token_id": 1.5}, r"pad_token_id must be a token id \(an int >= 0\) or None, got 1.5"),
    ({"eos_token_id": (2, -3)}, r"eos_token_id must be a token id \(an int >= 0\), a tuple of them or None"),
    ({"sliding_window": 1.5}, "sliding_window must be a positive int or None, got 1.5"),
    ({"qk_norm": "false"}, "qk_norm must be true or false, got 'false'"),
])
def test_model_config_refuses_values_that_would_build_a_wrong_model(change, message):
    """These were accepted: a negative RoPE base or a NaN epsilon gives NaN logits, a negative or float
    token id a wrong stop or pad, "false" a true flag."""
    with pytest.raises(ValueError, match="ModelConfig." + message):
        tiny_config(**change)
    assert tiny_config(rope_theta=1_000_000, eos_token_id=(1, 2)).eos_token_id == (1, 2)


def test_dense_gradient_equals_matmul_autodiff():
    """`dense` (custom VJP with a materialised transpose) has x @ w's value and both gradients."""
    from rlhf_jax.models.layers import dense

    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 5, 7))
    w = jax.random.normal(kw, (7, 3))
    probe = jax.random.normal(kg, (2, 5, 3))
    np.testing.assert_allclose(dense(x, w), x @ w, rtol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w)) * probe), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w) * probe), (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # bf16 operands with float32 accumulation: f32 output, gradients in the operands' dtypes
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert dense(xb, wb, jnp.float32).dtype == jnp.float32
    gx, gw = jax.grad(lambda x, w: jnp.sum(dense(x, w, jnp.float32)), (0, 1))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(gw.astype(jnp.float32), jnp.broadcast_to(jnp.sum(x, (0, 1))[:, None], (7, 3)),
                               rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ input validation (audit)


def test_forward_refuses_non_integer_empty_and_foreign_inputs():
    lm = CausalLM(tiny_config())
    params = lm.init(jax.random.key(0))
    tokens = jnp.array([[1, 2, 3, 4]])
    with pytest.raises(TypeError, match="tokens must be integer token ids, got dtype float32"):
        lm.forward(params, tokens.astype(jnp.float32))
    with pytest.raises(TypeError, match="dtype bool"):
        lm.forward(params, tokens > 1)
    for shape in ((0, 4), (2, 0)):
        with pytest.raises(ValueError, match="at least one row and one position"):
            lm.forward(params, jnp.zeros(shape, jnp.int32))
    wider = CausalLM(tiny_config(vocab_size=2 * lm.config.vocab_size)).init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(512, 64\).*\[256, 64\]"):
        jax.jit(lm.forward)(wider, tokens)
    with pytest.raises(KeyError, match="params lack 'embed'"):
        lm.forward({k: v for k, v in params.items() if k != "embed"}, tokens)


# ------------------------------------------------------------- RoPE scaling: linear and YaRN


ROPE_SCALINGS = {  # with max_position_embeddings = factor · original, as transformers expects of YaRN
    "linear": (64, RopeScaling(rope_type="linear", factor=3.0)),
    "yarn-qwen25": (64, RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "yarn-betas-untruncated": (64, RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                               beta_fast=16.0, beta_slow=2.0, truncate=False)),
    "yarn-mscale": (48, RopeScaling(rope_type="yarn", factor=3.0, original_max_position_embeddings=16, mscale=0.8,
                                    mscale_all_dim=0.5)),
    "yarn-attention-factor": (64, RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                              attention_factor=1.5)),
}


@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
def test_rope_angles_match_transformers_rotary_embedding(name):
    """cos and sin (YaRN's attention factor included) equal transformers' LlamaRotaryEmbedding at positions
    up to 4x the original context, the config going through our config.json export."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rlhf_jax.models.hf import config_to_hf
    from rlhf_jax.models.layers import rope_angles

    max_positions, scaling = ROPE_SCALINGS[name]
    c = tiny_config(max_position_embeddings=max_positions, rope_theta=1e6 if "qwen" in name else 1e4,
                    rope_scaling=scaling)
    hf = {k: v for k, v in config_to_hf(c).items() if k != "model_type"}
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**hf))
    positions = np.arange(64, dtype=np.int32)[None]
    with torch.no_grad():
        ref = rotary(torch.zeros(1, 64, c.head_dim), torch.tensor(positions, dtype=torch.long))
    cos, sin = rope_angles(jnp.asarray(positions), c)
    np.testing.assert_allclose(cos, ref[0].numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, ref[1].numpy(), rtol=0, atol=2e-6)
    # cos² + sin² is the attention factor squared: 1 for linear, 0.1·ln(factor) + 1 for a plain YaRN
    norm = np.sqrt(np.asarray(cos) ** 2 + np.asarray(sin) ** 2)
    want = {"linear": 1.0, "yarn-qwen25": 1 + 0.1 * math.log(4.0), "yarn-betas-untruncated": 1 + 0.1 * math.log(4.0),
            "yarn-mscale": (1 + 0.08 * math.log(3.0)) / (1 + 0.05 * math.log(3.0)), "yarn-attention-factor": 1.5}
    np.testing.assert_allclose(norm, want[name], rtol=1e-6)


def test_rope_scaling_refuses_fields_of_another_type_and_bad_values():
    with pytest.raises(ValueError, match="RopeScaling.beta_fast applies to rope_type 'yarn' only; got 8.0 with "
                                         "rope_type 'linear'"):
        RopeScaling(rope_type="linear", factor=2.0, beta_fast=8.0)
    with pytest.raises(ValueError, match="RopeScaling.low_freq_factor applies to rope_type 'llama3' only"):
        RopeScaling(rope_type="yarn", factor=2.0, low_freq_factor=2.0)
    with pytest.raises(ValueError, match=r"RopeScaling.rope_type must be one of \('llama3', 'linear', 'yarn', "
                                         r"'longrope', 'dynamic'\), got 'proportional'"):
        RopeScaling(rope_type="proportional", factor=2.0)
    with pytest.raises(ValueError, match="RopeScaling.attention_factor must be a finite number > 0, got -1.0"):
        RopeScaling(rope_type="yarn", attention_factor=-1.0)
    with pytest.raises(ValueError, match="RopeScaling.truncate must be true or false, got 'no'"):
        RopeScaling(rope_type="yarn", truncate="no")


def test_sampler_logprobs_equal_the_trainers_for_a_yarn_model():
    """Prefill and cached decode past the original context rotate with the trainer's (scaled) cos / sin."""
    from rlhf_jax.rollout import completion_logprobs
    from rlhf_jax.sampling import Categorical, Sampler

    c = tiny_config(max_position_embeddings=32, rope_scaling=RopeScaling(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=8))
    lm = CausalLM(c)
    params = _params(c)
    sampler = Sampler(lm, max_len=24, prompt_buckets=(16,), pad_id=0)
    prompts = [[5, 17, 33, 8, 90, 41, 7, 3, 9, 11], [12, 3]]
    out = sampler.generate(params, prompts, max_new_tokens=8, method=Categorical(temperature=1.0), rng=3)
    trainer = jax.jit(lambda p, *a: completion_logprobs(lm, p, *a, temperature=jnp.float32(1.0))[0])(
        params, out.prompt_tokens, out.prompt_lengths, out.completion_tokens)
    mask = np.asarray(out.completion_mask)
    assert mask[0].sum() == 8  # row 0 decodes positions 10..17, past the original context of 8
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(trainer)[mask], atol=1e-5, rtol=0)
