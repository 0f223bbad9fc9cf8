"""KTO end to end against a torch re-implementation of TRL's KTOTrainer loss (`trl` is not installed):
the loss and its gradient, the step on a tiny model (z0 over the global batch, micro-batches), a
batch of one class, the unpaired rows, and the driver's precomputed reference."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from step_fixtures import host_params, mesh_for, numpy_seq_logps, pair_batches, run_steps, tiny_lm
from rlhf_jax.config import CheckpointConfig, TrainConfig
from rlhf_jax.data.formats import DataError, RowRef, parse_row
from rlhf_jax.losses import kto_loss, kto_reference_point
from rlhf_jax.metrics import MetricsBuffer
from rlhf_jax.steps import KTO, make_dpo_step
from rlhf_jax.train import dpo, recipe_for, tiny_stages
from rlhf_jax.train.recipe import run


def _trl_kto(policy, ref, label, policy_kl, ref_kl, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """TRL's `KTOTrainer.kto_loss` + `get_batch_loss_metrics` (loss_type "kto"), float64 torch.

    z0 = mean over the batch (all processes) of the mismatched log-ratio, detached, clamped at 0;
    the loss is the mean over every example; a metric of an absent class is not logged (None).
    """
    t = lambda x: torch.tensor(np.asarray(x, np.float64))  # noqa: E731
    policy, ref, policy_kl, ref_kl = t(policy).requires_grad_(), t(ref), t(policy_kl), t(ref_kl)
    label = torch.tensor(np.asarray(label, bool))
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    chosen_ratio = policy[label] - ref[label]
    rejected_ratio = policy[~label] - ref[~label]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    loss = losses.nanmean()
    loss.backward()
    metrics = {"kl": kl.item()}
    for name, ratio, logps in (("chosen", chosen_ratio, policy[label]), ("rejected", rejected_ratio, policy[~label])):
        present = len(ratio) > 0
        metrics[f"rewards/{name}"] = (beta * ratio).mean().item() if present else None
        metrics[f"logps/{name}"] = logps.mean().item() if present else None
    if metrics["rewards/chosen"] is not None and metrics["rewards/rejected"] is not None:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss.item(), policy.grad.numpy(), metrics


def test_kto_loss_and_gradient_match_trl():
    rng = np.random.default_rng(0)
    policy, ref = rng.normal(-20, 3, 12), rng.normal(-20, 3, 12)
    ref_kl = rng.normal(-30, 2, 12)
    policy_kl = ref_kl + rng.normal(1.5, 1.0, 12)  # z0 > 0
    label = rng.random(12) < 0.4
    kw = dict(beta=0.3, desirable_weight=1.33, undesirable_weight=0.7)
    want, want_grad, want_m = _trl_kto(policy, ref, label, policy_kl, ref_kl, **kw)
    assert want_m["kl"] > 0

    def loss(p):
        z0 = kto_reference_point(jnp.asarray(policy_kl, jnp.float32), jnp.asarray(ref_kl, jnp.float32))
        losses, metrics = kto_loss(p, jnp.asarray(ref, jnp.float32), jnp.asarray(label), z0, **kw)
        return jnp.mean(losses), metrics

    (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(policy, jnp.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
    for key, value in want_m.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert (float(metrics["count/chosen"]), float(metrics["count/rejected"])) == (label.sum(), (~label).sum())
    # A negative batch estimate is clamped: z0 = 0, the same loss as kto_reference_point says.
    want0, _, m0 = _trl_kto(policy, ref, label, ref_kl, policy_kl, **kw)
    got0 = jnp.mean(kto_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(label),
                             kto_reference_point(jnp.asarray(ref_kl), jnp.asarray(policy_kl)), **kw)[0])
    assert m0["kl"] == 0.0 and float(got0) == pytest.approx(want0, rel=1e-5)


def _kto_batch(label):
    pairs = pair_batches(1, seed=3)[0]
    batch = {"tokens": pairs["chosen_tokens"], "loss_mask": pairs["chosen_loss_mask"], "label": np.asarray(label),
             "kl_tokens": pairs["rejected_tokens"], "kl_loss_mask": pairs["rejected_loss_mask"]}
    policy = numpy_seq_logps(host_params(), batch["tokens"], batch["loss_mask"])
    policy_kl = numpy_seq_logps(host_params(), batch["kl_tokens"], batch["kl_loss_mask"])
    # A reference that differs from the policy: log-ratios of both signs, a positive z0.
    offsets = np.linspace(-3.0, 2.0, len(policy))
    batch["ref_logps"] = (policy - offsets).astype(np.float32)
    batch["ref_kl_logps"] = (policy_kl - 1.5 - offsets[::-1]).astype(np.float32)
    return batch, policy, policy_kl


@pytest.mark.parametrize("label", [np.arange(8) % 3 == 0, np.ones(8, bool)], ids=["mixed", "all_desirable"])
def test_kto_step_matches_trl_on_the_global_batch(label):
    """Loss, z0 and metrics of the first step (4 devices, 2 micro-batches) equal TRL's on the whole batch.

    z0 is the global batch's mean (TRL gathers the per-process means); with micro-batches it is still
    the whole batch's (TRL, with gradient accumulation, estimates it per micro-batch). A batch with
    no undesirable example: TRL does not log the rejected metrics (nor a margin); the step gives 0
    for them beside `count/rejected` = 0, and the run's metrics buffer leaves them out of the record
    (it logged rewards/rejected = logps/rejected = 0, which read as values).
    """
    batch, policy, policy_kl = _kto_batch(label)
    obj = KTO(beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    want, _, want_m = _trl_kto(policy, batch["ref_logps"], label, policy_kl, batch["ref_kl_logps"],
                               beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    assert want_m["kl"] > 0.1
    for micro in (1, 2):
        _, (got,) = run_steps(make_dpo_step, head="lm", shape={"data": 2, "fsdp": 2}, strategy="fsdp",
                              batches=[batch], objective=obj, reference="precomputed", micro_batches=micro)
        assert got["loss"] == pytest.approx(want, rel=1e-4)
        for key, value in want_m.items():
            assert got[key] == pytest.approx(0.0 if value is None else value, rel=1e-4, abs=1e-4), (micro, key)
        if want_m["rewards/rejected"] is None:
            assert got["rewards/margins"] == pytest.approx(got["rewards/chosen"], rel=1e-6)
        # TRL's `count/chosen` / `count/rejected`: the examples of each class in the (gathered) batch
        assert (got["count/chosen"], got["count/rejected"]) == (label.sum(), (~label).sum()), micro
        buffer = MetricsBuffer()
        buffer.append(1, got)
        [(_, logged)] = buffer.flush()
        trl_logged = {k for k, v in want_m.items() if v is not None}
        assert {k for k in logged if "/" in k and not k.startswith("count/")} | {"kl"} == trl_logged, micro
        for key in trl_logged:
            assert logged[key] == pytest.approx(want_m[key], rel=1e-4, abs=1e-4), (micro, key)
        assert (logged["count/chosen"], logged["count/rejected"]) == (label.sum(), (~label).sum())


def test_kto_step_counts_skip_empty_rows_and_sum_over_micro_batches_and_devices():
    """`count/chosen` / `count/rejected` are the whole batch's desirable / undesirable examples with 2
    micro-batches on 4 devices (not a micro-batch's, nor their mean times anything); a padding row (no
    target token) is in neither."""
    label = np.arange(8) % 3 == 0
    batch, _, _ = _kto_batch(label)
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][[0, 4]] = 0   # one desirable, one undesirable padding row
    _, (got,) = run_steps(make_dpo_step, head="lm", shape={"data": 2, "fsdp": 2}, strategy="fsdp", batches=[batch],
                          objective=KTO(beta=0.2), reference="precomputed", micro_batches=2)
    keep = np.ones(8, bool)
    keep[[0, 4]] = False
    assert (got["count/chosen"], got["count/rejected"]) == ((label & keep).sum(), (~label & keep).sum()) == (2, 4)


def _trl_weights_in_range(nd, nu, wd, wu):
    """TRL's KTOTrainer check (Eq. 8 of the KTO paper): no warning for equal class counts, else one of
    the weights inside the range its counterpart and the counts allow (TRL writes 4/3 as 1.33)."""
    if nd == nu:
        return True
    return nu * wu / nd <= wd <= 4 / 3 * nu * wu / nd or nd * wd / nu / (4 / 3) <= wu <= nd * wd / nu


@pytest.mark.parametrize("nd, nu, wd, wu", [(90, 10, 1.0, 1.0), (40, 30, 1.0, 1.0), (30, 40, 1.0, 1.0),
                                             (30, 40, 1.2, 0.9), (30, 40, 1.4, 0.9), (10, 90, 9.5, 1.0),
                                             (20, 20, 1.0, 2.0), (7, 3, 1.0, 0.0)])
def test_kto_class_balance_warns_as_trl(nd, nu, wd, wu, caplog):
    """TRL's KTOTrainer warns when lambda_D n_D / (lambda_U n_U) is outside [1, 4/3] for a training set
    whose classes differ in size; the run did not. It warns once, naming the ratio and the weights that
    would bring it into range (each of which does)."""
    message = dpo.kto_class_balance(nd, nu, wd, wu)
    assert (message is None) == _trl_weights_in_range(nd, nu, wd, wu)
    dataset = dataclasses.make_dataclass("D", ["arrays"])({"label": np.random.default_rng(0).permutation(
        np.arange(nd + nu) < nd)})
    with caplog.at_level("WARNING", logger="rlhf_jax.train"):
        dpo.warn_kto_class_balance(KTO(desirable_weight=wd, undesirable_weight=wu), dataset)
    assert [r.getMessage() for r in caplog.records] == ([] if message is None else [message])
    if message is None:
        return
    ratio = wd * nd / (wu * nu) if wu else float("inf")
    assert f"= {ratio:.4g} is outside [1, 4/3]" in message
    for name, low, high in re.findall(r"(\w+_weight) in \[([\d.e+-]+), ([\d.e+-]+)\]", message):
        for value in (float(low), float(high)):
            fixed = {"desirable_weight": (value, wu), "undesirable_weight": (wd, value)}[name]
            assert 1 - 1e-3 <= fixed[0] * nd / (fixed[1] * nu) <= 4 / 3 + 1e-3, (name, value)


def test_kto_class_balance_names_an_absent_class():
    assert dpo.kto_class_balance(0, 5, 1.0, 1.0).startswith("KTO: the training set has 0 desirable and 5 undesirable "
                                                            "examples: no weights bring")
    assert dpo.kto_class_balance(90, 10, 1.0, 1.0).endswith(
        "= 9 is outside [1, 4/3], the range the KTO paper recommends: set desirable_weight in [0.1111, 0.1481] or "
        "undesirable_weight in [6.75, 9]")


def test_a_preference_pair_given_to_kto_names_the_conversion():
    ref = RowRef("prefs.jsonl", 2, "line")
    with pytest.raises(DataError, match=r"prefs.jsonl line 2: this is a preference pair \('chosen', 'rejected'\), "
                                        r"not an unpaired row: .*unpair_preference_dataset"):
        parse_row({"prompt": "q", "chosen": "a", "rejected": "b"}, "unpaired", ref)
    with pytest.raises(DataError, match=r"line 2: column 'label' must be a bool .*got float 1.0"):
        parse_row({"prompt": "q", "completion": "a", "label": 1.0}, "unpaired", ref)


def _kto_run(tmp_path, name, *, eval_set=None, algorithm=KTO(beta=0.1), **changes):
    config = tiny_stages.vowel_dpo(name, algorithm, steps=3)
    data = dataclasses.replace(config.data, batch_size=8, num_train=64, eval=eval_set, num_eval=20)
    config = dataclasses.replace(config, workdir=str(tmp_path / name), train=TrainConfig(steps=3, eval_every=0),
                                 checkpoint=CheckpointConfig(every=0, async_save=False), data=data,
                                 sampling=dpo.SampleEvalConfig(num_prompts=0), **changes)
    run(recipe_for(config), config)
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r or "eval/loss" in r]


def test_kto_run_evaluates_its_held_out_set(tmp_path):
    """`data.eval` of a KTO run was tokenized and never evaluated (the held-out loss ran for paired
    objectives only). At step 0 the policy is the reference: z0 = 0, every implied reward 0, each
    loss 1 - sigmoid(0) = 0.5 times its class weight (TRL's KTOTrainer eval); after training, not."""
    algorithm = KTO(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    records = _kto_run(tmp_path, "eval", eval_set="synthetic:vowel", algorithm=algorithm)
    first, final = [r for r in records if "eval/loss" in r]
    assert (first["step"], final["step"]) == (0, 3)
    assert first["eval/kl"] == 0.0
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    # 20 held-out examples, the vowel pairs split in two: 10 desirable (weight 1), 10 undesirable (2).
    assert first["eval/loss"] == pytest.approx(0.5 * (10 * 1.0 + 10 * 2.0) / 20, rel=1e-6)
    assert first["eval/logps/chosen"] < 0 and first["eval/logps/rejected"] < 0
    assert final["eval/rewards/chosen"] != 0.0 and final["eval/loss"] != first["eval/loss"]


def test_kto_held_out_eval_matches_trl_batch_by_batch():
    """Each held-out batch is TRL's KTO eval batch: z0 from that batch's own mismatched rows (the whole
    batch's, not each micro-batch's), clamped at 0; the set's loss and `kl` are means over examples,
    `*/chosen` over desirable examples only, `*/rejected` over undesirable ones (an empty row counts
    nowhere)."""
    from rlhf_jax.train.dpo import make_preference_eval

    policy, reference = host_params(seed=0), host_params(seed=1)
    batches, labels = [], [np.arange(8) % 3 == 0, np.arange(8) != 2]
    for pairs, label in zip(pair_batches(2, seed=5), labels):
        batch = {"tokens": pairs["chosen_tokens"], "loss_mask": pairs["chosen_loss_mask"], "label": label,
                 "kl_tokens": np.roll(pairs["rejected_tokens"], 1, 0),
                 "kl_loss_mask": np.roll(pairs["rejected_loss_mask"], 1, 0)}
        batches.append(batch)
    batches[1]["loss_mask"][7] = 0  # an empty (padding) row: in no mean, and its KL row is empty too
    batches[1]["kl_loss_mask"][0] = 0
    obj = KTO(beta=0.3, desirable_weight=1.2, undesirable_weight=0.7)
    evaluate = make_preference_eval(tiny_lm(), obj, batches, reference, mesh=mesh_for({"data": 2, "fsdp": 2}),
                                    strategy="fsdp", micro_batches=2)
    got = evaluate(policy)

    sums, counts, kls = {}, {}, []
    for b in batches:
        rows, kl_rows = b["loss_mask"].sum(1) > 0, b["kl_loss_mask"].sum(1) > 0
        lp = lambda params, key: numpy_seq_logps(params, b[key + "tokens"], b[key + "loss_mask"])  # noqa: E731
        pk, rk = lp(policy, "kl_")[kl_rows], lp(reference, "kl_")[kl_rows]
        loss, _, m = _trl_kto(lp(policy, "")[rows], lp(reference, "")[rows], b["label"][rows], pk, rk, beta=0.3,
                              desirable_weight=1.2, undesirable_weight=0.7)
        kls.append(m["kl"])
        n, d = rows.sum(), (rows & b["label"]).sum()
        for key, value, w in (("loss", loss, n), ("kl", m["kl"], n), ("rewards/chosen", m["rewards/chosen"], d),
                              ("rewards/rejected", m["rewards/rejected"], n - d),
                              ("logps/chosen", m["logps/chosen"], d), ("logps/rejected", m["logps/rejected"], n - d)):
            sums[key] = sums.get(key, 0.0) + w * value
            counts[key] = counts.get(key, 0) + w
    assert max(kls) > 0.05  # a z0 that matters (a clamped one would not test the estimate)
    want = {f"eval/{k}": sums[k] / counts[k] for k in sums}
    want["eval/rewards/margins"] = want["eval/rewards/chosen"] - want["eval/rewards/rejected"]
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_precomputed_kto_reference_takes_the_kl_rows_it_was_computed_on(tmp_path, caplog):
    """The reference log-probs of the KL rows were computed in one unshuffled pass, the policy's on
    the shuffled training batches, each row paired with another completion: at the first step
    (policy = reference) z0 was 1.88 and the loss 0.5117 instead of 0 and 0.5. The training batches
    now take the pairs of the pass (fixed per example, as TRL's KTO fixes them)."""
    with caplog.at_level("WARNING"):
        first = _kto_run(tmp_path, "pre", reference="precomputed")[0]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []  # 32 + 32 examples: balanced
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_kto_with_a_batch_of_one_or_packed_rows_is_refused():
    """One example per batch is its own KL pair: z0 = max(0, r), so a desirable example with r > 0 had
    a constant loss of 0.5 and no gradient. TRL refuses it as well. Packed KTO rows failed at startup in
    `batch_spec`, naming no config key."""
    from rlhf_jax.config import ConfigError

    config = tiny_stages.vowel_dpo("one", KTO())
    with pytest.raises(ConfigError, match=r"data.batch_size must be >= 2 with KTO\(reference_point='mismatched'\), "
                                          r"got 1: a batch of one example is its own mismatched pair"):
        dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=1))
    with pytest.raises(ConfigError, match=r"data.pack must be false with KTO: its unpaired examples are never packed"):
        dataclasses.replace(config, data=dataclasses.replace(config.data, pack=True))
    zero = dataclasses.replace(config, algorithm=KTO(reference_point="zero"))
    assert dataclasses.replace(zero, data=dataclasses.replace(config.data, batch_size=1)).data.batch_size == 1


def test_compile_plans_the_kto_held_out_eval():
    """`rlhf-jax compile` of a KTO run with `data.eval` plans its held-out eval program (it planned
    none, as the run ran none), and in the run's micro-batches."""
    import rlhf_jax.compile as compile_mod
    from rlhf_jax.train.aot import plan_run

    config = tiny_stages.vowel_dpo("plan_kto", KTO(beta=0.1), steps=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=16, num_train=32,
                                                                  num_eval=16),
                                 train=dataclasses.replace(config.train, micro_batches=2, eval_batches=1),
                                 sampling=dpo.SampleEvalConfig(num_prompts=0))
    texts, real = {}, compile_mod.compile_program

    def spy(name, lower, *args, **kwargs):
        texts[name] = lower().as_text()
        return real(name, lower, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_mod, "compile_program", spy)
        plan = plan_run(config, compiler_options={"xla_backend_optimization_level": 0})
    assert [p.name for p in plan.programs] == ["update step", "reference log-probs", "eval (held-out loss)"]
    assert all(p.ok for p in plan.programs)
    assert "tensor<2x8x32xi32>" in texts["eval (held-out loss)"]  # the run's 2 pieces of 8 rows


def test_kto_held_out_eval_of_one_class_logs_no_means_of_the_other():
    """A held-out set whose examples are all desirable: `eval/rewards/rejected` and `eval/logps/rejected` were
    logged as 0 (a sum over no example divided by max(0, 1)) and `eval/rewards/margins` as the chosen mean;
    they are now left out, as the training logs leave out an absent class (`without_empty_means`). The rest
    is TRL's, batch by batch."""
    from rlhf_jax.train.dpo import make_preference_eval

    policy, reference = host_params(seed=0), host_params(seed=1)
    batches = []
    for pairs in pair_batches(2, seed=5):
        batches.append({"tokens": pairs["chosen_tokens"], "loss_mask": pairs["chosen_loss_mask"],
                        "label": np.ones(8, bool), "kl_tokens": np.roll(pairs["rejected_tokens"], 1, 0),
                        "kl_loss_mask": np.roll(pairs["rejected_loss_mask"], 1, 0)})
    obj = KTO(beta=0.3, desirable_weight=1.2, undesirable_weight=0.7)
    got = make_preference_eval(tiny_lm(), obj, batches, reference, mesh=mesh_for({"data": 2}), strategy="dp")(policy)

    sums, count = {}, 0
    for b in batches:
        lp = lambda params, key: numpy_seq_logps(params, b[key + "tokens"], b[key + "loss_mask"])  # noqa: E731
        loss, _, m = _trl_kto(lp(policy, ""), lp(reference, ""), b["label"], lp(policy, "kl_"), lp(reference, "kl_"),
                              beta=0.3, desirable_weight=1.2, undesirable_weight=0.7)
        assert m["rewards/rejected"] is None and "rewards/margins" not in m
        for key, value in (("loss", loss), ("kl", m["kl"]), ("rewards/chosen", m["rewards/chosen"]),
                           ("logps/chosen", m["logps/chosen"])):
            sums[key] = sums.get(key, 0.0) + 8 * value
        count += 8
    want = {f"eval/{k}": v / count for k, v in sums.items()}
    assert set(got) == set(want)
    assert abs(want["eval/rewards/chosen"]) > 0.05  # the margin the old code logged (chosen - 0) was not 0
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
