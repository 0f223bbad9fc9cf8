"""Run metrics: a console progress bar, JSONL, TensorBoard and optional Weights & Biases.

The jitted step returns its metrics as device scalars. A driver appends them to a `MetricsBuffer`
every step (no host sync) and flushes the buffer every `logging.every` steps: one `device_get` for
all buffered steps, then `MetricsLogger.log` once per step, so `metrics.jsonl` has one line per step
whatever the logging interval.

Names follow what users know from TRL: `loss`, `learning_rate`, `grad_norm`, `mean_token_accuracy`,
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, ...;
evaluation metrics carry an `eval/` prefix. A mean over an empty part of a step's batch (a KTO batch
without undesirable examples: `count/rejected` = 0) is left out of that step's record
(`without_empty_means`), not logged as 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax
import numpy as np
from tqdm import tqdm

from rlhf_jax.config import ConfigError, LoggingConfig

__all__ = ["MetricsBuffer", "MetricsLogger", "ProgressBar", "read_jsonl", "write_jsonl", "format_duration",
           "purge_events_after", "without_empty_means"]


def _scalar(value: Any) -> float | int | None:
    """A Python number for a scalar metric, None for anything that is not one.

    Floats of every width count, JAX's `bfloat16` and float8 types too (NumPy files them as kind
    "V", not "f").
    """
    arr = np.asarray(value)
    if arr.ndim != 0:
        return None
    if arr.dtype.kind in "biu":
        return int(arr.item())
    if arr.dtype.kind == "f" or jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):
        return float(arr)
    return None


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
            out.append((step, without_empty_means(scalars)))
        return out


def without_empty_means(metrics: Mapping[str, float | int]) -> dict[str, float | int]:
    """A step's metrics less its means over an empty subset of the batch.

    A step that averages metrics over a subset of its examples also reports the subset's size as
    `count/<subset>` (KTO: `rewards/chosen` and `logps/chosen` over the desirable examples, counted
    by `count/chosen`; `*/rejected` over the undesirable ones). Where that count is 0 the step's
    mean is 0 by convention (nothing to average), which would read as a value: every
    `<name>/<subset>` is then left out of the record, and so is `rewards/margins` (the difference
    of the chosen and rejected means) when either side is empty. The counts stay. TRL's
    KTOTrainer logs no mean of an absent class either. Host side: the step's program is unchanged.
    """
    empty = {k.split("/", 1)[1] for k, v in metrics.items() if k.startswith("count/") and v == 0}
    if not empty:
        return dict(metrics)
    dropped = {"rewards/margins"} if empty & {"chosen", "rejected"} else set()
    return {k: v for k, v in metrics.items()
            if k.startswith("count/") or "/" not in k or (k not in dropped and k.rpartition("/")[2] not in empty)}


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


_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{wall}<{remaining}, {rate_fmt}{postfix}]"


class ProgressBar:
    """A one-line progress bar (drawn by tqdm's formatter): step/total, steps per second, ETA, key metrics.

    Steps run asynchronously: the host dispatches step `s` (`tick(s)`) while the device may still
    be `logging.every` steps behind, and learns that `s` finished only when its metrics are fetched
    (`update(s, ...)`, called by `MetricsLogger.log` after each flush). The rate is therefore timed
    between *sync points*, the moments a step is known to be finished: when ticks are used, the
    first `update` after new ticks (the flush returned, so the highest ticked step is done); without
    ticks, `update` of every `every`-th step. The rate is the steps between the first sync point
    and the latest one over the seconds between them: the first step's compilation is excluded, and
    evaluation and checkpoint pauses count, as they do for the ETA. Until two sync points exist
    the rate and ETA show as unknown.

    On a terminal the line is redrawn in place (at most every `redraw_interval` seconds between
    sync points); otherwise (log files, CI) a line is printed at most every `min_interval` seconds
    and at the end.

    Args:
      total: the run's last step.
      start: the step the run starts from (a resumed run's checkpoint step).
      keys: metrics shown after the bar, from the latest `update`.
      stream: where to draw (default stderr).
      width: the line's width in characters (default: the terminal's, or 100).
      min_interval: seconds between printed lines when `stream` is not a terminal.
      every: the logging interval (`LoggingConfig.every`): the sync points when nothing ticks.
      clock: the time source (seconds), for tests.
    """

    def __init__(self, total: int, *, start: int = 0, keys: Sequence[str] = ("loss",), stream: TextIO | None = None,
                 width: int | None = None, min_interval: float = 5.0, every: int = 1,
                 clock: Callable[[], float] = time.perf_counter, redraw_interval: float = 0.1):
        self.total = total
        self.keys = tuple(keys)
        self.stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width if width is not None else (shutil.get_terminal_size((100, 20)).columns if self._tty else 100)
        self.min_interval = min_interval
        self.redraw_interval = redraw_interval
        self.every = every
        self._clock = clock
        self._t0 = clock()
        self._start = start
        self._ticked = start              # highest step dispatched (`tick`)
        self._done = start                # highest step known finished (`update`)
        self._batch_t: float | None = None   # time of the first `update` since the last sync point
        self._first_sync: tuple[int, float] | None = None
        self._metrics: Mapping[str, float | int] = {}
        self._last_draw = -math.inf
        self._last_print = -math.inf
        self._unprinted = False           # not a terminal: the latest state is not printed yet
        self.rate = float("nan")

    def line(self, step: int, metrics: Mapping[str, float | int], *, now: float | None = None) -> str:
        """The progress text at `step` with `metrics` shown (also used by tests)."""
        now = self._clock() if now is None else now
        known = math.isfinite(self.rate) and self.rate > 0
        shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics)
        # elapsed=0: tqdm must not derive a rate of its own (dispatch bursts); the wall clock is `wall`.
        text = tqdm.format_meter(
            min(step, self.total), self.total, 0, ncols=self.width, unit="step",
            rate=self.rate if known else None, bar_format=_BAR_FORMAT, postfix=shown or None,
            ascii=False if self._tty else "-#",
            wall=tqdm.format_interval(now - self._t0), initial=self._start)
        return text.rstrip()

    def tick(self, step: int) -> None:
        """Step `step` was dispatched (cheap: call it every step; redraws at most every `redraw_interval` s)."""
        self._ticked = max(self._ticked, step)
        if self._tty:
            now = self._clock()
            if now - self._last_draw >= self.redraw_interval:
                self._draw(now)

    def update(self, step: int, metrics: Mapping[str, float | int]) -> None:
        """Step `step` is finished and these are its metrics: maybe a sync point; redraw or print."""
        now = self._clock()
        if self._batch_t is None:
            self._batch_t = now
        self._done = max(self._done, step)
        self._metrics = metrics
        if self._ticked > self._start:       # ticks: the flush that fetched `step` waited for every ticked step
            synced, at = step >= self._ticked, self._batch_t
        else:                                # no ticks: the last step of each `every`
            synced, at = step % self.every == 0 or step >= self.total, now
        if synced:
            self._sync(step, at)
            self._batch_t = None
        self._draw(now, final=step >= self.total)

    def _sync(self, step: int, at: float) -> None:
        if self._first_sync is None:
            self._first_sync = (step, at)
        elif step > self._first_sync[0] and at > self._first_sync[1]:
            self.rate = (step - self._first_sync[0]) / (at - self._first_sync[1])

    def _draw(self, now: float, *, final: bool = False) -> None:
        # A terminal's bar moves with the dispatched steps; a printed line (log file, CI) stays as it
        # was written, so it shows the step whose metrics it carries, never a step not yet finished.
        text = self.line(max(self._ticked, self._done) if self._tty else self._done, self._metrics, now=now)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._last_draw = now
        elif final or now - self._last_print >= self.min_interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print, self._unprinted = now, False
        else:
            self._unprinted = True

    def message(self, text: str) -> None:
        """Print a line (e.g. an eval result) without breaking the bar."""
        prefix = "\r\x1b[2K" if self._tty else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()
        self._last_draw = -math.inf

    def close(self) -> None:
        """End the line on a terminal; elsewhere print the latest state if it was rate-limited."""
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
        elif self._unprinted:
            self._draw(self._clock(), final=True)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file such as `metrics.jsonl` (an empty list when the file does not exist).

    A last line cut short (no newline and not valid JSON: what a process killed while writing leaves)
    is left out.

    Raises:
      ValueError: naming the file and line, for any other line that is not JSON.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # a whole file ends with "\n": its last item is ""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{os.fspath(path)} line {number}: not a JSON record ({e})") from None
    return records


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write rows as JSONL, atomically (a temporary file of its own, then rename); returns the path.

    Every process of a multi-process run may write the file it then reads (the same rows on each, so
    a shared file system ends with one copy): each through a temporary file no other process names.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class MetricsLogger:
    """Writes each step's metrics to the console, `metrics.jsonl`, TensorBoard and wandb.

    Args:
      workdir: the run directory; `metrics.jsonl` and `tb/` go there.
      config: a `LoggingConfig`.
      total_steps: the run's final step (for the progress bar and ETA).
      start_step: the step the run starts or resumes from. Records of later steps already in
        `metrics.jsonl` (written after the checkpoint a resumed run restarts from) are dropped, so
        the file holds exactly one record per step after a resume.
        TensorBoard events of those later steps are removed from the event files already in `tb/`
        (so any reader sees each step once), and the new event file starts with tensorboardX's
        `purge_step` marker at `start_step + 1` (TensorBoard's own way to hide them).
      keys: metrics shown on the progress bar (e.g. `loss`, or an RL run's `time/generate`).
      run_config: the run's config as a dict (sent to wandb).
      run_name: the wandb run name.
      stream: the console stream (default stderr).
      clock: the progress bar's time source, for tests.

    Call `tick(step)` after dispatching each step (cheap, no device sync) so the bar moves every
    step and its rate is timed from finished steps; `log` each step's fetched metrics.

    Raises:
      ConfigError: wandb was asked for and is not installed (raised before any compute).
    """

    def __init__(self, workdir: str | os.PathLike, *, config: LoggingConfig, total_steps: int, start_step: int = 0,
                 keys: Sequence[str] = ("loss",), run_config: Mapping[str, Any] | None = None,
                 run_name: str | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
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

            tb_dir = os.path.join(self.workdir, "tb")
            purge_events_after(tb_dir, start_step)
            # tensorboardX names an event file by the second it is opened and the host, and truncates
            # a file of that name: a logger opened in the same second as the previous one (a quick
            # resume) erased the earlier steps' events. The count of earlier files makes the name new.
            earlier = len([n for n in os.listdir(tb_dir) if n.startswith("events.out.tfevents")]
                          if os.path.isdir(tb_dir) else [])
            self._tb = SummaryWriter(logdir=tb_dir, purge_step=start_step + 1, filename_suffix=f".{earlier}")
        self._stream = stream if stream is not None else sys.stderr
        self.progress = (ProgressBar(total_steps, start=start_step, keys=keys, stream=stream, every=config.every,
                                     clock=clock) if config.console else None)

    def _truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step`, and a last line cut short (so appends start on a
        line of their own); rewritten atomically, so a kill meanwhile leaves the old file whole."""
        records = read_jsonl(self.jsonl_path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or not _ends_whole(self.jsonl_path):
            write_jsonl(self.jsonl_path, kept)

    def tick(self, step: int) -> None:
        """Step `step` was dispatched: moves the progress bar (no device sync, no file I/O)."""
        if self.progress is not None:
            self.progress.tick(step)

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


def _read_records(path: str) -> tuple[list[bytes], bool]:
    """The TFRecord payloads of an event file, and whether it ended cleanly (no torn or corrupt record)."""
    from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415

    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if end > len(data) or struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
            return records, False
        payload = data[pos + 12:end - 4]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
            return records, False
        records.append(payload)
        pos = end
    return records, pos == len(data)


def purge_events_after(tb_dir: str | os.PathLike, step: int) -> int:
    """Remove the events of steps after `step` from the TensorBoard event files in `tb_dir`.

    A resumed run restarts from its checkpoint at `step`; the events its previous attempt wrote
    for later steps would otherwise be read twice by any reader that does not honour
    tensorboardX's `purge_step` marker. Each affected file is rewritten atomically (a torn last
    record, from a crash mid-write, is dropped too); the `file_version` header is kept.

    Returns:
      The number of events removed.
    """
    from tensorboardX.proto.event_pb2 import Event  # noqa: PLC0415
    from tensorboardX.record_writer import RecordWriter  # noqa: PLC0415

    tb_dir = os.fspath(tb_dir)
    if not os.path.isdir(tb_dir):
        return 0
    removed = 0
    for name in sorted(os.listdir(tb_dir)):
        path = os.path.join(tb_dir, name)
        if name.endswith(".purging"):          # left by a crash during a rewrite; the original is intact
            os.remove(path)
            continue
        if not name.startswith("events.out.tfevents") or not os.path.isfile(path):
            continue
        records, clean = _read_records(path)
        events = [Event.FromString(r) for r in records]
        kept = [r for r, e in zip(records, events) if e.step <= step or e.file_version]
        if len(kept) == len(records) and clean:
            continue
        tmp = os.path.join(tb_dir, "rewrite.purging")   # no "tfevents" in the name: no reader loads it
        writer = RecordWriter(tmp)
        for record in kept:
            writer.write(record)
        writer.close()
        os.replace(tmp, path)
        removed += len(records) - len(kept)
    return removed


def _ends_whole(path: str) -> bool:
    """Whether the file is absent, empty, or ends with a newline."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _stable_run_id(workdir: str) -> str:
    """A wandb run id derived from the run directory, so a resumed run continues the same wandb run."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
