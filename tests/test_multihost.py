"""Multi-host runs as 2 local processes x 4 CPU devices joined by `jax.distributed` (127.0.0.1 only).

- SFT, DPO (with its sampled gold evaluation) and GRPO, 6 steps each, give the per-step losses and
  final parameters of 1 process x 8 devices. They agree within 1e-6, not bit for bit: across
  processes the gradient all-reduce runs in gloo, whose summation order differs from XLA:CPU's
  in-process all-reduce (the rollouts, rewards and evaluations are identical).
  RM and PPO (scored by the reward model, each process its own rows) too; GRPO trains LoRA adapters
  (the scale checkpointed from every process, `eval/kl` against the base over each process's own
  samples) and samples dynamically (DAPO), choosing the same groups as one process; PPO samples by continuous batching on its own
  tensor-parallel sampler mesh, each process on the engines of its own devices, its prompts keyed
  by their global index. Each process tokenized only its share of the data.
- Hugging Face weights: with FSDP over both processes each reads only its half of each tensor.
- SIGKILL of both processes after a checkpoint, then a relaunch; SIGTERM to process 1 alone: both
  processes save the same step and exit 75; the resumed run is exact. One writer of config.json
  and metrics.jsonl across five launches.
- Bad input ends in one line, quickly: a process id out of range, a coordinator nobody serves,
  fewer processes than declared, a global batch the data-parallel devices do not divide, a `--set`
  given to one process only, processes with different device counts, a coordinator port in use.
- Process 1 alone SIGKILLed while saving: process 0 ends non-zero, the last committed step resumes.
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
from rlhf_jax.models.lora import LoraConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.steps import DPO
from rlhf_jax.train import dpo, reward_model, rl, sft
from rlhf_jax.train.adapters import with_lora
from rlhf_jax.train import tiny_stages as tiny
from rlhf_jax.train.stages import Stage, run_stages

QUIET = LoggingConfig(every=1, console=False, tensorboard=False)
STEPS = dict(train=TrainConfig(steps=6, eval_every=3, eval_batches=1), logging=QUIET,
             checkpoint=CheckpointConfig(every=2, keep=3))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    workdir: str = "runs/multihost"
    stages: str = "sft,dpo,grpo,rm,ppo"
    sft: sft.SFTConfig
    dpo: dpo.DPOConfig
    grpo: rl.GRPORunConfig
    rm: reward_model.RewardModelConfig
    ppo: rl.PPORunConfig


def get_config(arg=None):
    s = tiny.sft_tiny("mh_sft")
    d = tiny.vowel_dpo("mh_dpo", DPO(beta=0.1, nll_weight=1.0))
    g = tiny.arithmetic_grpo("grpo", name="mh_grpo")
    m, p = tiny.vowel_reward_model("mh_rm"), tiny.vowel_ppo("mh_ppo")
    small = lambda c, **kw: dataclasses.replace(c, data=dataclasses.replace(c.data, **kw))  # noqa: E731
    return Config(
        sft=dataclasses.replace(small(s, num_train=96, num_eval=16, batch_size=16), **STEPS),
        dpo=dataclasses.replace(small(d, num_train=96, num_eval=16, batch_size=16), **STEPS,
                                sampling=dpo.SampleEvalConfig(num_prompts=16, max_new_tokens=4)),
        # GRPO training LoRA adapters (its KL reference the base), with DAPO's dynamic sampling: the
        # missing-EOS penalty gives some groups a signal. 8 prompts per process: each process's
        # evaluation samples fill its 4 devices.
        grpo=dataclasses.replace(small(with_lora(g, LoraConfig(rank=4, alpha=8.0), learning_rate=5e-4),
                                       num_train=64, num_eval=16, batch_size=16), **STEPS,
                                 algorithm=dataclasses.replace(g.algorithm, group_size=4),
                                 rollout=dataclasses.replace(g.rollout, dynamic_sampling=True, max_sampling_rounds=3),
                                 rewards=dataclasses.replace(g.rewards, functions=("task", "missing_eos"))),
        rm=dataclasses.replace(small(m, num_train=64, num_eval=16, batch_size=16), **STEPS),
        # PPO scored by the reward model (each process scores its rows), critic from it; sampled by
        # continuous batching on a data 4 x tensor 2 sampler mesh (the hand-off reshards the trainer's
        # layout to it): an engine per tensor-parallel pair, each process serving its rows on its own.
        ppo=dataclasses.replace(small(p, num_train=64, num_eval=16, batch_size=8, max_len=16), **STEPS,
                                rollout=dataclasses.replace(p.rollout, max_new_tokens=4, continuous_slots=2),
                                off_policy=dataclasses.replace(p.off_policy, sampler_mesh=MeshConfig(
                                    data=-1, tensor=2, strategy="tp")),
                                algorithm=dataclasses.replace(p.algorithm, num_epochs=1)))


def main(config):
    chosen = {"sft": Stage("sft", config.sft), "dpo": Stage("dpo", config.dpo, init_from="sft"),
              "grpo": Stage("grpo", config.grpo), "rm": Stage("rm", config.rm),
              "ppo": Stage("ppo", config.ppo, init_from="sft", reward_model="rm")}
    summaries = run_stages(config.workdir, [chosen[n] for n in config.stages.split(",")])
    return list(summaries.values())[-1]
'''


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("mh") / "mh_experiment.py"
    path.write_text(EXPERIMENT)
    return str(path)


@pytest.fixture(scope="module")
def hf_init(tmp_path_factory):
    """A Hugging Face directory of the tiny model (random weights) the SFT stage starts from."""
    import jax

    from rlhf_jax.models import CausalLM
    from rlhf_jax.models.hf import save_hf
    from rlhf_jax.models.presets import get_config

    config = get_config("tiny")
    path = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(path, config, CausalLM(config).init(jax.random.key(3)))
    return str(path)


def _sft_sets(hf_init):
    """The SFT stage starts from `hf_init`, its parameters sharded over all 8 devices (FSDP): each
    process holds half of every matrix, and reads only that half of the safetensors file."""
    return [f"sft.checkpoint.init_from={hf_init}", "sft.mesh.data=1", "sft.mesh.fsdp=-1", "sft.mesh.strategy=fsdp"]


def _args(experiment, workdir, sets=()):
    return ["run", experiment, "--set", f"workdir={workdir}", *[a for s in sets for a in ("--set", s)]]


def _run(experiment, workdir, *, processes, sets=(), timeout=600, hooks=None):
    with Launch(_args(experiment, workdir, sets), num_processes=processes, devices=8 // processes,
                hooks=hooks) as launch:
        return launch.wait(timeout)


def _records(path):
    return [json.loads(line) for line in open(path)]


def _params(checkpoints, step=6):
    """The parameters saved at `step` (policy, reward model; a LoRA run's adapters and scale too), as numpy."""
    import jax

    from rlhf_jax.checkpoint import Checkpointer, load_params

    out = {}
    for item in ("params", "lora"):
        if not os.path.isdir(os.path.join(checkpoints, str(step), item)):
            continue
        with Checkpointer(str(checkpoints), read_only=True) as ckpt:
            abstract = {k: jax.ShapeDtypeStruct(*v) for k, v in ckpt.item_shapes(item, step).items()}
        out[item] = jax.tree.map(np.asarray, load_params(str(checkpoints), abstract, step=step, item=item))
    return out


def _ok(results):
    for code, _, err in results:
        assert code == 0, err[-3000:]


def _one_writer(run_dir):
    """After a launch: config.json whole, no temporary file of it left, one metrics line per step."""
    assert not (run_dir / "config.json.tmp").exists() and not list(run_dir.glob("*.tmp"))
    json.loads((run_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def runs(experiment, hf_init, tmp_path_factory):
    """The five stages on 2 processes x 4 devices and on 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("runs")
    spy = {i: ["--spy-safetensors", str(root / f"read_{i}.jsonl")] for i in range(2)}
    _ok(_run(experiment, root / "two", processes=2, sets=_sft_sets(hf_init), hooks=spy, timeout=1200))
    _ok(_run(experiment, root / "one", processes=1, sets=_sft_sets(hf_init), timeout=1200))
    return root


# Per stage: the metrics compared, and the largest parameter difference allowed.
_COMPARED = {
    "sft": (("loss", "eval/loss"), 1e-6),
    "dpo": (("loss", "eval/loss", "eval/gold_reward"), 1e-6),
    # Dynamic sampling chooses the same groups (rounds, refills); the embedding rows of tokens hardly
    # seen get gradients near Adam's epsilon, where its normalisation turns gloo's 1e-9 differences
    # into 1e-6 of the update: 1e-5 there (the learning rate is 5e-4).
    "grpo": (("loss", "reward", "kl", "eval/accuracy", "eval/kl", "dynamic_sampling/rounds",
              "dynamic_sampling/filled_with_zero_std", "frac_reward_zero_std", "reward_std"), 1e-5),
    "rm": (("loss", "eval/loss"), 1e-6),
    "ppo": (("loss", "reward", "kl/sequence", "rewards/reward_model/mean", "value_loss", "advantages/mean"), 1e-5),
}


def test_two_processes_equal_one_process(runs):
    import jax

    for stage, (keys, tolerance) in _COMPARED.items():
        one, two = _records(runs / "one" / stage / "metrics.jsonl"), _records(runs / "two" / stage / "metrics.jsonl")
        assert [r["step"] for r in one] == [r["step"] for r in two]  # exactly one line per logged step, once
        assert len([r for r in two if "loss" in r]) == 6 and len({r["step"] for r in two if "loss" in r}) == 6
        for a, b in zip(one, two):
            for key in keys:
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (stage, a["step"], key, a[key], b[key])
        p1, p2 = _params(runs / "one" / stage / "checkpoints"), _params(runs / "two" / stage / "checkpoints")
        assert ("lora" in p2) == (stage == "grpo"), (stage, sorted(p2))  # GRPO trained adapters
        diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), p1, p2))
        assert max(diffs) <= tolerance, (stage, max(diffs))
        _one_writer(runs / "two" / stage)
    rounds = [r["dynamic_sampling/rounds"] for r in _records(runs / "two" / "grpo" / "metrics.jsonl") if "loss" in r]
    assert max(rounds) > 1  # dynamic sampling drew more prompts (on both processes alike)


def test_hugging_face_weights_are_read_where_they_are_held(runs, hf_init):
    """With FSDP over both processes each process reads about half of every sharded tensor, and the
    two together read the checkpoint (safetensors `get_slice`, spied)."""
    from safetensors import safe_open

    with safe_open(f"{hf_init}/model.safetensors", framework="np") as f:
        sizes = {name: int(np.prod(f.get_slice(name).get_shape())) for name in f.keys()}
    read = [{} for _ in range(2)]
    for i in range(2):
        for record in _records(runs / f"read_{i}.jsonl"):
            read[i][record["name"]] = read[i].get(record["name"], 0) + int(np.prod(record["shape"]))
    total = sum(sizes.values())
    for i in range(2):
        assert set(read[i]) == set(sizes)
        assert sum(read[i].values()) <= 0.55 * total, (i, sum(read[i].values()), total)
    matrices = [n for n in sizes if sizes[n] >= 1024]
    for name in matrices:  # each half read once, by one of the processes
        assert read[0][name] + read[1][name] == sizes[name], name


def test_killed_preempted_and_resumed_runs_end_exactly_like_an_uninterrupted_one(experiment, hf_init, runs, tmp_path):
    """Both processes SIGKILLed after the checkpoint of step 2; relaunched, SIGTERM to process 1 alone
    once step 3 is logged: both save one same step and exit 75 within 60 s; relaunched again, the run
    ends with the uninterrupted run's parameters (bit for bit) and metrics. Five launches write the
    run directory (these three, the reference, one more that has nothing left to do): one writer."""
    import chex

    sets = ["stages=sft", *_sft_sets(hf_init)]
    run_dir, ckpts = tmp_path / "sft", tmp_path / "sft" / "checkpoints"
    killed = _run(experiment, tmp_path, processes=2, sets=sets,
                  hooks={i: ["--kill", "between:3"] for i in range(2)})
    # Each process SIGKILLs itself at step 3. Process 1 may be aborted by JAX (SIGABRT, -6) first: the
    # coordination service it depends on died with process 0. Either way nothing is saved after step 2.
    codes = [code for code, _, _ in killed]
    assert codes[0] == -9 and codes[1] in (-9, -6), [err[-2000:] for _, _, err in killed]
    assert sorted(os.listdir(ckpts)) == ["2"]
    _one_writer(run_dir)

    # Steps take a second more from step 3 on, so the notice reaches both processes mid-run.
    with Launch(_args(experiment, tmp_path, sets), num_processes=2, devices=4,
                hooks={i: ["--slow-from", "3"] for i in range(2)}) as launch:
        deadline = time.monotonic() + 240
        while not any(r["step"] >= 3 for r in (_records(run_dir / "metrics.jsonl")
                                                if (run_dir / "metrics.jsonl").exists() else [])):
            assert time.monotonic() < deadline, "the resumed run never logged step 3"
            time.sleep(0.2)
        sent = time.monotonic()
        launch.signal(1, signal.SIGTERM)
        stopped = launch.wait(60)
        assert time.monotonic() - sent < 60
    assert [code for code, _, _ in stopped] == [75, 75], [err[-2000:] for _, _, err in stopped]
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert len(steps) == 2 and steps[0] == 2 and 3 <= steps[1] < 6, steps  # one more step, saved by both
    assert f"saved checkpoint at step {steps[1]}" in stopped[0][2]
    _one_writer(run_dir)

    for _ in range(2):  # resume to the end, then once more with nothing left to do
        _ok(_run(experiment, tmp_path, processes=2, sets=sets))
        _one_writer(run_dir)
    chex.assert_trees_all_equal(_params(runs / "two" / "sft" / "checkpoints"), _params(ckpts))
    last = lambda path: {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/")  # noqa: E731
                                     and k != "tokens_per_second"} for r in _records(path) if "loss" in r}
    assert last(run_dir / "metrics.jsonl") == last(runs / "two" / "sft" / "metrics.jsonl")


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


def test_fewer_processes_than_declared_fail_in_one_line(experiment, tmp_path):
    """Two processes started, three declared: each says so in one line when --init-timeout is up
    (not JAX's fatal error and stack trace a few seconds later)."""
    start = time.monotonic()
    with Launch(_args(experiment, tmp_path, ["stages=sft"]), num_processes=2, devices=4, declared=3,
                init_timeout_s=8) as launch:
        results = launch.wait(60)
    assert time.monotonic() - start < 30
    for i, (code, _, err) in enumerate(results):
        assert code == 2, err[-2000:]
        assert err.strip().splitlines() == [f"rlhf-jax: error: could not join coordinator {err.split()[6]} as process "
                                             f"{i} of 3 within 8 s: not every process joined (check --num-processes, "
                                             "that every process was started, that process 0's coordinator started "
                                             "(its own output says why not), and --init-timeout)"], err[-2000:]


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
    # processes on one machine start together: a missing one is reported within half a minute
    assert config.timeout_s == distributed.LOCAL_INIT_TIMEOUT_S == 20
    assert distributed.from_env("localhost:5", 2, 0, environ={}).timeout_s == 20
    assert distributed.from_env("10.0.0.2:5", 2, 0, environ={}).timeout_s == distributed.INIT_TIMEOUT_S == 300
    assert distributed.from_env("127.0.0.1:5", 2, 0, timeout_s=90, environ={}).timeout_s == 90
    with pytest.raises(distributed.DistributedError, match="give --coordinator, --num-processes and --process-id together"):
        distributed.from_env(coordinator="127.0.0.1:5", environ={})


def test_a_setting_given_to_one_process_only_is_refused_by_every_process(experiment, tmp_path):
    """`--set` on process 1 alone: both processes refuse before anything runs, in one line naming
    the keys and the values on each process (before: process 0 finished its 6 steps and waited in
    JAX's shutdown barrier while process 1 waited in a collective for it, both until killed)."""
    args = _args(experiment, tmp_path, ["stages=sft"])
    with Launch(args, num_processes=2, devices=4, extra={1: ["--set", "sft.train.steps=8"]}) as launch:
        results = launch.wait(120)
    for code, _, err in results:
        assert code == 2, err[-2000:]
        [line] = [line for line in err.splitlines() if "error" in line]
        assert "the processes of this run differ" in line and \
            "config.sft.train.steps is 6 on process 0 but 8 on process 1" in line, line
    assert not (tmp_path / "sft").exists()  # nothing was written


def test_processes_with_different_device_counts_are_refused_in_one_line(experiment, tmp_path):
    """Process 1 with 2 CPU devices, process 0 with 4: both name the counts (before: a ValueError
    traceback from JAX's `process_allgather`)."""
    with Launch(_args(experiment, tmp_path, ["stages=sft"]), num_processes=2, devices=4, devices_of={1: 2}) as launch:
        results = launch.wait(120)
    for code, _, err in results:
        assert code == 2, err[-2000:]
        assert "hold different numbers of devices (process 0: 4, process 1: 2)" in err, err[-2000:]


def test_a_coordinator_port_in_use_fails_in_one_line(experiment, tmp_path):
    """Another program holds the coordinator's port: process 0 says so in one line (before: JAX's
    service crashed it with a segmentation fault), process 1 ends when --init-timeout is up."""
    import socket

    from multihost import LOOPBACK

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen(8)
        port = squatter.getsockname()[1]
        flags = ["--coordinator", f"{LOOPBACK}:{port}", "--num-processes", "2", "--init-timeout", "8"]
        args = ["run", experiment, "--set", f"workdir={tmp_path}", "--set", "stages=sft", *flags]
        with Launch(args, num_processes=1, devices=4, extra={0: ["--process-id", "0"]}) as first, \
                Launch(args, num_processes=1, devices=4, extra={0: ["--process-id", "1"]}) as second:
            [(code0, _, err0)], [(code1, _, err1)] = first.wait(60), second.wait(60)
    assert code0 == 2 and [line for line in err0.splitlines() if "error" in line] == [
        f"rlhf-jax run: error: cannot start the coordinator on {LOOPBACK}:{port} as process 0 of 2: port {port} is "
        "already in use (another run or program holds it; choose a free port for --coordinator on every process)"], err0
    assert code1 == 2 and "could not join coordinator" in err1 and "process 0's coordinator started" in err1, err1


def test_one_process_killed_while_saving_leaves_the_last_checkpoint_restorable(experiment, tmp_path):
    """Process 1 alone SIGKILLed while its shards of step 4 are being written: process 0 ends too,
    non-zero (its collective or orbax's commit barrier lose process 1; JAX's heartbeat ends it), step
    4 is never committed, and a relaunch resumes from step 2 and finishes."""
    sets = ["stages=sft"]
    ckpts = tmp_path / "sft" / "checkpoints"
    killed = _run(experiment, tmp_path, processes=2, sets=sets, timeout=300, hooks={1: ["--kill", "saving:4"]})
    codes = [code for code, _, _ in killed]
    assert codes[1] == -9 and codes[0] in (1, -6), [err[-2000:] for _, _, err in killed]
    assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ["2"], os.listdir(ckpts)
    resumed = _run(experiment, tmp_path, processes=2, sets=sets, timeout=300)
    _ok(resumed)
    assert "resuming from step 2" in resumed[0][2]
    assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) == [2, 4, 6]
    assert set(_params(ckpts)["params"]) and not [d for d in os.listdir(ckpts) if "tmp" in d]


def test_the_run_record_names_what_processes_must_share(tmp_path):
    """What `agree` compares: the config, the experiment file's contents (not its path), the package
    versions and rlhf_jax's source; one process agrees with itself."""
    from rlhf_jax import distributed

    a, b = tmp_path / "a" / "exp.py", tmp_path / "b" / "exp.py"
    for path, text in ((a, "X = 1\n"), (b, "X = 1\n")):
        path.parent.mkdir()
        path.write_text(text)
    record = distributed.run_record({"train": {"steps": 6}}, str(a))
    assert record == distributed.run_record({"train": {"steps": 6}}, str(b))  # same contents elsewhere
    assert {"config", "packages", "experiment file"} <= set(record) and record["packages"]["jax"]
    assert record["packages"]["rlhf_jax"].startswith(distributed.run_record({})["packages"]["rlhf_jax"])
    b.write_text("X = 2\n")
    assert record["experiment file"] != distributed.run_record({}, str(b))["experiment file"]
    assert distributed._flat({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    distributed.agree(record)  # one process: nothing to compare
