"""Sampling methods: inverse-CDF goldens, truncation goldens, empirical distributions, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.sampling import (
    Categorical,
    Greedy,
    MinP,
    TopK,
    TopP,
    logprob_mismatch,
    make_method,
    sample_from_logits,
)

NEG_INF = -np.inf


def _sample(z, u):
    z = jnp.asarray(np.asarray(z, np.float32))
    u = jnp.asarray(np.asarray(u, np.float32))
    return np.asarray(jax.jit(sample_from_logits)(z, u))


def test_inverse_cdf_golden_small_vocab():
    # p = [0.1, 0.2, 0.3, 0.4]: running sums 0.1, 0.3, 0.6, 1.0; token = first sum > u.
    z = np.log([[0.1, 0.2, 0.3, 0.4]] * 6)
    u = [0.0, 0.05, 0.15, 0.35, 0.65, 0.9999999]
    np.testing.assert_array_equal(_sample(z, u), [0, 0, 1, 2, 3, 3])


def test_inverse_cdf_never_returns_excluded_tokens():
    # Mass 1/2 on tokens 1 and 3; -inf elsewhere, including after the last kept token.
    z = [[NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF]] * 5
    np.testing.assert_array_equal(_sample(z, [0.0, 0.49, 0.5, 0.999, 1.0 - 2**-24]), [1, 1, 3, 3, 3])


def test_inverse_cdf_two_levels_across_blocks():
    # V = 300 spans three 128-token blocks (the last one padded); mass on tokens 5, 150 and 299 only.
    v = 300
    z = np.full((7, v), NEG_INF, np.float32)
    z[:, [5, 150, 299]] = np.log([0.2, 0.5, 0.3])
    u = [0.0, 0.19, 0.21, 0.69, 0.71, 0.999, 1.0 - 2**-24]
    np.testing.assert_array_equal(_sample(z, u), [5, 5, 150, 150, 299, 299, 299])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_categorical_matches_softmax_frequencies(temperature):
    v, rows = 200, 40_000
    logits = np.random.default_rng(0).normal(size=(v,)).astype(np.float32) * 2
    method = Categorical(temperature=temperature)
    tokens = np.asarray(jax.jit(method.sample)(jax.random.key(3), jnp.tile(logits, (rows, 1))))
    freq = np.bincount(tokens, minlength=v) / rows
    z = logits / temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    # Binomial standard error is at most 0.0025 here; 5 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.0125)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 0.0, 4.9]])
    np.testing.assert_array_equal(Greedy().sample(jax.random.key(0), logits), [1, 0])
    assert Greedy().temperature == 1.0


def test_top_k_truncation_golden_and_support():
    z = jnp.array([[0.5, 3.0, -1.0, 2.0, 1.0]])
    np.testing.assert_array_equal(TopK(k=2).truncate(z), [[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF]])
    np.testing.assert_array_equal(TopK(k=5).truncate(z), z)
    np.testing.assert_array_equal(TopK(k=50).truncate(z), z)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3000, 64)).astype(np.float32))
    tokens = np.asarray(jax.jit(TopK(k=3, temperature=0.5).sample)(jax.random.key(1), logits))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    assert all(t in row for t, row in zip(tokens, top3))


def test_top_p_truncation_golden():
    # Sorted probabilities 0.5, 0.3, 0.15, 0.05 (shuffled in the vocab); mass before each: 0, .5, .8, .95.
    z = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    keep = lambda p: np.isfinite(np.asarray(TopP(p=p).truncate(z)))[0]  # noqa: E731
    np.testing.assert_array_equal(keep(0.3), [0, 1, 0, 0])   # the top token is always kept
    np.testing.assert_array_equal(keep(0.7), [0, 1, 0, 1])
    np.testing.assert_array_equal(keep(0.9), [1, 1, 0, 1])
    np.testing.assert_array_equal(keep(1.0), [1, 1, 1, 1])


def test_min_p_truncation_golden():
    # Keep p(v) >= min_p * 0.5.
    z = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    keep = lambda p: np.isfinite(np.asarray(MinP(p=p).truncate(z)))[0]  # noqa: E731
    np.testing.assert_array_equal(keep(0.35), [0, 1, 0, 1])   # threshold 0.175
    np.testing.assert_array_equal(keep(0.25), [1, 1, 0, 1])   # threshold 0.125
    np.testing.assert_array_equal(keep(1.0), [0, 1, 0, 0])


def test_truncated_sampling_frequencies_are_renormalised():
    # Top-2 of p = [0.1, 0.6, 0.3]: draws follow [0, 2/3, 1/3].
    rows = 30_000
    logits = jnp.tile(jnp.log(jnp.array([0.1, 0.6, 0.3])), (rows, 1))
    tokens = np.asarray(jax.jit(TopK(k=2).sample)(jax.random.key(5), logits))
    np.testing.assert_allclose(np.bincount(tokens, minlength=3) / rows, [0, 2 / 3, 1 / 3], atol=0.015)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TopP(p=0.0), r"TopP.p must be in \(0, 1\]"),
        (lambda: TopP(p=1.5), r"TopP.p must be in \(0, 1\]"),
        (lambda: TopP(p=-0.2), r"TopP.p must be in \(0, 1\]"),
        (lambda: MinP(p=0.0), r"MinP.p must be in \(0, 1\]"),
        (lambda: TopK(k=0), r"TopK.k must be an int >= 1"),
        (lambda: TopK(k=2.5), r"TopK.k must be an int >= 1"),
        (lambda: Categorical(temperature=0.0), r"Categorical.temperature must be a finite number > 0"),
        (lambda: TopK(k=3, temperature=-1.0), r"TopK.temperature must be a finite number > 0"),
        (lambda: Categorical(temperature=math.nan), r"Categorical.temperature"),
        (lambda: make_method(top_k=5, top_p=0.9), r"at most one of top_k, top_p, min_p"),
        (lambda: make_method(top_p=1.2), r"top_p must be in \(0, 1\]"),
        (lambda: make_method(greedy=True, temperature=0.5), r"greedy=True takes no temperature"),
    ],
)
def test_bad_method_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_make_method_maps_the_usual_knobs():
    assert make_method() == Categorical(temperature=1.0)
    assert make_method(temperature=0.7, top_k=40) == TopK(k=40, temperature=0.7)
    assert make_method(top_p=0.9) == TopP(p=0.9)
    assert make_method(min_p=0.1, temperature=1.5) == MinP(p=0.1, temperature=1.5)
    assert make_method(greedy=True) == Greedy()


def test_logprob_mismatch_golden():
    sampler = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    trainer = jnp.array([[-1.0, -2.5, -9.0], [-0.75, -0.25, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    stats = logprob_mismatch(sampler, trainer, mask)
    np.testing.assert_allclose(stats["sampler_logprob_diff/mean"], (0 + 0.5 + 0.25 + 0) / 4)
    np.testing.assert_allclose(stats["sampler_logprob_diff/max"], 0.5)
    with pytest.raises(ValueError, match="logprob_mismatch: shapes must match"):
        logprob_mismatch(sampler, trainer[:, :2], mask)


# --- input validation (API audit) ---

def test_methods_require_2d_logits_and_1d_u():
    with pytest.raises(ValueError, match=r"TopK.select: logits must be \[N, V\]"):
        TopK(k=2).select(jnp.zeros(5), jnp.zeros(()))
    with pytest.raises(ValueError, match=r"Categorical.sample: logits must be \[N, V\]"):
        Categorical().sample(jax.random.key(0), jnp.zeros(5))
    with pytest.raises(ValueError, match=r"sample_from_logits: u must be \[N\] = \[2\]"):
        sample_from_logits(jnp.zeros((2, 5)), jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"Greedy.select: logits must be \[N, V\]"):
        Greedy().select(jnp.zeros(5), None)
