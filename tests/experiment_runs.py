"""Full-length experiment runs for the opt-in tests: `rlhf-jax run` in a fresh interpreter, as a user runs it.

The suite's interpreter simulates 8 CPU devices at LLVM optimisation level 0 (conftest.py). A full
experiment runs thousands of steps, so it gets what a user's CPU run gets instead: one CPU device and
XLA's default optimisation, in a process of its own.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEST_ONLY_FLAGS = ("xla_force_host_platform_device_count", "xla_backend_optimization_level",
                   "xla_cpu_use_fusion_emitters")


def user_environment() -> dict[str, str]:
    """This process's environment without the suite's XLA flags (one CPU device, default codegen)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not any(t in f for t in _TEST_ONLY_FLAGS)]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("RLHF_JAX_HOST_MEMORY", None)
    return env


def run_experiment(name: str, workdir, *extra: str, timeout_s: float = 3 * 3600) -> None:
    """`python -m rlhf_jax run experiments/NAME.py --set workdir=WORKDIR EXTRA...`; fails with its output's tail."""
    command = [sys.executable, "-m", "rlhf_jax", "run", os.path.join(ROOT, "experiments", f"{name}.py"),
               "--set", f"workdir={workdir}", *extra]
    done = subprocess.run(command, cwd=ROOT, env=user_environment(), capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
