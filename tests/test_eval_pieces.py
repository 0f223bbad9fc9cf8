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
    for k, v in whole.items():  # margins: beta x differences of log-prob sums near -60, rounded by float32
        assert pieces[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k  # (~4e-7; AVX2 CPUs: 1.03e-7)


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


def _policy_eval_parts(temperature: float, sampler_dtype=None):
    """A GRPO config's held-out evaluation on the tiny model: 6 arithmetic prompts in batches of 4
    (the last with 2 padding rows), `train.eval_batches` 5 (more than there are), sampled at `temperature`."""
    import tempfile

    from rlhf_jax.config import TrainConfig
    from rlhf_jax.data.synthetic import ArithmeticTask
    from rlhf_jax.models import CausalLM
    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.steps import grpo_config
    from rlhf_jax.testing import tiny_config
    from rlhf_jax.train import rl
    from rlhf_jax.train.data import load_run_data
    from rlhf_jax.train.run_config import DataConfig

    model = tiny_config(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16)
    config = rl.GRPORunConfig(
        name="eval", workdir=tempfile.mkdtemp(), model=model, mesh=MeshConfig(data=-1, strategy="dp"),
        data=DataConfig(train="synthetic:arithmetic", eval="synthetic:arithmetic", num_train=8, num_eval=6,
                        max_len=16, batch_size=4, arithmetic=ArithmeticTask(max_operand=9)),
        algorithm=dataclasses.replace(grpo_config("grpo", group_size=4), temperature=temperature),
        rollout=rl.RolloutConfig(max_new_tokens=4, sampler_dtype=sampler_dtype), train=TrainConfig(steps=1, eval_batches=5))
    data, mesh, policy = load_run_data(config, "prompt"), config.mesh.make_mesh(), CausalLM(config.model)
    collector, gold = rl.rollout_parts(config, data, mesh, policy, 1, {})
    return config, data, mesh, policy, collector, gold


def _hand_logps(policy, params, arrays, temperature: float) -> np.ndarray:
    """Summed `log softmax(logits / T)` of each row's completion tokens, one unpadded row at a time (NumPy)."""
    out = []
    for i, n in enumerate(arrays["prompt_lengths"]):
        completion = arrays["completion_tokens"][i][arrays["completion_mask"][i]]
        tokens = np.concatenate([arrays["prompt_tokens"][i, :n], completion])[None].astype(np.int32)
        z = np.asarray(policy.forward(params, tokens).logits, np.float64)[0] / temperature
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        out.append(sum(logp[n - 1 + j, t] for j, t in enumerate(completion)))
    return np.array(out)


def test_rl_eval_kl_is_k1_at_the_sampling_temperature_over_real_prompts_only():
    """`eval/kl` = mean over the 6 real prompts of sum_t (log pi - log ref), both at T = 0.7 (a
    reference at T = 1 would give another number); padding rows are not sampled or counted; the
    same prompts and key every evaluation; with a baseline, ties of the gold reward count half."""
    from rlhf_jax.rewards import PythonReward
    from rlhf_jax.train import rl
    from rlhf_jax.train.data import eval_batches
    from rlhf_jax.train.evals import make_policy_eval

    t = 0.7
    config, data, mesh, policy, collector, gold = _policy_eval_parts(t)
    seen, sample = [], collector.sample
    collector.sample = lambda *a, **k: seen.append(sample(*a, **k)) or seen[-1]
    evaluate = rl.policy_eval(config, data, collector, gold, rl._reference_logps(policy, config.algorithm, mesh, "dp"),
                              mesh)
    pi, ref = jax.jit(policy.init)(jax.random.key(1)), jax.jit(policy.init)(jax.random.key(2))
    got = evaluate(pi, ref)
    assert [len(a["lengths"]) for a in seen] == [4, 2]   # 2 batches (not 5), the 2 padding rows dropped
    kl = np.concatenate([_hand_logps(policy, pi, a, t) - _hand_logps(policy, ref, a, t) for a in seen])
    at_t1 = np.concatenate([_hand_logps(policy, pi, a, t) - _hand_logps(policy, ref, a, 1.0) for a in seen])
    assert got["eval/kl"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-6)
    assert abs(at_t1.mean() - kl.mean()) > 1e-2   # the check tells the two temperatures apart
    lengths = np.concatenate([a["lengths"] for a in seen])
    assert got["eval/completions/mean_length"] == pytest.approx(lengths.mean())
    assert evaluate(pi, ref) == got   # same prompts, same key: a curve's points are comparable
    assert abs(evaluate(pi, pi)["eval/kl"]) < 1e-5   # the policy against itself: float rounding only

    tie = PythonReward(lambda completions, **kwargs: [1.0] * len(completions), "tie")
    held_out = eval_batches(data.eval, config.data, max_batches=config.train.eval_batches)
    win = make_policy_eval(collector, held_out, key=jax.random.key(0), gold=("eval/g", tie), baseline=ref)
    assert win(pi, None)["eval/gold_win_rate"] == 0.5   # every gold reward ties with the baseline's


def test_eval_kl_of_a_bfloat16_sampler_takes_the_policy_side_from_the_trainer_pass():
    """With `rollout.sampler_dtype="bfloat16"` on a float32 model, the sampler's log-probs are not
    the reference pass's numerics: the policy against itself read |eval/kl| > 1e-4. The policy's side
    now comes from the same float32 pass as the reference's (as TRL computes it)."""
    from rlhf_jax.train import rl

    config, data, mesh, policy, collector, gold = _policy_eval_parts(1.0, sampler_dtype="bfloat16")
    assert rl.sampler_numerics_differ(config, policy)
    assert not rl.sampler_numerics_differ(dataclasses.replace(config, rollout=rl.RolloutConfig(sampler_dtype="float32")), policy)
    logps = rl._reference_logps(policy, config.algorithm, mesh, "dp")
    pi = jax.jit(policy.init)(jax.random.key(1))
    sampler_side = rl.policy_eval(config, data, collector, gold, logps, mesh)(pi, pi)["eval/kl"]
    trainer_side = rl.policy_eval(config, data, collector, gold, logps, mesh, logps)(pi, pi)["eval/kl"]
    assert abs(sampler_side) > 1e-4
    assert abs(trainer_side) < 1e-6



def test_an_evaluation_without_batches_is_one_clear_error():
    from rlhf_jax.train.evals import make_policy_eval

    mesh = mesh_for(MESH)
    with pytest.raises(ValueError, match=r"^make_weighted_eval: batches is empty; an evaluation needs at least one "
                                         r"held-out batch$"):
        make_sft_eval(tiny_lm(), [], mesh=mesh, strategy="dp")(_params(mesh))
    with pytest.raises(ValueError, match=r"^make_policy_eval: batches is empty"):
        make_policy_eval(None, [], key=jax.random.key(0))


def test_preference_eval_metrics_are_trl_s_per_pair_means_over_real_pairs():
    """`eval/rewards/*` = beta (policy - reference) summed completion log-probs (NumPy), accuracy
    strict `chosen > rejected`, each a mean over the real pairs of batches of 8, 5 and 1 real pairs
    (not a mean of batch means)."""
    mesh, beta, lm = mesh_for(MESH), 0.1, tiny_lm()
    reference, policy = _params(mesh), _params(mesh, scale=0.02)
    extra = pair_batches(1, seed=9)[0]
    extra["example_mask"] = np.arange(8) == 0
    for k in ("chosen_loss_mask", "rejected_loss_mask"):
        extra[k] = np.where(extra["example_mask"][:, None], extra[k], 0)
    batches = _eval_batches() + [extra]
    got = dpo_mod.make_preference_eval(lm, DPO(beta=beta), batches, reference, mesh=mesh, strategy="dp")(policy)

    def logps(params, tokens, mask):
        z = np.asarray(lm.forward(jax.device_get(params), tokens).logits, np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return (np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum(1)

    rewards = {side: np.concatenate([
        beta * (logps(policy, b[f"{side}_tokens"], b[f"{side}_loss_mask"])
                - logps(reference, b[f"{side}_tokens"], b[f"{side}_loss_mask"]))[b["example_mask"]] for b in batches])
        for side in ("chosen", "rejected")}
    c, r = rewards["chosen"], rewards["rejected"]
    assert len(c) == 14
    want = {"eval/rewards/chosen": c.mean(), "eval/rewards/rejected": r.mean(), "eval/rewards/margins": (c - r).mean(),
            "eval/rewards/accuracies": (c > r).mean(), "eval/loss": np.log1p(np.exp(-(c - r))).mean()}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
