"""Launching `rlhf-jax` as N local processes joined by `jax.distributed` (coordinator on 127.0.0.1 only).

Every process gets `--xla_force_host_platform_device_count=<devices>` CPU devices; the runs are
bounded in time and killed when a test ends, so a failing test never leaves processes behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict[str, str]:
    """The subprocess environment: CPU JAX with `devices` devices, the suite's fast-compile flags."""
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("RLHF_JAX_HOST_MEMORY", "system")
    return env


class Launch:
    """`num_processes` processes of `rlhf-jax ARGS` (process i gets `--process-id i`), or one without flags."""

    def __init__(self, args: list[str], *, num_processes: int, devices: int, heartbeat_s: int = 15,
                 init_timeout_s: int = 60, extra: dict[int, list[str]] | None = None,
                 hooks: dict[int, list[str]] | None = None, declared: int | None = None,
                 devices_of: dict[int, int] | None = None):
        """`hooks`: per process, options of `tests/multihost_run.py` (kill points, slow steps, a
        safetensors spy); `declared`: the `--num-processes` given (default: the number launched);
        `devices_of`: per process, a device count other than `devices`."""
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        for i in range(num_processes):
            multi = [] if num_processes == 1 and declared is None else [
                "--coordinator", f"{LOOPBACK}:{port}", "--num-processes", str(declared or num_processes),
                "--process-id", str(i), "--heartbeat-timeout", str(heartbeat_s), "--init-timeout", str(init_timeout_s)]
            runner = ["-m", "rlhf_jax"] if hooks is None else [
                os.path.join(ROOT, "tests", "multihost_run.py"), *hooks.get(i, []), "--"]
            command = [sys.executable, *runner, *args, *multi, *(extra or {}).get(i, [])]
            env = environment((devices_of or {}).get(i, devices))
            self.procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True, start_new_session=True))

    def wait(self, timeout_s: float) -> list[tuple[int, str, str]]:
        """`(exit code, stdout, stderr)` per process; every process still running after `timeout_s` is killed."""
        deadline = time.monotonic() + timeout_s
        out = []
        for p in self.procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                stdout, stderr = p.communicate()
            out.append((p.returncode, stdout, stderr))
        return out

    def signal(self, index: int, sig: int) -> None:
        self.procs[index].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
        for p in self.procs:
            p.wait()
