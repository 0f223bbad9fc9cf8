"""Multi-host runs as 2 local processes x 4 CPU devices joined by `jax.distributed` (127.0.0.1 only).

- SFT, DPO (with its sampled gold evaluation) and GRPO, 6 steps each, give the per-step losses and
  final parameters of 1 process x 8 devices. They agree within 1e-6, not bit for bit: across
  processes the gradient all-reduce runs in gloo, whose summation order differs from XLA:CPU's
  in-process all-reduce (the rollouts, rewards and evaluations are identical).
- SIGKILL of both processes after a checkpoint, then a relaunch: the same parameters as without it.
- SIGTERM to process 1 alone: both processes save the same step and exit 75; the resumed run is exact.
- Bad input ends in one line, quickly: a process id out of range, a coordinator nobody serves, a
  global batch the data-parallel devices do not divide.
"""

import json
import os
import signal
import time

import numpy as np
import pytest

from multihost import Launch

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow

EXPERIMENT = '''
import dataclasses
from rlhf_jax.config import CheckpointConfig, LoggingConfig, TrainConfig
from rlhf_jax.steps import DPO
from rlhf_jax.train import dpo, rl, sft
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.stages import Stage, run_stages

QUIET = LoggingConfig(every=1, console=False, tensorboard=False)
STEPS = dict(train=TrainConfig(steps=6, eval_every=3, eval_batches=1), logging=QUIET,
             checkpoint=CheckpointConfig(every=2, keep=3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    workdir: str = "runs/multihost"
    stages: str = "sft,dpo,grpo"
    sft: sft.SFTConfig
    dpo: dpo.DPOConfig
    grpo: rl.GRPORunConfig


def get_config(arg=None):
    s = tiny.sft_tiny("mh_sft")
    d = tiny.vowel_dpo("mh_dpo", DPO(beta=0.1, nll_weight=1.0))
    g = tiny.arithmetic_grpo("grpo", name="mh_grpo")
    return Config(
        sft=dataclasses.replace(s, **STEPS, data=dataclasses.replace(s.data, num_train=96, num_eval=16, batch_size=16)),
        dpo=dataclasses.replace(d, **STEPS, data=dataclasses.replace(d.data, num_train=96, num_eval=16, batch_size=16),
                                sampling=dpo.SampleEvalConfig(num_prompts=16, max_new_tokens=4)),
        grpo=dataclasses.replace(g, **STEPS, algorithm=dataclasses.replace(g.algorithm, group_size=4),
                                 data=dataclasses.replace(g.data, num_train=64, num_eval=16, batch_size=8)))


def main(config):
    chosen = {"sft": Stage("sft", config.sft), "dpo": Stage("dpo", config.dpo, init_from="sft"),
              "grpo": Stage("grpo", config.grpo)}
    summaries = run_stages(config.workdir, [chosen[n] for n in config.stages.split(",")])
    return list(summaries.values())[-1]
'''


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("mh") / "mh_experiment.py"
    path.write_text(EXPERIMENT)
    return str(path)


def _run(experiment, workdir, *, processes, sets=(), timeout=300):
    args = ["run", experiment, "--set", f"workdir={workdir}", *[a for s in sets for a in ("--set", s)]]
    with Launch(args, num_processes=processes, devices=8 // processes) as launch:
        return launch.wait(timeout)


def _records(path):
    return [json.loads(line) for line in open(path)]


def _params(checkpoints):
    """The final policy parameters of a run of the tiny model, as numpy."""
    import jax

    from rlhf_jax.checkpoint import load_params
    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.presets import get_config

    return jax.tree.map(np.asarray, load_params(str(checkpoints), CausalLM(get_config("tiny")).abstract_params()))


def _ok(results):
    for code, _, err in results:
        assert code == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(experiment, tmp_path_factory):
    """The three stages on 2 processes x 4 devices and on 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("runs")
    _ok(_run(experiment, root / "two", processes=2))
    _ok(_run(experiment, root / "one", processes=1))
    return root


def test_two_processes_equal_one_process(runs):
    import jax

    for stage, keys in (("sft", ("loss", "eval/loss")), ("dpo", ("loss", "eval/loss", "eval/gold_reward")),
                        ("grpo", ("loss", "reward", "kl", "eval/accuracy"))):
        one, two = _records(runs / "one" / stage / "metrics.jsonl"), _records(runs / "two" / stage / "metrics.jsonl")
        assert [r["step"] for r in one] == [r["step"] for r in two]  # exactly one line per logged step, once
        assert len([r for r in two if "loss" in r]) == 6
        for a, b in zip(one, two):
            for key in keys:
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (stage, a["step"], key, a[key], b[key])
        p1, p2 = _params(runs / "one" / stage / "checkpoints"), _params(runs / "two" / stage / "checkpoints")
        diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), p1, p2))
        assert max(diffs) <= 1e-6, (stage, max(diffs))
        assert not (runs / "two" / stage / "config.json.tmp").exists()
        json.loads((runs / "two" / stage / "config.json").read_text())


def test_sigkill_of_both_then_relaunch_resumes_exactly(experiment, runs, tmp_path):
    import chex

    args = ["run", experiment, "--set", f"workdir={tmp_path}", "--set", "stages=sft"]
    with Launch(args, num_processes=2, devices=4) as launch:
        deadline = time.monotonic() + 240
        while not (tmp_path / "sft" / "checkpoints" / "4").is_dir():
            assert time.monotonic() < deadline, "no checkpoint at step 4"
            time.sleep(0.2)
        launch.kill()
    assert not (tmp_path / "sft" / "checkpoints" / "6").exists()  # killed between the checkpoints
    _ok(_run(experiment, tmp_path, processes=2, sets=["stages=sft"]))
    chex.assert_trees_all_equal(_params(runs / "two" / "sft" / "checkpoints"), _params(tmp_path / "sft" / "checkpoints"))
    losses = lambda path: {r["step"]: r["loss"] for r in _records(path) if "loss" in r}  # noqa: E731
    assert losses(tmp_path / "sft" / "metrics.jsonl") == losses(runs / "two" / "sft" / "metrics.jsonl")


def test_sigterm_to_one_process_stops_both_at_the_same_step(experiment, tmp_path):
    args = ["run", experiment, "--set", f"workdir={tmp_path}", "--set", "stages=sft",
            "--set", "sft.train.steps=400", "--set", "sft.checkpoint.every=0"]
    with Launch(args, num_processes=2, devices=4) as launch:
        metrics = tmp_path / "sft" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "the run never logged a step"
            time.sleep(0.2)
        sent = time.monotonic()
        launch.signal(1, signal.SIGTERM)
        results = launch.wait(60)
        assert time.monotonic() - sent < 60
    assert [code for code, _, _ in results] == [75, 75], [err[-2000:] for _, _, err in results]
    steps = [d for d in os.listdir(tmp_path / "sft" / "checkpoints") if d.isdigit()]
    assert len(steps) == 1  # one step, saved by both processes together
    assert "saved checkpoint at step" in results[0][2]


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2)"),
    (["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "1", "--init-timeout", "8"],
     "could not join coordinator 127.0.0.1:9 as process 1 of 2"),
])
def test_bad_multiprocess_flags_fail_in_one_line(experiment, tmp_path, flags, message):
    args = ["run", experiment, "--set", f"workdir={tmp_path}", "--set", "stages=sft", *flags]
    start = time.monotonic()
    with Launch(args, num_processes=1, devices=4) as launch:
        [(code, _, err)] = launch.wait(60)
    assert time.monotonic() - start < 30
    assert code == 2 and message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_global_batch_the_devices_do_not_divide_is_refused(experiment, tmp_path):
    start = time.monotonic()
    results = _run(experiment, tmp_path, processes=2, sets=["stages=sft", "sft.data.batch_size=12"], timeout=120)
    assert time.monotonic() - start < 30
    code, _, err = results[0]  # process 0 names the problem in one line; every process ends
    assert code == 2 and "batch size 12" in err and "not divisible by 8" in err, err[-2000:]
    assert all(code != 0 for code, _, _ in results)


def test_auto_start_is_chosen_by_the_environment():
    from rlhf_jax import distributed

    assert distributed._auto_detected({"RLHF_JAX_DISTRIBUTED": "auto"})
    assert distributed._auto_detected({"SLURM_NTASKS": "4"}) and not distributed._auto_detected({"SLURM_NTASKS": "1"})
    assert not distributed._auto_detected({})
    assert distributed.initialize(distributed.from_env(environ={}), environ={}) is False  # one process: nothing
    config = distributed.from_env(environ={"RLHF_JAX_COORDINATOR": "127.0.0.1:5", "RLHF_JAX_NUM_PROCESSES": "2",
                                           "RLHF_JAX_PROCESS_ID": "1"})
    assert (config.coordinator, config.num_processes, config.process_id) == ("127.0.0.1:5", 2, 1)
    with pytest.raises(distributed.DistributedError, match="give --coordinator, --num-processes and --process-id together"):
        distributed.from_env(coordinator="127.0.0.1:5", environ={})
