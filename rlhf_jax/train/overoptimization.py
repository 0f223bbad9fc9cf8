"""Reward-model over-optimization (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

Pure numpy functions of scored samples, and one sampling helper:

- `kl_best_of_n(n)`: the KL of best-of-n to its base policy, `KL_bon = log n - (n - 1) / n`.
- `best_of_n_curve(proxy, gold, ns)`: the expected gold and proxy reward of the best-of-n sample
  (picked by the proxy) for each n, from `N >= n` samples per prompt by the unbiased order-statistics
  estimator (Gao et al., Appendix: every size-n subset of the N samples averaged, in closed form).
- `fit_best_of_n(d, r)`: least squares of `R_bon(d) = d (alpha - beta d)`, and
  `fit_rl(d, r)`: of `R_RL(d) = d (alpha - beta log d)`, with `d = sqrt(KL)` and `R` the gold
  reward gain over the initial policy (Gao et al., Eq. 1 and 2).
- `score_samples(config, params, n)`: `n` completions per held-out prompt of an RL config's
  data, each scored by the proxy (the config's rewards) and the gold reward (the task's grader).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["kl_best_of_n", "best_of_n_weights", "best_of_n_curve", "fit_best_of_n", "fit_rl", "score_samples"]


def kl_best_of_n(n: int | np.ndarray) -> np.ndarray:
    """`KL(pi_bon || pi) = log n - (n - 1) / n` nats (Stiennon et al. 2020; Gao et al. 2022, Sec. 2).

    Example:
      >>> [round(float(kl_best_of_n(n)), 4) for n in (1, 2, 16)]
      [0.0, 0.1931, 1.8351]
    """
    n = np.asarray(n, np.float64)
    if np.any(n < 1):
        raise ValueError(f"kl_best_of_n: n must be >= 1, got {n}")
    return np.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: int) -> np.ndarray:
    """`w_i = C(i - 1, n - 1) / C(N, n)`, i = 1..N: the probability that the sample of proxy rank i
    (ascending) is the best of a uniformly random size-n subset of N samples. Sums to 1."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"best_of_n_weights: need 1 <= n <= N, got n={n}, N={num_samples}")
    total = math.comb(num_samples, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, num_samples + 1)], np.float64)


def best_of_n_curve(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> dict[str, np.ndarray]:
    """Expected gold and proxy reward of best-of-n (argmax of the proxy) for each n in `ns`.

    For each prompt, its N samples sorted by proxy ascending; `E[R | n] = sum_i w_i R_(i)`
    (`best_of_n_weights`), averaged over prompts. Among samples with equal proxy scores the first
    one wins, as in `rejection_sampling.select_best` and `prm.best_of_n` (so the point n = N is
    what those pick). Non-finite scores raise ValueError.

    Args:
      proxy, gold: float `[P, N]` scores of N samples for each of P prompts.
      ns: the n values (each <= N).

    Returns:
      `{"n", "kl", "sqrt_kl", "gold", "proxy"}`, arrays over `ns`.
    """
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(f"best_of_n_curve: proxy {proxy.shape} and gold {gold.shape} must both be [P, N]")
    if not (np.all(np.isfinite(proxy)) and np.all(np.isfinite(gold))):
        which, arr = ("proxy", proxy) if not np.all(np.isfinite(proxy)) else ("gold", gold)
        row, col = map(int, np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"best_of_n_curve: {which}[{row}, {col}] is {arr[row, col]}; scores must be finite")
    # Ascending, and among equal scores the earlier sample ranks higher (a stable sort of the reversed
    # rows, mapped back), so the first of the tied samples is the best.
    n_samples = proxy.shape[1]
    order = n_samples - 1 - np.argsort(proxy[:, ::-1], axis=1, kind="stable")
    proxy_sorted = np.take_along_axis(proxy, order, axis=1)
    gold_sorted = np.take_along_axis(gold, order, axis=1)
    g, p = [], []
    for n in ns:
        w = best_of_n_weights(proxy.shape[1], int(n))
        g.append(float((gold_sorted @ w).mean()))
        p.append(float((proxy_sorted @ w).mean()))
    kl = kl_best_of_n(np.asarray(ns))
    return {"n": np.asarray(ns), "kl": kl, "sqrt_kl": np.sqrt(kl), "gold": np.asarray(g), "proxy": np.asarray(p)}


def _lstsq(features: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    coef, *_ = np.linalg.lstsq(features, r, rcond=None)
    resid = r - features @ coef
    ss = float(np.sum((r - r.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss if ss > 0 else float("nan")
    return float(coef[0]), float(coef[1]), r2


def fit_best_of_n(d: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Least squares of `R_bon(d) = d (alpha - beta d)` (Gao et al. 2022, Eq. 1), `d = sqrt(KL)`.

    `r` is the gold-reward gain over the base policy (R(0) = 0). Linear in `(alpha, beta)` with
    features `(d, -d^2)`. Returns `alpha`, `beta`, `r2` and, for `beta > 0`, the peak
    `d* = alpha / (2 beta)` with `R_bon(d*) = alpha^2 / (4 beta)`.

    Example:
      >>> d = np.linspace(0.1, 2.0, 8)
      >>> fit = fit_best_of_n(d, d * (1.5 - 0.5 * d))
      >>> round(fit["alpha"], 6), round(fit["beta"], 6), round(fit["peak_sqrt_kl"], 6)
      (1.5, 0.5, 1.5)
    """
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    alpha, beta, r2 = _lstsq(np.stack([d, -d * d], axis=1), r)
    out = {"alpha": alpha, "beta": beta, "r2": r2}
    if beta > 0:
        out.update(peak_sqrt_kl=alpha / (2 * beta), peak_gain=alpha * alpha / (4 * beta))
    return out


def fit_rl(d: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Least squares of `R_RL(d) = d (alpha - beta log d)` (Gao et al. 2022, Eq. 2), over points with `d > 0`.

    Features `(d, -d log d)`. For `beta > 0` the curve peaks at `d* = exp(alpha / beta - 1)` with
    `R_RL(d*) = beta d*`.

    Example:
      >>> d = np.linspace(0.2, 3.0, 10)
      >>> fit = fit_rl(d, d * (0.8 - 0.4 * np.log(d)))
      >>> round(fit["alpha"], 6), round(fit["beta"], 6)
      (0.8, 0.4)
    """
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    keep = d > 0
    d, r = d[keep], r[keep]
    alpha, beta, r2 = _lstsq(np.stack([d, -d * np.log(d)], axis=1), r)
    out = {"alpha": alpha, "beta": beta, "r2": r2}
    if beta > 0:
        peak = math.exp(alpha / beta - 1)
        out.update(peak_sqrt_kl=peak, peak_gain=beta * peak)
    return out


def score_samples(config, params, n: int, *, max_batches: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(proxy [P, n], gold [P, n])`: `n` samples per held-out prompt (`data.eval`, the first
    `max_batches` batches) of the policy `params`, scored by the config's rewards (the proxy) and
    its synthetic task's grader (gold). Sampling as the RL driver's training samples
    (`algorithm.temperature`, `rollout`)."""
    import jax  # noqa: PLC0415 -- the pure functions above need no JAX

    from rlhf_jax.distributed import gather_rows  # noqa: PLC0415
    from rlhf_jax.models import CausalLM  # noqa: PLC0415
    from rlhf_jax.train.data import eval_batches, load_run_data  # noqa: PLC0415
    from rlhf_jax.train.rl import rollout_parts  # noqa: PLC0415

    data = load_run_data(config, "prompt")
    if data.eval is None or config.data.task("eval") is None:
        raise ValueError("score_samples needs held-out prompts of a synthetic task (data.eval=synthetic:...)")
    mesh = config.mesh.make_mesh()
    collector, gold = rollout_parts(config, data, mesh, CausalLM(config.model), n, {})
    sampler_params = collector.sampler.load_params(params)
    key = jax.random.key(seed)
    proxies, golds = [], []
    for k, batch in enumerate(eval_batches(data.eval, config.data, max_batches=max_batches)):
        arrays = collector.sample(sampler_params, batch, collector.train_sampling, jax.random.fold_in(key, k))
        proxies.append(np.asarray(collector.score(arrays).total).reshape(-1, n))
        golds.append(np.asarray(collector.score(arrays, sources=[gold[1]]).total).reshape(-1, n))
    # Each process sampled its own prompts: the curves are over all of them.
    return gather_rows(np.concatenate(proxies)), gather_rows(np.concatenate(golds))
