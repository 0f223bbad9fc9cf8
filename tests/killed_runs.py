"""`rlhf-jax` in a subprocess, optionally SIGKILLed at a chosen point of its checkpointing: the
machinery of the resume tests (test_fault_resume, test_exit_codes).

    python tests/killed_runs.py POINT:STEP run experiments/sft_tiny.py --set ...

runs the CLI with a hook that SIGKILLs the process at one of `KILL_POINTS`:
- "between": when step STEP has been dispatched, once every earlier save is committed (no save in
  flight: the kill falls between two checkpoints);
- "saving": during the asynchronous save of step STEP: from orbax's finalization thread, when the
  step's files are all in orbax's temporary directory and neither its manifest nor the commit (the
  rename to `<root>/STEP`) has happened, while the training loop runs on; on a process other than
  process 0 of a multi-process run (which never finalizes), as soon as its save of STEP is under way;
- "saved": right after the save of step STEP is committed (manifest and rename done).
The hook changes nothing else, so a run that never reaches its kill point ends as usual (the test
then sees its exit status instead of -SIGKILL).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KILL_POINTS = ("between", "saving", "saved")


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Subprocess environment: this repository importable, output unbuffered, and the session's
    compilation cache (tests/conftest.py), so only the first run of a program pays for compiling it."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1")


def run_cli(args: list[str], *, env: dict[str, str], kill: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`rlhf-jax ARGS` (with `kill="POINT:STEP"`: SIGKILLed there), run to its end from the repository root."""
    command = [sys.executable, "-m", "rlhf_jax"] if kill is None else [sys.executable, __file__, kill]
    return subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def flip_byte(step_dir: os.PathLike) -> pathlib.Path:
    """Flip one bit of the middle byte of the largest file under `step_dir/params`; returns that file."""
    files = [pathlib.Path(r) / f for r, _, fs in os.walk(pathlib.Path(step_dir) / "params") for f in fs]
    weights = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    return weights


def _process_index() -> int:
    import jax  # noqa: PLC0415

    return jax.process_index()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, step: int) -> None:
    """Patch the checkpointer (and the progress tick) of this process to die at `point` of `step`."""
    from rlhf_jax import checkpoint, metrics

    opened: list[checkpoint.Checkpointer] = []
    save = checkpoint.Checkpointer.save

    def save_and_maybe_die(self, at, *args, **kwargs):
        opened.append(self)
        written = save(self, at, *args, **kwargs)
        if point == "saving" and at == step and _process_index() != 0:
            _die()  # this process's files of the step are being written; process 0 commits (finalizes)
        if point == "saved" and at == step:
            self.wait()  # manifest written, step committed
            _die()
        return written

    checkpoint.Checkpointer.save = save_and_maybe_die
    if point == "between":
        tick = metrics.MetricsLogger.tick

        def tick_and_maybe_die(self, at):
            tick(self, at)
            if at == step:
                for ckpt in opened:
                    ckpt.wait()  # no save in flight
                _die()

        metrics.MetricsLogger.tick = tick_and_maybe_die
    elif point == "saving":
        write_manifest = checkpoint.write_manifest  # called by orbax's finalization thread before the commit

        def die_before_the_commit(step_dir):
            if os.path.basename(step_dir).startswith(f"{step}.") and os.path.isdir(step_dir):
                _die()  # the step is still in orbax's temporary directory
            return write_manifest(step_dir)

        checkpoint.write_manifest = die_before_the_commit


if __name__ == "__main__":
    point, _, at = sys.argv[1].partition(":")
    if point not in KILL_POINTS or not at.isdigit():
        sys.exit(f"usage: killed_runs.py {{{','.join(KILL_POINTS)}}}:STEP rlhf-jax-args...")
    _install(point, int(at))
    from rlhf_jax.cli import main

    sys.exit(main(sys.argv[2:]))
