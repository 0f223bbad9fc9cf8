"""`rlhf-jax` for the multi-process tests, with optional hooks (one process of a launch each):

    python tests/multihost_run.py [--kill POINT:STEP] [--slow-from STEP] [--spy-safetensors FILE] -- ARGS

- `--kill POINT:STEP`: SIGKILL this process at a checkpointing point (`killed_runs.KILL_POINTS`).
- `--slow-from STEP`: from step STEP on, every step takes at least a second longer (so a signal sent
  at a known step lands while the run still has steps to go, whatever the machine's speed).
- `--spy-safetensors FILE`: append to FILE, as JSON lines, the name and slice shape of every tensor
  this process reads from a safetensors file (`safe_open(...).get_slice(name)[index]` or
  `get_tensor(name)`), to check that a process reads only what its devices hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository (rlhf_jax) and tests/ (killed_runs)


def _slow(from_step: int) -> None:
    from rlhf_jax import metrics

    tick = metrics.MetricsLogger.tick

    def slow_tick(self, at):
        tick(self, at)
        if at >= from_step:
            time.sleep(1.0)

    metrics.MetricsLogger.tick = slow_tick


def _spy(path: str) -> None:
    import numpy as np
    import safetensors

    real = safetensors.safe_open

    def record(name, shape):
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "name": name, "shape": list(shape)}) + "\n")

    class Slice:
        def __init__(self, inner, name):
            self._inner, self._name = inner, name

        def __getitem__(self, index):
            out = self._inner[index]
            record(self._name, np.shape(out))
            return out

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    class Handle:
        def __init__(self, inner):
            self._inner = inner

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_slice(self, name):
            return Slice(self._inner.get_slice(name), name)

        def get_tensor(self, name):
            out = self._inner.get_tensor(name)
            record(name, np.shape(out))
            return out

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    def spied_open(*args, **kwargs):
        return Handle(real(*args, **kwargs))

    safetensors.safe_open = spied_open
    import rlhf_jax.models.hf as hf  # noqa: PLC0415 (it may hold its own reference)

    for module in (hf, *[m for n, m in sys.modules.items() if n.startswith("rlhf_jax.") and hasattr(m, "safe_open")]):
        if getattr(module, "safe_open", None) is real:
            module.safe_open = spied_open


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill", default=None)
    parser.add_argument("--slow-from", type=int, default=None)
    parser.add_argument("--spy-safetensors", default=None)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if ns.kill:
        from killed_runs import _install

        point, _, step = ns.kill.partition(":")
        _install(point, int(step))
    if ns.slow_from is not None:
        _slow(ns.slow_from)
    if ns.spy_safetensors:
        _spy(ns.spy_safetensors)
    from rlhf_jax.cli import main

    sys.exit(main(args))
