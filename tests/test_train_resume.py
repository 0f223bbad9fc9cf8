"""Exact resume after a killed process, and SIGTERM handling, with the real SFT driver in subprocesses."""

import os
import signal
import subprocess
import sys
import time

import chex
from killed_runs import ROOT, cli_env, run_cli  # noqa: F401 (cli_env is a fixture)

from rlhf_jax.checkpoint import Checkpointer, load_params
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.models import CausalLM
from rlhf_jax.testing import tiny_config

SFT = os.path.join(ROOT, "experiments", "sft_tiny.py")
SMALL = ["--set", "data.num_train=256", "--set", "data.num_eval=32", "--set", "data.batch_size=8",
         "--set", "train.eval_batches=1", "--set", "logging.tensorboard=false", "--set", "logging.console=false"]


def _args(workdir, steps=6):
    return ["run", SFT, "--set", f"workdir={workdir}", "--set", f"train.steps={steps}", "--set", "train.eval_every=3",
            "--set", "checkpoint.every=3", "--set", "checkpoint.keep=5", *SMALL]


def _final_params(workdir):
    abstract = CausalLM(tiny_config()).abstract_params()
    return load_params(os.path.join(workdir, "checkpoints"), abstract, step=6)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, cli_env):  # noqa: F811
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    done = run_cli(_args(straight), env=cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_cli(_args(interrupted), env=cli_env, kill="saved:3")  # SIGKILL once checkpoint 3 is on disk
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with Checkpointer(interrupted / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
    resumed = run_cli(_args(interrupted), env=cli_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = _final_params(straight), _final_params(interrupted)
    chex.assert_trees_all_equal(a, b, strict=True)  # same tree, shapes, dtypes and bits
    ra, rb = read_jsonl(straight / "metrics.jsonl"), read_jsonl(interrupted / "metrics.jsonl")
    assert [r["step"] for r in ra] == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # eval at 0, train 1..6, evals at 3 and 6
    assert ra == rb  # every metric of every step, bit for bit
    assert (straight / "results.json").exists() and (interrupted / "results.json").exists()


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path, cli_env):  # noqa: F811
    workdir = tmp_path / "run"
    args = ["run", SFT, "--set", f"workdir={workdir}", "--set", "train.steps=100000", "--set", "train.eval_every=0",
            "--set", "checkpoint.every=0", *SMALL]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax", *args], env=cli_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        records = read_jsonl(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= 2 for r in records):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # EXIT_PREEMPTED: resume me
    with Checkpointer(workdir / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
    last = read_jsonl(workdir / "metrics.jsonl")[-1]["step"]
    assert steps == [last] and last >= 2
    assert f"SIGTERM: saved checkpoint at step {last}; exiting" in err
    assert not (workdir / "results.json").exists()  # an interrupted run reports no results
