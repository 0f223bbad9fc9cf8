"""rlhf_jax.losses: golden values (by hand and from float64 NumPy written here), gradients, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax.losses as L


def _jitted(fn):
    """`fn` called under `jax.jit` with its keyword hyperparameters bound: one compile per call
    instead of one per primitive (eager mode), which keeps this file fast on a small CPU."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return jax.jit(functools.partial(fn, **kwargs))(*args)

    return call


aggregate = _jitted(L.aggregate)
bradley_terry_loss = _jitted(L.bradley_terry_loss)
cispo_loss = _jitted(L.cispo_loss)
dpo_loss = _jitted(L.dpo_loss)
entropy_bonus = _jitted(L.entropy_bonus)
kl_divergence = _jitted(L.kl_divergence)
kto_loss = _jitted(L.kto_loss)
kto_reference_point = _jitted(L.kto_reference_point)
orpo_loss = _jitted(L.orpo_loss)
ppo_policy_loss = _jitted(L.ppo_policy_loss)
sft_loss = _jitted(L.sft_loss)
simpo_loss = _jitted(L.simpo_loss)
value_loss = _jitted(L.value_loss)
count_sequences, count_tokens = L.count_sequences, L.count_tokens

RNG = np.random.default_rng(0)
B, T, V = 4, 6, 11


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _np_sigmoid(x):
    return np.exp(_np_log_sigmoid(x))


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _grad_check(f, *args, eps=1e-3):
    """Reverse-mode gradient of `sum(f(*args))` against a central finite difference along a random direction.

    (jax.test_util.check_grads picks its step for float64; these losses compute in float32, where a
    step of 1e-3 balances truncation against rounding.)
    """
    value_and_grad = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a)), argnums=tuple(range(len(args)))))
    loss = lambda *a: float(value_and_grad(*a)[0])  # noqa: E731  (one compile serves values and gradients)
    _, grads = value_and_grad(*args)
    rng = np.random.default_rng(1)
    for i, (x, g) in enumerate(zip(args, grads)):
        u = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        plus = [a + eps * u if j == i else a for j, a in enumerate(args)]
        minus = [a - eps * u if j == i else a for j, a in enumerate(args)]
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(fd, float(jnp.sum(g * u)), rtol=1e-2, atol=1e-2, err_msg=f"argument {i}")


# Per-example preference inputs, away from kinks of hinge/clip terms.
PC = np.array([-10.2, -35.0, -7.7, -22.1])
PR = np.array([-12.9, -30.5, -9.1, -21.0])
RC = np.array([-11.0, -33.3, -8.0, -20.2])
RR = np.array([-11.5, -31.0, -8.6, -22.9])


# --------------------------------------------------------------------------- SFT
def test_sft_loss_matches_numpy_and_ignores_masked_labels():
    logits = RNG.standard_normal((B, T, V)) * 2
    labels = RNG.integers(0, V, (B, T))
    mask = (np.arange(T)[None] < np.array([6, 3, 1, 0])[:, None]).astype(np.float32)
    labels_with_ignore = np.where(mask > 0, labels, -100)
    got = sft_loss(_f32(logits), jnp.asarray(labels_with_ignore), jnp.asarray(mask))
    z = np.asarray(_f32(logits), np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(got, ref, atol=2e-6)
    assert got.dtype == jnp.float32
    _grad_check(lambda z: sft_loss(z, jnp.asarray(labels), jnp.asarray(mask)), _f32(logits))


def test_sft_loss_rejects_out_of_vocab_labels_inside_the_mask():
    # HF-style labels (-100 on the prompt) with the attention mask as `mask` would gather -100: NaN.
    logits, labels = jnp.zeros((1, 3, 4)), jnp.array([[-100, 2, 1]])
    with pytest.raises(ValueError, match=r"sft_loss: labels must be in \[0, 4\) where mask is set, got -100 at "
                                         r"\(0, 0\) \(1 such positions\).*mask = labels != -100"):
        L.sft_loss(logits, labels, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"got 4 at \(0, 2\)"):
        L.sft_loss(logits, jnp.array([[0, 1, 4]]), jnp.ones((1, 3)))
    with pytest.raises(TypeError, match="sft_loss: labels must be an integer array"):
        L.sft_loss(logits, jnp.array([[0.0, 1.0, 2.0]]), jnp.ones((1, 3)))
    # The same labels with the ignored position masked out are fine (and list inputs are checked too).
    np.testing.assert_allclose(L.sft_loss(logits, labels, [[0, 1, 1]]), [[0.0, np.log(4), np.log(4)]], rtol=1e-6)


# --------------------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_hand_computed():
    c, r = _f32([2.0, 0.0]), _f32([1.0, 0.0])
    np.testing.assert_allclose(bradley_terry_loss(c, r), [np.log1p(np.exp(-1.0)), np.log(2.0)], rtol=1e-6)
    # margin 0.5: softplus(-(2 - 1 - 0.5)); centering 0.01 * (2 + 1)^2 = 0.09.
    got = bradley_terry_loss(c, r, margin=_f32([0.5, 0.0]), center_rewards_coefficient=0.01)
    np.testing.assert_allclose(got, [np.log1p(np.exp(-0.5)) + 0.09, np.log(2.0)], rtol=1e-6)
    # d/dc of -log sigmoid(c - r) is -sigmoid(r - c); the centering adds 2 eta (c + r).
    g = jax.grad(lambda c: bradley_terry_loss(c, r, center_rewards_coefficient=0.01).sum())(c)
    np.testing.assert_allclose(g, [-_np_sigmoid(-1.0) + 0.06, -0.5], rtol=1e-5)
    _grad_check(lambda c, r: bradley_terry_loss(c, r, margin=0.3, center_rewards_coefficient=0.1), c, r)


# --------------------------------------------------------------------------- DPO family
def _np_dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    c = pc - (0.0 if rc is None else rc)
    r = pr - (0.0 if rr is None else rr)
    h = c - r
    if loss_type == "sigmoid":
        return -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * _np_log_sigmoid(beta * h) + eps * _np_log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - _np_sigmoid(beta * c) + _np_sigmoid(beta * r)
    if loss_type == "apo_down":
        return _np_sigmoid(beta * c) + 1 - _np_sigmoid(beta * h)
    raise AssertionError(loss_type)


def test_dpo_sigmoid_hand_computed():
    # h = (-1 - -2) - (-3 - -2) = 2, beta h = 1: loss = log(1 + e^-1) = 0.3132617.
    losses, metrics = dpo_loss(_f32([-1.0]), _f32([-3.0]), _f32([-2.0]), _f32([-2.0]), beta=0.5)
    np.testing.assert_allclose(losses, [0.31326169], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 1.0)
    np.testing.assert_allclose(metrics["logps/chosen"], -1.0)
    np.testing.assert_allclose(metrics["logps/rejected"], -3.0)


@pytest.mark.parametrize(
    "loss_type,eps",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),
        ("robust", 0.2),
        ("hinge", 0.0),
        ("ipo", 0.0),
        ("apo_zero", 0.0),
        ("apo_down", 0.0),
    ],
)
def test_dpo_matches_numpy(loss_type, eps):
    beta = 0.3
    inputs = (_f32(PC), _f32(PR), _f32(RC), _f32(RR))
    losses, metrics = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=eps)
    np.testing.assert_allclose(losses, _np_dpo(PC, PR, RC, RR, beta, loss_type, eps), rtol=2e-5, atol=1e-6)
    c_rew, r_rew = beta * (PC - RC), beta * (PR - RR)
    np.testing.assert_allclose(metrics["rewards/chosen"], c_rew.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], r_rew.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracies"], (c_rew > r_rew).mean())
    np.testing.assert_allclose(metrics["rewards/margins"], (c_rew - r_rew).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/chosen"], PC.mean(), rtol=1e-6)
    f = functools.partial(dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps)
    _grad_check(lambda *a: f(*a)[0], _f32(PC), _f32(PR), _f32(RC), _f32(RR))


def test_dpo_reference_free_equals_zero_reference():
    free, m_free = dpo_loss(_f32(PC), _f32(PR), None, None, beta=0.2)
    zero, _ = dpo_loss(_f32(PC), _f32(PR), jnp.zeros(4), jnp.zeros(4), beta=0.2)
    np.testing.assert_array_equal(free, zero)
    np.testing.assert_allclose(free, _np_dpo(PC, PR, None, None, 0.2, "sigmoid"), rtol=1e-5)
    np.testing.assert_allclose(m_free["rewards/chosen"], 0.2 * PC.mean(), rtol=1e-6)


def test_dpo_gradient_direction_and_robust_label_smoothing_identity():
    # sigmoid DPO: dL/d(chosen) = -beta sigmoid(-beta h) < 0, dL/d(rejected) = +beta sigmoid(-beta h).
    g_c, g_r = jax.grad(lambda c, r: dpo_loss(c, r, _f32(RC), _f32(RR), beta=0.3)[0].sum(), (0, 1))(_f32(PC), _f32(PR))
    h = (PC - RC) - (PR - RR)
    np.testing.assert_allclose(g_c, -0.3 * _np_sigmoid(-0.3 * h), rtol=1e-5)
    np.testing.assert_allclose(g_r, 0.3 * _np_sigmoid(-0.3 * h), rtol=1e-5)
    # With eps = 0 robust and conservative DPO both reduce to plain sigmoid DPO.
    for loss_type in ("robust", "sigmoid"):
        a, _ = dpo_loss(_f32(PC), _f32(PR), _f32(RC), _f32(RR), beta=0.3, loss_type=loss_type)
        np.testing.assert_allclose(a, _np_dpo(PC, PR, RC, RR, 0.3, "sigmoid"), rtol=2e-5)


def test_simpo_hand_computed_and_numpy():
    # beta (a_w - a_l) - gamma = 2 * 1 - 0.5 = 1.5: loss = log(1 + e^-1.5) = 0.2014133.
    np.testing.assert_allclose(simpo_loss(_f32([-1.0]), _f32([-2.0])), [0.20141328], rtol=1e-6)
    aw, al = PC / 20, PR / 20
    got = simpo_loss(_f32(aw), _f32(al), beta=2.5, gamma=0.8)
    np.testing.assert_allclose(got, -_np_log_sigmoid(2.5 * (aw - al) - 0.8), rtol=1e-5)
    _grad_check(functools.partial(simpo_loss, beta=2.5, gamma=0.8), _f32(aw), _f32(al))


def test_orpo_matches_numpy():
    aw, al = np.array([-0.3, -1.2, -0.05, -2.0]), np.array([-0.9, -0.4, -0.5, -2.5])
    losses, metrics = orpo_loss(_f32(aw), _f32(al), beta=0.25)
    log_odds = (aw - al) - (np.log1p(-np.exp(aw)) - np.log1p(-np.exp(al)))
    np.testing.assert_allclose(losses, -0.25 * _np_log_sigmoid(log_odds), rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_ratio"], _np_log_sigmoid(log_odds).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.25 * aw.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 0.75)
    _grad_check(lambda a, b: orpo_loss(a, b, beta=0.25)[0], _f32(aw), _f32(al))
    # An average log-prob of exactly 0 (p = 1, e.g. an empty row) stays finite.
    edge, _ = orpo_loss(_f32([0.0]), _f32([-1.0]))
    assert np.isfinite(np.asarray(edge)).all()


def test_kto_matches_numpy_and_reference_point():
    logps, ref = _f32(PC), _f32(RC)
    desirable = jnp.array([True, False, True, False])
    mismatched, ref_mismatched = _f32([-20.0, -25.0, -30.0, -10.0]), _f32([-21.0, -24.0, -31.5, -10.5])
    z0 = kto_reference_point(mismatched, ref_mismatched)
    np.testing.assert_allclose(z0, 0.5, rtol=1e-6)  # mean(1, -1, 1.5, 0.5) = 0.5
    assert float(kto_reference_point(ref_mismatched, mismatched)) == 0.0  # clamped at 0
    losses, metrics = kto_loss(logps, ref, desirable, z0, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    r = PC - RC
    good, bad = 1 - _np_sigmoid(0.2 * (r - 0.5)), 1.5 * (1 - _np_sigmoid(0.2 * (0.5 - r)))
    ref_losses = np.where([True, False, True, False], good, bad)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.2 * r[[0, 2]].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.2 * r[[1, 3]].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["count/chosen"], 2.0)
    np.testing.assert_allclose(metrics["kl"], 0.5, rtol=1e-6)
    # z0 is a constant: no gradient reaches the mismatched log-probs.
    g = jax.grad(lambda m: kto_loss(logps, ref, desirable, kto_reference_point(m, ref_mismatched))[0].sum())(mismatched)
    np.testing.assert_array_equal(g, np.zeros(4))
    _grad_check(lambda lp: kto_loss(lp, ref, desirable, 0.5, undesirable_weight=1.5)[0], logps)


# --------------------------------------------------------------------------- policy losses
def _policy_inputs(adv_rank=1):
    lp = np.log(RNG.uniform(0.05, 0.95, (B, T)))
    old = lp + RNG.normal(0, 0.25, (B, T))
    mask = (np.arange(T)[None] < np.array([6, 4, 2, 5])[:, None]).astype(np.float64)
    adv = RNG.standard_normal((B,) if adv_rank == 1 else (B, T))
    return lp, old, adv, mask


def _np_ppo(lp, old, adv, mask, eps_low, eps_high, dual=None, sequence=False):
    adv = adv[:, None] * np.ones_like(lp) if adv.ndim == 1 else adv
    log_ratio = lp - old
    if sequence:
        seq = (log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1)
        log_ratio = np.repeat(seq[:, None], lp.shape[1], 1)
    ratio = np.exp(log_ratio)
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if dual is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    tok = np.exp(lp - old)
    metrics = {
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/region_mean": mean(low | high),
        "approx_kl": mean(tok - 1 - np.log(tok)),
    }
    return loss * mask, metrics


def test_preference_metrics_weighted_paired_and_unpaired_by_hand():
    """The one reducer of TRL's DPO-family metrics, with the weights and global counts the steps pass."""
    c, r = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 3.0, jnp.nan])  # a NaN where the weight is 0 stays out
    lc, lr = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-4.0, -5.0, -6.0])
    w = jnp.array([1.0, 1.0, 0.0])
    m = L.preference_metrics(c, r, lc, lr, weights=w, count=4.0, extra={"x": jnp.array([2.0, 2.0, 100.0])})
    want = {"rewards/chosen": 3 / 4, "rewards/rejected": 3 / 4, "rewards/accuracies": 1 / 4,
            "rewards/margins": 0.0, "logps/chosen": -3 / 4, "logps/rejected": -9 / 4, "x": 1.0}
    assert set(m) == set(want)
    for key, value in want.items():
        assert float(m[key]) == pytest.approx(value, abs=1e-7), key
    # Unpaired (KTO): desirable and undesirable means over their own subsets; no accuracies.
    rewards, logps = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([-1.0, -2.0, -3.0, -4.0])
    good = jnp.array([True, False, True, False])
    u = L.preference_metrics(rewards, rewards, logps, logps, weights=good, rejected_weights=~good)
    assert "rewards/accuracies" not in u
    assert [float(u[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                  "logps/rejected")] == [2.0, 3.0, -1.0, -2.0, -3.0]
    assert float(L.preference_metrics(rewards, rewards, logps, logps, weights=good, count=4.0,
                                      rejected_weights=~good, rejected_count=1.0)["rewards/margins"]) == 1.0 - 6.0
    # No weights: plain batch means, as dpo_loss reports them.
    _, dpo = L.dpo_loss(lc, lr, None, None, beta=0.5)
    assert float(dpo["rewards/margins"]) == pytest.approx(0.5 * 9 / 3)


def test_ppo_hand_computed_clip_and_dual_clip():
    lp = _f32([[np.log(5.0), np.log(1.5), np.log(0.5), 0.0]])
    old = jnp.zeros((1, 4))
    mask = jnp.ones((1, 4))
    adv = _f32([[-1.0, 2.0, -1.0, 1.0]])
    loss, m = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    # ratio 5, A=-1: max(5, 1.2) = 5 | ratio 1.5, A=2: max(-3, -2.4) = -2.4 | ratio .5, A=-1: max(.5, .8) = .8 | 0 - 1
    np.testing.assert_allclose(loss, [[5.0, -2.4, 0.8, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(m["clip_ratio/high_mean"], 0.25)  # token 2 (ratio 1.5 > 1.2, A > 0)
    np.testing.assert_allclose(m["clip_ratio/low_mean"], 0.25)  # token 3 (ratio .5 < .8, A < 0)
    np.testing.assert_allclose(m["clip_ratio/region_mean"], 0.5)
    loss_dual, m_dual = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    np.testing.assert_allclose(loss_dual, [[3.0, -2.4, 0.8, -1.0]], rtol=1e-6)  # min(5, 3 * 1) = 3
    np.testing.assert_allclose(m_dual["clip_ratio/dual_mean"], 0.25)
    # clip-higher: with eps_high = 0.6 the ratio 1.5 is inside the region: -2 * 1.5 = -3.
    loss_high, _ = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    np.testing.assert_allclose(loss_high[0, 1], -3.0, rtol=1e-6)


@pytest.mark.parametrize("adv_rank,eps_high,dual", [(1, None, None), (2, 0.28, None), (2, None, 2.0)])
def test_ppo_token_matches_numpy(adv_rank, eps_high, dual):
    lp, old, adv, mask = _policy_inputs(adv_rank)
    kw = {"clip_eps": 0.2, "clip_eps_high": eps_high, "dual_clip": dual}
    loss, metrics = ppo_policy_loss(_f32(lp), _f32(old), _f32(adv), _f32(mask), **kw)
    ref, ref_metrics = _np_ppo(lp, old, adv, mask, 0.2, 0.2 if eps_high is None else eps_high, dual)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    f = functools.partial(ppo_policy_loss, clip_eps=0.2, clip_eps_high=eps_high, dual_clip=dual)
    _grad_check(lambda x: f(x, _f32(old), _f32(adv), _f32(mask))[0], _f32(lp))


def test_gspo_value_and_gradient_equal_the_sequence_objective():
    lp, old, adv, mask = _policy_inputs(1)
    old = lp + RNG.normal(0, 0.05, (B, T))  # sequence ratios inside and outside [1 - eps, 1 + eps]
    loss, _ = ppo_policy_loss(_f32(lp), _f32(old), _f32(adv), _f32(mask), clip_eps=0.01, ratio_level="sequence")
    ref, _ = _np_ppo(lp, old, adv, mask, 0.01, 0.01, sequence=True)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)

    def token_form(x):
        per_token, _ = ppo_policy_loss(x, _f32(old), _f32(adv), _f32(mask), clip_eps=0.01, ratio_level="sequence")
        return aggregate(per_token, _f32(mask), mode="seq_mean_token_mean")

    def paper_form(x):  # GSPO eq. (5): mean_i min(s_i A_i, clip(s_i) A_i), s_i from length-normalised log-ratios
        m = _f32(mask)
        s = jnp.exp(jnp.sum((x - _f32(old)) * m, 1) / jnp.sum(m, 1))
        a = _f32(adv)
        return jnp.mean(jnp.maximum(-a * s, -a * jnp.clip(s, 0.99, 1.01)))

    np.testing.assert_allclose(token_form(_f32(lp)), paper_form(_f32(lp)), rtol=1e-5)
    g_token, g_paper = jax.grad(token_form)(_f32(lp)), jax.grad(paper_form)(_f32(lp))
    np.testing.assert_allclose(g_token, g_paper, rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(g_paper)).max() > 0


def test_cispo_value_gradient_and_metrics():
    lp, old, adv, mask = _policy_inputs(2)
    cispo = functools.partial(L.cispo_loss, clip_eps_high=0.1, clip_eps_low=0.1)
    loss, metrics = jax.jit(cispo)(_f32(lp), _f32(old), _f32(adv), _f32(mask))
    ratio = np.exp(lp - old)
    weight = np.clip(ratio, 0.9, 1.1)
    np.testing.assert_allclose(loss, -weight * adv * lp * mask, rtol=1e-5, atol=1e-6)
    # The weight is a constant: dL/dlogp = -clip(ratio) A, even for clipped tokens (unlike PPO).
    g = jax.jit(jax.grad(lambda x: cispo(x, _f32(old), _f32(adv), _f32(mask))[0].sum()))(_f32(lp))
    np.testing.assert_allclose(g, -weight * adv * mask, rtol=1e-5, atol=1e-7)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    np.testing.assert_allclose(metrics["clip_ratio/high_mean"], mean(ratio > 1.1), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/low_mean"], mean(ratio < 0.9), rtol=1e-6)
    # No lower bound by default: a tiny ratio keeps its tiny weight.
    loss_nolow, m = cispo_loss(_f32([[np.log(0.1)]]), jnp.zeros((1, 1)), _f32([1.0]), jnp.ones((1, 1)))
    np.testing.assert_allclose(loss_nolow, [[-0.1 * np.log(0.1)]], rtol=1e-5)
    np.testing.assert_allclose(m["clip_ratio/low_mean"], 0.0)


def test_value_loss_hand_computed_and_numpy():
    v, old, ret = _f32([[1.5, 0.5]]), _f32([[1.0, 0.6]]), _f32([[2.0, 0.0]])
    # token 0: unclipped (1.5 - 2)^2 = .25, clipped v = 1.2: (1.2 - 2)^2 = .64 -> .5 * .64 = .32
    # token 1: v - old = -.1 is inside the range: .5 * .25 = .125
    got = value_loss(v, old, ret, jnp.ones((1, 2)), clip_range=0.2)
    np.testing.assert_allclose(got, [[0.32, 0.125]], rtol=1e-6)
    np.testing.assert_allclose(value_loss(v, old, ret, jnp.ones((1, 2)), clip_range=None), [[0.125, 0.125]], rtol=1e-6)
    vals, olds, rets = RNG.standard_normal((3, B, T))
    mask = np.ones((B, T))
    mask[1, 3:] = 0
    ref = 0.5 * np.maximum((vals - rets) ** 2, (olds + np.clip(vals - olds, -0.3, 0.3) - rets) ** 2) * mask
    got = value_loss(_f32(vals), _f32(olds), _f32(rets), _f32(mask), clip_range=0.3)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    _grad_check(lambda x: value_loss(x, _f32(olds), _f32(rets), _f32(mask), clip_range=0.3), _f32(vals))


# --------------------------------------------------------------------------- KL and entropy
def test_kl_estimators_match_numpy_and_are_exactly_zero_on_equal_inputs():
    lp, ref = np.log(RNG.uniform(0.01, 1, (B, T))), np.log(RNG.uniform(0.01, 1, (B, T)))
    d = lp - ref
    expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}
    for name, value in expected.items():
        np.testing.assert_allclose(kl_divergence(_f32(lp), _f32(ref), estimator=name), value, rtol=1e-5, atol=1e-6)
        same = kl_divergence(_f32(lp), _f32(lp), estimator=name)
        assert np.all(np.asarray(same) == 0.0), name
        _grad_check(lambda x: kl_divergence(x, _f32(ref), estimator=name), _f32(lp))
    clamped = kl_divergence(_f32([[5.0, -5.0]]), jnp.zeros((1, 2)), estimator="k1", clamp=1.0)
    np.testing.assert_array_equal(clamped, [[1.0, -1.0]])
    # k3 on an extreme log-ratio stays finite.
    assert np.isfinite(np.asarray(kl_divergence(_f32([[-200.0]]), _f32([[0.0]]), estimator="k3"))).all()


def test_kl_estimators_expectations_and_gradients_against_exact_kl():
    # Oracle independent of the code: two small categoricals pi = softmax(theta), pi_ref, and
    # y ~ pi. Unbiasedness: E[k1] = E[k3] = KL(pi || pi_ref), exactly and by Monte Carlo. As losses
    # on fixed samples: E[grad k1] = 0, E[grad k2] = grad KL(pi || pi_ref) (Schulman's note),
    # E[grad k3] = grad KL(pi_ref || pi).
    theta = _f32([0.3, -1.2, 0.8, 0.0, -0.4])
    ref = jax.nn.log_softmax(_f32([-0.5, 0.4, 0.2, -1.0, 0.9]))
    lp = jax.nn.log_softmax(theta)
    p, q = np.exp(np.asarray(lp, np.float64)), np.exp(np.asarray(ref, np.float64))
    kl = float(np.sum(p * np.log(p / q)))
    for name in ("k1", "k3"):
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(lp) * kl_divergence(lp, ref, estimator=name))), kl, rtol=1e-5)
        y = jax.random.categorical(jax.random.PRNGKey(0), lp, shape=(200_000,))
        samples = np.asarray(kl_divergence(lp[y], ref[y], estimator=name))
        assert abs(samples.mean() - kl) < 4 * samples.std() / np.sqrt(samples.size), name

    def expected_grad(name):
        def f(t):
            logp = jax.nn.log_softmax(t)
            return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * L.kl_divergence(logp, ref, estimator=name))
        return np.asarray(jax.grad(f)(theta))

    forward = jax.grad(lambda t: jnp.sum(jnp.exp(jax.nn.log_softmax(t)) * (jax.nn.log_softmax(t) - ref)))(theta)
    reverse = jax.grad(lambda t: jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(t))))(theta)
    np.testing.assert_allclose(expected_grad("k1"), 0.0, atol=1e-6)
    np.testing.assert_allclose(expected_grad("k2"), forward, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected_grad("k3"), reverse, rtol=1e-5, atol=1e-6)


def test_entropy_bonus_is_negative_masked_entropy():
    logits = RNG.standard_normal((B, T, V))
    mask = np.ones((B, T))
    mask[2] = 0
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ref = (np.exp(logp) * logp).sum(-1) * mask
    np.testing.assert_allclose(entropy_bonus(_f32(logits), _f32(mask)), ref, rtol=1e-5, atol=1e-6)
    _grad_check(lambda x: entropy_bonus(x, _f32(mask)), _f32(logits))


# --------------------------------------------------------------------------- aggregate
def _np_aggregate(x, m, mode, max_len=None):
    n = m.sum(1)
    rows = n > 0
    if mode == "token_mean":
        return (x * m).sum() / m.sum()
    if mode == "seq_mean_token_mean":
        return ((x * m).sum(1)[rows] / n[rows]).mean()
    if mode == "seq_mean_token_sum":
        return (x * m).sum(1)[rows].mean()
    return (x * m).sum(1)[rows].mean() / (max_len or x.shape[1])


MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def test_aggregate_matches_numpy_and_hand_example():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    m = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.float64)
    hand = {
        "token_mean": 10 / 4,  # four valid tokens: 1 + 2 + 3 + 4
        "seq_mean_token_mean": (2 + 4) / 2,  # the empty row is not a sequence
        "seq_mean_token_sum": (6 + 4) / 2,
        "seq_mean_token_sum_norm": (6 + 4) / 2 / 3,  # L defaults to T = 3
    }
    for mode, value in hand.items():
        np.testing.assert_allclose(aggregate(_f32(x), _f32(m), mode=mode), value, rtol=1e-6)
    dr_grpo = aggregate(_f32(x), _f32(m), mode="seq_mean_token_sum_norm", max_len=10)
    np.testing.assert_allclose(dr_grpo, 10 / 2 / 10, rtol=1e-6)
    xs, ms = RNG.standard_normal((8, 5)), (RNG.uniform(size=(8, 5)) > 0.4).astype(np.float64)
    for mode in MODES:
        np.testing.assert_allclose(aggregate(_f32(xs), _f32(ms), mode=mode), _np_aggregate(xs, ms, mode), rtol=1e-5)
    # An empty batch gives 0, never NaN.
    for mode in MODES:
        assert float(aggregate(jnp.ones((2, 3)), jnp.zeros((2, 3)), mode=mode)) == 0.0


def test_aggregate_micro_batches_sum_to_full_batch():
    x = _f32(RNG.standard_normal((16, 7)))
    lengths = RNG.integers(0, 8, 16)
    m = _f32(np.arange(7)[None] < lengths[:, None])
    assert (lengths == 0).any()  # empty rows are part of the test

    def full(mode, y):
        return L.aggregate(y, m, mode=mode)

    def parts(mode, y):  # 4 micro-batches normalised by the global count, summed
        kwargs = {"num_tokens": count_tokens(m)} if mode == "token_mean" else {"num_sequences": count_sequences(m)}
        return sum(L.aggregate(y[i : i + 4], m[i : i + 4], mode=mode, **kwargs) for i in range(0, 16, 4))

    @functools.partial(jax.jit, static_argnums=0)
    def values_and_grads(mode, y):
        return tuple(jax.value_and_grad(functools.partial(f, mode))(y) for f in (full, parts))

    for mode in MODES:
        (v_full, g_full), (v_parts, g_parts) = values_and_grads(mode, x)
        np.testing.assert_allclose(v_parts, v_full, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(g_parts, g_full, atol=1e-7, err_msg=mode)  # gradients accumulate the same way


# --------------------------------------------------------------------------- bad input
def _raises(match, f, *args, **kwargs):
    with pytest.raises((ValueError, TypeError), match=match):
        f(*args, **kwargs)
    # The same check fires at trace time under jit.
    with pytest.raises((ValueError, TypeError), match=match):
        jax.jit(lambda *a: f(*a, **kwargs))(*args)


def test_bad_input_names_the_argument():
    b4, b3 = jnp.zeros(4), jnp.zeros(3)
    bt, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
    _raises("loss_type", L.dpo_loss, b4, b4, b4, b4, loss_type="nope")
    _raises("beta", L.dpo_loss, b4, b4, b4, b4, beta=0.0)
    _raises("beta", L.dpo_loss, b4, b4, b4, b4, beta=-1.0)
    _raises("label_smoothing", L.dpo_loss, b4, b4, b4, b4, loss_type="hinge", label_smoothing=0.1)
    _raises("label_smoothing", L.dpo_loss, b4, b4, b4, b4, loss_type="robust", label_smoothing=0.5)
    _raises(r"rejected_logps\[3\]", L.dpo_loss, b4, b3, b4, b4)
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps"):
        L.dpo_loss(b4, b4, b4, None)
    _raises("beta", L.simpo_loss, b4, b4, beta=0.0)
    _raises("beta", L.orpo_loss, b4, b4, beta=-0.1)
    _raises("beta", L.kto_loss, b4, b4, b4 > 0, 0.0, beta=0.0)
    _raises("kl_ref_point", L.kto_loss, b4, b4, b4 > 0, b4)
    _raises("rejected_rewards", L.bradley_terry_loss, b4, b3)
    _raises("margin", L.bradley_terry_loss, b4, b4, margin=b3)
    _raises("ratio_level", L.ppo_policy_loss, bt, bt, bt, mask, ratio_level="seq")
    _raises("advantages", L.ppo_policy_loss, bt, bt, jnp.zeros(3), mask)
    _raises("old_logps", L.ppo_policy_loss, bt, jnp.zeros((2, 4)), bt, mask)
    _raises("clip_eps", L.ppo_policy_loss, bt, bt, bt, mask, clip_eps=0.0)
    _raises("dual_clip", L.ppo_policy_loss, bt, bt, bt, mask, dual_clip=1.0)
    _raises("clip_eps_high", L.cispo_loss, bt, bt, bt, mask, clip_eps_high=0.0)
    _raises("clip_range", L.value_loss, bt, bt, bt, mask, clip_range=-0.2)
    _raises("returns", L.value_loss, bt, bt, jnp.zeros((2, 4)), mask)
    _raises("estimator", L.kl_divergence, bt, bt, estimator="k4")
    _raises("clamp", L.kl_divergence, bt, bt, clamp=0.0)
    _raises("mode", L.aggregate, bt, mask, mode="sum")
    _raises("mask", L.aggregate, bt, jnp.ones((2, 4)))
    _raises("num_tokens", L.aggregate, bt, mask, mode="seq_mean_token_mean", num_tokens=3.0)
    _raises("max_len", L.aggregate, bt, mask, mode="token_mean", max_len=3)
    _raises("mask", L.sft_loss, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
    _raises("mask", L.entropy_bonus, jnp.zeros((2, 3, 5)), jnp.ones((2, 4)))


# --- input validation (API audit): concrete-array hyperparameters, shapes, dtypes, empty batches ---

_A, _B = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -11.0])
_LP, _M, _ADV = -jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.array([1.0, -1.0])


@pytest.mark.parametrize("call, match", [
    (lambda: L.dpo_loss(_A, _B, _A + 1, _B + 1, beta=jnp.array(-0.1)), "beta must be a finite number > 0"),
    (lambda: L.dpo_loss(_A, _B, _A + 1, _B + 1, loss_type="robust", label_smoothing=jnp.array(0.5)),
     "label_smoothing must be in"),
    (lambda: L.ppo_policy_loss(_LP, _LP, _ADV, _M, clip_eps=jnp.array(-0.2)), "clip_eps must be in"),
    (lambda: L.aggregate(_LP, _M, num_tokens=jnp.array(0.0)), "num_tokens must be > 0"),
    (lambda: L.aggregate(_LP, _M, num_tokens=jnp.array([1.0, 2.0])), r"num_tokens must be a scalar .*\(2,\)"),
    (lambda: L.dpo_loss(_A, _B, None, None, beta=jnp.array([0.1, 0.2, 0.3])), r"beta must be a scalar .*\(3,\)"),
    (lambda: L.simpo_loss(_A, _B, gamma=jnp.ones(2)), "gamma must be a scalar"),
])
def test_array_hyperparameters_are_checked_like_numbers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, name", [
    (lambda: L.dpo_loss(_A, _B, None, None, beta=True), "beta"),
    (lambda: L.dpo_loss(_A, _B, None, None, beta=np.bool_(True)), "beta"),
    (lambda: L.ppo_policy_loss(_LP, _LP, _ADV, _M, clip_eps=jnp.array(True)), "clip_eps"),
    (lambda: L.kl_divergence(_LP, _LP, clamp=True), "clamp"),
])
def test_a_bool_hyperparameter_is_refused_not_read_as_one(call, name):
    # beta=True once gave the loss at beta 1.0 without a word
    with pytest.raises(TypeError, match=f"{name} must be a real number, got True \\(a bool\\)"):
        call()


def test_traced_hyperparameters_still_work_under_jit():
    got = jax.jit(lambda beta: L.dpo_loss(_A, _B, None, None, beta=beta)[0])(0.1)
    np.testing.assert_allclose(got, L.dpo_loss(_A, _B, None, None, beta=0.1)[0], rtol=1e-6)
    assert float(jax.jit(lambda n: L.aggregate(_LP, _M, num_tokens=n))(6.0)) == -1.0
    with pytest.raises(ValueError, match="beta must be a scalar"):  # shapes are checked even when traced
        jax.jit(lambda beta: L.dpo_loss(_A, _B, None, None, beta=beta)[0])(jnp.ones(2))
    # a concrete ndim-0 array that is in range is accepted
    np.testing.assert_allclose(L.dpo_loss(_A, _B, None, None, beta=jnp.array(0.1))[0],
                               L.dpo_loss(_A, _B, None, None, beta=0.1)[0])


@pytest.mark.parametrize("kwargs", [
    dict(chosen_rewards=_A, rejected_rewards=_B[:, None], chosen_logps=_A, rejected_logps=_B),
    dict(chosen_rewards=_A, rejected_rewards=_B, chosen_logps=_A, rejected_logps=_B, weights=jnp.ones((2, 1))),
    dict(chosen_rewards=_A, rejected_rewards=_B, chosen_logps=_A, rejected_logps=_B, weights=jnp.ones(3)),
    dict(chosen_rewards=_A, rejected_rewards=_B, chosen_logps=_A, rejected_logps=_B, extra={"x": jnp.ones((2, 2))}),
])
def test_preference_metrics_checks_shapes(kwargs):
    with pytest.raises(ValueError, match="preference_metrics: shapes must match"):
        L.preference_metrics(**kwargs)


@pytest.mark.parametrize("call, name", [
    (lambda: L.ppo_policy_loss(jnp.ones((2, 3), int), jnp.ones((2, 3), int), _ADV, _M), "logps"),
    (lambda: L.kl_divergence(jnp.array([1, 2]), jnp.array([0, 0])), "logps"),
    (lambda: L.dpo_loss(jnp.array([1, 2]), jnp.array([3, 4]), None, None), "chosen_logps"),
    (lambda: L.value_loss(jnp.ones((2, 3), int), _LP, _LP, _M), "values"),
])
def test_integer_logprobs_and_values_are_rejected(call, name):
    with pytest.raises(TypeError, match=f"{name} must be floating point"):
        call()


def test_non_binary_masks_are_refused_by_losses_that_mask_and_weight_once_in_aggregate():
    # A loss zeroes masked tokens by multiplying by its mask and aggregate weights by it again: a
    # 0.5 weight used to count as 0.25 (ppo + aggregate gave -0.833 for a weighted mean of -1).
    lp, z = _f32([[-1.0, -2.0]]), jnp.zeros((1, 2))
    weights = _f32([[0.5, 1.0]])
    calls = {
        "ppo_policy_loss": lambda m: L.ppo_policy_loss(lp, lp, _f32([1.0]), m),
        "cispo_loss": lambda m: L.cispo_loss(lp, lp, _f32([1.0]), m),
        "value_loss": lambda m: L.value_loss(lp, lp, z, m),
        "sft_loss": lambda m: L.sft_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), m),
        "entropy_bonus": lambda m: L.entropy_bonus(jnp.zeros((1, 2, 3)), m),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name}: mask must be bool or 0/1, got values \[0.5\]; per-token "
                                             r"weights would count twice"):
            call(weights)
        call(jnp.array([[True, False]]))  # bool, int and float 0/1 masks are fine
        call(jnp.array([[1, 0]]))
    loss, _ = L.ppo_policy_loss(lp, lp, _f32([1.0]), jnp.ones((1, 2)))  # ratio 1: loss -A = -1 per token
    np.testing.assert_allclose(L.aggregate(loss, weights), -1.0, rtol=1e-6)
    np.testing.assert_allclose(L.aggregate(_f32([[1.0, 4.0]]), weights), (0.5 + 4.0) / 1.5, rtol=1e-6)


def test_empty_batches_raise_except_aggregate():
    with pytest.raises(ValueError, match="dpo_loss: chosen_logps is an empty batch"):
        L.dpo_loss(jnp.zeros(0), jnp.zeros(0), None, None)
    with pytest.raises(ValueError, match="kto_reference_point: .* empty batch"):
        L.kto_reference_point(jnp.zeros(0), jnp.zeros(0))
    assert float(L.aggregate(jnp.zeros((0, 3)), jnp.zeros((0, 3)))) == 0.0  # documented: 0


def test_count_sequences_needs_rank_2_and_entropy_bonus_takes_lists():
    with pytest.raises(ValueError, match="count_sequences: mask must have rank 2"):
        L.count_sequences(jnp.ones(3))
    out = L.entropy_bonus(jnp.zeros((2, 3, 4)), [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(out, [[-np.log(4)] * 3, [-np.log(4)] * 2 + [0.0]], rtol=1e-6)


# --- notebook-user audit: k3 beyond its overflow guard, nested lists, finite beta, binary KTO labels ---

def _np_verl_low_var_kl(logp, ref):
    """verl's `low_var_kl` penalty, from its formula: `kl = clip(ref - logp, -20, 20)`, `clip(e^kl - kl - 1, -10, 10)`."""
    kl = np.clip(np.asarray(ref, np.float64) - np.asarray(logp, np.float64), -20.0, 20.0)
    return np.clip(np.exp(kl) - kl - 1.0, -10.0, 10.0)


def test_k3_is_exact_above_its_overflow_guard_and_clamped_k3_is_verls_low_var_kl():
    # d = log pi - log pi_ref. k3 = e^-d - 1 + d and its gradient in log pi is 1 - e^-d (TRL's unclamped GRPO
    # penalty). d was clipped to [-20, 20]: at d = 39 k3 read 19.0 with gradient 0, so the penalty let go of the
    # tokens where the policy had drifted furthest from the reference. Only d < -20 (where e^-d overflows) is guarded.
    lp, ref = _f32([-1.0, -40.0, -2.0, -1.0]), _f32([-40.0, -1.0, -3.0, -26.0])  # d = 39, -39, 1, 25
    k3 = lambda x: L.kl_divergence(x, ref, estimator="k3")  # noqa: E731
    value, grad = jax.jit(lambda x: (k3(x), jax.grad(lambda y: jnp.sum(k3(y)))(x)))(lp)
    np.testing.assert_allclose(value, [38.0, np.exp(20.0) - 21.0, np.exp(-1.0), 24.0], rtol=1e-6)
    np.testing.assert_allclose(grad, [1.0, 0.0, 1.0 - np.exp(-1.0), 1.0], rtol=1e-6)
    # With clamp=10 it is verl's low_var_kl, values and (zero where clamped) gradients, on both sides of +-20.
    d = np.array([-45.0, -21.0, -20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 11.5, 19.0, 25.0, 45.0])
    ref = np.full_like(d, -30.0)
    low_var = jax.jit(lambda x, r: L.kl_divergence(x, r, estimator="k3", clamp=10.0))
    np.testing.assert_allclose(low_var(_f32(ref + d), _f32(ref)), _np_verl_low_var_kl(ref + d, ref), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(low_var(x, _f32(ref))))(_f32(ref + d))
    inside = np.abs(np.exp(-d) - 1 + d) < 10
    np.testing.assert_allclose(g, np.where(inside, 1 - np.exp(-d), 0.0), rtol=1e-5, atol=1e-6)


def test_losses_take_nested_lists_like_arrays():
    # A notebook passes Python lists: the preference losses, kl_divergence and value_loss used to fail in their
    # dtype check with "Cannot determine dtype of [-10.0, -12.0]". (Each call is traced with the lists as
    # constants: one compile instead of one per primitive.)
    pc, pr, rc, rr = [-10.0, -12.0], [-12.0, -11.0], [-11.0, -11.5], [-11.0, -10.0]

    @jax.jit
    def outputs():
        dpo, dpo_metrics = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
        kto, kto_metrics = L.kto_loss([-5.0, -8.0], [-6.0, -7.0], [1, 0], 0.0, beta=1.0)
        return dict(dpo=dpo, margins=dpo_metrics["rewards/margins"], ipo=L.dpo_loss(pc, pr, rc, rr, loss_type="ipo")[0],
                    simpo=L.simpo_loss([-1.0], [-1.5], beta=2.0, gamma=0.5), orpo=L.orpo_loss([-0.5], [-1.0])[0],
                    kto=kto, kto_margins=kto_metrics["rewards/margins"],
                    z0=L.kto_reference_point([-5.0, -7.0], [-6.0, -7.0]),
                    k3=L.kl_divergence([0.0, -1.0], [-1.0, -1.0], estimator="k3"),
                    value=L.value_loss([[0.5, 2.0]], [[0.0, 2.0]], [[1.0, 1.0]], [[1, 1]]))

    got = outputs()
    # h = (1, -0.5) - (-1, -1) = (2, 0.5)
    np.testing.assert_allclose(got["dpo"], -_np_log_sigmoid([1.0, 0.25]), rtol=1e-6)  # -log sigmoid(0.5 h)
    np.testing.assert_allclose(got["margins"], 0.5 * 1.25, rtol=1e-6)
    np.testing.assert_allclose(got["ipo"], (np.array([2.0, 0.5]) - 1 / 0.2) ** 2, rtol=1e-6)  # (h - 1/(2 beta))^2
    np.testing.assert_allclose(got["simpo"], [0.47407698], rtol=1e-6)
    np.testing.assert_allclose(got["orpo"], [0.03203], atol=1e-5)
    np.testing.assert_allclose(got["kto"], [1 - _np_sigmoid(1.0)] * 2, rtol=1e-6)
    assert float(got["kto_margins"]) == 2.0 and float(got["z0"]) == 0.5
    np.testing.assert_allclose(got["k3"], [np.exp(-1.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["value"], [[0.32, 0.5]], rtol=1e-6)
    with pytest.raises(TypeError, match="dpo_loss: chosen_logps must be floating point, got dtype int32"):
        L.dpo_loss([-10, -12], [-12, -11], None, None)


@pytest.mark.parametrize("call", [
    lambda beta: L.dpo_loss(_A, _B, _A + 1, _B + 1, beta=beta),
    lambda beta: L.dpo_loss(_A, _B, None, None, loss_type="ipo", beta=beta),
    lambda beta: L.simpo_loss(_A / 10, _B / 10, beta=beta),
    lambda beta: L.orpo_loss(_A / 10, _B / 10, beta=beta),
    lambda beta: L.kto_loss(_A, _B, jnp.array([True, False]), 0.0, beta=beta),
])
def test_preference_beta_must_be_finite(call):
    # beta = inf passed the `> 0` check and gave NaN losses (inf * 0 at a zero margin, inf - inf).
    for beta in (float("inf"), jnp.array(float("inf"))):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            call(beta)


def test_kto_desirable_must_be_binary_and_bradley_terry_needs_a_batch():
    # `desirable` was cast to bool: a 0.5 (a soft label, or a weight passed in the wrong place) counted as desirable.
    with pytest.raises(ValueError, match=r"kto_loss: desirable must be bool or 0/1 .*got values \[0.5\]"):
        L.kto_loss(_A, _B, jnp.array([0.5, 0.0]), 0.0)
    with pytest.raises(ValueError, match=r"kto_loss: desirable must be bool or 0/1 .*got values \[2.0\]"):
        L.kto_loss(_A, _B, [2, 0], 0.0)
    # An empty batch returned an empty array (its mean NaN) where every other per-example loss raises.
    with pytest.raises(ValueError, match="bradley_terry_loss: chosen_rewards is an empty batch"):
        L.bradley_terry_loss(jnp.zeros(0), jnp.zeros(0))


def test_process_reward_loss_is_exactly_zero_off_step_ends_even_for_non_finite_logits():
    # `m * (softplus(s) - y s)` gave NaN off step ends for an inf / NaN logit there (0 * inf), or an ignored
    # label such as -100 with an inf logit; the docstring promises zero.
    from rlhf_jax.losses.process_reward import process_reward_loss

    s = _f32([[jnp.inf, jnp.nan, 2.0, -jnp.inf]])
    y, m = jnp.array([[-100, 1, 1, 0]]), jnp.array([[0, 0, 1, 0]])
    loss = np.asarray(jax.jit(process_reward_loss)(s, y, m))
    np.testing.assert_array_equal(loss[0, [0, 1, 3]], 0.0)
    np.testing.assert_allclose(loss[0, 2], np.log1p(np.exp(-2.0)), rtol=1e-6)
