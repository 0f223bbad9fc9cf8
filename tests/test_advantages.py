"""rlhf_jax.advantages and rlhf_jax.kl_control: hand-computed goldens, NumPy references, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.advantages import (
    adaptive_kl_controller,
    discounted_returns,
    fixed_kl_controller,
    gae,
    group_normalized,
    leave_one_out,
    per_token_rewards,
    reinforce_plus_plus,
    whiten,
)
from rlhf_jax.kl_control import KLControllerState

RNG = np.random.default_rng(0)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def test_gae_hand_computed_four_steps():
    # gamma = 0.9, lam = 0.8, reward 1 at the last step, V = [.5, .6, .7, .8]:
    # d3 = 1 - .8 = .2                 A3 = .2
    # d2 = .9 * .8 - .7 = .02          A2 = .02 + .72 * .2     = .164
    # d1 = .9 * .7 - .6 = .03          A1 = .03 + .72 * .164   = .14808
    # d0 = .9 * .6 - .5 = .04          A0 = .04 + .72 * .14808 = .1466176
    rewards, values = _f32([[0, 0, 0, 1]]), _f32([[0.5, 0.6, 0.7, 0.8]])
    adv, ret = jax.jit(lambda r, v, m: gae(r, v, m, gamma=0.9, lam=0.8))(rewards, values, jnp.ones((1, 4)))
    np.testing.assert_allclose(adv, [[0.1466176, 0.14808, 0.164, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.6466176, 0.74808, 0.864, 1.0]], rtol=1e-6)
    assert adv.dtype == ret.dtype == jnp.float32


def _np_gae(rewards, values, mask, gamma, lam):
    """Loop over the valid positions of each row only (masked positions are skipped)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        next_v, next_a = 0.0, 0.0
        for t in idx[::-1]:
            next_a = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * next_a
            next_v = values[b, t]
            adv[b, t] = next_a
    return adv, (adv + values) * mask


def test_gae_matches_numpy_with_padding_and_holes():
    rewards, values = RNG.standard_normal((2, 4, 7))
    mask = np.ones((4, 7))
    mask[0, 5:] = 0  # right padding
    mask[1, 2:4] = 0  # a hole (e.g. tool output) inside the completion
    mask[2, :] = 0  # empty row
    adv, ret = gae(_f32(rewards), _f32(values), _f32(mask), gamma=0.95, lam=0.9)
    ref_adv, ref_ret = _np_gae(rewards, values, mask, 0.95, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)
    # lam = 1, gamma = 1: advantages are reward-to-go minus the value.
    adv1, _ = gae(_f32(rewards), _f32(values), _f32(mask), gamma=1.0, lam=1.0)
    to_go = np.where(mask > 0, np.cumsum((rewards * mask)[:, ::-1], 1)[:, ::-1], 0)
    np.testing.assert_allclose(adv1, (to_go - values) * mask, rtol=1e-5, atol=1e-5)


def test_discounted_returns_hand_computed():
    rewards, mask = _f32([[1.0, 0.0, 2.0, 5.0]]), _f32([[1, 1, 1, 0]])
    # G2 = 2, G1 = 0 + .5 * 2 = 1, G0 = 1 + .5 * 1 = 1.5; the padded reward 5 is ignored.
    np.testing.assert_allclose(discounted_returns(rewards, mask, gamma=0.5), [[1.5, 1.0, 2.0, 0.0]])


def _np_group(r, g, scale, eps):
    x = r.reshape(-1, g)
    centered = x - x.mean(1, keepdims=True)
    if scale == "group":
        centered = centered / (x.std(1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std(ddof=1) + eps)
    return centered.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_normalized_matches_numpy(scale):
    r = RNG.uniform(0, 1, 12)
    got = group_normalized(_f32(r), 4, scale=scale)
    np.testing.assert_allclose(got, _np_group(r, 4, scale, 1e-4), rtol=1e-5, atol=1e-6)


def test_group_normalized_hand_computed_and_identical_rewards():
    # Group [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3), so A = +-.5 * sqrt(3) (eps = 0).
    got = group_normalized(_f32([1, 0, 0, 1]), 4, eps=0.0)
    np.testing.assert_allclose(got, [0.8660254, -0.8660254, -0.8660254, 0.8660254], rtol=1e-6)
    # Identical rewards in a group: exactly zero (no rounding residue from the mean), never NaN.
    same = _f32([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.5])
    for scale in ("group", "batch", "none"):
        adv = jax.jit(lambda r: group_normalized(r, 3, scale=scale))(same)
        np.testing.assert_array_equal(adv[:6], 0.0)
        assert np.isfinite(np.asarray(adv)).all()
    adv = group_normalized(_f32([0.3] * 4), 2, scale="group", eps=0.0)  # eps 0 and std 0: still 0, not NaN
    np.testing.assert_array_equal(adv, 0.0)


def test_group_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_normalized(_f32([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        leave_one_out(_f32([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="not divisible by group_size 4"):
        group_normalized(_f32(np.zeros(6)), 4)
    with pytest.raises(TypeError, match="group_size"):
        group_normalized(_f32(np.zeros(6)), 2.0)
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda r: group_normalized(r, 2, scale="global"))(_f32(np.zeros(4)))
    with pytest.raises(ValueError, match="rewards must have rank 1"):
        group_normalized(_f32(np.zeros((2, 2))), 2)


def test_leave_one_out():
    # [1, 0, 0]: 1 - 0 = 1, 0 - (1 + 0) / 2 = -.5, -.5; identical group -> 0.
    got = leave_one_out(_f32([1.0, 0.0, 0.0, 0.3, 0.3, 0.3]), 3)
    np.testing.assert_allclose(got, [1.0, -0.5, -0.5, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(got[3:], 0.0)
    r = RNG.uniform(0, 1, 12)
    x = r.reshape(3, 4)
    ref = (4 / 3 * (x - x.mean(1, keepdims=True))).reshape(-1)  # G / (G - 1) (r - mean)
    np.testing.assert_allclose(leave_one_out(_f32(r), 4), ref, rtol=1e-5, atol=1e-6)


def test_whiten():
    x = RNG.standard_normal((3, 5)) * 3 + 2
    mask = (RNG.uniform(size=(3, 5)) > 0.3).astype(np.float64)
    valid = x[mask > 0]
    ref = np.where(mask > 0, (x - valid.mean()) / np.sqrt(valid.var() + 1e-8), 0)
    got = whiten(_f32(x), _f32(mask))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    kept = whiten(_f32(x), _f32(mask), shift_mean=False)
    np.testing.assert_allclose(np.asarray(kept)[mask > 0].mean(), valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kept)[mask > 0].std(), 1.0, rtol=1e-5)


def test_whiten_constant_values_give_exact_zeros_and_eps_zero_is_finite():
    # A mean with a rounding residue (37 x 100.3 in float32) used to come back amplified by
    # 1 / sqrt(eps): 0.29 per token instead of 0; and eps=0 gave NaN for one token or equal values.
    const = jnp.full((3, 37), 100.3)
    np.testing.assert_array_equal(whiten(const, jnp.ones((3, 37))), 0.0)
    np.testing.assert_array_equal(whiten(const, jnp.ones((3, 37)), shift_mean=False), const)
    np.testing.assert_array_equal(reinforce_plus_plus(_f32([1.1, 1.1, 1.1]), jnp.ones((3, 37))), 0.0)
    np.testing.assert_array_equal(whiten(_f32([[3.0, 0.0, 0.0]]), _f32([[1, 0, 0]]), eps=0.0), [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(whiten(_f32([[3.0, 3.0, 7.0]]), _f32([[1, 1, 0]]), eps=0.0), [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(whiten(_f32([[1.0, 3.0, 9.0]]), _f32([[1, 1, 0]]), eps=0.0), [[-1.0, 1.0, 0.0]])
    assert whiten(jnp.zeros((0, 3)), jnp.zeros((0, 3))).shape == (0, 3)


def test_per_token_rewards_hand_computed():
    scores = _f32([2.0, -1.0, 5.0])
    mask = _f32([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]])
    kl = _f32(np.full((3, 4), 0.5))
    got = per_token_rewards(scores, mask, kl=kl, kl_coef=0.1)
    # Score at the last valid token (index 2, index 3, none), -0.1 * 0.5 on every valid token.
    np.testing.assert_allclose(got, [[-0.05, -0.05, 1.95, 0.0], [-0.05, 0.0, -0.05, -1.05], [0, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(per_token_rewards(scores, mask), [[0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0, 0]])
    # A traced coefficient (from a KL controller) works under jit.
    traced = jax.jit(lambda c: per_token_rewards(scores, mask, kl=kl, kl_coef=c))(jnp.float32(0.1))
    np.testing.assert_allclose(traced, got, rtol=1e-6)
    with pytest.raises(ValueError, match="scores"):
        per_token_rewards(_f32([1.0]), mask)
    with pytest.raises(ValueError, match="kl_coef"):
        per_token_rewards(scores, mask, kl=kl, kl_coef=-0.1)


def test_reinforce_plus_plus_matches_numpy_composition():
    scores = np.array([1.0, 0.0, 0.5, 0.5])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float64)
    kl = RNG.uniform(0, 0.2, (4, 4))
    for group_size in (None, 2):
        s = scores
        if group_size is not None:
            s = (scores.reshape(-1, 2) - scores.reshape(-1, 2).mean(1, keepdims=True)).reshape(-1)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], 1)
        rewards = -0.05 * kl * mask
        rewards[np.arange(4), last] += s
        to_go = np.cumsum(rewards[:, ::-1], 1)[:, ::-1] * mask
        valid = to_go[mask > 0]
        ref = np.where(mask > 0, (to_go - valid.mean()) / np.sqrt(valid.var() + 1e-8), 0)
        got = reinforce_plus_plus(_f32(scores), _f32(mask), kl=_f32(kl), kl_coef=0.05, group_size=group_size)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_kl_controllers():
    fixed = fixed_kl_controller(kl_coef=0.05)
    state = fixed.init()
    assert isinstance(state, KLControllerState)
    assert float(fixed.update(state, jnp.float32(100.0), 256).kl_coef) == pytest.approx(0.05)

    ctl = adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=10_000)
    s0 = ctl.init()
    # KL 9 > target: error clip(9/6 - 1) = .2, beta *= 1 + .2 * 256 / 10000.
    np.testing.assert_allclose(ctl.update(s0, jnp.float32(9.0), 256).kl_coef, 0.2 * 1.00512, rtol=1e-6)
    # KL 4.5 < target: error 4.5/6 - 1 = -.25 -> -.2.
    np.testing.assert_allclose(ctl.update(s0, jnp.float32(4.5), 256).kl_coef, 0.2 * (1 - 0.00512), rtol=1e-6)

    # Pure and jittable: a scan of updates equals the Python loop.
    kls = jnp.asarray([9.0, 7.0, 6.0, 3.0, 12.0], jnp.float32)
    final, _ = jax.lax.scan(lambda s, kl: (ctl.update(s, kl, 64), None), s0, kls)
    beta = 0.2
    for kl in [9.0, 7.0, 6.0, 3.0, 12.0]:
        beta *= 1 + np.clip(kl / 6 - 1, -0.2, 0.2) * 64 / 10_000
    np.testing.assert_allclose(final.kl_coef, beta, rtol=1e-6)
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_controller(target=0.0)
    with pytest.raises(ValueError, match="kl_coef"):
        fixed_kl_controller(kl_coef=-1.0)


def test_bad_input_names_the_argument():
    bt, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="gamma"):
        gae(bt, bt, mask, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        jax.jit(lambda r: gae(r, bt, mask, lam=-0.1))(bt)
    with pytest.raises(ValueError, match="values"):
        gae(bt, jnp.zeros((2, 4)), mask)
    with pytest.raises(ValueError, match="mask"):
        whiten(bt, jnp.ones((3, 2)))


# --- input validation (API audit) ---

def test_array_hyperparameters_are_checked():
    m = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="gae: gamma must be in"):
        gae(m, m, m, gamma=jnp.array(2.0))
    with pytest.raises(ValueError, match=r"per_token_rewards: kl_coef must be a scalar .*\(3,\)"):
        per_token_rewards(jnp.ones(2), m, kl=m, kl_coef=jnp.ones(3))
    # traced coefficients (e.g. the KL controller's) are unchanged
    got = jax.jit(lambda c: per_token_rewards(jnp.ones(2), m, kl=m, kl_coef=c))(0.1)
    np.testing.assert_allclose(got, per_token_rewards(jnp.ones(2), m, kl=m, kl_coef=0.1))


def test_per_token_rewards_accepts_lists():
    np.testing.assert_allclose(per_token_rewards([1.0, 2.0], [[1, 1, 0], [1, 1, 1]]), [[0, 1, 0], [0, 0, 2]])


def test_adaptive_kl_controller_update_checks_its_arguments():
    ctl = adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=10)
    s0 = ctl.init()
    with pytest.raises(ValueError, match=r"n_steps must be <= horizon \(10\)"):
        ctl.update(s0, 0.0, 100)  # would make the factor 1 - 0.2 * 10 < 0
    with pytest.raises(ValueError, match="n_steps must be >= 0"):
        ctl.update(s0, 12.0, -1)
    with pytest.raises(TypeError, match="n_steps must be an integer"):
        ctl.update(s0, 12.0, 2.5)
    with pytest.raises(ValueError, match=r"observed_kl must be a scalar .*\(2,\)"):
        ctl.update(s0, jnp.array([1.0, 12.0]), 1)
    with pytest.raises(ValueError, match="observed_kl must be a scalar"):
        fixed_kl_controller(kl_coef=0.1).update(s0, jnp.ones(2), 1)
    # a NaN observation would make kl_coef NaN for the rest of the run
    with pytest.raises(ValueError, match=r"adaptive_kl_controller.update: observed_kl must be finite, got nan"):
        ctl.update(s0, float("nan"), 1)
    with pytest.raises(ValueError, match="observed_kl must be finite"):
        ctl.update(s0, jnp.array(jnp.inf), 1)
    # the bound n = H: the largest step, still >= 0; and unchanged under jit
    np.testing.assert_allclose(ctl.update(s0, 0.0, 10).kl_coef, 0.2 * 0.8, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(ctl.update)(s0, 12.0, 10).kl_coef, 0.2 * 1.2, rtol=1e-6)
