"""Recipes and the one loop: `compile` lowers exactly what `run` runs; KTO and precomputed references.

The HLO check captures the arguments the run's jitted step is actually called with (shapes, dtypes,
shardings) and compares the text that lowering gives with the text of `rlhf-jax compile`'s path
(`train.aot.build_program` + `Program.abstract_args`), for SFT with packing, SimPO with chunked
log-probs, and GRPO.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.cli import load_experiment, main
from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.steps import KTO, SimPO
from rlhf_jax.steps.common import Step
from rlhf_jax.train import recipe_for, tiny_stages
from rlhf_jax.train.aot import build_program, run_configs
from rlhf_jax.train.recipe import run
from rlhf_jax.train.stages import Stage, resolve_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = dict(train=TrainConfig(steps=2, eval_every=0), checkpoint=CheckpointConfig(every=0, async_save=False),
             logging=LoggingConfig(console=False, tensorboard=False))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass(frozen=True)
class _Capturing(Step):
    calls: list = dataclasses.field(default_factory=list)

    def __call__(self, state, batch, *frozen):
        self.calls.append(_abstract((state, batch, *frozen)))
        return super().__call__(state, batch, *frozen)


def _run_capturing(config):
    """Run `config`; return the Step the run used and the arguments of each call (abstract)."""
    recipe = recipe_for(config)
    box = {}

    def build(cfg, mesh):
        program = recipe.build(cfg, mesh)
        step = _Capturing(**{f.name: getattr(program.step, f.name) for f in dataclasses.fields(Step)})
        box["step"] = step
        return dataclasses.replace(program, step=step)

    run(dataclasses.replace(recipe, build=build), config)
    return box["step"], box["step"].calls


def _sft(tmp_path):
    config = tiny_stages.sft_stage("hlo_sft", "synthetic:vowel", vowel=tiny_stages.VOWEL)
    return dataclasses.replace(config, workdir=str(tmp_path / "sft"), **SHORT,
                               data=dataclasses.replace(config.data, pack=True, seq_len=64, max_segments=4,
                                                        batch_size=8, num_train=64, eval=None))


def _simpo(tmp_path):
    config = tiny_stages.vowel_dpo("hlo_simpo", SimPO(beta=2.0, gamma=0.5), steps=1)
    return dataclasses.replace(config, workdir=str(tmp_path / "simpo"), logits_chunk_size=8, **SHORT,
                               data=dataclasses.replace(config.data, batch_size=8, num_train=32, eval=None))


def _grpo(tmp_path):
    config = tiny_stages.arithmetic_grpo("grpo", name="hlo_grpo")
    return dataclasses.replace(config, workdir=str(tmp_path / "grpo"), **SHORT,
                               data=dataclasses.replace(config.data, batch_size=8, num_train=32, eval=None))


@pytest.mark.parametrize("make", [_sft, _simpo, _grpo], ids=["sft_packed", "simpo_chunked", "grpo"])
def test_compile_lowers_the_hlo_the_run_executes(tmp_path, make):
    config = make(tmp_path)
    ran, calls = _run_capturing(config)
    # The second step takes what the first returned in the same shapes, dtypes and shardings: it
    # compiles nothing again.
    assert len(calls) == 2 and calls[1] == calls[0]
    planned = build_program(config)
    run_text = ran.jitted.lower(*calls[0]).as_text()
    plan_text = planned.step.jitted.lower(*planned.abstract_args()).as_text()
    assert run_text == plan_text
    assert "tf.aliasing_output" in plan_text or "jax.buffer_donor" in plan_text  # the state is donated


def _ppo(**value):
    from rlhf_jax.train import rl  # noqa: PLC0415

    config = tiny_stages.vowel_ppo("fresh_ppo")
    return dataclasses.replace(config, value=rl.ValueConfig(init="policy", **value),
                               algorithm=dataclasses.replace(config.algorithm, kl_target=1.0))


@pytest.mark.parametrize("make", [lambda: tiny_stages.sft_tiny(), lambda: tiny_stages.vowel_reward_model(),
                                  lambda: tiny_stages.arithmetic_grpo(), _ppo, lambda: _ppo(shared_backbone=True)],
                         ids=["sft", "reward_model", "grpo", "ppo", "ppo_shared_value_head"])
def test_a_fresh_state_is_laid_out_as_the_step_returns_it(make):
    """`StateSpec.fresh()` creates every array in its `shardings()` entry, the layout the step returns.

    Else the step's second call, its first on a state it returned, traces and compiles it again: PPO's
    KL-controller state was an uncommitted scalar, so every PPO run compiled its update twice.
    """
    from rlhf_jax import sharding as sh  # noqa: PLC0415

    config = make()
    state = recipe_for(config).build(config, sh.make_mesh(config.mesh.shape)).state
    fresh, shardings = state.fresh(), state.shardings()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    assert treedef == jax.tree.structure(shardings)
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)


def _distinct_experiment_runs() -> list[tuple[str, str, str]]:
    """(experiment, stage, recipe) of every run of every experiment's tiny mode, one per distinct config.

    Stages that several experiments share (the same config apart from name and directory) appear once.
    """
    from rlhf_jax.config import to_dict  # noqa: PLC0415

    seen, out = set(), []
    for name in sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "experiments")) if n.endswith(".py")):
        module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
        for stage, config in run_configs(module.get_config("tiny")).items():
            key = json.dumps({k: v for k, v in to_dict(config).items() if k not in ("name", "workdir")},
                             sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.append((name, stage, recipe_for(config).name))
    return out


EXPERIMENT_RUNS = _distinct_experiment_runs()


def test_every_recipe_is_among_the_experiment_runs():
    assert {"sft", "reward_model", "dpo", "grpo", "ppo"} <= {recipe for _, _, recipe in EXPERIMENT_RUNS}


@pytest.mark.parametrize("name,stage", [r[:2] for r in EXPERIMENT_RUNS], ids=[f"{n}:{s}" for n, s, _ in EXPERIMENT_RUNS])
def test_compile_accepts_every_experiment_run(name, stage):
    """`rlhf-jax compile`'s path builds and compiles every run of every experiment (tiny modes, CPU mesh)."""
    from rlhf_jax.train.aot import compile_run  # noqa: PLC0415

    module, _ = load_experiment(os.path.join(ROOT, "experiments", f"{name}.py"))
    config = run_configs(module.get_config("tiny"))[stage]
    report = compile_run(config, compiler_options={"xla_backend_optimization_level": 0})
    assert report.ok and report.fits, (name, stage, report.reason)


@pytest.mark.parametrize("mode,reference", [("dr_grpo", False), ("lora", True)])
def test_compile_command_plans_every_program_of_a_multi_stage_experiment(capsys, mode, reference):
    """Dr. GRPO has no KL term, so no reference pass; with LoRA the reference is the policy's base
    (the plan once passed the whole adapter tree to that pass, which did not compile)."""
    assert main(["compile", os.path.join(ROOT, "experiments", "grpo_tiny.py") + f":{mode}"]) == 0
    out = capsys.readouterr().out
    assert "== sft ==" in out and "== grpo ==" in out and out.count("verdict: FITS") == 2, out[-2000:]
    # Every program of the RL run is planned (issue 18).
    for program in ("update step", "weight hand-off", "sampler prefill", "sampler decode loop"):
        assert f"-- {program}" in out, program
    assert ("-- reference log-probs" in out) == reference


def test_stages_resolve_references_and_reject_unknown_ones(tmp_path):
    sft, ppo = tiny_stages.vowel_sft(), tiny_stages.vowel_ppo()
    resolved = resolve_stages(str(tmp_path), [Stage("sft", sft), Stage("rm", tiny_stages.vowel_reward_model()),
                                              Stage("ppo", ppo, init_from="sft", reward_model="rm")])
    assert resolved[2].config.checkpoint.init_from == str(tmp_path / "sft" / "checkpoints")
    assert resolved[2].config.rewards.reward_model == str(tmp_path / "rm" / "checkpoints")
    assert resolved[0].config.workdir == str(tmp_path / "sft")
    with pytest.raises(ValueError, match=r"ppo.init_from='sft' names no earlier stage"):
        resolve_stages(str(tmp_path), [Stage("ppo", ppo, init_from="sft"), Stage("sft", sft)])


def test_a_later_stage_data_error_is_reported_before_the_first_stage_trains(tmp_path):
    from rlhf_jax.train.stages import run_stages

    bad = dataclasses.replace(tiny_stages.vowel_dpo(), data=dataclasses.replace(
        tiny_stages.vowel_dpo().data, train=str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match=r"stage 'dpo': data.train: .*missing.jsonl does not exist"):
        run_stages(str(tmp_path), [Stage("sft", tiny_stages.vowel_sft()), Stage("dpo", bad, init_from="sft")])
    assert not (tmp_path / "sft").exists()  # nothing trained


def test_a_later_stage_bad_row_keeps_its_error_class_and_line(tmp_path):
    from rlhf_jax.data.formats import DataError
    from rlhf_jax.train.stages import run_stages

    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    bad = dataclasses.replace(tiny_stages.vowel_dpo(), data=dataclasses.replace(
        tiny_stages.vowel_dpo().data, train=str(path), eval=None, on_error="raise"))
    with pytest.raises(DataError, match=r"stage 'dpo': .*prefs.jsonl.*2"):
        run_stages(str(tmp_path), [Stage("sft", tiny_stages.vowel_sft()), Stage("dpo", bad, init_from="sft")])
    assert not (tmp_path / "sft").exists()


def _dpo_losses(tmp_path, name, *, data=None, **changes):
    config = tiny_stages.vowel_dpo(name, steps=3)
    data = data or dataclasses.replace(config.data, batch_size=8, num_train=64, eval=None)
    config = dataclasses.replace(config, workdir=str(tmp_path / name),
                                 **{**SHORT, "train": TrainConfig(steps=3, eval_every=0)}, data=data, **changes)
    run(recipe_for(config), config)
    return [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]


def test_precomputed_reference_gives_the_losses_of_recomputing(tmp_path):
    recomputed = _dpo_losses(tmp_path, "recomputed")
    precomputed = _dpo_losses(tmp_path, "precomputed", reference="precomputed")
    assert len(recomputed) == 3
    np.testing.assert_allclose(precomputed, recomputed, rtol=0, atol=1e-6)
    # Packed rows: each example's reference log-prob is looked up by the dataset index of its slot.
    packed = dataclasses.replace(tiny_stages.vowel_dpo().data, batch_size=8, num_train=64, eval=None, pack=True,
                                 seq_len=96, max_segments=3)
    np.testing.assert_allclose(_dpo_losses(tmp_path, "packed_pre", data=packed, reference="precomputed"),
                               _dpo_losses(tmp_path, "packed_model", data=packed), rtol=0, atol=1e-6)


def test_kto_runs_from_the_cli_with_trl_metric_names(tmp_path):
    args = ["run", os.path.join(ROOT, "experiments", "dpo_tiny.py") + ":kto", "--set", f"workdir={tmp_path}",
            "--set", "sft.train.steps=2", "--set", "sft.train.eval_every=0", "--set", "sft.data.num_train=64",
            "--set", "dpo.train.steps=2", "--set", "dpo.train.eval_every=2", "--set", "dpo.data.num_train=64",
            "--set", "dpo.data.num_eval=16", "--set", "dpo.sampling.num_prompts=8", "--set",
            "dpo.sampling.max_new_tokens=6", "--set", "dpo.reference=precomputed"]
    assert main(args) == 0
    records = read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "kl"} <= set(train[-1])
    assert [r["step"] for r in records if "eval/gold_reward" in r] == [0, 2]
    assert load_experiment(os.path.join(ROOT, "experiments", "dpo_tiny.py"))[0].get_config("kto").dpo.algorithm == KTO()


def _chain(tmp_path, sft_steps):
    sft = tiny_stages.vowel_sft()
    sft = dataclasses.replace(sft, **{**SHORT, "train": TrainConfig(steps=sft_steps, eval_every=0)},
                              data=dataclasses.replace(sft.data, batch_size=8, num_train=32, eval=None))
    dpo = tiny_stages.vowel_dpo(steps=1)
    dpo = dataclasses.replace(dpo, **{**SHORT, "train": TrainConfig(steps=1, eval_every=0)},
                              data=dataclasses.replace(dpo.data, batch_size=8, num_train=32, eval=None))
    return [Stage("sft", sft), Stage("dpo", dpo, init_from="sft")]


def test_a_finished_stage_whose_earlier_stage_changed_is_reported_stale(tmp_path, capsys):
    import warnings

    from rlhf_jax.train import dpo as dpo_mod
    from rlhf_jax.train.adapters import make_model
    from rlhf_jax.train.stages import StaleStageWarning, run_stages
    from rlhf_jax.train.weights import restore_item

    stages = _chain(tmp_path, 2)
    assert {k: v["step"] for k, v in run_stages(str(tmp_path), stages).items()} == {"sft": 2, "dpo": 1}
    recorded = json.loads((tmp_path / "dpo" / "stage_inputs.json").read_text())
    assert recorded["init_from"]["stage"] == "sft" and recorded["init_from"]["step"] == 2
    # DPO's reference (and its policy's start) is the SFT checkpoint, bit for bit.
    config = resolve_stages(str(tmp_path), stages)[1].config
    mesh = config.mesh.make_mesh()
    reference = dpo_mod.reference_params(make_model(config), config, mesh)
    sft_params = restore_item(str(tmp_path / "sft" / "checkpoints"), "params", None)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(sft_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with warnings.catch_warnings():  # a rerun of the same chain: both no-ops, nothing stale
        warnings.simplefilter("error", StaleStageWarning)
        run_stages(str(tmp_path), stages)
        # A finished stage's edited config is not applied, and it says so (it said "nothing to do").
        capsys.readouterr()
        edited = dataclasses.replace(stages[0].config, optim=dataclasses.replace(stages[0].config.optim,
                                                                                 learning_rate=1e-2))
        run_stages(str(tmp_path), [Stage("sft", edited), stages[1]])
    assert ("sft: already trained to step 2 (train.steps=2); nothing to do\nthe config differs from the one it was "
            "trained with, and is not applied: optim.learning_rate: 0.003 -> 0.01 (delete ") in capsys.readouterr().err
    # SFT trained further: DPO's checkpoints came from its step 2; it is kept, and said to be stale.
    with pytest.warns(StaleStageWarning, match=r"stage 'dpo': its checkpoints started from stage 'sft' at step 2 "
                                               r"\(init_from\), which is now re-written at step 3.*Delete .*dpo"):
        summaries = run_stages(str(tmp_path), _chain(tmp_path, 3))
    assert {k: v["step"] for k, v in summaries.items()} == {"sft": 3, "dpo": 1}


def test_stage_reward_model_must_name_a_reward_model_stage(tmp_path):
    with pytest.raises(ValueError, match=r"stages: ppo.reward_model='sft' names a sft stage, not a reward_model"):
        resolve_stages(str(tmp_path), [Stage("sft", tiny_stages.vowel_sft()),
                                       Stage("ppo", tiny_stages.vowel_ppo(), init_from="sft", reward_model="sft")])

    ppo = tiny_stages.vowel_ppo()
    ppo = dataclasses.replace(ppo, checkpoint=dataclasses.replace(ppo.checkpoint, init_from="runs/other/checkpoints"))
    with pytest.raises(ValueError, match=r"stages: ppo sets both init_from='sft' and "
                                         r"checkpoint.init_from=runs/other/checkpoints; give one"):
        resolve_stages(str(tmp_path), [Stage("sft", tiny_stages.vowel_sft()), Stage("ppo", ppo, init_from="sft")])
