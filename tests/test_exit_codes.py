"""`rlhf-jax run` exit status: 75 (EX_TEMPFAIL, `EXIT_PREEMPTED`) when a signal stopped the run after it
saved a checkpoint, so that a scheduler can tell "preempted, rerun me" from "finished" (0); the rerun
resumes from it. (Resuming past a corrupt or half-written checkpoint: `test_fault_resume.py`.)"""

import json
import signal
import subprocess
import sys
import time

import pytest
from killed_runs import ROOT, cli_env  # noqa: F401 (cli_env is a fixture)

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.cli import EXIT_PREEMPTED


def _command(workdir, steps):
    sets = [f"workdir={workdir}", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
            "data.num_train=256", "data.num_eval=32", "checkpoint.every=1000", "logging.every=1"]
    flags = [a for s in sets for a in ("--set", s)]
    return [sys.executable, "-m", "rlhf_jax", "run", "experiments/sft_tiny.py", *flags]


def _train_steps(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_sigterm_exits_75_and_reruns_resume_from_the_newest_intact_checkpoint(tmp_path, cli_env):  # noqa: F811
    assert EXIT_PREEMPTED == 75
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(workdir, 5000), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env)   # the reruns below reuse its compiled programs
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "metrics.jsonl").exists() or not _train_steps(workdir):  # the first metrics line
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    stopped = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and 1 <= stopped < 5000
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [stopped] and ckpt.latest_step() == stopped
        assert ckpt.verify(stopped).status == "intact"
    assert _train_steps(workdir) == list(range(1, stopped + 1))
    assert f"SIGTERM: saved checkpoint at step {stopped}; exiting" in err
    assert not (workdir / "results.json").exists()  # an interrupted run reports no results

    # The same command (here asking for 2 more steps) resumes from that checkpoint and finishes with 0.
    rerun = subprocess.run(_command(workdir, stopped + 2), cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=cli_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout[rerun.stdout.index("{"):])["steps"] == stopped + 2
    assert _train_steps(workdir) == list(range(1, stopped + 3))  # steps 1..stopped were not trained again
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == stopped + 2
    assert (workdir / "results.json").exists()

