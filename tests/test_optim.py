"""Optimizer configs: schedules (warm-up, linear, cosine), clipping, weight-decay masks, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.optim import OptimizerConfig, decay_mask, global_norm, make_optimizer, make_schedule


def test_warmup_then_cosine_schedule_values():
    lr = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine", decay_steps=10,
                                       end_learning_rate_ratio=0.1))
    assert [float(lr(s)) for s in (0, 1, 2, 4)] == pytest.approx([0.0, 0.25, 0.5, 1.0])
    # 5 of 10 decay steps: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    assert float(lr(9)) == pytest.approx(0.55)
    assert float(lr(14)) == pytest.approx(0.1) and float(lr(100)) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    lin = make_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear", decay_steps=4))
    assert [float(lin(s)) for s in (0, 1, 4, 8)] == pytest.approx([2.0, 1.5, 0.0, 0.0])
    const = make_schedule(OptimizerConfig(learning_rate=3e-4))
    assert float(const(0)) == float(const(10_000)) == pytest.approx(3e-4)


def test_adamw_first_step_is_clipped_sign_step():
    # Adam's first update is lr * g / (|g| + eps) elementwise (bias-corrected); clipping to norm 1
    # rescales g first, which the sign-like update ignores: both give -lr * sign(g).
    tx = make_optimizer(OptimizerConfig(learning_rate=0.1, max_grad_norm=1.0, eps=0.0))
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    grads = {"a": jnp.array([30.0, -40.0]), "b": jnp.array([0.5])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.1, 0.1], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(updates["b"]), [-0.1], rtol=2e-5)


def test_sgd_sees_the_clipped_gradient():
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, max_grad_norm=1.0))
    grads = {"a": jnp.array([3.0, 4.0])}
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.6, -0.8], rtol=1e-6)
    assert float(global_norm(grads)) == pytest.approx(5.0)


def test_weight_decay_mask_skips_norm_scales_and_biases():
    params = {"attn": {"q_proj": 1.0, "q_bias": 1.0}, "final_norm": {"scale": 1.0}}
    assert decay_mask(params) == {"attn": {"q_proj": True, "q_bias": False}, "final_norm": {"scale": False}}
    tx = make_optimizer(OptimizerConfig(learning_rate=0.5, weight_decay=0.1, weight_decay_mask="no_norms_or_biases",
                                        max_grad_norm=None))
    p = {"w": jnp.ones(2), "scale": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, p)
    updates, _ = tx.update(zeros, tx.init(p), p)
    # zero gradient: the update is the decay alone, -lr * wd * p on decayed leaves only
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.05, -0.05], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["scale"]), [0.0, 0.0])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_every_optimizer_reduces_a_quadratic(name):
    tx = make_optimizer(OptimizerConfig(name=name, learning_rate=0.05, momentum=0.5 if name == "sgd" else 0.0))
    p = {"x": jnp.array([1.0, -2.0])}
    state = tx.init(p)
    for _ in range(5):
        g = jax.grad(lambda q: jnp.sum(q["x"] ** 2))(p)
        u, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    assert float(jnp.sum(p["x"] ** 2)) < 5.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="adamax"), "OptimizerConfig.name must be one of"),
    (dict(learning_rate=0.0), "OptimizerConfig.learning_rate must be > 0"),
    (dict(schedule="cosine"), "OptimizerConfig.decay_steps must be a positive int for schedule 'cosine'"),
    (dict(b2=1.0), "OptimizerConfig.b2 must be in"),
    (dict(max_grad_norm=-1.0), "OptimizerConfig.max_grad_norm"),
    (dict(name="adam", weight_decay=0.1), "is not applied by 'adam'"),
    (dict(warmup_steps=-1), "OptimizerConfig.warmup_steps"),
])
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
    assert math.isfinite(OptimizerConfig().learning_rate)
