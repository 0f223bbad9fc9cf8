"""Over-optimization math (Gao et al. 2022): KL of best-of-n, the unbiased best-of-n estimator against
brute-force enumeration of subsets, the two functional forms' fits recovering known coefficients."""

import itertools
import math
import os

import numpy as np
import pytest

from rlhf_jax.train.overoptimization import best_of_n_curve, best_of_n_weights, fit_best_of_n, fit_rl, kl_best_of_n

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kl_of_best_of_n():
    np.testing.assert_allclose(kl_best_of_n([1, 2, 4, 64]),
                               [0.0, math.log(2) - 0.5, math.log(4) - 0.75, math.log(64) - 63 / 64])
    with pytest.raises(ValueError, match="n must be >= 1"):
        kl_best_of_n(0)


def test_estimator_equals_the_mean_over_every_subset():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in (1, 2, 3, 7):
        w = best_of_n_weights(7, n)
        assert w.sum() == pytest.approx(1.0)
        brute_gold, brute_proxy = [], []
        for p, g in zip(proxy, gold):
            picks = [max(subset, key=lambda i: p[i]) for subset in itertools.combinations(range(7), n)]
            brute_gold.append(np.mean([g[i] for i in picks]))
            brute_proxy.append(np.mean([p[i] for i in picks]))
        curve = best_of_n_curve(proxy, gold, [n])
        assert curve["gold"][0] == pytest.approx(np.mean(brute_gold), abs=1e-12)
        assert curve["proxy"][0] == pytest.approx(np.mean(brute_proxy), abs=1e-12)
    # n = 1 is the plain mean; n = N the argmax.
    curve = best_of_n_curve(proxy, gold, [1, 7])
    assert curve["gold"][0] == pytest.approx(gold.mean())
    assert curve["gold"][1] == pytest.approx(gold[np.arange(3), proxy.argmax(1)].mean())
    np.testing.assert_allclose(curve["sqrt_kl"], np.sqrt(kl_best_of_n([1, 7])))
    with pytest.raises(ValueError, match="need 1 <= n <= N"):
        best_of_n_curve(proxy, gold, [8])


def test_fits_recover_the_coefficients_and_peaks():
    d = np.sqrt(kl_best_of_n(np.array([2, 4, 8, 16, 32, 64])))
    fit = fit_best_of_n(d, d * (0.3 - 0.1 * d))
    assert fit["alpha"] == pytest.approx(0.3) and fit["beta"] == pytest.approx(0.1) and fit["r2"] == pytest.approx(1)
    assert fit["peak_sqrt_kl"] == pytest.approx(1.5) and fit["peak_gain"] == pytest.approx(0.225)
    d = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    fit = fit_rl(d, np.where(d > 0, d * (0.5 - 0.2 * np.log(np.maximum(d, 1e-9))), 0.0))
    assert fit["alpha"] == pytest.approx(0.5) and fit["beta"] == pytest.approx(0.2)
    assert fit["peak_sqrt_kl"] == pytest.approx(math.exp(0.5 / 0.2 - 1))


def test_best_of_n_shape_classification():
    from rlhf_jax.cli import load_experiment

    module, _ = load_experiment(os.path.join(ROOT, "experiments", "overoptimization.py"))
    assert module.bon_shape(np.array([0.1, 0.3, 0.4, 0.35]), 0.1) == "rises then falls"
    assert module.bon_shape(np.array([0.1, 0.3, 0.4, 0.405]), 0.1) == "rises then saturates"
    assert module.bon_shape(np.array([0.1, 0.2, 0.3, 0.4]), 0.1) == "keeps rising"
    assert module.bon_shape(np.array([0.1, 0.0, -0.1, -0.2]), 0.1) == "does not rise"


@pytest.mark.parametrize("name", ["overoptimization", "prm_tiny", "grpo_gsm8k_tiny"])
def test_issue20_experiments_state_their_command_and_build(name):
    from rlhf_jax.cli import load_experiment
    from rlhf_jax.train.aot import run_configs

    module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
    assert f"rlhf-jax run experiments/{name}.py" in module.__doc__ and "Measured" in module.__doc__
    for mode in (None, "tiny"):
        assert run_configs(module.get_config(mode))
    with pytest.raises(ValueError, match="mode"):
        module.get_config("nonsense")


def test_tied_proxy_scores_pick_the_first_sample_as_best_of_n_training_does():
    """A discrete proxy (a verifier, a rounded RM) ties often: the first tied sample wins, as
    `select_best` picks it, against the brute-force mean over subsets with Python's first max."""
    from rlhf_jax.train.rejection_sampling import select_best

    rng = np.random.default_rng(1)
    proxy, gold = rng.integers(0, 3, size=(4, 6)).astype(float), rng.normal(size=(4, 6))
    for n in (2, 3, 6):
        brute = [np.mean([g[max(s, key=lambda i: p[i])] for s in itertools.combinations(range(6), n)])
                 for p, g in zip(proxy, gold)]
        assert best_of_n_curve(proxy, gold, [n])["gold"][0] == pytest.approx(np.mean(brute), abs=1e-12)
    # n = N is exactly the sample `select_best` trains on; all-equal scores: the first sample.
    picks = select_best(proxy.reshape(-1), 6)
    assert best_of_n_curve(proxy, gold, [6])["gold"][0] == pytest.approx(gold.reshape(-1)[picks].mean())
    assert best_of_n_curve(np.ones((1, 3)), np.array([[3.0, 2.0, 1.0]]), [3])["gold"][0] == 3.0


def test_non_finite_scores_are_refused():
    # argsort put a NaN proxy last, so the NaN sample was every subset's "best".
    with pytest.raises(ValueError, match=r"best_of_n_curve: proxy\[0, 0\] is nan; scores must be finite"):
        best_of_n_curve(np.array([[np.nan, 0.0, 1.0]]), np.array([[5.0, 0.0, 1.0]]), [3])
    with pytest.raises(ValueError, match=r"gold\[1, 2\] is inf"):
        best_of_n_curve(np.zeros((2, 3)), np.array([[0.0, 0, 0], [0, 0, np.inf]]), [2])
