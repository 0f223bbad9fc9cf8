"""Step machinery on a toy linear model (fast to compile): accumulation, NaN guard, jit_step checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding as sh
from rlhf_jax.state import TrainState, train_state_from_params
from rlhf_jax.steps import accumulate_gradients, apply_gradients, jit_step, make_update, split_micro_batches
from rlhf_jax.steps.common import jit_model_step, micro_share, step_key

AXES = {"w": ("embed", "mlp")}
TX = optax.sgd(0.1)


def _make_loss(micro_batches=1):
    def loss(params, batch, context, rng):
        """Squared error summed over the masked rows of the micro-batch, / the global row count."""
        del rng
        err = (batch["x"] @ params["w"] - batch["y"]) ** 2
        per_row = jnp.sum(err, axis=-1) * batch["m"]
        share = micro_share(jnp.sum(batch["m"]), context["rows"], micro_batches)
        return jnp.sum(per_row) / context["rows"], {"rows_here": share}

    return loss


_loss = _make_loss()


def _prepare(params, batch, frozen, rng):
    del params, frozen, rng
    return batch, {"rows": jnp.sum(batch["m"])}


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4)).astype(np.float32), "y": rng.normal(size=(n, 2)).astype(np.float32),
            "m": (rng.random(n) > 0.3).astype(np.float32)}


def test_split_micro_batches_interleaves_rows():
    out = split_micro_batches({"a": jnp.arange(8)}, 4)["a"]
    np.testing.assert_array_equal(np.asarray(out), [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match=r"batch\['a'\] has 6 rows, not divisible by 4"):
        split_micro_batches({"a": jnp.arange(6)}, 4)


def test_accumulated_gradients_equal_full_batch_gradients():
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)), jnp.float32)}
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    _, context = _prepare(params, batch, (), None)
    key = jax.random.key(0)
    full = accumulate_gradients(_loss, params, batch, context, key, micro_batches=1)
    acc = accumulate_gradients(_make_loss(4), params, batch, context, key, micro_batches=4)
    np.testing.assert_allclose(float(acc[0]), float(full[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(acc[1]["w"]), np.asarray(full[1]["w"]), rtol=1e-6, atol=1e-7)
    # Independent NumPy reference of the loss: mean over masked rows of the summed squared error.
    b = _batch()
    err = ((b["x"] @ np.asarray(params["w"]) - b["y"]) ** 2).sum(-1)
    assert float(full[0]) == pytest.approx((err * b["m"]).sum() / b["m"].sum(), rel=1e-6)
    # Metrics are averaged over micro-batches: micro-batch shares of a global mean add back up.
    assert float(acc[2]["rows_here"]) == float(full[2]["rows_here"]) == pytest.approx(1.0)


def _state(params):
    return TrainState(jnp.zeros((), jnp.int32), params, TX.init(params), jax.random.key_data(jax.random.key(0)))


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_update_is_skipped_without_host_sync(policy):
    params = {"w": jnp.ones((4, 2))}
    state = _state(params)
    grads = {"w": jnp.full((4, 2), jnp.nan)}
    new, metrics = jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(1.0), TX, nonfinite=policy))(state, grads)
    np.testing.assert_array_equal(np.asarray(new.params["w"]), np.ones((4, 2)))
    assert int(new.step) == 1 and float(metrics["nonfinite"]) == 1.0
    assert ("halt" in metrics) == (policy == "halt")
    good, metrics = apply_gradients(state, {"w": jnp.ones((4, 2))}, jnp.float32(1.0), TX, nonfinite=policy,
                                    learning_rate=optax.constant_schedule(0.1))
    np.testing.assert_allclose(np.asarray(good.params["w"]), np.full((4, 2), 0.9))
    assert float(metrics["nonfinite"]) == 0.0 and float(metrics["grad_norm"]) == pytest.approx(np.sqrt(8))
    assert float(metrics["learning_rate"]) == pytest.approx(0.1)


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_update_from_finite_gradients_is_skipped(policy):
    """Loss and gradient finite, but the optimizer's update is not (learning_rate=inf, issue 22), or the
    update is finite and the new parameters overflow float32: skipped like a non-finite gradient."""
    params = {"w": jnp.ones((4, 2))}
    grads = {"w": jnp.ones((4, 2))}
    cases = [
        (optax.adam(jnp.inf), params),  # Adam's update is -inf * m / (sqrt(v) + eps) = -inf
        (optax.sgd(-3e38), {"w": jnp.full((4, 2), 3e38)}),  # 3e38 + 3e38 overflows to inf
    ]
    for tx, start in cases:
        state = TrainState(jnp.zeros((), jnp.int32), start, tx.init(start), jax.random.key_data(jax.random.key(0)))
        new, metrics = jax.jit(lambda s, g, tx=tx: apply_gradients(s, g, jnp.float32(1.0), tx, nonfinite=policy))(
            state, grads)
        np.testing.assert_array_equal(np.asarray(new.params["w"]), np.asarray(start["w"]))
        jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)  # moments and count kept
        assert int(new.step) == 1 and float(metrics["nonfinite"]) == 1.0
        assert float(metrics["grad_norm"]) == pytest.approx(np.sqrt(8))
        assert float(metrics.get("halt", 0.0)) == (1.0 if policy == "halt" else 0.0)
    # The same transform with a finite rate applies: Adam's first step moves every weight by -lr
    # (up to float32 rounding of the bias corrections 1 - 0.9 and 1 - 0.999).
    tx = optax.adam(0.5)
    state = _state(params)._replace(opt_state=tx.init(params))
    new, metrics = apply_gradients(state, grads, jnp.float32(1.0), tx, nonfinite=policy)
    np.testing.assert_allclose(np.asarray(new.params["w"]), np.full((4, 2), 0.5), rtol=1e-5)
    assert float(metrics["nonfinite"]) == 0.0
    # "off" applies the infinite update.
    state = _state(params)._replace(opt_state=optax.adam(jnp.inf).init(params))
    off, _ = apply_gradients(state, grads, jnp.float32(1.0), optax.adam(jnp.inf), nonfinite="off")
    assert np.isneginf(np.asarray(off.params["w"])).all()


def test_nonfinite_guard_decides_before_updating():
    """The guard checks the would-be parameters first and runs the update under one `lax.cond`
    (in place on donated buffers, no selecting pass); a finite step is the unguarded update, bit
    for bit, parameters and optimizer state."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    params = {"w": jax.random.normal(jax.random.key(0), (4, 2)), "b": jnp.ones((2,))}
    grads = {"w": jax.random.normal(jax.random.key(1), (4, 2)), "b": jnp.full((2,), 3.0)}
    start = np.asarray(params["w"])
    state = _state(params)._replace(opt_state=tx.init(params))
    skip, off = (jax.jit(lambda s, g, p=p: apply_gradients(s, g, jnp.float32(1.0), tx, nonfinite=p),
                         donate_argnums=(0,)) for p in ("skip", "off"))
    assert skip.lower(state, grads).compile().as_text().count("conditional(") == 1
    guarded, unguarded = state, jax.tree.map(jnp.copy, state)
    for _ in range(3):
        guarded, metrics = skip(guarded, grads)
        unguarded, _ = off(unguarded, grads)
        assert float(metrics["nonfinite"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, guarded, unguarded)
    assert not np.array_equal(np.asarray(guarded.params["w"]), start)


def test_nonfinite_off_applies_the_update_and_bad_policy_is_rejected():
    state = _state({"w": jnp.ones((4, 2))})
    new, metrics = apply_gradients(state, {"w": jnp.full((4, 2), jnp.inf)}, jnp.float32(1.0), TX, nonfinite="off")
    assert not np.isfinite(np.asarray(new.params["w"])).any() and "nonfinite" not in metrics
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        make_update(_loss, TX, nonfinite="ignore")


def test_jit_step_checks_batches_and_donates_state():
    mesh = sh.make_mesh({"data": 4, "fsdp": 2})
    params = {"w": np.ones((4, 2), np.float32)}
    state = train_state_from_params(params, TX, rng=0, logical_axes=AXES, mesh=mesh, strategy="fsdp")
    shardings = jax.tree.map(lambda x: x.sharding, state)
    update = make_update(_loss, TX, prepare=_prepare, micro_batches=1)
    step = jit_step(update, mesh=mesh, strategy="fsdp", state_shardings=shardings, batch_keys=("x", "y", "m"))
    old = state.params["w"]
    state, metrics = step(state, _batch())
    assert old.is_deleted()  # donated
    assert state.params["w"].sharding.spec == shardings.params["w"].spec
    assert set(metrics) == {"loss", "rows_here", "grad_norm", "nonfinite"} and int(state.step) == 1
    with pytest.raises(sh.ShardingError, match="batch size 4 .* not divisible by 8"):
        step(state, _batch(n=4))
    with pytest.raises(KeyError, match=r"lacks keys \['m'\]"):
        step(state, {"x": _batch()["x"], "y": _batch()["y"]})
    with pytest.raises(sh.ShardingError, match=r"names mesh axes \['expert'\]"):
        jit_step(update, mesh=mesh, strategy=sh.Strategy(name="e", rules={"mlp": "expert"}),
                 state_shardings=shardings)


def test_step_keys_are_typed_and_draw_the_raw_keys_bits():
    """`step_key` wraps the state's raw key data as a typed key; the loss sees typed keys only."""
    state = _state({"w": jnp.ones(2)})._replace(step=jnp.asarray(3, jnp.int32))
    key = step_key(state)
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = jax.random.fold_in(state.rng, 3)  # the same stream as the raw-key API
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(key)), np.asarray(raw))
    assert step_key(state._replace(rng=jax.random.wrap_key_data(state.rng))).dtype == key.dtype  # typed in: kept
    seen = []

    def loss(params, batch, context, rng):
        seen.append(rng.dtype)
        return jnp.sum(params["w"]) * 0.0, {}

    make_update(loss, TX, micro_batches=2)(state, {"x": jnp.zeros((2, 1))})
    assert seen and all(jax.dtypes.issubdtype(d, jax.dtypes.prng_key) for d in seen)


def test_jit_model_step_rejects_a_bad_frozen_count():
    with pytest.raises(ValueError, match="frozen_params must be an int >= 0, got -1"):
        jit_model_step(lambda s, b: (s, {}), None, TX, mesh=sh.make_mesh({"data": 8}), strategy="dp", frozen_params=-1)


def test_step_rng_is_folded_from_the_step_counter():
    seen = []

    def loss(params, batch, context, rng):
        return jnp.sum(params["w"]) * 0.0, {"r": jax.random.uniform(rng)}

    update = jax.jit(make_update(loss, TX))
    state = _state({"w": jnp.ones(2)})
    for _ in range(2):
        state, m = update(state, {"x": jnp.zeros((2, 1))})
        seen.append(float(m["r"]))
    assert seen[0] != seen[1]
    again, m = update(_state({"w": jnp.ones(2)}), {"x": jnp.zeros((2, 1))})
    assert float(m["r"]) == seen[0]


def test_a_skipped_update_does_not_advance_the_schedule_and_the_metric_reads_the_rate_applied():
    """A skipped (non-finite) update keeps the optimizer's count, so the schedule does not advance; the
    `learning_rate` metric is the rate the update applies (it read `state.step`, one step ahead per skip)."""
    from rlhf_jax.optim import OptimizerConfig, make_optimizer, make_schedule

    config = OptimizerConfig(name="sgd", learning_rate=1.0, warmup_steps=4, max_grad_norm=None)
    tx, schedule = make_optimizer(config), make_schedule(config)
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(1)}, tx.init({"w": jnp.zeros(1)}),
                       jax.random.key_data(jax.random.key(0)))
    step = jax.jit(lambda s, loss: apply_gradients(s, {"w": jnp.ones(1)}, loss, tx, learning_rate=schedule))
    reported, applied, skipped = [], [], []
    for loss in (1.0, np.nan, 1.0, 1.0, 1.0):
        before = float(state.params["w"][0])
        state, metrics = step(state, jnp.float32(loss))
        reported.append(float(metrics["learning_rate"]))
        applied.append(before - float(state.params["w"][0]))  # SGD on a unit gradient moves w by -lr
        skipped.append(float(metrics["nonfinite"]))
    assert skipped == [0, 1, 0, 0, 0] and int(state.step) == 5
    assert applied == [0.0, 0.0, 0.25, 0.5, 0.75]
    assert reported == [0.0, 0.25, 0.25, 0.5, 0.75]  # the skipped step's would-be rate, then the applied ones


def test_maxima_and_minima_over_micro_batches_are_not_averaged():
    """`.../max` (e.g. `sampler_logprob_diff/max`) was averaged over micro-batches: the mean of their maxima."""
    def loss(params, batch, context, rng):
        err = jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, axis=-1)
        share = micro_share(jnp.sum(err), context["rows"], 4)
        return jnp.sum(err) / context["rows"], {"err/max": jnp.max(err), "err_min": jnp.min(err), "err/mean": share}

    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)), jnp.float32)}
    b = _batch()
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    _, _, metrics = accumulate_gradients(loss, params, batch, {"rows": jnp.float32(8)}, jax.random.key(0),
                                         micro_batches=4)
    err = ((b["x"] @ np.asarray(params["w"]) - b["y"]) ** 2).sum(-1)
    assert float(metrics["err/max"]) == pytest.approx(err.max(), rel=1e-6)
    assert float(metrics["err_min"]) == pytest.approx(err.min(), rel=1e-6)
    assert float(metrics["err/mean"]) == pytest.approx(err.mean(), rel=1e-6)


def test_packed_rows_with_more_segments_than_the_step_sums_and_weighted_masks_are_refused():
    """A DPO or reward-model step built for `max_segments=S` sums segments 1..S of each row: packed
    data with more pairs per row lost the rest silently (loss log 2 from one pair of four). Every
    batch is now checked on the host, and the reference precompute too."""
    from rlhf_jax.models import CausalLM
    from rlhf_jax.steps import make_dpo_step, make_reward_model_step
    from rlhf_jax.steps.batch_checks import host_batch_check
    from rlhf_jax.steps.preference import make_reference_logps_fn
    from rlhf_jax.testing import tiny_config

    packed = {"chosen_tokens": np.zeros((1, 6), np.int32), "chosen_segment_ids": np.array([[1, 1, 2, 3, 3, 0]])}
    message = (r"^step: batch\['chosen_segment_ids'\] numbers up to 3 segments in a row, but the step was built "
               r"for max_segments=2: the rows' other segments would be dropped")
    with pytest.raises(ValueError, match=message):
        host_batch_check(16, max_segments=2)(packed, "step")
    host_batch_check(16, max_segments=3)(packed, "step")
    host_batch_check(16)(packed, "step")  # an SFT step sums no segments
    lm, scalar = CausalLM(tiny_config()), CausalLM(tiny_config(), head="scalar")
    with pytest.raises(ValueError, match=r"max_segments=1"):
        make_dpo_step(lm, optax.sgd(1.0)).host_check(packed, "step")
    with pytest.raises(ValueError, match=r"max_segments=2"):
        make_reward_model_step(scalar, optax.sgd(1.0), max_segments=2).host_check(packed, "step")
    make_dpo_step(lm, optax.sgd(1.0), max_segments=4).host_check(packed, "step")
    # A weighted loss mask is read as 0/1 by every step (causal_targets): refused, not trained as 1.
    weighted = {**packed, "chosen_loss_mask": np.array([[0, 0.5, 1, 1, 1, 0]])}
    with pytest.raises(ValueError, match=r"^step: batch\['chosen_loss_mask'\] must be bool or 0/1, got values \[0.5\]"):
        make_dpo_step(lm, optax.sgd(1.0), max_segments=4).host_check(weighted, "step")
    mesh = sh.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"^make_reference_logps_fn: .* max_segments=1"):
        make_reference_logps_fn(lm, mesh=mesh, strategy="dp")(None, packed)
