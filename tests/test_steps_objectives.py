"""Preference objectives: wiring to the pure losses (NumPy goldens), KTO and ORPO steps, packed pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_fixtures import host_params, max_rel_diff, pair_batches, run_steps, tiny_lm
from rlhf_jax.config import ConfigError
from rlhf_jax.steps import DPO, KTO, ORPO, SimPO, make_dpo_step
from rlhf_jax.steps.preference import SequenceLogps

CHOSEN = SequenceLogps(jnp.array([-10.0, -20.0]), jnp.array([4.0, 5.0]))
REJECTED = SequenceLogps(jnp.array([-12.0, -18.0]), jnp.array([4.0, 2.0]))
REF_C = SequenceLogps(jnp.array([-11.0, -19.0]), jnp.array([4.0, 5.0]))
REF_R = SequenceLogps(jnp.array([-11.0, -19.0]), jnp.array([4.0, 2.0]))


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_dpo_sigmoid_on_summed_logps():
    terms = DPO(beta=0.5)(CHOSEN, REJECTED, REF_C, REF_R)
    h = np.array([(-10 + 11) - (-12 + 11), (-20 + 19) - (-18 + 19)])  # [2, -2]
    np.testing.assert_allclose(np.asarray(terms.losses), -_log_sigmoid(0.5 * h), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(terms.chosen_rewards), [0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(terms.rejected_rewards), [-0.5, 0.5], rtol=1e-6)


def test_ipo_uses_length_averaged_logps():
    terms = DPO(beta=0.25, loss_type="ipo")(CHOSEN, REJECTED, REF_C, REF_R)
    c = np.array([-10 / 4 + 11 / 4, -20 / 5 + 19 / 5])
    r = np.array([-12 / 4 + 11 / 4, -18 / 2 + 19 / 2])
    np.testing.assert_allclose(np.asarray(terms.losses), (c - r - 1 / (2 * 0.25)) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(terms.chosen_logps), [-2.5, -4.0], rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "apo_zero", "apo_down"])
def test_every_dpo_loss_type_is_finite_and_reference_free_drops_ref(loss_type):
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    obj = DPO(loss_type=loss_type, label_smoothing=smoothing)
    assert np.isfinite(np.asarray(obj(CHOSEN, REJECTED, REF_C, REF_R).losses)).all()
    free = DPO(loss_type=loss_type, reference_free=True)
    assert not free.needs_reference
    assert np.isfinite(np.asarray(free(CHOSEN, REJECTED, None, None).losses)).all()


def test_simpo_and_orpo_golden():
    a_w, a_l = np.array([-2.5, -4.0]), np.array([-3.0, -9.0])
    simpo = SimPO(beta=2.0, gamma=0.5)(CHOSEN, REJECTED, None, None)
    np.testing.assert_allclose(np.asarray(simpo.losses), -_log_sigmoid(2.0 * (a_w - a_l) - 0.5), rtol=1e-6)
    orpo = ORPO(beta=0.1)(CHOSEN, REJECTED, None, None)
    log_odds = (a_w - np.log1p(-np.exp(a_w))) - (a_l - np.log1p(-np.exp(a_l)))
    np.testing.assert_allclose(np.asarray(orpo.losses), -0.1 * _log_sigmoid(log_odds), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(orpo.extra["log_odds_ratio"]), _log_sigmoid(log_odds), rtol=1e-5)
    assert ORPO.nll_weight == 1.0 and not ORPO().needs_reference


@pytest.mark.parametrize("make, match", [
    (lambda: DPO(loss_type="kto"), r"algorithm.loss_type \(DPO\) must be one of"),
    (lambda: DPO(beta=0.0), r"algorithm.beta \(DPO\) must be > 0, got 0.0"),
    (lambda: DPO(label_smoothing=0.5), r"algorithm.label_smoothing \(DPO\) must be in \[0, 0.5\)"),
    # Used to pass here and fail only when the first training step was traced (a dpo_loss ValueError).
    (lambda: DPO(loss_type="ipo", label_smoothing=0.1),
     r"algorithm.label_smoothing \(DPO\) applies to loss_type 'sigmoid' and 'robust' only, got 0.1 with loss_type 'ipo'"),
    (lambda: SimPO(nll_weight=-1.0), r"algorithm.nll_weight \(SimPO\) must be >= 0"),
    (lambda: KTO(reference_point="batch"), r"algorithm.reference_point \(KTO\)"),
])
def test_objective_validation(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def _kto_batch():
    pairs = pair_batches(1)[0]
    return {"tokens": pairs["chosen_tokens"], "loss_mask": pairs["chosen_loss_mask"],
            "label": np.arange(8) % 2 == 0, "kl_tokens": pairs["rejected_tokens"],
            "kl_loss_mask": pairs["rejected_loss_mask"]}


def test_kto_step_starts_at_half_the_weights():
    # Policy = reference: r = 0 and z0 = 0, so each loss is weight * (1 - sigmoid(0)) = weight / 2.
    obj = KTO(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    _, history = run_steps(make_dpo_step, head="lm", shape={"data": 2, "fsdp": 2}, strategy="fsdp",
                           batches=[_kto_batch(), _kto_batch()], with_reference=True, objective=obj)
    assert history[0]["loss"] == pytest.approx((0.5 + 1.0) / 2, rel=1e-6)
    assert history[0]["kl"] == 0.0 and history[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert history[1]["loss"] < history[0]["loss"]


def _numpy_token_logps(params, tokens):
    logits = np.asarray(tiny_lm().forward(params, tokens).logits, np.float64)[:, :-1]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def test_orpo_step_loss_is_nll_plus_odds_ratio_term():
    batch = pair_batches(1)[0]
    _, history = run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=[batch],
                           objective=ORPO(beta=0.1))
    out = {}
    for side in ("chosen", "rejected"):
        tok = _numpy_token_logps(host_params(), batch[f"{side}_tokens"])
        mask = batch[f"{side}_loss_mask"][:, 1:]
        out[side] = ((tok * mask).sum(-1), mask.sum(-1))
    nll = -out["chosen"][0].sum() / out["chosen"][1].sum()
    a_w, a_l = out["chosen"][0] / out["chosen"][1], out["rejected"][0] / out["rejected"][1]
    log_odds = (a_w - np.log1p(-np.exp(a_w))) - (a_l - np.log1p(-np.exp(a_l)))
    want = nll + np.mean(-0.1 * _log_sigmoid(log_odds))
    assert history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert history[0]["nll_loss"] == pytest.approx(nll, rel=1e-5)


def _pack_pairs(batch):
    """Rows 2r and 2r+1 of each side into row r as segments 1 and 2 (positions restart)."""
    out = {}
    for side in ("chosen_", "rejected_"):
        tok, mask = batch[side + "tokens"], batch[side + "loss_mask"]
        b, t = tok.shape
        lengths = (tok != 0).sum(-1)
        ptok = np.zeros((b // 2, 2 * t), np.int32)
        pmask, pseg, ppos = (np.zeros_like(ptok) for _ in range(3))
        for r in range(b // 2):
            at = 0
            for k, i in enumerate((2 * r, 2 * r + 1)):
                n = lengths[i]
                ptok[r, at:at + n], pmask[r, at:at + n] = tok[i, :n], mask[i, :n]
                pseg[r, at:at + n], ppos[r, at:at + n] = k + 1, np.arange(n)
                at += n
        out.update({side + "tokens": ptok, side + "loss_mask": pmask, side + "segment_ids": pseg,
                    side + "positions": ppos})
    return out


def test_packed_pairs_equal_unpacked_pairs():
    batch = pair_batches(1, seed=5)[0]
    packed = _pack_pairs(batch)
    assert packed["chosen_tokens"].shape == (4, 32)
    params, history = run_steps(make_dpo_step, head="lm", shape=None, strategy="dp", batches=[batch],
                                objective=SimPO())
    p_params, p_history = run_steps(make_dpo_step, head="lm", shape={"data": 2}, strategy="dp", batches=[packed],
                                    objective=SimPO(), max_segments=2)
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm"):
        assert p_history[0][key] == pytest.approx(history[0][key], rel=1e-5), key
    assert max_rel_diff(p_params, params) <= 1e-5
    assert jax.tree.structure(p_params) == jax.tree.structure(params)
