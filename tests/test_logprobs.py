"""rlhf_jax.logprobs: float32 log-probs/entropy against float64 references, chunked == unchunked."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax.logprobs import (
    chunked_logprobs_and_entropy,
    chunked_token_entropy,
    chunked_token_logprobs,
    logprobs_and_entropy,
    next_token_targets,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)


# Jitted (temperature traced): one compile per shape instead of one per primitive in eager mode.
_lp = jax.jit(token_logprobs)
_ent = jax.jit(token_entropy)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _inputs(b=3, t=5, v=37, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(scale * rng.standard_normal((b, t, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    return logits, labels


def _gathered(logp, labels):
    return np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]


def test_token_logprobs_matches_float64_log_softmax_f32():
    logits, labels = _inputs()
    got = _lp(logits, labels)
    assert got.dtype == jnp.float32 and got.shape == labels.shape
    with jax.enable_x64(True):
        ref = jax.jit(lambda z: jax.nn.log_softmax(z, axis=-1))(jnp.asarray(np.asarray(logits), jnp.float64))
        ref = _gathered(np.asarray(ref), labels)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6, rtol=0)


def test_token_logprobs_bf16_is_upcast_before_softmax():
    logits, labels = _inputs()
    got = _lp(logits.astype(jnp.bfloat16), labels)
    assert got.dtype == jnp.float32
    # Against the unrounded float64 logits: only bf16 rounding of the inputs remains.
    ref_exact = _gathered(_np_log_softmax(np.asarray(logits)), labels)
    err = np.abs(np.asarray(got) - ref_exact).max()
    assert err < 2e-2
    # Against the bf16 values themselves: the softmax ran in float32, not bf16.
    ref_rounded = _gathered(_np_log_softmax(np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))), labels)
    np.testing.assert_allclose(np.asarray(got), ref_rounded, atol=1e-6, rtol=0)


def test_temperature_is_honored():
    logits, labels = _inputs()
    for temp in (0.5, 1.0, 1.7):
        ref = _gathered(_np_log_softmax(np.asarray(logits, np.float64) / temp), labels)
        np.testing.assert_allclose(np.asarray(_lp(logits, labels, temperature=temp)), ref, atol=2e-6)
        ent_ref = _np_entropy(np.asarray(logits, np.float64) / temp)
        np.testing.assert_allclose(np.asarray(_ent(logits, temperature=temp)), ent_ref, atol=2e-6)
    # A traced temperature works too (the sampler may carry it as an array).
    traced = jax.jit(lambda l, y, t: token_logprobs(l, y, temperature=t))(logits, labels, jnp.float32(0.5))
    np.testing.assert_allclose(traced, _lp(logits, labels, temperature=0.5), atol=1e-6)


def test_hand_computed_logprob():
    # Two-token vocabulary: log softmax([0, log 3]) = [log 1/4, log 3/4].
    logits = jnp.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)]]], jnp.float32)
    got = _lp(logits, jnp.array([[0, 1]]))
    np.testing.assert_allclose(got, [[np.log(0.25), np.log(0.75)]], atol=1e-7)
    # At temperature 2 the logits become [0, log 3 / 2]: p = [1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)].
    got_t = _lp(logits, jnp.array([[0, 1]]), temperature=2.0)
    s3 = np.sqrt(3.0)
    np.testing.assert_allclose(got_t, [[np.log(1 / (1 + s3)), np.log(s3 / (1 + s3))]], atol=1e-7)


def _np_entropy(z):
    logp = _np_log_softmax(z)
    return -(np.exp(logp) * logp).sum(-1)


def test_token_entropy_matches_numpy_and_bounds():
    logits, _ = _inputs()
    np.testing.assert_allclose(np.asarray(_ent(logits)), _np_entropy(np.asarray(logits)), atol=2e-6)
    uniform = jnp.zeros((1, 2, 37), jnp.bfloat16)
    ent = _ent(uniform)
    assert ent.dtype == jnp.float32
    np.testing.assert_allclose(ent, np.full((1, 2), np.log(37.0)), rtol=1e-6)
    # -inf logits (a vocab mask) contribute 0, and the gradient stays finite.
    masked = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(_ent(masked), [[np.log(2.0)]], rtol=1e-6)
    grad = jax.jit(jax.grad(lambda z: token_entropy(z).sum()))(masked)
    assert np.isfinite(np.asarray(grad)).all()


def test_next_token_targets():
    tokens = jnp.array([[5, 6, 7, 8], [1, 2, 3, 0]])
    inputs, labels = next_token_targets(tokens)
    np.testing.assert_array_equal(inputs, [[5, 6, 7], [1, 2, 3]])
    np.testing.assert_array_equal(labels, [[6, 7, 8], [2, 3, 0]])
    with pytest.raises(ValueError, match="tokens"):
        next_token_targets(jnp.array([[1], [2]]))


def test_sequence_logprobs_sum_average_and_empty_row():
    logps = jnp.array([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0], [-3.0, -3.0, -3.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(sequence_logprobs(logps, mask), [-7.0, -1.0, 0.0])
    np.testing.assert_allclose(sequence_logprobs(logps, mask, average=True), [-7.0 / 3, -0.5, 0.0])
    grad = jax.grad(lambda x: sequence_logprobs(x, mask, average=True).sum())(logps)
    np.testing.assert_allclose(grad, [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_logprob_gradient_check():
    logits, labels = _inputs(b=2, t=2, v=5, scale=1.0)
    both = jax.jit(lambda z: (token_logprobs(z, labels, temperature=0.8), token_entropy(z, temperature=1.3)))
    check_grads(both, (logits,), order=1, modes=("rev",), atol=1e-2)


def _head(b=2, t=7, e=8, v=50, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, t, e)), dtype)
    weight = jnp.asarray(rng.standard_normal((e, v)) * 2.0 / np.sqrt(e), dtype)
    labels = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    return hidden, weight, labels


def _full_logits(hidden, weight):
    return jnp.einsum("bte,ev->btv", hidden, weight, preferred_element_type=jnp.float32)


def test_chunked_equals_unchunked():
    hidden, weight, labels = _head()

    @jax.jit
    def full(temp):
        z = _full_logits(hidden, weight)
        return token_logprobs(z, labels, temperature=temp), token_entropy(z, temperature=temp)

    chunked = jax.jit(
        lambda temp, chunk_size: chunked_logprobs_and_entropy(
            hidden, weight, labels, temperature=temp, chunk_size=chunk_size
        ),
        static_argnums=1,
    )
    for chunk_size in (3, 7, 100):  # 14 tokens in all: uneven split, exact split, one chunk larger than all
        for temp in (1.0, 0.6):
            lp, ent = chunked(jnp.float32(temp), chunk_size)
            ref_lp, ref_ent = full(jnp.float32(temp))
            np.testing.assert_allclose(lp, ref_lp, atol=1e-5, rtol=0)
            np.testing.assert_allclose(ent, ref_ent, atol=1e-5, rtol=0)
            assert lp.dtype == ent.dtype == jnp.float32 and lp.shape == labels.shape
    # The single-output wrappers agree with the pair.
    lp, ent = chunked(jnp.float32(1.0), 3)
    np.testing.assert_array_equal(chunked_token_logprobs(hidden, weight, labels, chunk_size=3), lp)
    np.testing.assert_array_equal(chunked_token_entropy(hidden, weight, chunk_size=3), ent)


def test_chunked_gradients_equal_unchunked():
    hidden, weight, labels = _head()
    cot = jnp.asarray(np.random.default_rng(3).standard_normal(labels.shape), jnp.float32)

    def chunked(h, w):
        lp, ent = chunked_logprobs_and_entropy(h, w, labels, temperature=0.9, chunk_size=4)
        return jnp.sum(lp * cot) + 0.1 * jnp.sum(ent)

    def full(h, w):
        z = _full_logits(h, w)
        lp, ent = token_logprobs(z, labels, temperature=0.9), token_entropy(z, temperature=0.9)
        return jnp.sum(lp * cot) + 0.1 * jnp.sum(ent)

    g_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, weight)
    g_full = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, weight)
    for a, b in zip(g_chunked, g_full):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_chunked_bf16_inputs_give_f32():
    hidden, weight, labels = _head(dtype=jnp.bfloat16)
    lp = chunked_token_logprobs(hidden, weight, labels, chunk_size=5)
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, token_logprobs(_full_logits(hidden, weight), labels), atol=1e-5)


def _max_intermediate_size(jaxpr) -> int:
    """Largest array (in elements) produced anywhere in a jaxpr, sub-jaxprs included."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    best = max(best, _max_intermediate_size(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    best = max(best, _max_intermediate_size(sub))
    return best


def test_chunked_never_materialises_full_logits_forward_or_backward():
    b, t, e, v, chunk = 4, 16, 8, 512, 8
    hidden, weight, labels = _head(b=b, t=t, e=e, v=v)
    loss = lambda h, w: chunked_token_logprobs(h, w, labels, chunk_size=chunk).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, weight).jaxpr
    biggest = _max_intermediate_size(jaxpr)
    assert biggest <= chunk * v, (biggest, b * t * v)
    full_jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: token_logprobs(_full_logits(h, w), labels).sum(), (0, 1)))
    assert _max_intermediate_size(full_jaxpr(hidden, weight).jaxpr) >= b * t * v  # the probe sees it when present


def test_bad_inputs_name_the_argument():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs(logits, labels[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        token_logprobs(logits, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda z: token_entropy(z, temperature=-1.0))(logits)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(jnp.zeros((2, 3)), jnp.ones((2, 4)))
    hidden, weight, labels = _head()
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_token_logprobs(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels shape"):
        chunked_token_logprobs(hidden, weight, labels[:, :3])


def test_fused_logprobs_and_entropy_equal_separate_values_and_gradients():
    """`logprobs_and_entropy` (one exp pass, hand-written gradient) == `token_logprobs` and
    `token_entropy` with autodiff: values to f32 rounding (entropy 1e-5), gradients of a loss using both (entropy
    bonus and temperature) within 1e-6 relative; a -inf logit contributes 0 and a zero gradient."""
    logits, labels = _inputs(b=2, t=4, v=37)
    logits = logits.at[0, 0, 5].set(-jnp.inf)
    labels = labels.at[0, 0].set(jnp.where(labels[0, 0] == 5, 6, labels[0, 0]))
    g_lp, g_ent = _inputs(b=2, t=4, v=2, seed=1)[0][..., 0], _inputs(b=2, t=4, v=2, seed=2)[0][..., 0]

    def separate(z, temperature):
        return token_logprobs(z, labels, temperature=temperature), token_entropy(z, temperature=temperature)

    def fused(z, temperature):
        return logprobs_and_entropy(z, labels, temperature=temperature)

    for temperature in (1.0, 0.7):
        want, got = jax.jit(separate)(logits, temperature), jax.jit(fused)(logits, temperature)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)  # lse - E[z]: another rounding
        loss = lambda f, z: jnp.sum(f(z, temperature)[0] * g_lp) - 0.3 * jnp.sum(f(z, temperature)[1] * g_ent)  # noqa: E731
        gw, gf = jax.jit(jax.grad(lambda z: loss(separate, z)))(logits), jax.jit(jax.grad(lambda z: loss(fused, z)))(logits)
        assert np.all(np.isfinite(gf)) and float(gf[0, 0, 5]) == 0.0
        np.testing.assert_allclose(gf, gw, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(gw))))


# --- input validation (API audit) ---

def _lt():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    return logits, jnp.array([[0, 1, 2], [3, 4, 0]])


@pytest.mark.parametrize("temperature, match", [
    (jnp.array(0.0), "temperature must be finite and > 0"),
    (float("inf"), "temperature must be a finite number > 0"),
    (jnp.array([1.0, 2.0]), r"temperature must be a scalar or broadcast to shape \(2, 3, 5\)"),
])
def test_token_logprobs_checks_temperature(temperature, match):
    logits, labels = _lt()
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, labels, temperature=temperature)


def test_token_logprobs_per_row_and_traced_temperature_still_work():
    logits, labels = _lt()
    ref = token_logprobs(logits, labels, temperature=2.0)
    np.testing.assert_allclose(token_logprobs(logits, labels, temperature=jnp.full((2, 3, 1), 2.0)), ref, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda t: token_logprobs(logits, labels, temperature=t))(2.0), ref, rtol=1e-6)


def test_lists_are_accepted_and_mask_is_required_and_logps_floating():
    np.testing.assert_allclose(token_logprobs([[0.0, 1.0]], [1]), [-np.log1p(np.exp(-1.0))], rtol=1e-6)
    inputs, labels = next_token_targets([[1, 2, 3]])
    assert inputs.tolist() == [[1, 2]] and labels.tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="sequence_logprobs: mask is required"):
        sequence_logprobs(-jnp.ones((2, 3)), None)
    with pytest.raises(TypeError, match="sequence_logprobs: token_logps must be floating point"):
        sequence_logprobs(jnp.ones((2, 3), int), jnp.ones((2, 3)))


def test_per_row_temperature_needs_a_vocab_axis_of_one():
    # With B == V a [B] temperature broadcast along the vocab axis: each *token* got its own temperature and
    # token_logprobs returned [-2.5789, -0.9741] here instead of the per-row [-2.1269, -0.9741].
    logits, labels = jnp.array([[3.0, 1.0], [0.0, 1.0]]), jnp.array([1, 0])
    for call in (lambda t: token_logprobs(logits, labels, temperature=t), lambda t: token_entropy(logits, temperature=t),
                 lambda t: logprobs_and_entropy(logits, labels, temperature=t)):
        with pytest.raises(ValueError, match=r"per-row temperature needs a last \(vocab\) axis of size 1 .*got "
                                             r"shape \(2,\) for logits of shape \(2, 2\); pass temperature\[\.\.\., None\]"):
            call(jnp.array([1.0, 2.0]))
    per_row = _lp(logits, labels, temperature=jnp.array([[1.0], [2.0]]))
    want = _gathered(_np_log_softmax(np.array([[3.0, 1.0], [0.0, 0.5]])), labels)  # row 1 divided by 2
    np.testing.assert_allclose(per_row, want, rtol=1e-6)
    np.testing.assert_allclose(want, [-2.126928, -0.974077], rtol=1e-6)
    with pytest.raises(ValueError, match=r"token_logprobs: logits must have a vocab axis, shape \[\.\.\., V\], got "
                                         r"shape \(\)"):
        token_logprobs(jnp.array(3.0), jnp.array(0))


def test_chunked_heads_take_nested_lists():
    hidden, w, labels = [[[1.0, 0.0], [0.0, 1.0]]], [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0, 1]]
    logps, entropy, entropy_only = jax.jit(lambda: (*chunked_logprobs_and_entropy(hidden, w, labels, chunk_size=1),
                                                    chunked_token_entropy(hidden, w)))()
    z = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(logps, [_gathered(_np_log_softmax(z), np.array([0, 1]))], rtol=1e-6)
    p = np.exp(_np_log_softmax(z))
    np.testing.assert_allclose(entropy, [-(p * np.log(p)).sum(-1)], rtol=1e-6)
    np.testing.assert_allclose(entropy_only, entropy, rtol=1e-6)
