"""Forward-only passes in the update's micro-batches: the DPO family's held-out eval and reference
log-probs (per-eval frozen reference and `reference="precomputed"`), and the shared
`make_weighted_eval` behind SFT / reward-model / PRM evals, equal their whole-batch values.

Each pass runs `train.micro_batches` interleaved pieces under `lax.map` in its one program, so it
holds one micro-batch's activations, as the update step does (issue 18: Llama-3-8B DPO's eval
reference forward of 128 pairs x 2048 tokens did not fit where the step did). A row's log-probs
depend on that row alone, and the losses are normalised by the whole batch's counts, so the values
must not move; the oracle is the one-piece pass of the same function on the same mesh.
"""

import dataclasses

import jax
import numpy as np
import pytest

from step_fixtures import host_params, mesh_for, pair_batches, sft_batches, tiny_lm
from rlhf_jax import sharding as sh
from rlhf_jax.config import ConfigError
from rlhf_jax.steps import DPO, make_reference_logps_fn
from rlhf_jax.train import dpo as dpo_mod, tiny_stages
from rlhf_jax.train.aot import plan_run
from rlhf_jax.train.sft import make_sft_eval

MESH = {"data": 4}   # 8 rows: 2 per device, 1 per device in each of 2 pieces
BATCHES = pair_batches(2, seed=3)


def _eval_batches():
    """Held-out batches as `eval_batches` makes them: `example_mask`, the last one's final 3 rows padding."""
    out = [{**b, "example_mask": np.ones(8, bool)} for b in BATCHES]
    last = out[-1]
    last["example_mask"][5:] = False
    for k in ("chosen_loss_mask", "rejected_loss_mask"):
        last[k] = np.where(last["example_mask"][:, None], last[k], 0)
    return out


def _params(mesh, scale=0.0):
    """The fixtures' initial weights (scale 0: the reference) or a perturbed policy, placed like a run's."""
    lm = tiny_lm()
    shardings = sh.param_shardings(lm.abstract_params(), lm.logical_axes, mesh=mesh, strategy="dp")
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), host_params())
    return jax.device_put(params, shardings)


def test_reference_logps_in_pieces_equal_the_whole_batch():
    mesh = mesh_for(MESH)
    reference = _params(mesh)
    whole = make_reference_logps_fn(tiny_lm(), mesh=mesh, strategy="dp")
    pieces = make_reference_logps_fn(tiny_lm(), mesh=mesh, strategy="dp", micro_batches=2)
    for batch in BATCHES:
        want, got = whole(reference, batch), pieces(reference, batch)
        assert set(got) == {"ref_chosen_logps", "ref_rejected_logps"}
        for k in want:
            assert got[k].shape == (8,) and got[k].sharding.is_equivalent_to(want[k].sharding, 1)
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=0)
    # Summed log-probs of 3-11 completion tokens of a 256-token vocabulary: about -6 each.
    assert -12 * 11 < float(np.min(want["ref_chosen_logps"])) < float(np.max(want["ref_chosen_logps"])) < 0
    loops = [fn.program.lower(reference, BATCHES[0]).as_text().count("stablehlo.while") for fn in (whole, pieces)]
    assert loops[1] == loops[0] + 1, loops   # the layers' scan, and a loop over the 2 pieces around it


def test_preference_eval_in_pieces_equals_the_whole_batch():
    mesh = mesh_for(MESH)
    reference, policy = _params(mesh), _params(mesh, scale=0.02)
    results = {}
    for m in (1, 2):
        evaluate = dpo_mod.make_preference_eval(tiny_lm(), DPO(beta=0.1, nll_weight=1.0), _eval_batches(), reference,
                                                mesh=mesh, strategy="dp", micro_batches=m)
        results[m] = evaluate(policy)
    whole, pieces = results[1], results[2]
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/nll_loss"} <= set(whole)
    assert whole["eval/rewards/margins"] != 0.0 and 0.0 < whole["eval/rewards/accuracies"] < 1.0
    for k, v in whole.items():
        assert pieces[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_sft_eval_in_pieces_equals_the_whole_batch():
    mesh = mesh_for(MESH)
    policy = _params(mesh, scale=0.02)
    batches = sft_batches(2, seed=4)
    whole = make_sft_eval(tiny_lm(), batches, mesh=mesh, strategy="dp")(policy)
    pieces = make_sft_eval(tiny_lm(), batches, mesh=mesh, strategy="dp", micro_batches=2)(policy)
    assert set(pieces) == {"eval/loss", "eval/mean_token_accuracy"}
    for k, v in whole.items():
        assert pieces[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_a_batch_the_pieces_do_not_divide_is_one_line_naming_the_key():
    mesh = mesh_for(MESH)
    reference = _params(mesh)
    fn = make_reference_logps_fn(tiny_lm(), mesh=mesh, strategy="dp", micro_batches=3)
    with pytest.raises(ValueError, match=r"batch\['chosen_tokens'\] has 8 rows, not divisible by micro_batches=3 "
                                         r"\(train.micro_batches\)") as e:
        fn(reference, BATCHES[0])
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)  # a config mistake: the CLI reports it in one line, exit 2
    with pytest.raises(ValueError, match=r"make_weighted_eval: batch\['tokens'\] has 8 rows, not divisible by "
                                         r"micro_batches=3 \(train.micro_batches\)") as e:
        make_sft_eval(tiny_lm(), sft_batches(1), mesh=mesh, strategy="dp", micro_batches=3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="micro_batches must be a positive int, got 0"):
        make_reference_logps_fn(tiny_lm(), mesh=mesh, strategy="dp", micro_batches=0)


def test_plan_compiles_the_eval_and_reference_passes_in_the_runs_pieces(monkeypatch):
    """`plan_run` lowers the same micro-batched programs the run executes (a `while` over pieces)."""
    import rlhf_jax.compile as compile_mod

    texts, real = {}, compile_mod.compile_program

    def spy(name, lower, *args, **kwargs):
        texts[name] = lower().as_text()   # StableHLO: the program as JAX traced it
        return real(name, lower, *args, **kwargs)

    monkeypatch.setattr(compile_mod, "compile_program", spy)
    config = tiny_stages.vowel_dpo("plan_pieces", steps=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=16, num_train=32,
                                                                  num_eval=16),
                                 train=dataclasses.replace(config.train, micro_batches=2, eval_batches=1),
                                 sampling=dpo_mod.SampleEvalConfig(num_prompts=0))
    plan = plan_run(config, compiler_options={"xla_backend_optimization_level": 0})
    assert [p.name for p in plan.programs] == ["update step", "reference log-probs", "eval (held-out loss)"]
    assert all(p.ok for p in plan.programs)
    # Every program loops over the same pieces: 2 micro-batches of 8 of the 16 rows (32 tokens each).
    for name, text in texts.items():
        assert "tensor<2x8x32xi32>" in text and "stablehlo.while" in text, name
