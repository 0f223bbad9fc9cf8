"""The TPU pod scripts (`tpu/`) and the Slurm example (`cluster/slurm_run.sbatch`), without a cloud or a cluster.

Every `tpu/` script runs with `--dry-run` under fake TPU_NAME/ZONE/PROJECT and a PATH whose `gcloud`
only records that it was called (each test checks it never was); the printed gcloud commands are
parsed with shlex and checked. The remote command lines they print are then run by bash in a sandbox
HOME standing in for a worker: `tpu/worker_setup.sh` with a fake python3/uv, and launch's and stop's
command lines with a fake `rlhf_jax` package, so that the quoting, the background start, the
"already running" guard and stopping with SIGTERM (exit 75 in the log) are exercised, not just read.
The Slurm script runs with fake `srun`/`scontrol` and a fake Python per task. Only launch's local
pre-check starts the real package (four times, ~4 s each).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SBATCH = ROOT / "cluster" / "slurm_run.sbatch"
SCRIPTS = sorted(TPU.glob("*.sh"))
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


def _write(path: Path, text: str, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def env(tmp_path):
    """A fake pod's settings, and a PATH whose gcloud records any call (and fails)."""
    fake_bin = tmp_path / "bin"
    log = tmp_path / "gcloud_calls"
    _write(fake_bin / "gcloud", f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexit 97\n', executable=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "RLHF_JAX_", "SLURM_"))}
    for k in ("ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REPO_DIR", "PYTHON_VERSION", "DRY_RUN",
              "SPOT", "STOP_TIMEOUT", "PYTHONPATH"):
        e.pop(k, None)
    e.update(TPU_NAME="test-pod", ZONE="test-zone-a", PROJECT="test-project", PYTHON=sys.executable,
             PATH=f"{fake_bin}{os.pathsep}{e['PATH']}")
    yield e
    assert not log.exists(), f"gcloud was called: {log.read_text()}"


def _run(script: str, *args: str, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(TPU / script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def _gcloud(stdout: str) -> list[list[str]]:
    """The printed gcloud commands as argument lists (a command spans lines where a quoted argument has newlines)."""
    commands, pending = [], ""
    for line in stdout.splitlines():
        pending += line
        try:
            argv = shlex.split(pending)
        except ValueError:  # an open quote: the command goes on
            pending += "\n"
            continue
        if argv[:1] == ["gcloud"]:
            commands.append(argv)
        pending = ""
    assert not pending, pending
    return commands


def _flags(argv: list[str]) -> dict[str, str | bool]:
    out = {}
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out[name] = value if eq else True
    return out


def _check_common(argv: list[str], sub: str) -> dict:
    assert argv[:5] == GCLOUD + [sub], argv
    flags = _flags(argv)
    assert flags["--zone"] == "test-zone-a" and flags["--project"] == "test-project", argv
    return flags


def test_scripts_parse_and_pass_shellcheck():
    paths = [*SCRIPTS, SBATCH]
    assert {p.name for p in SCRIPTS} >= {"common.sh", "create.sh", "setup.sh", "worker_setup.sh", "launch.sh",
                                         "ssh.sh", "copy.sh", "stop.sh", "teardown.sh"}
    for p in paths:
        subprocess.run(["bash", "-n", str(p)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", "-s", "bash", *map(str, paths)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("accelerator, runtime", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-64", "v2-alpha-tpuv5")])
def test_create(env, accelerator, runtime):
    env.update(ACCELERATOR_TYPE=accelerator, SPOT="1")
    (argv,) = _gcloud(_run("create.sh", "--dry-run", env=env).stdout)
    flags = _check_common(argv, "create")
    assert argv[5] == "test-pod"
    assert flags["--accelerator-type"] == accelerator and flags["--version"] == runtime and flags["--spot"] is True


def test_settings_are_required(env):
    del env["TPU_NAME"]
    proc = _run("create.sh", "--dry-run", env=env, ok=False)
    assert proc.returncode == 2 and "set TPU_NAME" in proc.stderr and not proc.stdout


def test_setup_copies_the_checkout_and_installs_on_all_workers(env):
    scp, ssh = _gcloud(_run("setup.sh", "--dry-run", env=env).stdout)
    flags = _check_common(scp, "scp")
    assert flags["--worker"] == "all" and scp[5].endswith("/rlhf_jax.tar.gz") and scp[6] == "test-pod:~/rlhf_jax.tar.gz"
    flags = _check_common(ssh, "ssh")
    assert flags["--worker"] == "all"
    command, code_id = flags["--command"].rsplit(" && echo ", 1)
    assert command == ("mkdir -p ~/rlhf_jax && tar -xzf ~/rlhf_jax.tar.gz -C ~/rlhf_jax && "
                       "rm ~/rlhf_jax.tar.gz && PYTHON_VERSION=3.12 bash ~/rlhf_jax/tpu/worker_setup.sh")
    # Once installed, the worker records the checkout's code id, the one launch.sh requires.
    code_id, dest = code_id.split(" > ")
    assert dest == "~/rlhf_jax/.code_id" and code_id == _checkout_code_id()


def _checkout_code_id() -> str:
    """tpu/common.sh's code_id of this checkout (what setup.sh records and launch.sh requires)."""
    return subprocess.run(["bash", "-c", "source tpu/common.sh && code_id"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_setup_ships_the_tracked_files(env, tmp_path):
    """Without --dry-run (gcloud faked): the archive sent to the workers holds the checkout's tracked files."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    calls, shipped = tmp_path / "calls", tmp_path / "shipped.tar.gz"
    fake = _write(tmp_path / "fake_gcloud" / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {calls}
if [ "$4" = scp ]; then cp "$5" {shipped}; fi
""", executable=True)
    env = dict(env, PATH=f"{fake.parent}{os.pathsep}{env['PATH']}")
    _run("setup.sh", env=env)
    lines = calls.read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["scp", "ssh"] and all("--worker=all" in line for line in lines)
    def listing(*command: str) -> set[str]:
        return set(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines())

    names, tracked = listing("tar", "-tzf", str(shipped)), listing("git", "-C", str(ROOT), "ls-files")
    assert {"setup.py", "rlhf_jax/cli.py", "tpu/worker_setup.sh"} <= names <= tracked


@pytest.mark.parametrize("image_python, venv_python", [("3.10", "3.12"), ("3.12", "IMAGE")])
def test_worker_setup_installs_a_supported_python_and_the_tpu_extra(tmp_path, image_python, venv_python):
    """On a worker: uv from pip when absent, a 3.12 venv when the image's python3 is older than 3.11, `-e .[tpu]`."""
    home, fake = tmp_path / "home", tmp_path / "fake"
    repo = home / "rlhf_jax"
    shutil.copy(TPU / "worker_setup.sh", _write(repo / "tpu" / ".keep", "").parent)
    calls = tmp_path / "calls"
    old = "1" if image_python == "3.10" else "0"
    uv = (f'#!/bin/sh\necho "uv $*" >> {calls}\n'
          'if [ "$1" = venv ]; then mkdir -p .venv/bin && printf \'#!/bin/sh\\necho venv-python "$@"\\n\' '
          '> .venv/bin/python3 && chmod +x .venv/bin/python3; fi\n')
    _write(fake / "uv.template", uv)
    # python3: the version check exits 1 for an old image; `-m pip install --user ... uv` installs the fake uv.
    _write(fake / "python3", f'#!/bin/sh\necho "python3 $*" >> {calls}\n'
                             f'case "$*" in *version_info*) exit {old} ;; *"pip install"*)\n'
                             f'  mkdir -p "$HOME/.local/bin" && cp {fake}/uv.template "$HOME/.local/bin/uv" '
                             '&& chmod +x "$HOME/.local/bin/uv" ;; esac\n', executable=True)
    env = {"HOME": str(home), "PATH": f"{fake}:/usr/bin:/bin", "PYTHON_VERSION": "3.12"}
    proc = subprocess.run(["bash", str(repo / "tpu" / "worker_setup.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "python3 -m pip install --user --quiet uv"
    expected_python = str(fake / "python3") if venv_python == "IMAGE" else venv_python
    assert f"uv venv --python {expected_python} .venv" in lines
    assert "uv pip install --python .venv/bin/python3 -e .[tpu]" in lines
    assert proc.stdout.startswith("venv-python -c import sys, jax, rlhf_jax")


def _launch_command(env, *args: str) -> str:
    proc = _run("launch.sh", "--dry-run", *args, env=env)
    (argv,) = _gcloud(proc.stdout)
    flags = _check_common(argv, "ssh")
    assert argv[5] == "test-pod" and flags["--worker"] == "all"
    return flags["--command"]


def _code_id(launch_command: str) -> str:
    """The code id launch's command requires of the worker's ~/rlhf_jax/.code_id."""
    (code_id,) = re.findall(r'"\$\(cat \.code_id 2> /dev/null\)" != ([0-9a-f]{40}) \]; then ', launch_command)
    return code_id


def _fake_worker(tmp_path, code_id: str = "") -> Path:
    """A HOME like a set-up worker's: ~/rlhf_jax/.venv/bin/python3 runs a fake rlhf_jax that records its argv,
    then exits with $FAKE_RC, or on SIGTERM with 75 (as the real one does after saving; $FAKE_HUNG: ignores it)."""
    home = tmp_path / "worker"
    repo = home / "rlhf_jax"
    (repo / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, repo / ".venv" / "bin" / "python3")
    _write(repo / ".code_id", code_id + "\n")  # as setup.sh leaves it
    _write(repo / "rlhf_jax" / "__init__.py", "")
    _write(repo / "rlhf_jax" / "__main__.py", """\
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("FAKE_HUNG") else lambda *_: sys.exit(75))
home = os.path.expanduser("~")
with open(os.path.join(home, "argv.tmp"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid()}, f)
os.replace(os.path.join(home, "argv.tmp"), os.path.join(home, "argv.json"))
rc = int(os.environ.get("FAKE_RC", "-1"))
if rc >= 0:
    sys.exit(rc)
time.sleep(60)
""")
    return home


def _wait_for(path: Path, predicate=lambda text: True, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and predicate(text := path.read_text()):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path} not ready: {path.read_text() if path.exists() else 'missing'}")


def test_launch_runs_the_command_on_every_worker_and_stop_ends_it_with_75(env, tmp_path):
    workdir = "/mnt/shared/my run's dir"
    command = _launch_command(env, "experiments/sft_tiny.py", "--set", "train.steps=3", "--set", f"workdir={workdir}")
    expected = ["run", "experiments/sft_tiny.py", "--set", "train.steps=3", "--set", f"workdir={workdir}"]
    assert "RLHF_JAX_DISTRIBUTED=auto ~/rlhf_jax/.venv/bin/python3 -m rlhf_jax run experiments/sft_tiny.py --set train.steps=3 --set " in command
    assert ">> ~/run.log 2>&1 < /dev/null &" in command

    home = _fake_worker(tmp_path, _code_id(command))
    worker_env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    record = home / "argv.json"
    pid = None
    try:
        t0 = time.monotonic()
        subprocess.run(["bash", "-c", command], env=worker_env, check=True, timeout=20)
        assert time.monotonic() - t0 < 10  # started in the background, ssh returns at once
        started = json.loads(_wait_for(record))
        pid = started["pid"]
        assert started["argv"] == expected and started["cwd"] == str(home / "rlhf_jax")
        # A second launch while it runs is refused.
        again = subprocess.run(["bash", "-c", command], env=worker_env, capture_output=True, text=True, timeout=20)
        assert again.returncode == 1 and "already running" in again.stderr
        # stop.sh's command: SIGTERM, wait for the exit; the log ends with status 75.
        env["STOP_TIMEOUT"] = "20"
        (stop,) = _gcloud(_run("stop.sh", "--dry-run", env=env).stdout)
        assert _flags(stop)["--worker"] == "all"
        subprocess.run(["bash", "-c", _flags(stop)["--command"]], env=worker_env, check=True, timeout=30)
        log = _wait_for(home / "run.log", lambda text: "exit status" in text)
        assert "== rlhf-jax exit status 75 " in log
        pid = None
    finally:
        _kill_fake(pid)


def _kill_fake(pid: int | None) -> None:
    """SIGKILL the fake run a test started (None: it ended, or none started)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, signal.SIGKILL)


def _start_on_fake_worker(command: str, home: Path, **worker_env: str) -> dict:
    """Run launch's remote command in the fake worker `home`; the started process's record."""
    subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": "/usr/bin:/bin", **worker_env},
                   check=True, timeout=20)
    return json.loads(_wait_for(home / "argv.json"))


def test_launch_passes_any_argument_through_exactly(env, tmp_path):
    """Spaces, quotes, $, ;, backquotes, globs, a newline, an empty value and a --flag=value reach the workers'
    python as given, and none is run by a shell on the way."""
    values = ["workdir=/mnt/a b/$HOME;touch PWNED `touch PWNED2` $(touch PWNED3)", "x='y\"z", "k=* ? [a] {a,b} ~ \\",
              "nl=a\nb", "", "é=ü"]
    args = ["experiments/sft_tiny.py"] + [a for v in values for a in ("--set", v)] + ["--set=eq='$x'"]
    command = _launch_command(env, "--no-check", *args)
    assert "RLHF_JAX_DISTRIBUTED=auto " in command
    home = _fake_worker(tmp_path)
    started = _start_on_fake_worker(command, home, FAKE_RC="0")
    assert started["argv"] == ["run", *args]
    assert not list(home.rglob("PWNED*")) and not list(Path(started["cwd"]).glob("PWNED*"))
    assert "== rlhf-jax exit status 0 " in _wait_for(home / "run.log", lambda text: "exit status" in text)


def test_dry_run_after_the_arguments_still_runs_nothing(env):
    """`tpu/copy.sh PATH --dry-run` had copied PATH (and then failed on '--dry-run'): --dry-run counts anywhere."""
    mkdir, scp = _gcloud(_run("copy.sh", "experiments", "--dry-run", env=env).stdout)
    assert _flags(mkdir)["--command"] == "mkdir -p ~/rlhf_jax" and scp[5:7] == ["--recurse", str(ROOT / "experiments")]
    (ssh,) = _gcloud(_run("launch.sh", "--no-check", "experiments/sft_tiny.py", "--set", "train.steps=3", "--dry-run",
                          env=env).stdout)
    assert _flags(ssh)["--command"].count("rlhf_jax run experiments/sft_tiny.py --set train.steps=3; ") == 1


def test_copy_checks_every_path_before_copying_any(env):
    proc = _run("copy.sh", "experiments", "no/such/dir", env=env, ok=False)  # no --dry-run: gcloud must not run
    assert proc.returncode == 2 and "no/such/dir does not exist" in proc.stderr and not proc.stdout


def test_launch_refuses_a_worker_with_other_code(env, tmp_path):
    """A worker whose checkout is not this one's (edited since setup.sh, or setup.sh failed there) starts nothing."""
    command = _launch_command(env, "experiments/sft_tiny.py")
    assert _code_id(command) == _checkout_code_id()
    for recorded in ("0" * 40, None):
        home = _fake_worker(tmp_path / str(recorded), "0" * 40)
        if recorded is None:
            (home / "rlhf_jax" / ".code_id").unlink()
        proc = subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 1 and "is not this checkout's: rerun tpu/setup.sh" in proc.stderr
        assert not (home / "argv.json").exists() and not (home / "run.log").exists()
    assert ".code_id" not in _launch_command(env, "--no-check", "experiments/sft_tiny.py")


def test_local_check_ignores_this_shells_cluster_variables(env):
    """Launching from a shell inside a Slurm allocation (or with RLHF_JAX_DISTRIBUTED=auto exported) had the local
    check try to join a cluster and fail with 'coordinator_address should be defined'."""
    env.update(RLHF_JAX_DISTRIBUTED="auto", SLURM_NTASKS="4", OMPI_COMM_WORLD_SIZE="2", TPU_WORKER_HOSTNAMES="a,b")
    proc = _run("launch.sh", "--dry-run", "experiments/sft_tiny.py", "--set", "train.steps=3", env=env)
    assert len(_gcloud(proc.stdout)) == 1


def test_launch_failing_on_a_worker_is_reported(env, tmp_path):
    fake = _write(tmp_path / "failing" / "gcloud", "#!/bin/sh\necho '##### Command execution on worker 3 failed' >&2\n"
                                                    "exit 1\n", executable=True)
    env = dict(env, PATH=f"{fake.parent}{os.pathsep}{env['PATH']}")
    proc = _run("launch.sh", "--no-check", "experiments/sft_tiny.py", env=env, ok=False)
    assert proc.returncode == 2 and "worker 3 failed" in proc.stderr
    assert "launch.sh: the launch failed on a worker" in proc.stderr and "tpu/stop.sh stops them now" in proc.stderr


def test_stop_kill_ends_a_run_that_ignores_sigterm(env, tmp_path):
    """A hung run (SIGTERM does nothing): stop.sh says so (exit 1, naming --kill); stop.sh --kill ends it (137)."""
    home = _fake_worker(tmp_path)
    pid = _start_on_fake_worker(_launch_command(env, "--no-check", "experiments/sft_tiny.py"), home,
                                FAKE_HUNG="1")["pid"]
    worker_env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    try:
        env["STOP_TIMEOUT"] = "1"
        (stop,) = _gcloud(_run("stop.sh", "--dry-run", env=env).stdout)
        proc = subprocess.run(["bash", "-c", _flags(stop)["--command"]], env=worker_env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 1 and "still running" in proc.stderr and "tpu/stop.sh --kill" in proc.stderr
        env["STOP_TIMEOUT"] = "20"
        (kill,) = _gcloud(_run("stop.sh", "--dry-run", "--kill", env=env).stdout)
        assert _flags(kill)["--worker"] == "all" and "pkill -KILL -f" in _flags(kill)["--command"]
        subprocess.run(["bash", "-c", _flags(kill)["--command"]], env=worker_env, check=True, timeout=30)
        assert "== rlhf-jax exit status 137 " in _wait_for(home / "run.log", lambda text: "exit status" in text)
        pid = None
    finally:
        _kill_fake(pid)


def test_launch_rejects_a_bad_key_before_anything_is_sent(env):
    proc = _run("launch.sh", "--dry-run", "experiments/sft_tiny.py", "--set", "data.path=x", env=env, ok=False)
    assert proc.returncode == 2 and not _gcloud(proc.stdout)
    assert "unknown key 'data.path'" in proc.stderr and "nothing was launched" in proc.stderr
    proc = _run("launch.sh", "--dry-run", "--no-check", "/abs/experiments/sft_tiny.py", env=env, ok=False)
    assert proc.returncode == 2 and "relative to the checkout" in proc.stderr


def test_ssh_copy_stop_teardown(env):
    (ssh,) = _gcloud(_run("ssh.sh", "--dry-run", "--worker=0", "tail -f ~/run.log", env=env).stdout)
    assert ssh[5] == "test-pod" and _check_common(ssh, "ssh")["--worker"] == "0"
    assert _flags(ssh)["--command"] == "tail -f ~/run.log"

    mkdir, scp = _gcloud(_run("copy.sh", "--dry-run", "experiments/", env=env).stdout)
    assert _flags(mkdir)["--command"] == "mkdir -p ~/rlhf_jax" and _flags(mkdir)["--worker"] == "all"
    assert _check_common(scp, "scp")["--worker"] == "all"
    assert scp[5:8] == ["--recurse", str(ROOT / "experiments"), "test-pod:~/rlhf_jax/"]

    stop, delete = _gcloud(_run("teardown.sh", "--dry-run", env=env).stdout)
    assert _flags(stop)["--worker"] == "all" and "pkill -TERM" in _flags(stop)["--command"]
    assert delete[:6] == GCLOUD + ["delete", "test-pod"] and _check_common(delete, "delete")["--quiet"] is True
    (delete_now,) = _gcloud(_run("teardown.sh", "--dry-run", "--now", env=env).stdout)
    assert delete_now == delete


# ----------------------------------------------------------------------------------------------- Slurm


@pytest.fixture
def slurm(tmp_path):
    """Fake srun (runs each task here with its SLURM_PROCID), scontrol, and a Python that records each task.

    No process listens: the fake Python only records its arguments. The nodes scontrol names are
    loopback addresses all the same, so the coordinator the script derives is 127.0.0.1.
    """
    fake, logs = tmp_path / "slurm_bin", tmp_path / "logs"
    logs.mkdir()
    _write(fake / "srun", """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
status=0
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || status=$?; done
exit $status
""", executable=True)
    _write(fake / "scontrol", f"""#!/bin/sh
case $1 in
  show) printf '127.0.0.1\\n127.0.0.2\\n' ;;
  requeue) echo "requeue $2" >> {logs}/scontrol ;;
esac
""", executable=True)
    _write(fake / "python", f"""#!/usr/bin/env bash
printf '%s\\n' "$@" > {logs}/task$SLURM_PROCID
exit ${{FAKE_RC:-0}}
""", executable=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RLHF_JAX_"))}
    e.update(PATH=f"{fake}{os.pathsep}{e['PATH']}", PYTHON=str(fake / "python"), SLURM_JOB_ID="1234",
             SLURM_JOB_NODELIST="node[07-08]", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(ROOT))
    return e, logs


@pytest.mark.parametrize("rc, restarts, requeued", [(75, 0, True), (0, 0, False), (1, 0, False), (75, 20, False)])
def test_slurm_runs_one_process_per_node_and_requeues_on_75(slurm, rc, restarts, requeued):
    env, logs = slurm
    env.update(FAKE_RC=str(rc), SLURM_RESTART_COUNT=str(restarts))
    args = ["experiments/sft_tiny.py", "--set", "workdir=/shared/runs/a b"]
    proc = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == rc, proc.stderr
    for i in range(2):
        argv = (logs / f"task{i}").read_text().splitlines()
        assert argv == ["-m", "rlhf_jax", "run", *args, "--coordinator", "127.0.0.1:21234", "--num-processes", "2",
                        "--process-id", str(i)]
    assert ((logs / "scontrol").read_text() == "requeue 1234\n") if requeued else not (logs / "scontrol").exists()
    assert f"rlhf-jax exit status {rc}" in proc.stdout


def test_slurm_dry_run_prints_the_step(slurm):
    env, logs = slurm
    env["PATH"] = os.environ["PATH"]  # no scontrol: the nodelist's first host is read by the script itself
    proc = subprocess.run(["bash", str(SBATCH), "--dry-run", "experiments/sft_tiny.py", "--set", "train.steps=3"],
                          env=env, capture_output=True, text=True, timeout=30, check=True)
    step, *tasks = proc.stdout.splitlines()
    argv = shlex.split(step)
    assert argv[0] == "srun" and "--ntasks-per-node=1" in argv and "--ntasks=2" in argv
    assert argv[argv.index("-m") - 1:] == [env["PYTHON"], "-m", "rlhf_jax", "run", "experiments/sft_tiny.py", "--set",
                                           "train.steps=3", "--coordinator", "node07:21234", "--num-processes", "2"]
    assert [shlex.split(t.split(": ", 1)[1])[-1] for t in tasks] == ["0", "1"]
    assert not any(logs.iterdir())
