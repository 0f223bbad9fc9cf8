"""Run metrics: a console progress bar, JSONL, TensorBoard and optional Weights & Biases.

The jitted step returns its metrics as device scalars. A driver appends them to a `MetricsBuffer`
every step (no host sync) and flushes the buffer every `logging.every` steps: one `device_get` for
all buffered steps, then `MetricsLogger.log` once per step, so `metrics.jsonl` has one line per step
whatever the logging interval.

Names follow what users know from TRL: `loss`, `learning_rate`, `grad_norm`, `mean_token_accuracy`,
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, ...;
evaluation metrics carry an `eval/` prefix.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np

from rlhf_jax.config import ConfigError, LoggingConfig

__all__ = ["MetricsBuffer", "MetricsLogger", "ProgressBar", "read_jsonl", "format_duration"]


def _scalar(value: Any) -> float | int | None:
    """A Python number for a scalar metric, None for anything that is not one."""
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "biuf":
        return None
    item = arr.item()
    return int(item) if arr.dtype.kind in "biu" else float(item)


class MetricsBuffer:
    """Per-step device metrics held until the next flush (one host transfer per flush)."""

    def __init__(self):
        self._items: list[tuple[int, Mapping[str, Any]]] = []

    def append(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep `metrics` (device arrays are fine: nothing is transferred yet) for `step`."""
        self._items.append((step, metrics))

    def __len__(self) -> int:
        return len(self._items)

    def flush(self) -> list[tuple[int, dict[str, float | int]]]:
        """All buffered `(step, metrics)` as host scalars, oldest first; empties the buffer."""
        items, self._items = self._items, []
        fetched = jax.device_get([dict(m) for _, m in items])
        out = []
        for (step, _), metrics in zip(items, fetched):
            scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
            out.append((step, scalars))
        return out


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (or `M:SS` under an hour); `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


class ProgressBar:
    """A one-line progress bar: `step/total`, percent, steps per second, ETA and key metrics.

    On a terminal the line is redrawn in place; otherwise (log files, CI) a line is printed at most
    every `min_interval` seconds and at the end. Throughput is measured from the first update
    onwards, so the first step's compilation does not distort the ETA.
    """

    def __init__(self, total: int, *, start: int = 0, keys: Sequence[str] = ("loss",), stream: TextIO | None = None,
                 width: int = 24, min_interval: float = 5.0):
        self.total = total
        self.keys = tuple(keys)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0: float | None = None
        self._step0 = start
        self._last_print = -math.inf
        self.rate = float("nan")

    def line(self, step: int, metrics: Mapping[str, float | int]) -> str:
        """The progress text for `step` (also used by tests)."""
        frac = min(max(step / self.total, 0.0), 1.0) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        eta = (self.total - step) / self.rate if self.rate > 0 else float("nan")
        rate = f"{self.rate:.2f} step/s" if math.isfinite(self.rate) else "- step/s"
        shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics)
        line = f"[{bar}] {step}/{self.total} {100 * frac:3.0f}% {rate} ETA {format_duration(eta)} | {shown}"
        return line.rstrip(" |")

    def update(self, step: int, metrics: Mapping[str, float | int]) -> None:
        """Record that `step` is done and redraw (or print) the line."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        elif step > self._step0:
            self.rate = (step - self._step0) / max(now - self._t0, 1e-9)
        text = self.line(step, metrics)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif now - self._last_print >= self.min_interval or step >= self.total:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now

    def message(self, text: str) -> None:
        """Print a line (e.g. an eval result) without breaking the bar."""
        prefix = "\r\x1b[2K" if self._tty else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (an empty list when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes each step's metrics to the console, `metrics.jsonl`, TensorBoard and wandb.

    Args:
      workdir: the run directory; `metrics.jsonl` and `tb/` go there.
      config: a `LoggingConfig`.
      total_steps: the run's final step (for the progress bar and ETA).
      start_step: the step the run starts or resumes from. Records of later steps already in
        `metrics.jsonl` (written after the checkpoint a resumed run restarts from) are dropped, so
        the file holds exactly one record per step after a resume.
      keys: metrics shown on the progress bar.
      run_config: the run's config as a dict (sent to wandb).
      run_name: the wandb run name.
    Raises:
      ConfigError: wandb was asked for and is not installed (raised before any compute).
    """

    def __init__(self, workdir: str | os.PathLike, *, config: LoggingConfig, total_steps: int, start_step: int = 0,
                 keys: Sequence[str] = ("loss",), run_config: Mapping[str, Any] | None = None,
                 run_name: str | None = None, stream: TextIO | None = None):
        self.workdir = os.fspath(workdir)
        self.config = config
        os.makedirs(self.workdir, exist_ok=True)
        self._wandb = None
        if config.wandb:
            try:
                import wandb  # noqa: PLC0415 (optional dependency)
            except ImportError:
                raise ConfigError("logging.wandb=true but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=config.wandb_project, name=run_name, dir=self.workdir,
                                     config=dict(run_config or {}), resume="allow",
                                     id=_stable_run_id(self.workdir))
        self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
        self._jsonl = None
        if config.jsonl:
            self._truncate_after(start_step)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (slow import, only when asked for)

            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"), purge_step=start_step + 1)
        self._stream = stream if stream is not None else sys.stderr
        self.progress = ProgressBar(total_steps, start=start_step, keys=keys, stream=stream) if config.console else None

    def _truncate_after(self, step: int) -> None:
        records = read_jsonl(self.jsonl_path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            with open(self.jsonl_path, "w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")

    def log(self, step: int, metrics: Mapping[str, Any], *, progress: bool = True) -> None:
        """Write one step's scalar metrics everywhere (non-scalars are ignored)."""
        scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self.progress is not None and progress:
            self.progress.update(step, scalars)

    def message(self, text: str) -> None:
        """A human-readable line (eval results, warnings) on the console stream, bar or no bar."""
        if self.progress is not None:
            self.progress.message(text)
        else:
            self._stream.write(text + "\n")
            self._stream.flush()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stable_run_id(workdir: str) -> str:
    """A wandb run id derived from the run directory, so a resumed run continues the same wandb run."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
