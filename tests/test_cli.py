"""The `rlhf-jax` command line: help, config overrides and bad input, convert and export round trips."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.cli import build_parser, main
from rlhf_jax.config import CheckpointConfig
from rlhf_jax.models import CausalLM
from rlhf_jax.models.hf import load_hf, save_hf
from rlhf_jax.testing import tiny_config
from rlhf_jax.train.results import ChecksMissed, check_passed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "experiments", "sft_tiny.py")


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [[], ["run"], ["compile"], ["convert"], ["export"]])
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: rlhf-jax")
    if command:
        assert f"rlhf-jax {command[0]}" in text


def test_console_script_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0 and "run" in proc.stdout and "convert" in proc.stdout


def test_print_config_applies_overrides(capsys):
    code, out, _ = _run(capsys, "run", SFT, "--set", "optim.learning_rate=0.01", "--set", "train.steps=7",
                        "--print-config")
    assert code == 0
    config = json.loads(out)
    assert config["optim"]["learning_rate"] == 0.01 and config["train"]["steps"] == 7
    assert config["name"] == "sft_tiny" and config["model"]["num_layers"] == tiny_config().num_layers


def test_unknown_key_and_wrong_type_fail_before_compute(capsys, tmp_path):
    workdir = tmp_path / "run"
    code, _, err = _run(capsys, "run", SFT, "--set", "optim.learnig_rate=1", "--set", f"workdir={workdir}")
    assert code == 2
    assert "unknown key 'optim.learnig_rate'" in err and "Did you mean optim.learning_rate" in err
    assert "optim.weight_decay: float" in err  # the valid keys are listed
    code, _, err = _run(capsys, "run", SFT, "--set", "train.steps=many")
    assert code == 2 and "wrong type for 'train.steps'" in err and "got 'many'" in err
    code, _, err = _run(capsys, "run", SFT, "--set", "steps")
    assert code == 2 and "expected KEY=VALUE" in err
    assert not workdir.exists()


def test_missing_files_are_clear_errors(capsys, tmp_path):
    code, _, err = _run(capsys, "run", str(tmp_path / "nope.py"))
    assert code == 2 and "experiment file not found" in err
    code, _, err = _run(capsys, "run", f"{SFT}:wat")  # a mode the experiment does not have: one line
    assert code == 2 and err.strip().splitlines() == [
        f"rlhf-jax run: error: experiment {SFT}:wat: sft_tiny: unknown mode 'wat'; the modes are tiny (default) "
        "and lora"]
    missing = tmp_path / "missing.jsonl"
    code, _, err = _run(capsys, "run", SFT, "--set", f"data.train={missing}", "--set", f"workdir={tmp_path / 'w'}")
    assert code == 2 and f"data.train: {missing} does not exist" in err
    code, _, err = _run(capsys, "run", SFT, "--set", f"checkpoint.init_from={tmp_path / 'nothing'}",
                        "--set", f"workdir={tmp_path / 'w2'}")
    assert code == 2 and "checkpoint.init_from" in err and "does not exist" in err
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    code, _, err = _run(capsys, "run", SFT, "--set", f"data.tokenizer={broken}", "--set", f"workdir={tmp_path / 'w3'}")
    assert code == 2 and err.startswith(f"rlhf-jax run: error: load_tokenizer: no usable tokenizer in '{broken}'")
    assert len(err.strip().splitlines()) == 1


def test_checkpoint_of_another_model_shape_fails_before_compute(capsys, tmp_path):
    workdir = tmp_path / "run"
    other = tiny_config(hidden_size=32, head_dim=8)
    params = jax.eval_shape(CausalLM(other).init, jax.random.key(0))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    with Checkpointer(workdir / "checkpoints", config=CheckpointConfig(async_save=False), model_config=other) as ck:
        ck.save(5, {"params": params, "train": {"step": np.int32(5)}})
    code, _, err = _run(capsys, "run", SFT, "--set", f"workdir={workdir}")
    assert code == 2
    assert "does not match this run's model/state" in err
    assert "model.hidden_size: checkpoint 32, this run 64" in err
    assert not (workdir / "metrics.jsonl").exists()  # nothing was trained or logged


def _hf_dir(path, config, seed=0):
    params = jax.jit(CausalLM(config).init)(jax.random.key(seed))
    save_hf(path, config, params)
    return params


def test_convert_round_trip(capsys, tmp_path):
    config = tiny_config()
    params = _hf_dir(tmp_path / "hf", config)
    code, out, _ = _run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert code == 0 and "step 0" in out
    code, _, _ = _run(capsys, "convert", str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    assert code == 0
    config2, params2 = load_hf(tmp_path / "hf2")
    assert config2.hidden_size == config.hidden_size and config2.num_layers == config.num_layers
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code, _, err = _run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert code == 2 and "already holds checkpoints" in err
    code, _, err = _run(capsys, "convert", str(tmp_path), str(tmp_path / "x"))
    assert code == 2 and "neither a Hugging Face model directory" in err


def test_a_write_the_machine_refuses_is_one_line_and_leaves_nothing(tmp_path):
    """`convert` under a file size limit (as a full disk): exit 1, one `error:` line naming the file
    and the directory, and no output directory or staging files left behind."""
    config = tiny_config()
    ckpt = tmp_path / "ckpt"
    with Checkpointer(ckpt, config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(1, {"params": jax.jit(CausalLM(config).init)(jax.random.key(0)), "train": {"step": np.int32(1)}})

    limited = ("import resource, runpy, sys\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
               "sys.argv = ['rlhf-jax', *sys.argv[1:]]\n"
               "runpy.run_module('rlhf_jax', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", limited, "convert", str(ckpt), str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [f"rlhf-jax convert: error: save_hf: writing model.safetensors of {tmp_path / 'hf'} failed "
                     f"{lines[0].split(' failed ', 1)[1]}"] and lines[0].endswith("was left as it was"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_export_latest_and_best_with_tokenizer(capsys, tmp_path):
    from rlhf_jax.testing.tokenizer import save_offline_tokenizer

    config = tiny_config()
    init = jax.jit(CausalLM(config).init)
    run = tmp_path / "run"
    cfg = CheckpointConfig(async_save=False, keep=3, keep_best=1, best_metric="eval/acc")
    saved = {}
    with Checkpointer(run / "checkpoints", config=cfg, model_config=config) as ck:
        for step, acc in [(1, 0.9), (2, 0.5), (3, 0.6)]:
            saved[step] = init(jax.random.key(step))
            ck.save(step, {"params": saved[step], "train": {"step": np.int32(step)}}, metrics={"eval/acc": acc})
    save_offline_tokenizer(run / "tokenizer")
    for which, step in (("latest", 3), ("best", 1), ("2", 2)):
        out_dir = tmp_path / f"hf_{which}"
        code, out, _ = _run(capsys, "export", str(run), str(out_dir), "--step", which)
        assert code == 0 and "with its tokenizer" in out
        _, params = load_hf(out_dir)
        np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(saved[step]["embed"]))
        assert os.path.exists(out_dir / "tokenizer.json")
    code, _, err = _run(capsys, "export", str(run), str(tmp_path / "hf_latest"))
    assert code == 2 and "exists" in err
    code, _, err = _run(capsys, "export", str(tmp_path), str(tmp_path / "y"))
    assert code == 2 and "no checkpoints in" in err


def test_compile_an_experiment_and_dispatch_the_preset_form(capsys, tmp_path):
    report_file = tmp_path / "report.json"
    code, out, _ = _run(capsys, "compile", SFT, "--set", "data.batch_size=16", "--json", str(report_file))
    assert code == 0
    assert "== sft_tiny ==" in out and "verdict: FITS" in out
    assert "-- update step" in out and "-- eval (held-out loss)" in out  # every program of the run
    report = json.loads(report_file.read_text())["sft_tiny"]
    assert report["fits"] and report["target"] == f"cpu x{len(jax.devices())}" and report["peak_bytes"] > 0
    assert [p["name"] for p in report["programs"]][:2] == ["update step", "eval (held-out loss)"]
    # Without an experiment, the arguments go to rlhf_jax.compile's model-preset command line.
    code, _, err = _run(capsys, "compile", "--model", "no-such-model")
    assert code == 2 and "unknown --model 'no-such-model'" in err
    code, _, err = _run(capsys, "compile", "not_an_experiment")
    assert code == 2 and "give an experiment" in err
    code, _, err = _run(capsys, "compile", SFT, "--suggest", "-1")  # would have sliced the knobs from the end
    assert code == 2 and "--suggest is a number of knobs to try (>= 0), got -1" in err


def test_a_collective_that_lost_its_peer_is_named_as_such():
    """On N processes, the process whose collective found a peer gone says so after its traceback (its
    own error is only gloo's), so that a user looks in the other process's output for the cause."""
    from rlhf_jax.cli import _lost_a_peer

    gloo = RuntimeError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
                        "Connection closed by peer [127.0.0.1]:53940")
    assert _lost_a_peer(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("while gathering the rewards") from inner
    except ValueError as outer:
        assert _lost_a_peer(outer)  # found through the cause
    assert not _lost_a_peer(RuntimeError("reward source 'len' raised RuntimeError: user reward failed"))


def _argparse_error(capsys, *argv):
    """A bad option value: argparse's one `error:` line after the usage, exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_data_sources_name_their_key(capsys, tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("hi\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, problem in ((text, "unknown file type '.txt'"), (empty, "neither a saved Hugging Face dataset")):
        code, _, err = _run(capsys, "run", SFT, "--set", f"data.train={source}", "--set", f"workdir={tmp_path / 'w'}")
        assert code == 2 and err.startswith("rlhf-jax run: error: data.train: ") and problem in err
        assert str(source) in err and len(err.strip().splitlines()) == 1
    rows = tmp_path / "rows.jsonl"  # fewer training examples than one batch: refused before compiling
    rows.write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "b"}) + "\n" for i in range(20)))
    code, _, err = _run(capsys, "run", SFT, "--set", f"data.train={rows}", "--set", "data.batch_size=32",
                        "--set", f"workdir={tmp_path / 'w2'}")
    assert code == 2 and f"data.batch_size 32 is larger than the 20 training examples of data.train {rows}" in err
    code, _, err = _run(capsys, "run", SFT, "--set", "data.num_train=16", "--set", "data.batch_size=32",
                        "--set", f"workdir={tmp_path / 'w3'}")
    assert code == 2 and "data.batch_size 32 is larger than the 16 training examples" in err
    assert "raise data.num_train" in err
    assert not (tmp_path / "w2").exists() and not (tmp_path / "w3").exists()


def test_a_workdir_that_is_a_file_is_named(capsys, tmp_path):
    plain = tmp_path / "afile"
    plain.write_text("x")
    code, _, err = _run(capsys, "run", SFT, "--set", f"workdir={plain}")
    assert code == 2 and err.strip() == (f"rlhf-jax run: error: workdir: the run directory {plain} is a file; "
                                         "choose another workdir (--set workdir=...)")
    code, _, err = _run(capsys, "run", SFT, "--set", f"workdir={plain / 'run'}")
    assert code == 2 and f"workdir: the run directory {plain / 'run'} cannot be created: {plain} is a file" in err


def test_bad_step_and_device_memory_options_exit_2(capsys, tmp_path):
    for command in ("export", "convert"):
        code, line = _argparse_error(capsys, command, str(tmp_path), str(tmp_path / "out"), "--step", "foo")
        assert code == 2 and line == (f"rlhf-jax {command}: error: argument --step: must be an integer, 'latest' "
                                      "or 'best', got 'foo'")
    for value in ("nan", "inf", "-5", "0"):
        code, line = _argparse_error(capsys, "compile", SFT, "--device-memory-gib", value)
        assert code == 2 and line.endswith(f"argument --device-memory-gib: must be a finite number > 0 (GiB per "
                                           f"device), got '{value}'")
        code, line = _argparse_error(capsys, "compile", "--model", "w1", "--device-memory-gib", value)
        assert code == 2 and "must be a finite number > 0" in line
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "--help"])
    assert "(exit 3 if not, 2 on bad input)" in " ".join(capsys.readouterr().out.split())


def test_a_run_directory_given_as_a_model_says_so(capsys, tmp_path):
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", config=CheckpointConfig(async_save=False), model_config=tiny_config()) as ck:
        ck.save(1, {"params": jax.jit(CausalLM(tiny_config()).init)(jax.random.key(0))})
    (run / "config.json").write_text(json.dumps({"name": "sft_tiny", "model": {}}))  # the run's config record
    code, _, err = _run(capsys, "convert", str(run), str(tmp_path / "hf"))
    assert code == 2 and f"{run} is an rlhf-jax run directory" in err
    assert f"pass its checkpoints, {run / 'checkpoints'}" in err and f"rlhf-jax export {run} OUT_DIR" in err
    code, _, err = _run(capsys, "run", SFT, "--set", f"checkpoint.init_from={run}", "--set",
                        f"workdir={tmp_path / 'w'}")
    assert code == 2 and f"{run} is an rlhf-jax run directory" in err


def test_a_broken_tokenizer_file_is_named(capsys, tmp_path):
    from rlhf_jax.testing.tokenizer import save_offline_tokenizer

    tok = tmp_path / "tokenizer"
    save_offline_tokenizer(tok)
    (tok / "tokenizer_config.json").write_text("{bad")
    code, _, err = _run(capsys, "run", SFT, "--set", f"data.tokenizer={tok}", "--set", f"workdir={tmp_path / 'w'}")
    assert code == 2 and err.startswith(f"rlhf-jax run: error: load_tokenizer: no usable tokenizer in '{tok}': "
                                        f"{tok / 'tokenizer_config.json'} is not valid JSON (")
    assert len(err.strip().splitlines()) == 1


def test_rl_reward_and_minibatch_errors_are_refused_with_the_config(capsys):
    grpo = os.path.join(ROOT, "experiments", "grpo_tiny.py")
    code, _, err = _run(capsys, "run", grpo, "--set", "grpo.rewards.functions=[]", "--print-config")
    assert code == 2 and "--set grpo.rewards.functions=[]: rewards.functions is empty" in err
    code, _, err = _run(capsys, "run", grpo, "--set", "grpo.data.batch_size=8", "--set",
                        "grpo.algorithm.num_minibatches=3", "--print-config")
    assert code == 2 and ("data.batch_size 8 x algorithm.group_size 8 = 64 completions per step do not split into "
                          "algorithm.num_minibatches 3") in err


def test_missed_acceptance_checks_exit_1_naming_them_after_the_results_are_written(capsys, tmp_path):
    """An experiment that checks its figures (the quickstart's margins) raises `ChecksMissed` after
    writing them; `rlhf-jax run` reports the missed checks in one line and exits 1, not 0."""
    experiment = tmp_path / "checked.py"
    experiment.write_text(
        "import dataclasses, os\n"
        "from rlhf_jax.train.results import check_passed, write_json\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Config:\n"
        "    gain: float = 0.05\n"
        f"    workdir: str = {str(tmp_path)!r}\n"
        "def get_config():\n"
        "    return Config()\n"
        "def main(config):\n"
        "    passed = {'gain >= 0.1': config.gain >= 0.1, 'finite': True}\n"
        "    path = write_json(os.path.join(config.workdir, 'results.json'), {'gain': config.gain, 'passed': passed})\n"
        "    check_passed('checked', passed, path)\n"
        "    return {'passed': passed}\n")
    code, _, err = _run(capsys, "run", str(experiment))
    assert code == 1
    assert err.strip() == (f"rlhf-jax run: checked missed its checks: gain >= 0.1 (figures in "
                           f"{tmp_path / 'results.json'})")
    assert json.loads((tmp_path / "results.json").read_text())["passed"] == {"gain >= 0.1": False, "finite": True}
    code, out, err = _run(capsys, "run", str(experiment), "--set", "gain=0.2")
    assert code == 0 and json.loads(out)["passed"]["gain >= 0.1"] is True and not err
    check_passed("one", True, "r.json")
    with pytest.raises(ChecksMissed, match=r"^one missed its checks: one \(figures in r.json\)$"):
        check_passed("one", False, "r.json")


def test_export_from_the_cli_and_from_python_write_the_same_directory(capsys, tmp_path):
    """`rlhf-jax export RUN OUT` is `export_hf(RUN/checkpoints, OUT)`: the same files, byte for byte (the
    run's tokenizer included; a reward model's pad id with it); `--max-shard-size` writes shards with an
    index, and a size that is not one is refused by argparse."""
    from rlhf_jax.checkpoint_hf import export_hf
    from rlhf_jax.testing.tokenizer import save_offline_tokenizer

    config = tiny_config()
    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints", config=CheckpointConfig(async_save=False), model_config=config) as ck:
        ck.save(2, {"params": CausalLM(config, head="scalar").init(jax.random.key(0))})
    save_offline_tokenizer(run / "tokenizer")
    code, out, _ = _run(capsys, "export", str(run), str(tmp_path / "cli"), "--max-shard-size", "40000")
    assert code == 0 and out.strip() == f"exported {run}/checkpoints (step 2) to {tmp_path / 'cli'} with its tokenizer"
    export_hf(run / "checkpoints", tmp_path / "py", max_shard_size=40_000)

    def files(root):
        return {p.name: p.read_bytes() for p in root.iterdir()}

    assert files(tmp_path / "cli") == files(tmp_path / "py")
    assert "model.safetensors.index.json" in files(tmp_path / "py") and "tokenizer.json" in files(tmp_path / "py")
    assert json.loads((tmp_path / "py" / "config.json").read_text())["pad_token_id"] == 0
    _, params = load_hf(tmp_path / "cli")
    assert params["score"].shape == (config.hidden_size,)
    code, line = _argparse_error(capsys, "export", str(run), str(tmp_path / "x"), "--max-shard-size", "2 gigs")
    assert code == 2 and line == ("rlhf-jax export: error: argument --max-shard-size: max_shard_size must be bytes "
                                  "or like '2GB'/'500MiB', got '2 gigs'")
