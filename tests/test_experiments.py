"""Experiment modules: docstrings and configs, short runs through the CLI, real-size configs checked
by `jax.eval_shape` at full size and an ahead-of-time compile at reduced size on the 8-device CPU mesh.

The full-length tiny runs with their learning thresholds are in tests/test_experiments_full.py.
"""

import json
import os

import jax
import pytest

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.cli import experiment_config, load_experiment, main
from rlhf_jax.config import CheckpointConfig, flat_keys, override
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models import CausalLM
from rlhf_jax.optim import make_optimizer
from rlhf_jax.state import abstract_train_state
from rlhf_jax.train.aot import compile_run, run_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
TINY = ["sft_tiny", "reward_model_tiny", "dpo_tiny", "online_dpo_tiny", "rlaif_tiny", "agentic_tiny"]
REAL = ["dpo_qwen2_5_0_5b", "dpo_llama3_8b"]


def _path(name):
    return os.path.join(EXPERIMENTS, f"{name}.py")


@pytest.mark.parametrize("name", TINY + REAL)
def test_docstring_states_command_and_modes_build(name):
    module, _ = load_experiment(_path(name))
    doc = module.__doc__
    assert f"rlhf-jax run experiments/{name}.py" in doc
    modes = [None, "tiny"] + (["full"] if name in REAL else [])
    for mode in modes:
        config = module.get_config() if mode is None else module.get_config(mode)
        assert run_configs(config)  # every mode holds at least one run config
    with pytest.raises(ValueError, match="mode|only the tiny mode"):
        module.get_config("nonsense")


def test_every_dpo_loss_type_and_objective_is_selectable():
    module, _ = load_experiment(_path("dpo_tiny"))
    keys = flat_keys(module.get_config())
    assert keys["dpo.algorithm.loss_type"] == "'sigmoid' | 'robust' | 'hinge' | 'ipo' | 'apo_zero' | 'apo_down'"
    assert keys["dpo.reference"] == "'model' | 'precomputed'"
    for loss_type in ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "apo_down"):
        config = experiment_config(module, None, [f"dpo.algorithm.loss_type={loss_type}"])
        assert config.dpo.algorithm.loss_type == loss_type
    objectives = {mode: type(module.get_config(mode).dpo.algorithm).__name__ for mode in ("dpo", "simpo", "orpo", "kto")}
    assert objectives == {"dpo": "DPO", "simpo": "SimPO", "orpo": "ORPO", "kto": "KTO"}
    config = experiment_config(module, "simpo", ["dpo.algorithm.beta=2.5", "dpo.reference=precomputed"])
    assert config.dpo.algorithm.beta == 2.5 and config.dpo.reference == "precomputed"
    assert module.get_config("kto").workdir == "runs/dpo_tiny_kto"


def _small(workdir, *, steps, stage=""):
    return ["--set", f"workdir={workdir}", "--set", f"{stage}train.steps={steps}",
            "--set", f"{stage}train.eval_every={steps}", "--set", f"{stage}data.num_train=256",
            "--set", f"{stage}data.num_eval=32", "--set", f"{stage}train.eval_batches=1",
            "--set", f"{stage}logging.tensorboard=false", "--set", f"{stage}logging.console=false"]


def test_reward_model_tiny_runs_briefly_and_writes_results(tmp_path, capsys):
    # sft_tiny's short runs are in tests/test_fault_resume.py (uninterrupted, killed and resumed).
    workdir = tmp_path / "rm"
    assert main(["run", _path("reward_model_tiny"), *_small(workdir, steps=3)]) == 0
    results = json.loads((workdir / "results.json").read_text())
    assert results["experiment"] == "Reward Model Validation" and results["steps"] == 3
    assert results["accuracy_threshold"] == 0.9 and isinstance(results["passed"], bool)
    assert (workdir / "results.png").stat().st_size > 1000
    records = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 3]
    assert (workdir / "checkpoints" / "3").is_dir() and (workdir / "tokenizer" / "tokenizer.json").exists()
    printed = capsys.readouterr().out
    assert json.loads(printed)["steps"] == 3  # the CLI prints the experiment's summary


def test_dpo_tiny_runs_briefly_from_an_sft_checkpoint(tmp_path):
    # An untrained policy stands in for the SFT stage (its own short run is tested with sft_tiny).
    module, _ = load_experiment(_path("dpo_tiny"))
    model_config = module.get_config().dpo.model
    params = jax.jit(CausalLM(model_config).init)(jax.random.key(0))
    with Checkpointer(tmp_path / "sft", config=CheckpointConfig(async_save=False), model_config=model_config) as ck:
        ck.save(0, {"params": params})
    workdir = tmp_path / "dpo"
    args = ["run", _path("dpo_tiny"), "--set", f"sft_checkpoint={tmp_path / 'sft'}",
            *_small(workdir, steps=2, stage="dpo."), "--set", "dpo.sampling.num_prompts=8",
            "--set", "dpo.sampling.max_new_tokens=8"]
    assert main(args) == 0
    assert not (workdir / "sft").exists()
    results = json.loads((workdir / "dpo" / "results.json").read_text())
    assert results["experiment"] == "DPO baseline" and results["steps"] == 2
    evals = [r for r in read_jsonl(workdir / "dpo" / "metrics.jsonl") if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/gold_win_rate"] == 0.5  # step 0 is the starting policy against itself
    assert {"eval/rewards/accuracies", "eval/rewards/margins", "eval/loss"} <= set(evals[-1])
    assert (workdir / "dpo" / "results.png").exists()


@pytest.mark.slow
def test_agentic_tiny_runs_briefly_and_writes_results(tmp_path):
    # One step of each stage on a one-layer model (its modes and docstring are checked above, always);
    # the learning run is tests/test_agents.py::test_agentic_tiny_tool_use_rises_and_beats_the_no_tool_run.
    stages = ("sft.", "tool.", "no_tool.")
    sizes = [f"{s}model.num_layers=1" for s in stages] + [f"{s}train.steps=1" for s in stages] + [
        "sft.train.eval_every=0", "sft.data.batch_size=8", "num_demos=8", "num_eval_prompts=2"] + [
        f"{s}{k}" for s in stages[1:] for k in ("train.eval_every=1", "data.batch_size=1", "environment.max_turns=2",
                                                 "logging.console=false")]
    args = ["run", _path("agentic_tiny") + ":smoke", "--set", f"workdir={tmp_path}"]
    assert main(args + [a for kv in sizes for a in ("--set", kv)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 1 and [s for s, _ in results["accuracy_with_tool"]] == [0, 1]
    assert [s for s, _ in results["accuracy_without_tool"]] == [0, 1] and (tmp_path / "results.png").exists()
    records = read_jsonl(tmp_path / "tool" / "metrics.jsonl")
    assert {"num_turns/mean", "tool_calls/mean", "trajectory/observed_tokens/mean"} <= set(records[1])


@pytest.mark.parametrize("name", REAL)
def test_real_size_config_eval_shape_at_full_size(name):
    module, _ = load_experiment(_path(name))
    config = module.get_config("full")
    model = CausalLM(config.model)
    state = abstract_train_state(model.init, make_optimizer(config.optim))
    n = sum(x.size for x in jax.tree.leaves(state.params))
    assert n == module.EXPECTED_PARAMS
    # AdamW keeps two moments per parameter, all float32 like the parameters.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n
    assert config.mesh.strategy == "fsdp" and config.data.string_format == "chat"


@pytest.mark.parametrize("name", REAL)
def test_real_size_config_compiles_at_reduced_size_on_cpu_mesh(name):
    module, _ = load_experiment(_path(name))
    config = override(module.get_config("full"), [
        "model.num_layers=2", "data.batch_size=16", "data.max_len=64", "data.max_prompt_len=32",
        "train.micro_batches=2"])
    report = compile_run(config, device_memory_bytes=64 * 2**30,
                         compiler_options={"xla_backend_optimization_level": 0})
    assert report.ok, report.reason
    assert report.num_devices == 8 and report.mesh["fsdp"] == 8 and report.strategy == "fsdp"
    assert report.fits and report.peak_bytes > 0
    # FSDP really splits the state: the per-device train state is about 1/8 of the whole.
    model = CausalLM(config.model)
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_train_state(
        model.init, make_optimizer(config.optim))))
    assert report.state_bytes < 0.2 * full


def test_an_experiment_that_writes_its_data_keeps_a_data_path_given_with_set(tmp_path):
    """grpo_gsm8k_tiny writes GSM8K-format files and trains on them where its config names
    `<workdir>/data/...`; a path a user sets is what the stage reads (it used to be replaced)."""
    module, _ = load_experiment(_path("grpo_gsm8k_tiny"))
    mine = str(tmp_path / "my_gsm8k.jsonl")
    written = {"sft": "w/data/sft.jsonl", "train": "w/data/train.jsonl", "eval": "w/data/eval.jsonl"}
    default = module._with_files(experiment_config(module, None, []), written)
    assert (default.sft.data.train, default.grpo.data.train, default.grpo.data.eval) == (
        written["sft"], written["train"], written["eval"])
    given = module._with_files(experiment_config(module, None, [f"grpo.data.train={mine}"]), written)
    assert (given.sft.data.train, given.grpo.data.train, given.grpo.data.eval) == (
        written["sft"], mine, written["eval"])
