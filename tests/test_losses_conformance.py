"""Conformance suite run over every loss: jit, float32 and bfloat16 inputs, float32 outputs of stable
shape, finite values and gradients, and fully masked rows that are finite with exactly zero gradient.

Each case maps token-level inputs (logits, per-token log-probs, values, advantages) and a mask to a
loss; per-example losses are fed through `sequence_logprobs`, as a training step would, so a masked
row reaches them as an empty sequence.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.logprobs import sequence_logprobs
from rlhf_jax.losses import (
    aggregate,
    bradley_terry_loss,
    cispo_loss,
    dpo_loss,
    entropy_bonus,
    kl_divergence,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    ppo_policy_loss,
    sft_loss,
    simpo_loss,
    value_loss,
)

B, T, V = 3, 5, 7
MASKED_ROW = 1
LABELS = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
MASK = jnp.asarray([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)
DESIRABLE = jnp.asarray([True, False, False])


def _inputs(dtype):
    rng = np.random.default_rng(0)
    lp = -rng.uniform(0.1, 3.0, (B, T))
    x = {
        "logits": 2 * rng.standard_normal((B, T, V)),
        "lp": lp,
        "old": lp + 0.3 * rng.standard_normal((B, T)),
        "ref": lp + 0.3 * rng.standard_normal((B, T)),
        "values": rng.standard_normal((B, T)),
        "returns": rng.standard_normal((B, T)),
        "adv": rng.standard_normal((B, T)),
        "adv_seq": rng.standard_normal((B,)),
    }
    return {k: jnp.asarray(v, dtype) for k, v in x.items()}


def _seq(x, average=False):
    return sequence_logprobs(x, MASK, average=average)


def _dpo(loss_type, **kw):
    def case(x):
        average = loss_type == "ipo"
        losses, _ = dpo_loss(
            _seq(x["lp"], average), _seq(x["old"], average), _seq(x["ref"], average), _seq(x["values"] - 2, average),
            loss_type=loss_type, **kw,
        )
        return losses

    return case


# name -> (x -> loss, kind). kind: "token" ([B, T], zero where masked), "token_raw" ([B, T], masked by
# `aggregate` only), "example" ([B]).
CASES = {
    "sft": (lambda x: sft_loss(x["logits"], LABELS, MASK), "token"),
    "entropy_bonus": (lambda x: entropy_bonus(x["logits"], MASK, temperature=0.7), "token"),
    "kl_k1": (lambda x: kl_divergence(x["lp"], x["ref"], estimator="k1"), "token_raw"),
    "kl_k2": (lambda x: kl_divergence(x["lp"], x["ref"], estimator="k2"), "token_raw"),
    "kl_k3": (lambda x: kl_divergence(x["lp"], x["ref"], estimator="k3", clamp=10.0), "token_raw"),
    "value": (lambda x: value_loss(x["values"], x["old"], x["returns"], MASK, clip_range=0.2), "token"),
    "ppo_seq_adv": (lambda x: ppo_policy_loss(x["lp"], x["old"], x["adv_seq"], MASK)[0], "token"),
    "ppo_dapo_dual": (
        lambda x: ppo_policy_loss(x["lp"], x["old"], x["adv"], MASK, clip_eps_high=0.28, dual_clip=3.0)[0],
        "token",
    ),
    "gspo": (lambda x: ppo_policy_loss(x["lp"], x["old"], x["adv_seq"], MASK, ratio_level="sequence")[0], "token"),
    "cispo": (lambda x: cispo_loss(x["lp"], x["old"], x["adv"], MASK, clip_eps_high=0.2)[0], "token"),
    "bradley_terry": (
        lambda x: bradley_terry_loss(
            _seq(x["values"], True), _seq(x["returns"], True), margin=0.1, center_rewards_coefficient=0.01
        ),
        "example",
    ),
    **{f"dpo_{t}": (_dpo(t), "example") for t in ("sigmoid", "hinge", "ipo", "apo_zero", "apo_down")},
    "dpo_robust": (_dpo("robust", label_smoothing=0.1), "example"),
    "dpo_reference_free": (lambda x: dpo_loss(_seq(x["lp"]), _seq(x["old"]), None, None)[0], "example"),
    "simpo": (lambda x: simpo_loss(_seq(x["lp"], True), _seq(x["old"], True)), "example"),
    "orpo": (lambda x: orpo_loss(_seq(x["lp"], True), _seq(x["old"], True))[0], "example"),
    "kto": (
        lambda x: kto_loss(
            _seq(x["lp"]), _seq(x["ref"]), DESIRABLE, kto_reference_point(_seq(x["old"]), _seq(x["ref"]))
        )[0],
        "example",
    ),
}


def _objective(case, kind, x):
    out = case(x)
    scalar = jnp.sum(out) if kind == "example" else aggregate(out, MASK, mode="seq_mean_token_mean")
    return scalar, out


@functools.lru_cache(maxsize=None)
def _compiled(name):
    case, kind = CASES[name]
    return jax.jit(jax.value_and_grad(functools.partial(_objective, case, kind), has_aux=True))


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_conformance(name):
    case, kind = CASES[name]
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        x = _inputs(dtype)
        (scalar, out), grads = _compiled(name)(x)
        want_shape = (B,) if kind == "example" else (B, T)
        assert out.dtype == jnp.float32 and out.shape == want_shape, (dtype, out.dtype, out.shape)
        assert scalar.dtype == jnp.float32 and scalar.shape == ()
        assert jax.eval_shape(case, x) == jax.ShapeDtypeStruct(want_shape, jnp.float32)
        assert np.isfinite(np.asarray(out)).all() and np.isfinite(float(scalar))
        if kind == "token":
            np.testing.assert_array_equal(out[MASKED_ROW], 0.0)
            np.testing.assert_array_equal(np.asarray(out)[np.asarray(MASK) == 0], 0.0)
        for key, g in grads.items():
            assert g.dtype == x[key].dtype, key
            g = np.asarray(g.astype(jnp.float32))
            assert np.isfinite(g).all(), key
            np.testing.assert_array_equal(g[MASKED_ROW], 0.0, err_msg=f"{name}: gradient of masked row, {key}")
        results[dtype] = (np.asarray(out), {k: np.asarray(g.astype(jnp.float32)) for k, g in grads.items()})
    # bf16 inputs give the float32 answer up to the rounding of the inputs.
    out32, out16 = results[jnp.float32][0], results[jnp.bfloat16][0]
    np.testing.assert_allclose(out16, out32, rtol=5e-2, atol=5e-2)
    assert any(np.abs(g).max() > 0 for g in results[jnp.float32][1].values()), "loss has no gradient"
