"""Offline preference losses: the DPO family, SimPO, ORPO's odds-ratio term and KTO.

Inputs are per-example sequence log-probs (`rlhf_jax.logprobs.sequence_logprobs`): summed for
DPO (sigmoid/robust/hinge/APO) and KTO, length-averaged for SimPO, ORPO and IPO, as their papers
define them. Metrics are batch means with TRL's names, computed under `stop_gradient` by one
reducer, `preference_metrics`, which the training steps call too (with weights and global counts).
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax import _checks

DPOLossType = Literal["sigmoid", "robust", "hinge", "ipo", "apo_zero", "apo_down"]
Metrics = dict[str, jax.Array]

# log(1 - p) is -inf at p = 1; ORPO clamps log p below this (a row whose average log-prob rounds
# to 0, e.g. a fully masked one, stays finite with zero gradient).
_MAX_AVG_LOGP = -1e-6


def _check_pairs(fn: str, *, floating: tuple[str, ...] = (), **arrays: jax.Array | None
                 ) -> tuple[jax.Array | None, ...]:
    """The arrays (nested lists converted), all `[B]` with one shape and B >= 1; those named in
    `floating` (log-probs) floating point."""
    arrays = {k: None if v is None else _checks.as_array(fn, k, v) for k, v in arrays.items()}
    first = next(iter(arrays))
    _checks.check_rank(fn, first, arrays[first], 1)
    _checks.check_same_shape(fn, **arrays)
    _checks.check_nonempty(fn, first, arrays[first])
    for name in floating:
        if arrays[name] is not None:
            _checks.check_floating(fn, name, arrays[name])
    return tuple(arrays.values())


def _weighted_mean(x: jax.Array, weights: jax.Array | None, count: jax.Array | None) -> jax.Array:
    """`mean(x)`, or `sum(w x) / count` (`count` default `sum(w)`; 0 when there is nothing to average)."""
    if weights is None:
        return jnp.mean(x)
    total = _checks.masked_sum(x, weights)
    if count is None:
        count = jnp.sum(_checks.mask_f32(weights))
    return total / _checks.safe_denominator(count)


def preference_metrics(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    weights: jax.Array | None = None,
    count: jax.Array | None = None,
    rejected_weights: jax.Array | None = None,
    rejected_count: jax.Array | None = None,
    extra: dict[str, jax.Array] | None = None,
) -> Metrics:
    """TRL's metrics of the DPO family from per-example values: the one place they are computed.

    Paired (`rejected_weights` None): example `i` is a pair with weight `w_i` (default 1), and with
    `n = count` (default `sum w`): `rewards/chosen = sum w c / n`, `rewards/rejected = sum w r / n`,
    `rewards/accuracies = sum w [c > r] / n`, `rewards/margins = sum w (c - r) / n`,
    `logps/chosen`, `logps/rejected` likewise; every `extra[k]` as `sum w extra[k] / n`.

    Unpaired (KTO; `rejected_weights` given): the `chosen_*` means run over `weights` (the desirable
    examples, count `count`), the `rejected_*` ones over `rejected_weights` (count
    `rejected_count`), `rewards/margins = rewards/chosen - rewards/rejected`, and there is no
    `rewards/accuracies` (no pairs to compare).

    Pass global counts to make micro-batch values add up to the batch's (see
    `rlhf_jax.steps.common.micro_share`).

    Args:
      chosen_rewards, rejected_rewards: `[N]` implicit rewards (e.g. `beta * (log pi - log pi_ref)`).
      chosen_logps, rejected_logps: `[N]` the log-probs the loss consumed.
      weights: `[N]` weights of the (chosen) examples, or None (all 1).
      count: the normaliser of the (chosen) means, or None (`sum(weights)`).
      rejected_weights, rejected_count: the rejected side's, for unpaired examples.
      extra: more `[N]` per-example values to average like the chosen side.

    Returns:
      float32 scalars under `stop_gradient`: `rewards/chosen`, `rewards/rejected`,
      `rewards/accuracies` (paired), `rewards/margins`, `logps/chosen`, `logps/rejected`, and `extra`'s.

    Example:
      >>> m = preference_metrics(jnp.array([0.5, -0.2]), jnp.array([0.1, 0.3]), jnp.array([-4.0, -6.0]),
      ...                        jnp.array([-5.0, -5.0]))
      >>> {k: round(float(v), 4) for k, v in m.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'rewards/chosen': 0.15, 'rewards/rejected': 0.2, 'rewards/accuracies': 0.5, 'rewards/margins': -0.05,
       'logps/chosen': -5.0, 'logps/rejected': -5.0}
    """
    fn = "preference_metrics"
    paired = rejected_weights is None
    _checks.check_rank(fn, "chosen_rewards", chosen_rewards, 1)
    named = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards, "chosen_logps": chosen_logps,
             "rejected_logps": rejected_logps, "weights": weights, "rejected_weights": rejected_weights}
    named.update({f"extra[{k!r}]": v for k, v in (extra or {}).items()})
    _checks.check_same_shape(fn, **named)
    for name, value in (("count", count), ("rejected_count", rejected_count)):
        if value is not None:
            _checks.check_scalar(fn, name, value)
    sg = jax.lax.stop_gradient
    c, r = sg(_checks.f32(chosen_rewards)), sg(_checks.f32(rejected_rewards))
    r_weights, r_count = (weights, count) if paired else (rejected_weights, rejected_count)
    metrics = {
        "rewards/chosen": _weighted_mean(c, weights, count),
        "rewards/rejected": _weighted_mean(r, r_weights, r_count),
    }
    if paired:
        metrics["rewards/accuracies"] = _weighted_mean((c > r).astype(jnp.float32), weights, count)
        metrics["rewards/margins"] = _weighted_mean(c - r, weights, count)
    else:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["logps/chosen"] = _weighted_mean(sg(_checks.f32(chosen_logps)), weights, count)
    metrics["logps/rejected"] = _weighted_mean(sg(_checks.f32(rejected_logps)), r_weights, r_count)
    for key, value in (extra or {}).items():
        metrics[key] = _weighted_mean(sg(_checks.f32(value)), weights, count)
    return metrics


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization and its variants, per preference pair.

    With log-ratios `c = log pi(y_w) - log pi_ref(y_w)`, `r = log pi(y_l) - log pi_ref(y_l)` and
    `h = c - r` (reference terms are 0 when both ref arguments are None: reference-free DPO):

    - `sigmoid`:  `-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)` (Rafailov et al. 2023;
      `eps > 0` is conservative DPO, Mitchell 2023)
    - `robust`:   `[-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)`, unbiased
      under label-flip rate `eps` (Chowdhury et al. 2024, "Provably Robust DPO")
    - `hinge`:    `max(0, 1 - beta h)` (SLiC-HF, Zhao et al. 2023)
    - `ipo`:      `(h - 1 / (2 beta))^2` (Azar et al. 2023); pass length-averaged log-probs
    - `apo_zero`: `1 - sigmoid(beta c) + sigmoid(beta r)` (D'Oosterlinck et al. 2024, "Anchored
      Preference Optimization"): raise chosen, lower rejected likelihood
    - `apo_down`: `sigmoid(beta c) + 1 - sigmoid(beta (c - r))`: lower both, rejected more

    Args:
      chosen_logps: `[B]` summed completion log-probs of the chosen responses under the policy.
      rejected_logps: `[B]` same for the rejected responses.
      ref_chosen_logps: `[B]` under the frozen reference policy, or None (reference-free).
      ref_rejected_logps: `[B]` or None; must be None exactly when `ref_chosen_logps` is.
      beta: inverse temperature of the implicit reward, finite and > 0.
      loss_type: one of `DPOLossType`.
      label_smoothing: assumed label-flip probability in `[0, 0.5)`; `sigmoid` and `robust` only.

    Returns:
      `(losses, metrics)`: float32 `[B]` and TRL's `rewards/chosen`, `rewards/rejected`,
      `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected` (batch means; the
      rewards are `beta * c` and `beta * r`).

    Example:
      >>> losses, metrics = dpo_loss(jnp.array([-10.0]), jnp.array([-12.0]), jnp.array([-11.0]),
      ...                            jnp.array([-11.0]), beta=0.5)  # c = 1, r = -1
      >>> round(float(losses[0]), 4), float(metrics["rewards/margins"])  # -log sigmoid(0.5 * 2)
      (0.3133, 1.0)
    """
    fn = "dpo_loss"
    _checks.check_choice(fn, "loss_type", loss_type, get_args(DPOLossType))
    _checks.check_positive(fn, "beta", beta, finite=True)
    _checks.check_range(fn, "label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    if loss_type not in ("sigmoid", "robust") and _checks.scalar_value(fn, "label_smoothing", label_smoothing) != 0:
        raise ValueError(f"{fn}: label_smoothing applies to loss_type 'sigmoid' and 'robust' only, got {loss_type!r}")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            f"{fn}: ref_chosen_logps and ref_rejected_logps must both be arrays or both be None "
            "(reference-free), got one of each"
        )
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = _check_pairs(
        fn,
        floating=("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    pc, pr = _checks.f32(chosen_logps), _checks.f32(rejected_logps)
    if ref_chosen_logps is None:
        c, r = pc, pr
    else:
        c, r = pc - _checks.f32(ref_chosen_logps), pr - _checks.f32(ref_rejected_logps)
    h = c - r
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1 / (2 * beta))
    elif loss_type == "apo_zero":
        losses = 1 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
    else:  # apo_down
        losses = jax.nn.sigmoid(beta * c) + 1 - jax.nn.sigmoid(beta * h)
    return losses, preference_metrics(beta * c, beta * r, pc, pr)


def simpo_loss(
    chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float = 2.0, gamma: float = 0.5
) -> jax.Array:
    """Simple Preference Optimization: a reference-free, length-normalised margin loss.

    `l = -log sigmoid(beta (a_w - a_l) - gamma)` with `a = (1/|y|) log pi(y | x)`; `gamma` is the
    target reward margin (TRL's `gamma_beta_ratio` is `gamma / beta`).

    Args:
      chosen_avg_logps: `[B]` length-averaged log-probs of the chosen responses
        (`sequence_logprobs(..., average=True)`).
      rejected_avg_logps: `[B]` same for the rejected responses.
      beta: reward scale, > 0 (the paper uses 2.0-2.5).
      gamma: target margin (the paper uses 0.3-1.6).

    Returns:
      float32 `[B]`. Reference: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
      Reference-Free Reward".

    Example:
      >>> round(float(simpo_loss(jnp.array([-1.0]), jnp.array([-1.5]), beta=2.0, gamma=0.5)[0]), 4)
      0.4741
    """
    fn = "simpo_loss"
    _checks.check_positive(fn, "beta", beta, finite=True)
    _checks.check_scalar(fn, "gamma", gamma)
    chosen_avg_logps, rejected_avg_logps = _check_pairs(
        fn, floating=("chosen_avg_logps", "rejected_avg_logps"),
        chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    diff = _checks.f32(chosen_avg_logps) - _checks.f32(rejected_avg_logps)
    return jax.nn.softplus(-(beta * diff - gamma))


def _log1m_exp(x: jax.Array) -> jax.Array:
    """`log(1 - exp(x))` for `x < 0`, accurate on both sides of `-log 2`."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float = 0.1
) -> tuple[jax.Array, Metrics]:
    """ORPO's odds-ratio term (add the SFT loss on the chosen response to get the full ORPO loss).

    With odds `o(y) = p / (1 - p)`, `p = exp(a)`, `a = (1/|y|) log pi(y | x)`:
    `l = -beta log sigmoid(log o(y_w) - log o(y_l))`,
    `log o(y_w) - log o(y_l) = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))`.
    Average log-probs are clamped to <= -1e-6 so that `log(1 - p)` stays finite.

    Args:
      chosen_avg_logps: `[B]` length-averaged chosen log-probs (`sequence_logprobs(average=True)`).
      rejected_avg_logps: `[B]` length-averaged rejected log-probs.
      beta: weight of the odds-ratio term (the paper's lambda), > 0.

    Returns:
      `(losses, metrics)`: float32 `[B]`; metrics `rewards/*` and `logps/*` as in `dpo_loss` with
      rewards `beta * a`, plus `log_odds_ratio` (mean `log sigmoid(.)`) and `log_odds_chosen`
      (mean log-odds difference), as TRL logs them.

    Reference: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model".

    Example:
      >>> losses, metrics = orpo_loss(jnp.array([-0.5]), jnp.array([-1.0]), beta=0.1)
      >>> round(float(metrics["log_odds_chosen"]), 4)  # log(e^-.5 / (1 - e^-.5)) - log(e^-1 / (1 - e^-1))
      0.9741
      >>> round(float(losses[0]), 4)  # -0.1 log sigmoid(0.9741)
      0.032
    """
    fn = "orpo_loss"
    _checks.check_positive(fn, "beta", beta, finite=True)
    chosen_avg_logps, rejected_avg_logps = _check_pairs(
        fn, floating=("chosen_avg_logps", "rejected_avg_logps"),
        chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    a_w = jnp.minimum(_checks.f32(chosen_avg_logps), _MAX_AVG_LOGP)
    a_l = jnp.minimum(_checks.f32(rejected_avg_logps), _MAX_AVG_LOGP)
    log_odds = (a_w - a_l) - (_log1m_exp(a_w) - _log1m_exp(a_l))
    log_ratio = jax.nn.log_sigmoid(log_odds)
    metrics = preference_metrics(beta * a_w, beta * a_l, a_w, a_l,
                                 extra={"log_odds_ratio": log_ratio, "log_odds_chosen": log_odds})
    return -beta * log_ratio, metrics


def kto_reference_point(mismatched_logps: jax.Array, ref_mismatched_logps: jax.Array) -> jax.Array:
    """KTO's reference point `z0`: a batch estimate of KL(pi || pi_ref), clamped at 0, no gradient.

    `z0 = max(0, mean_i [log pi(y'_i | x_i) - log pi_ref(y'_i | x_i)])` over mismatched pairs
    (each prompt paired with another example's completion, as in the paper).

    Args:
      mismatched_logps: `[B]` summed log-probs of mismatched completions under the policy.
      ref_mismatched_logps: `[B]` same under the reference.

    Returns:
      float32 scalar. Reference: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
      Theoretic Optimization".

    Example:
      >>> float(kto_reference_point(jnp.array([-5.0, -7.0]), jnp.array([-6.0, -7.0])))  # mean(1, 0)
      0.5
      >>> float(kto_reference_point(jnp.array([-5.0]), jnp.array([-4.0])))  # a negative estimate is clamped
      0.0
    """
    fn = "kto_reference_point"
    mismatched_logps, ref_mismatched_logps = _check_pairs(
        fn, floating=("mismatched_logps", "ref_mismatched_logps"),
        mismatched_logps=mismatched_logps, ref_mismatched_logps=ref_mismatched_logps)
    kl = jnp.mean(_checks.f32(mismatched_logps) - _checks.f32(ref_mismatched_logps))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    desirable: jax.Array,
    kl_ref_point: jax.Array | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, Metrics]:
    """Kahneman-Tversky Optimization on unpaired desirable / undesirable examples.

    With `r = log pi(y|x) - log pi_ref(y|x)` and reference point `z0` (no gradient, clamped >= 0):
    `l = lambda_D (1 - sigmoid(beta (r - z0)))` for desirable examples,
    `l = lambda_U (1 - sigmoid(beta (z0 - r)))` for undesirable ones.

    Args:
      logps: `[B]` summed completion log-probs under the policy.
      ref_logps: `[B]` same under the reference.
      desirable: `[B]` bool, True for desirable (thumbs-up) examples.
      kl_ref_point: scalar `z0`, e.g. `kto_reference_point(...)` or a running estimate.
      beta: > 0.
      desirable_weight: `lambda_D >= 0`.
      undesirable_weight: `lambda_U >= 0`; the paper keeps
        `lambda_D n_D / (lambda_U n_U)` in `[1, 4/3]`.

    Returns:
      `(losses, metrics)`: float32 `[B]`; metrics `rewards/chosen`, `rewards/rejected` (means of
      `beta r` over desirable / undesirable examples), `rewards/margins`, `logps/chosen`,
      `logps/rejected`, `count/chosen`, `count/rejected` and `kl` (= z0). A class absent from the
      batch has means of 0 beside its count of 0 (a run's logs leave them out:
      `rlhf_jax.metrics.without_empty_means`).

    Reference: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".

    Example:
      >>> losses, metrics = kto_loss(jnp.array([-5.0, -8.0]), jnp.array([-6.0, -7.0]), jnp.array([True, False]),
      ...                            0.0, beta=1.0)  # r = +1 (desirable), -1 (undesirable)
      >>> [round(v, 4) for v in losses.tolist()], float(metrics["rewards/margins"])  # 1 - sigmoid(1) for both
      ([0.2689, 0.2689], 2.0)
    """
    fn = "kto_loss"
    _checks.check_positive(fn, "beta", beta, finite=True)
    _checks.check_nonnegative(fn, "desirable_weight", desirable_weight)
    _checks.check_nonnegative(fn, "undesirable_weight", undesirable_weight)
    logps, ref_logps, desirable = _check_pairs(fn, floating=("logps", "ref_logps"), logps=logps, ref_logps=ref_logps,
                                               desirable=desirable)
    values = _checks.non_binary_values(desirable)
    if values is not None:
        raise ValueError(f"{fn}: desirable must be bool or 0/1 (True for desirable examples), got values {values}")
    if jnp.ndim(kl_ref_point) != 0:
        raise ValueError(f"{fn}: kl_ref_point must be a scalar, got shape {jnp.shape(kl_ref_point)}")
    z0 = jax.lax.stop_gradient(jnp.maximum(_checks.f32(kl_ref_point), 0.0))
    p = _checks.f32(logps)
    r = p - _checks.f32(ref_logps)
    good = jnp.asarray(desirable).astype(bool)
    losses = jnp.where(
        good,
        desirable_weight * (1 - jax.nn.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - jax.nn.sigmoid(beta * (z0 - r))),
    )
    bad = ~good
    metrics = preference_metrics(beta * r, beta * r, p, p, weights=good, rejected_weights=bad)
    metrics.update({
        "count/chosen": jnp.sum(good.astype(jnp.float32)),
        "count/rejected": jnp.sum(bad.astype(jnp.float32)),
        "kl": z0,
    })
    return losses, metrics
