"""Sampling methods: inverse-CDF goldens, truncation goldens, empirical distributions, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.sampling import (
    Categorical,
    Filtered,
    Greedy,
    MinP,
    TopK,
    TopP,
    logprob_mismatch,
    make_method,
    sample_from_logits,
)
from rlhf_jax.sampling.methods import METHOD_KINDS, TOP_P, row_fields, select_per_row

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
        (lambda: Filtered(top_k=-1, top_p=0.9), r"Filtered.top_k must be an int >= 0 \(0 = off\), got -1"),
        (lambda: Filtered(top_k=5, top_p=0.0), r"Filtered.top_p must be in \(0, 1\], got 0.0"),
        (lambda: Filtered(top_k=5, min_p=1.5), r"Filtered.min_p must be in \[0, 1\] \(0 = off\), got 1.5"),
        (lambda: make_method(top_k=5, top_p=0.9, temperature=0.0), r"Filtered.temperature must be a finite"),
        (lambda: make_method(top_p=1.2), r"top_p must be in \(0, 1\]"),
        (lambda: make_method(greedy=True, temperature=0.5), r"greedy=True takes no temperature"),
        # 1e-50 is 0 and 1e40 is inf in the float32 the logits are divided by: every draw was token 0.
        (lambda: make_method(temperature=1e-50), r"Categorical.temperature must be a finite number > 0 \(a normal "
                                                 r"float32, in \[1.18e-38, 3.4e\+38\]\), got 1e-50"),
        (lambda: TopP(p=0.9, temperature=1e40), r"TopP.temperature must be a finite number > 0 .* got 1e\+40"),
        (lambda: make_method(temperature=math.inf), r"Categorical.temperature must be a finite number > 0"),
        (lambda: make_method(top_k=-1), r"make_method: top_k must be an int >= 0 \(0 = off\), got -1"),
        (lambda: make_method(top_p=math.nan), r"make_method: top_p must be in \(0, 1\], got nan"),
        (lambda: make_method(min_p=math.nan), r"make_method: min_p must be in \[0, 1\] \(0 = off\), got nan"),
        (lambda: make_method(min_p=-0.1), r"make_method: min_p must be in \[0, 1\] \(0 = off\), got -0.1"),
        # A truthy string used to give Greedy() ("false" included).
        (lambda: make_method(greedy="false"), r"make_method: greedy must be a bool, got 'false'"),
    ],
)
def test_bad_method_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_make_method_maps_the_usual_knobs():
    assert make_method() == Categorical(temperature=1.0)
    # NumPy ints (a sweep over np.arange) are taken and stored as Python ints (a static, hashable method).
    assert make_method(top_k=np.int64(40)) == TopK(k=40) and type(TopK(k=np.int32(3)).k) is int
    assert make_method(temperature=0.7, top_k=40) == TopK(k=40, temperature=0.7)
    assert make_method(top_p=0.9) == TopP(p=0.9)
    assert make_method(min_p=0.1, temperature=1.5) == MinP(p=0.1, temperature=1.5)
    assert make_method(greedy=True) == Greedy()
    # Two or three filters combine (they used to be refused), in transformers' order.
    assert make_method(temperature=0.7, top_k=50, top_p=0.95) == Filtered(temperature=0.7, top_k=50, top_p=0.95)
    assert make_method(top_p=0.9, min_p=0.05) == Filtered(top_p=0.9, min_p=0.05)
    assert make_method(top_k=np.int64(8), top_p=0.9, min_p=0.1).filters == (8, 0.9, 0.1)
    assert TopK(k=4).filters == (4, 1.0, 0.0) and MinP(p=0.2).filters == (0, 1.0, 0.2)


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


# --- the distribution drawn from, against transformers' logits warpers ---

def _hf_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, order="kpm"):
    """softmax of transformers' warpers on float32 logits: Temperature, then TopK, TopP, MinP in its
    `_get_logits_processor` order ("kpm"; another `order` only to show that the order matters)."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores, ids = torch.tensor(np.asarray(logits, np.float32)), torch.zeros((len(logits), 1), dtype=torch.long)
    warpers = [lp.TemperatureLogitsWarper(temperature)] if temperature != 1 else []
    by_name = dict(k=[lp.TopKLogitsWarper(top_k)] if top_k else [], p=[lp.TopPLogitsWarper(top_p)] if top_p < 1 else [],
                   m=[lp.MinPLogitsWarper(min_p)] if min_p > 0 else [])
    warpers += [w for name in order for w in by_name[name]]
    for w in warpers:
        scores = w(ids, scores)
    return torch.softmax(scores, dim=-1).numpy()


def _probs(method, logits):
    """The distribution `method` draws from: softmax(truncate(logits / T)), float32."""
    z = jnp.asarray(logits, jnp.float32) / jnp.float32(method.temperature)
    return np.asarray(jax.nn.softmax(method.truncate(z), axis=-1))


_RAND = np.random.default_rng(0).normal(size=(3, 300)).astype(np.float32) * 3
_CASES = {
    "random": _RAND,
    "bf16": np.asarray(jnp.asarray(_RAND, jnp.bfloat16).astype(jnp.float32)),
    "dyadic": np.log(np.array([[0.5, 0.0625, 0.25, 0.125, 0.0625]], np.float32)),   # masses 0.5 .75 .875 exact
    "neg_inf": np.array([[-np.inf, 1.0, 0.0, -np.inf, 2.0, -0.5]], np.float32),
    "top_k_ties": np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], np.float32),
    "all_equal": np.zeros((1, 7), np.float32),
}
_SETTINGS = [
    dict(temperature=0.7), dict(temperature=1e-3), dict(top_k=1), dict(top_k=3), dict(top_k=3, temperature=0.5),
    dict(top_k=1000), dict(top_p=0.5), dict(top_p=0.75), dict(top_p=0.875), dict(top_p=0.9, temperature=0.6),
    dict(top_p=1.0), dict(min_p=0.1), dict(min_p=0.5, temperature=0.5), dict(min_p=1.0), dict(min_p=0.0),
    # Combined (Filtered): each filter on what the one before kept.
    dict(top_k=3, top_p=0.7), dict(top_k=40, top_p=0.9, temperature=0.7), dict(top_k=2, top_p=0.6),
    dict(top_p=0.8, min_p=0.3), dict(top_k=4, min_p=0.2, temperature=1.5), dict(top_k=20, top_p=0.95, min_p=0.05),
    dict(top_k=1000, top_p=0.875, min_p=0.1),
]


@pytest.mark.parametrize("case", list(_CASES))
def test_truncated_distribution_equals_transformers_warpers(case):
    logits = _CASES[case]
    for kw in _SETTINGS:
        if case in ("top_k_ties", "all_equal") and kw.get("top_p", 1) < 1:
            continue   # a tie at the nucleus boundary: test_top_p_keeps_every_token_tied_at_the_boundary
        want = _hf_probs(logits, **kw)
        got = _probs(make_method(**kw), logits)
        # The kept set exactly (tiny tempered probabilities may underflow differently: compare masses > 1e-30).
        np.testing.assert_array_equal(got > 1e-30, want > 1e-30, err_msg=f"{case} {kw}")
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=f"{case} {kw}")


def test_top_p_keeps_every_token_tied_at_the_boundary():
    # Equal logits: the nucleus boundary falls inside a tie. TopP keeps all tied tokens (no sort-order
    # dependence); transformers keeps the part of the tie its sort puts first.
    logits = np.zeros((1, 7), np.float32)
    for p in (0.3, 0.5, 0.8):
        np.testing.assert_array_equal(_probs(TopP(p=p), logits), np.full((1, 7), 1 / 7, np.float32))
        hf = _hf_probs(logits, top_p=p)
        assert 0 < (hf > 0).sum() < 7    # a strict subset of the tie
    # Mass 0.5, then a tie 0.25 / 0.25 at p = 0.75: both kept (mass before each strictly more likely: 0.5 < p).
    z = jnp.log(jnp.array([[0.25, 0.5, 0.25]]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(TopP(p=0.75).truncate(z))), [[True, True, True]])


@pytest.mark.parametrize(
    "method",
    [Categorical(temperature=0.8), TopK(k=5, temperature=1.3), TopP(p=0.6, temperature=0.9), MinP(p=0.2)],
    ids=lambda m: type(m).__name__,
)
def test_draws_follow_the_truncated_distribution(method):
    # 300 tokens (3 inverse-CDF blocks), a tie of three tokens in different blocks near the top, two -inf.
    v, rows = 300, 60_000
    logits = (np.random.default_rng(0).normal(size=v) * 2).astype(np.float32)
    logits[[3, 140, 299]] = logits.max() - 0.5
    logits[[10, 11]] = -np.inf
    kw = dict(zip(("top_k", "top_p", "min_p"), method.filters), temperature=method.temperature)
    probs = _hf_probs(logits[None], **kw)[0].astype(np.float64)
    tokens = np.asarray(jax.jit(method.sample)(jax.random.key(7), jnp.tile(logits, (rows, 1))))
    counts = np.bincount(tokens, minlength=v)
    assert counts[probs == 0].sum() == 0, np.nonzero(counts * (probs == 0))
    # Pearson chi-square over tokens expected >= 5 times (the rest pooled); 6 sigma of its normal
    # approximation, a bound from the counts alone (p ~ 1e-9 of a false failure at this fixed key).
    expected = rows * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    dof = len(exp) - 1
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    if isinstance(method, (TopK, TopP)):
        assert counts[[3, 140, 299]].min() > 0     # every member of the tie is drawn


def test_top_p_near_one_keeps_the_float64_nucleus():
    # One token of mass 1 - 3e-5, then 1024 distinct tokens of ~3e-8 each, at p = 1 - 2**-16 (exact in
    # float32): the cut falls among tokens lighter than float32's spacing near 1 (6e-8). A running sum
    # from the top stalled there and kept 26 tokens too many; the tail summed from the least likely
    # token (as transformers' TopPLogitsWarper does) keeps the float64 set, 422 tokens.
    tail = np.linspace(2.0, 1.0, 1024)
    logits = np.log(np.concatenate([[1 - 3e-5], tail / tail.sum() * 3e-5])).astype(np.float32)[None]
    p = 1 - 2.0**-16
    exact = np.exp(logits[0].astype(np.float64))
    exact /= exact.sum()
    want = np.cumsum(exact) - exact < p                    # already sorted, most likely first
    got = np.isfinite(np.asarray(TopP(p=p).truncate(jnp.asarray(logits))))[0]
    assert want.sum() == 422
    np.testing.assert_array_equal(got, want)
    # Continuous batching's per-row selection shares the threshold: the same tokens at any u.
    u = jnp.asarray([0.0, 0.5, 0.99999, 0.9999999], jnp.float32)
    rows = jnp.asarray(np.repeat(logits, 4, axis=0))
    per_row = select_per_row(rows, u, jnp.full((4,), TOP_P), jnp.ones((4,)), jnp.zeros((4,), jnp.int32),
                             jnp.full((4,), p, jnp.float32), jnp.zeros((4,)), kinds=(TOP_P,))
    np.testing.assert_array_equal(per_row, TopP(p=p).select(rows, u))
    assert 0 < np.asarray(per_row).max() < 422


def test_temperature_zero_points_to_greedy():
    # vLLM reads temperature=0 as greedy; here it is refused, naming the argument and the greedy method.
    for build in (lambda: make_method(temperature=0), lambda: TopP(p=0.9, temperature=0.0)):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0 .* got 0(\.0)?; for greedy "
                                             r"\(argmax\) decoding use Greedy\(\) or make_method\(greedy=True\)"):
            build()
    with pytest.raises(ValueError, match=r"got -1.0$"):     # the hint is for 0 only
        make_method(temperature=-1.0)


# --- combined filters (Filtered): transformers' chain, continuous batching's rows ---

def test_combined_filters_equal_transformers_chain_at_qwen_vocab():
    # V = 151936 (Qwen2): a flat row and a row with 40 boosted tokens. The kept set is transformers'
    # Temperature -> TopK -> TopP -> MinP chain exactly, and the renormalised probabilities agree;
    # the other orders keep other sets here (top-p before top-k: 50 tokens; min-p before top-p, as
    # vLLM does: a smaller nucleus), so the order is pinned.
    v = 151936
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, v)) * 2.5).astype(np.float32)
    logits[1, :40] += np.linspace(9, 6, 40).astype(np.float32)
    for kw, kept, other in [(dict(temperature=0.7, top_k=50, top_p=0.95), [40, 26], "pkm"),
                            (dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05), [11, 11], "kmp")]:
        method = make_method(**kw)
        assert type(method) is Filtered
        want = _hf_probs(logits, **kw)
        got = _probs(method, logits)
        np.testing.assert_array_equal((got > 0).sum(-1), kept, err_msg=str(kw))
        np.testing.assert_array_equal(got > 0, want > 0, err_msg=str(kw))
        np.testing.assert_allclose(got, want, atol=1e-7, rtol=0, err_msg=str(kw))
        assert not np.array_equal(_hf_probs(logits, **kw, order=other) > 0, want > 0)


def test_select_per_row_mixes_combined_and_single_methods_bit_for_bit():
    # One batch with every kind, Filtered rows among them (continuous batching's slots): each row's
    # token is its method's own `select` at the same u. A Filtered with one filter on draws that
    # method's tokens, and the static path's log-prob temperature is the method's.
    methods = [Greedy(), Categorical(temperature=0.8), TopK(k=5, temperature=1.3), TopP(p=0.6), MinP(p=0.2),
               Filtered(top_k=12, top_p=0.7, min_p=0.1, temperature=1.1), Filtered(top_k=30, top_p=0.5),
               Filtered(top_p=0.6, min_p=0.3, temperature=0.9), Filtered(top_k=5, temperature=1.3),
               Filtered(top_p=0.6), Filtered(min_p=0.2), Filtered(temperature=0.8)]
    logits = (np.random.default_rng(2).normal(size=(len(methods), 300)) * 2).astype(np.float32)
    logits[:, [3, 140, 299]] = logits.max(-1, keepdims=True) - 0.5     # a tie across inverse-CDF blocks
    logits[8:] = logits[[2, 3, 4, 1]]                                   # the single methods' rows again
    fields = {k: jnp.asarray(np.stack([row_fields(m)[k] for m in methods]))
              for k in ("kind", "temperature", "top_k", "top_p", "log_min_p")}
    kinds = tuple(sorted(set(METHOD_KINDS.values())))
    per_row = jax.jit(select_per_row, static_argnames="kinds")
    for u in (0.0, 0.3, 0.77, 1 - 2**-24):
        uu = jnp.full((len(methods),), u, jnp.float32)
        got = np.asarray(per_row(jnp.asarray(logits), uu, **fields, kinds=kinds))
        want = [int(m.select(jnp.asarray(logits[i:i + 1]), uu[:1])[0]) for i, m in enumerate(methods)]
        np.testing.assert_array_equal(got, want, err_msg=f"u={u}")
        np.testing.assert_array_equal(want[8:], want[2:5] + want[1:2], err_msg=f"u={u}")  # one filter = its method


def test_rollout_config_takes_combined_filters():
    # `--set rollout.top_k=50 rollout.top_p=0.95` (settings ported from HF / vLLM) used to be refused.
    from rlhf_jax.train.rollouts import RolloutConfig

    config = RolloutConfig(top_k=50, top_p=0.95, min_p=0.05)
    assert make_method(temperature=0.7, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p) == \
        Filtered(temperature=0.7, top_k=50, top_p=0.95, min_p=0.05)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        RolloutConfig(top_k=50, top_p=1.5)
