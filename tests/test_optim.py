"""Optimizer configs: schedules (warm-up, linear, cosine), clipping, weight-decay masks, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    (dict(schedule="cosine_with_restarts"),
     r"OptimizerConfig.schedule must be one of \('constant', 'linear', 'cosine'\), got 'cosine_with_restarts'"),
    (dict(learning_rate=math.nan), "OptimizerConfig.learning_rate must be a finite number, got nan"),
    (dict(learning_rate=-1e-5), "OptimizerConfig.learning_rate must be > 0, got -1e-05"),
    (dict(schedule="linear", decay_steps=0),
     "OptimizerConfig.decay_steps must be a positive int for schedule 'linear', got 0"),
    # a bool is not a step count (True was taken as 1 before)
    (dict(warmup_steps=True), "OptimizerConfig.warmup_steps must be an int >= 0, got True"),
    (dict(schedule="cosine", decay_steps=True), "OptimizerConfig.decay_steps must be a positive int for schedule"),
])
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
    assert math.isfinite(OptimizerConfig().learning_rate)


@pytest.mark.parametrize("hf_name, schedule, warmup, total, kwargs, ratio", [
    ("linear", "linear", 3, 10, {}, 0.0),
    ("cosine", "cosine", 3, 10, {}, 0.0),
    ("cosine_with_min_lr", "cosine", 4, 20, {"min_lr_rate": 0.1}, 0.1),
    ("constant_with_warmup", "constant", 5, 10, {}, 0.0),
    ("cosine", "cosine", 0, 7, {}, 0.0),
])
def test_schedules_match_transformers_step_by_step(hf_name, schedule, warmup, total, kwargs, ratio):
    """Our decay_steps count after warm-up (HF's num_training_steps includes it); the first update's rate is
    the schedule at 0 (0 with warm-up, as the HF Trainer's first step). Past num_training_steps HF's cosine
    rises again; ours stays at the end rate, so the comparison stops there."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-3)
    hf = get_scheduler(hf_name, opt, num_warmup_steps=warmup, num_training_steps=total,
                       scheduler_specific_kwargs=kwargs or None)
    expected = []
    for _ in range(total + 1):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = make_schedule(OptimizerConfig(learning_rate=2e-3, warmup_steps=warmup, schedule=schedule,
                                         decay_steps=None if schedule == "constant" else total - warmup,
                                         end_learning_rate_ratio=ratio))
    np.testing.assert_allclose([float(ours(s)) for s in range(total + 1)], expected, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("mask", ["all", "no_norms_or_biases"])
def test_adamw_with_clipping_and_schedule_matches_torch(mask):
    """5 updates of clip_by_global_norm + AdamW (warm-up, linear decay, decoupled decay on the masked
    leaves) against torch's clip_grad_norm_ + AdamW + transformers' linear schedule on the same gradients."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3, 4)), "scale": rng.normal(size=4), "q_bias": rng.normal(size=4)}
    start = {k: v.astype(np.float32) for k, v in start.items()}
    grads = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in start.items()}
             for s in (5, 0.1, 3, 0.5, 2)]
    config = OptimizerConfig(learning_rate=0.1, warmup_steps=2, schedule="linear", decay_steps=5, weight_decay=0.3,
                             weight_decay_mask=mask, max_grad_norm=1.0, b1=0.8, b2=0.95, eps=1e-6)
    tx = make_optimizer(config)
    params = jax.tree.map(jnp.asarray, start)
    opt_state = tx.init(params)
    theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    decayed = ["w", "scale", "q_bias"] if mask == "all" else ["w"]  # HF's rule: no decay on norms and biases
    groups = [{"params": [theirs[k] for k in decayed], "weight_decay": 0.3},
              {"params": [theirs[k] for k in theirs if k not in decayed], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1, betas=(0.8, 0.95), eps=1e-6)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=7)
    for g in grads:
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, params)
        params = optax.apply_updates(params, updates)
        for k, p in theirs.items():
            p.grad = torch.tensor(g[k])
        norm = torch.nn.utils.clip_grad_norm_(list(theirs.values()), 1.0)
        assert float(global_norm(g)) == pytest.approx(float(norm), rel=1e-6)
        opt.step()
        sched.step()
    for k in start:
        np.testing.assert_allclose(np.asarray(params[k]), theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(params["w"]), start["w"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_steps=100), r"OptimizerConfig.decay_steps is not used by schedule 'constant' \(got 100\)"),
    (dict(end_learning_rate_ratio=0.1), r"OptimizerConfig.end_learning_rate_ratio is not used by schedule 'constant'"),
    (dict(momentum=0.9), r"OptimizerConfig.momentum is not used by 'adamw' \(got 0.9\); leave it at 0.0"),
    (dict(name="adam", nesterov=True), r"OptimizerConfig.nesterov is not used by 'adam'"),
    (dict(name="sgd", nesterov=True), r"OptimizerConfig.nesterov needs momentum > 0"),
    (dict(name="sgd", b1=0.5), r"OptimizerConfig.b1 is not used by 'sgd'"),
    (dict(name="lion", eps=1e-6), r"OptimizerConfig.eps is not used by 'lion' \(got 1e-06\); leave it at 1e-08"),
    (dict(name="adafactor", b2=0.99), r"OptimizerConfig.b2 is not used by 'adafactor'"),
])
def test_a_setting_the_run_would_ignore_is_refused(kwargs, match):
    """Before, each of these built an optimizer that silently did not apply the setting (e.g. a constant
    rate where a decay to 10% was asked for, SGD without the Nesterov step, Lion without any epsilon)."""
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
    # The settings each optimizer does read are accepted.
    OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    OptimizerConfig(name="lion", b1=0.95, b2=0.98, weight_decay=0.1)
    OptimizerConfig(schedule="linear", decay_steps=10, end_learning_rate_ratio=0.1)


@pytest.mark.parametrize("name, b2", [("adamw", 0.999), ("adam", 0.999), ("lion", 0.99)])
def test_b2_defaults_to_each_optimizers_published_value(name, b2):
    """`b2` unset is Adam's 0.999 and Lion's 0.99 (Chen et al. 2023; optax's default): Lion ran with
    Adam's 0.999 before. Three updates equal optax's own optimizer with that b2."""
    config = OptimizerConfig(name=name, learning_rate=0.1)
    assert config.beta2 == b2 and OptimizerConfig(name=name, b2=0.9).beta2 == 0.9
    ours = make_optimizer(config)
    reference = {"adamw": lambda: optax.adamw(0.1, b2=b2, weight_decay=0.0), "adam": lambda: optax.adam(0.1, b2=b2),
                 "lion": lambda: optax.lion(0.1, b2=b2, weight_decay=0.0)}[name]()
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    states = [ours.init(params), reference.init(params)]
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.normal(size=(3, 4)) * 0.1, jnp.float32)}  # under max_grad_norm: no clipping
        (u1, states[0]), (u2, states[1]) = ours.update(grads, states[0], params), reference.update(grads, states[1],
                                                                                                   params)
        np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6, atol=1e-8)
