"""Optimizers against independent references: transformers' Adafactor as its Trainer runs it, Lion's
published update, torch's SGD, and a micro-batched AdamW update against torch with one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.optim import OptimizerConfig, make_optimizer, make_schedule
from rlhf_jax.state import TrainState
from rlhf_jax.steps.common import make_update

torch = pytest.importorskip("torch")


def _run(config, start, grads):
    tx = make_optimizer(config)
    params = jax.tree.map(jnp.asarray, start)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def test_adafactor_matches_the_transformers_trainer_adafactor():
    """`optim="adafactor"` of transformers' Trainer: `Adafactor(lr, scale_parameter=False,
    relative_step=False)`, update clipping at 1, decay `lr * wd * p` on the decayed group only. Before,
    optax's defaults scaled each step by RMS(p) (~0.02 here: 50x smaller), left updates unclipped, and
    subtracted `wd * p` unscaled by the rate (10% of every weight per step at wd = 0.1)."""
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    # 128 x 130: factored second moment (both dims >= 128); a bias: full second moment, no decay.
    start = {"w": (0.02 * rng.normal(size=(128, 130))).astype(np.float32),
             "q_bias": rng.normal(size=5).astype(np.float32)}
    # the jump to 30x makes RMS(g / sqrt(v)) > 1 at step 2: update clipping is exercised
    grads = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in start.items()} for s in (1, 30, 0.1, 1)]
    config = OptimizerConfig(name="adafactor", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=None,
                             weight_decay_mask="no_norms_or_biases")
    ours = _run(config, start, grads)
    theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    groups = [{"params": [theirs["w"]], "weight_decay": 0.1}, {"params": [theirs["q_bias"]], "weight_decay": 0.0}]
    opt = Adafactor(groups, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)
    for g in grads:
        for k, p in theirs.items():
            p.grad = torch.tensor(g[k])
        opt.step()
    for k in start:
        np.testing.assert_allclose(ours[k], theirs[k].detach().numpy(), rtol=1e-5, atol=1e-7)
    # the bias moved by ~lr per step (sign-like Adafactor steps), not RMS(p) * lr
    assert np.abs(ours["q_bias"] - start["q_bias"]).max() > 0.02


def test_lion_matches_the_published_update():
    """Chen et al. 2023, Algorithm 2: c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p); m = b2 m + (1 - b2) g."""
    rng = np.random.default_rng(1)
    start = rng.normal(size=6).astype(np.float32)
    grads = [rng.normal(size=6).astype(np.float32) for _ in range(4)]
    lr, wd, b1, b2 = 0.01, 0.5, 0.8, 0.95
    ours = _run(OptimizerConfig(name="lion", learning_rate=lr, weight_decay=wd, b1=b1, b2=b2, max_grad_norm=None),
                {"p": start}, [{"p": g} for g in grads])["p"]
    p, m = start.astype(np.float64), np.zeros(6)
    for g in grads:
        p = p - lr * (np.sign(b1 * m + (1 - b1) * g) + wd * p)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(ours, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch(nesterov):
    rng = np.random.default_rng(2)
    start = rng.normal(size=6).astype(np.float32)
    grads = [rng.normal(size=6).astype(np.float32) for _ in range(4)]
    ours = _run(OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=nesterov, max_grad_norm=None),
                {"p": start}, [{"p": g} for g in grads])["p"]
    theirs = torch.nn.Parameter(torch.tensor(start))
    opt = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=nesterov)
    for g in grads:
        theirs.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_micro_batched_update_is_one_token_weighted_batch_clipped_once():
    """Two micro-batches with 1 and 4 target tokens: the gradient is the token mean over the whole
    batch (transformers' `num_items_in_batch` accumulation), `grad_norm` is its norm before clipping
    (`clip_grad_norm_`'s return value), clipping is applied once to the sum, then AdamW. Clipping each
    micro-batch, or averaging micro-batch means, would each give other parameters."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 2, 3)).astype(np.float32)        # [rows, tokens, features]
    y = rng.normal(size=(4, 2)).astype(np.float32)
    mask = np.array([[1, 0], [1, 1], [0, 0], [1, 1]], np.float32)  # micro-batches: rows {0, 2}, {1, 3}
    w0 = rng.normal(size=3).astype(np.float32)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)}

    def loss_fn(params, mb, context, rng):
        err = (mb["x"] @ params["w"] - mb["y"]) ** 2 * 10.0
        return jnp.sum(err * mb["mask"]) / context["num_tokens"], {}

    def prepare(params, batch, frozen, rng):
        return batch, {"num_tokens": jnp.sum(batch["mask"])}

    config = OptimizerConfig(learning_rate=0.05, max_grad_norm=1.0, weight_decay=0.1, warmup_steps=1,
                             schedule="linear", decay_steps=3)
    update = jax.jit(make_update(loss_fn, make_optimizer(config), prepare=prepare, micro_batches=2,
                                     learning_rate=make_schedule(config)))
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.asarray(w0)}, make_optimizer(config).init({"w": w0}),
                       jax.random.key_data(jax.random.key(0)))
    w = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([w], lr=0.05, weight_decay=0.1)
    from transformers import get_scheduler
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=4)
    for _ in range(3):
        state, metrics = update(state, batch)
        opt.zero_grad()
        loss = (((torch.tensor(x) @ w - torch.tensor(y)) ** 2 * 10.0) * torch.tensor(mask)).sum() / mask.sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
        assert float(metrics["grad_norm"]) == pytest.approx(float(norm), rel=1e-5)
        assert float(norm) > 1.0  # clipping is active
        assert float(metrics["learning_rate"]) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(state.params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)
