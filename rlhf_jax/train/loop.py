"""The loop every driver shares: step, log, evaluate, checkpoint, stop cleanly on a signal.

    for s in start+1 .. total:
        state, metrics = step(state, next_batch())      # jitted, asynchronous
        buffer metrics                                  # no host sync
        wait for step s - 8 to finish                   # at most 8 steps in flight (`InFlight`)
        every logging.every steps: fetch, write, check the NaN/Inf guard's flags
        every train.eval_every steps (and at the end): evaluate(state) -> "eval/..." metrics,
            and a console line `eval @ step N (Xs, K of M held-out examples): ...`
        every checkpoint.every steps: save (asynchronously)
        on SIGTERM / SIGINT: finish this step, save, return

`rlhf_jax.train.recipe.run` builds the model, data and jitted step of a recipe, restores or
creates its state, and hands the rest to `fit`. Everything a resumed run needs to continue bit for bit (the state
pytrees and the data iterator's position) goes into each checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from rlhf_jax.checkpoint import Checkpointer, is_checkpoint_dir
from rlhf_jax.distributed import any_process, is_main, preemption_sync_point
from rlhf_jax.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig
from rlhf_jax.metrics import MetricsBuffer, MetricsLogger, read_jsonl
from rlhf_jax.train.results import json_ready, write_json

__all__ = ["TrainingHalted", "StopSignal", "Interrupted", "interrupt_outside_training", "RunDir", "FitResult", "fit",
           "open_run", "InFlight"]

MAX_IN_FLIGHT = 8  # dispatched programs allowed to run ahead of the host (see `InFlight`)


class InFlight:
    """Bounds how far the host dispatches ahead: `add(outputs)` of a program's n-th dispatch waits
    for the outputs of dispatch n - `limit`, so at most `limit` programs are unfinished.

    Asynchronous dispatch needs a small window only; an unbounded one deadlocks XLA:CPU with N
    host devices (`--xla_force_host_platform_device_count`) on a host with fewer than 2N cores:
    its client has max(cores, N) threads, a program's launch blocks a thread while the device has
    32 unfinished programs, and an N-device collective needs N threads at once. Past 32 steps
    dispatched without a host sync (e.g. `logging.every` > 32), some launches hold threads that
    the all-reduce of an earlier step needs, and XLA aborts ("Expected 8 threads to join the
    rendezvous, but only 6 of them arrived").
    """

    def __init__(self, limit: int = MAX_IN_FLIGHT):
        self.limit, self._pending = limit, deque()

    def add(self, outputs: Any) -> None:
        self._pending.append(outputs)
        while len(self._pending) > self.limit:
            jax.block_until_ready(self._pending.popleft())


class TrainingHalted(RuntimeError):
    """The NaN/Inf guard stopped the run (`train.nonfinite="halt"`); the message names the step."""


class Interrupted(BaseException):
    """A SIGTERM or SIGINT that came while no training loop was running (`interrupt_outside_training`).

    A `BaseException`, as `KeyboardInterrupt`, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class interrupt_outside_training:  # noqa: N801 -- used as a function: `with interrupt_outside_training():`
    """While set, SIGTERM and SIGINT raise `Interrupted` at once, except inside `fit`'s loop.

    `fit` installs its own handlers (`StopSignal`: finish the step, save, return) and puts these
    back when it returns; so a signal during setup, compilation or between the stages of an
    experiment ends the command at once (nothing new to save), and one during training stops it at
    a checkpoint. A signal whose `Interrupted` was swallowed (Python ignores exceptions raised in a
    garbage-collector callback) is remembered, and the next `fit` stops before its first step.
    Single-process runs only: on several processes SIGTERM is JAX's preemption notice. Inert
    outside the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        raise Interrupted(self.received)

    def __enter__(self) -> "interrupt_outside_training":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the loop polls between steps (TPU preemption notice).

    `forward`: a signal to raise after noting one (a multi-process run leaves SIGTERM to JAX's
    preemption notifier and forwards SIGINT to it).

    Used as a context manager; the previous handlers come back on exit. A second SIGINT while a
    stop is pending raises `KeyboardInterrupt` as usual, so a stuck run can still be interrupted.
    Outside the main thread (where handlers cannot be installed) it is an inert flag.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), *, forward: int | None = None):
        self.signals, self.forward = signals, forward
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.forward is not None:  # e.g. to JAX's preemption notifier, which holds SIGTERM
            signal.raise_signal(self.forward)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
                outside = getattr(self._previous[s], "__self__", None)
                if isinstance(outside, interrupt_outside_training) and outside.received:
                    self.received = outside.received  # its Interrupted was swallowed: stop now
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@dataclasses.dataclass
class RunDir:
    """A run's directory, checkpointer, metrics logger and the step it starts from.

    Attributes:
      path: the run directory (`config.json`, `metrics.jsonl`, `tb/`, `checkpoints/`, results).
      checkpointer: the run's `Checkpointer` on `path/checkpoints`.
      restore_step: the checkpoint to resume from, or None for a fresh start.
      config_changes: on a resume, the config keys that differ from the config the steps up to
        `restore_step` ran with ("key: old -> new"); `record_config` keeps that one as
        `config.until_step_<restore_step>.json`.
      config: the run's config (JSON-ready) that `record_config` writes as `config.json`.
    """

    path: str
    checkpointer: Checkpointer
    restore_step: int | None
    config_changes: tuple[str, ...] = ()
    config: Any = None

    def file(self, name: str) -> str:
        """A path inside the run directory."""
        return os.path.join(self.path, name)

    def record_config(self) -> None:
        """Write `config.json`, first keeping the one the earlier steps ran with when it differs.

        Called once the run is accepted (its checkpoint restored, about to train), so a rerun that
        is refused leaves the record as it was. An existing `config.until_step_<N>.json` is never
        replaced: it is what steps 1-N ran with.
        """
        if not is_main():  # one process writes files (every process saves its shards of the checkpoints)
            return
        config_file = self.file("config.json")
        if self.config_changes and os.path.isfile(config_file):
            kept = self.file(f"config.until_step_{self.restore_step}.json")
            if not os.path.exists(kept):  # byte for byte
                shutil.copyfile(config_file, kept)
        write_json(config_file, self.config)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.checkpointer.close()


def open_run(workdir: str, *, run_config: Any, checkpoint: CheckpointConfig, model_config: Any) -> RunDir:
    """Create (or reopen) a run directory and find the checkpoint to resume; writes no record yet.

    On a resume, the config is compared with the one the steps up to the checkpoint ran with (its
    `config.until_step_<N>.json` if a changed config was kept for that step before, else
    `config.json`). `fit` writes the new record (`RunDir.record_config`) when it starts training.

    Raises:
      ConfigError: the directory already holds checkpoints but `checkpoint.resume` is false (a
        fresh run would collide with them), naming the directory.
    """
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if is_checkpoint_dir(ckpt_dir) and not checkpoint.resume:
        raise ConfigError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=false: choose another "
                          "workdir (--set workdir=...) or delete the old run")
    checkpointer = Checkpointer(ckpt_dir, config=checkpoint, model_config=model_config)
    restore_step = checkpointer.latest_step() if checkpoint.resume else None
    config = json_ready(run_config)
    changes = ()
    if restore_step is not None:
        kept = os.path.join(workdir, f"config.until_step_{restore_step}.json")
        ran_with = kept if os.path.isfile(kept) else os.path.join(workdir, "config.json")
        if os.path.isfile(ran_with):  # else no record to compare with (deleted by hand)
            try:
                with open(ran_with, encoding="utf-8") as f:
                    changes = config_differences(json.load(f), config)
            except ValueError as e:   # edited by hand into something that is not JSON
                changes = (f"{os.path.basename(ran_with)}: not readable as JSON ({e})",)
    return RunDir(os.path.abspath(workdir), checkpointer, restore_step, changes, config)


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    """The dotted keys whose values differ between two config dicts, as "key: old -> new" (a key only
    one of them has shows "(absent)" on the other side)."""
    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            if isinstance(value, Mapping) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(before), flat(after)
    absent = "(absent)"
    return tuple(f"{key}: {json.dumps(a[key]) if key in a else absent} -> {json.dumps(b[key]) if key in b else absent}"
                 for key in sorted(set(a) | set(b)) if a.get(key, absent) != b.get(key, absent))


@dataclasses.dataclass
class FitResult:
    """What `fit` ends with.

    Attributes:
      state: the final state.
      step: the last completed step.
      stopped_by: the signal name that stopped the run early ("SIGTERM", "SIGINT"), or None.
      last_eval: the last evaluation's metrics (empty when none ran).
      last_metrics: the last logged training metrics.
    """

    state: Any
    step: int
    stopped_by: str | None
    last_eval: dict[str, float]
    last_metrics: dict[str, float]


def fit(
    *,
    state: Any,
    step_fn: Callable[[Any, Mapping[str, Any]], tuple[Any, Mapping[str, Any]]],
    batches: Iterator[Mapping[str, Any]],
    start_step: int,
    train: TrainConfig,
    checkpoint: CheckpointConfig,
    logging: LoggingConfig,
    run: RunDir,
    save_items: Callable[[Any], Mapping[str, Any]],
    extras: Callable[[], Mapping[str, Any]],
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
    progress_keys: tuple[str, ...] = ("loss",),
    run_config: Mapping[str, Any] | None = None,
    evaluate_at_start: bool = True,
    held_out: Any = None,
) -> FitResult:
    """Train from `start_step` to `train.steps`, logging, evaluating and checkpointing.

    Args:
      state: the (restored or fresh) state the step takes.
      step_fn: the jitted `(state, batch) -> (state, metrics)`.
      batches: an iterator of host batches, positioned after `start_step` batches; its state is
        read through `extras()` for checkpoints.
      start_step: the step `state` is at (0 for a fresh run).
      train: loop settings: steps, eval interval, NaN/Inf policy.
      checkpoint: save interval and retention.
      logging: logging interval and sinks.
      run: the run directory from `open_run`.
      save_items: `state -> {item name: pytree}` for the checkpoint.
      extras: `() -> JSON host state` (data iterator state, ...) for the checkpoint, read right
        after the step whose state is saved.
      evaluate: `state -> metrics` (named "eval/..."), run every `train.eval_every` steps and at
        the end.
      progress_keys: metrics shown on the progress bar.
      run_config: the config dict for wandb.
      evaluate_at_start: on a fresh run, evaluate the initial state and log it as step 0 (the
        baseline every later evaluation is compared with).
      held_out: what `evaluate` reads of the held-out set (`rlhf_jax.train.data.HeldOut`: its
        `describe()`, e.g. "32 of 120 held-out examples", goes into each `eval @ step N` line), or
        None.
    Returns:
      A `FitResult`.
    Raises:
      TrainingHalted: a non-finite loss or gradient under `train.nonfinite="halt"`.
      ConfigError: `checkpoint.keep_best` ranks by a metric the first evaluation does not report.
    """
    quiet = None
    if not is_main():  # process 0 alone logs, writes metrics files, shows progress and prints messages
        logging = dataclasses.replace(logging, console=False, jsonl=False, tensorboard=False, wandb=False)
        quiet = io.StringIO()  # the other processes' messages (evaluations, resuming, saving) are not shown
    logger = MetricsLogger(run.path, config=logging, total_steps=train.steps, start_step=start_step,
                           keys=progress_keys, run_config=run_config, run_name=os.path.basename(run.path),
                           stream=quiet)
    buffer = MetricsBuffer()
    in_flight = InFlight()
    last_eval: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    step = start_step

    def flush() -> None:
        nonlocal last_metrics
        for s, metrics in buffer.flush():
            if metrics.get("halt", 0):
                logger.log(s, metrics)
                logger.flush()
                raise TrainingHalted(
                    f"step {s}: non-finite loss or gradient (loss={metrics.get('loss')}, "
                    f"grad_norm={metrics.get('grad_norm')}); the update was not applied and the run halts "
                    "(train.nonfinite='halt'). The last checkpoint is before this step."
                )
            if metrics.get("nonfinite", 0):
                logger.message(f"step {s}: non-finite loss or gradient; update skipped (train.nonfinite='skip')")
            logger.log(s, metrics)
            last_metrics = metrics
        logger.flush()

    def run_eval() -> dict[str, float]:
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in evaluate(state).items()}
        if checkpoint.keep_best and checkpoint.best_metric not in metrics:
            raise ConfigError(f"checkpoint.best_metric={checkpoint.best_metric!r} is not a metric this run's "
                              f"evaluation reports; it reports: {', '.join(sorted(metrics))}")
        logger.log(step, metrics, progress=False)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        read = "" if held_out is None else f", {held_out.describe()}"
        logger.message(f"eval @ step {step} ({time.perf_counter() - start:.1f}s{read}): {shown}")
        return metrics

    saved_at = start_step

    def save(metrics: Mapping[str, float] | None = None) -> None:
        nonlocal saved_at
        run.checkpointer.save(step, save_items(state), extras=extras(), metrics=metrics)
        saved_at = step

    if start_step >= train.steps:
        logger.message(f"{run.path}: already trained to step {start_step} (train.steps={train.steps}); "
                       "nothing to do")
        if run.config_changes:  # not applied: nothing trains (e.g. an earlier stage of a chain edited)
            logger.message(f"the config differs from the one it was trained with, and is not applied: "
                           f"{'; '.join(run.config_changes)} (delete {run.path} to train it with this config)")
        logger.close()
        last_eval, last_metrics = _last_logged(run.file("metrics.jsonl"), start_step)
        return FitResult(state, start_step, None, last_eval, last_metrics)

    run.record_config()
    if start_step > 0:
        logger.message(f"resuming from step {start_step} ({run.checkpointer.directory})")
        if run.config_changes:
            shown = "; ".join(run.config_changes[:6]) + (f"; and {len(run.config_changes) - 6} more"
                                                         if len(run.config_changes) > 6 else "")
            logger.message(f"the config differs from the one steps 1-{start_step} ran with: {shown} (that one is "
                           f"kept as config.until_step_{start_step}.json)")
    try:
        agreed = preemption_sync_point()
        with (StopSignal() if agreed is None else StopSignal((signal.SIGINT,), forward=signal.SIGTERM)) as stop:
            if evaluate is not None and evaluate_at_start and start_step == 0:
                last_eval = run_eval()
            # Every process stops at the same step: a signal on any one of them counts for all.
            should_stop = (lambda at: any_process(stop.requested)) if agreed is None else agreed  # noqa: E731
            stopping = should_stop(step)
            while step < train.steps and not stopping:
                state, metrics = step_fn(state, next(batches))
                step += 1
                buffer.append(step, metrics)
                in_flight.add(metrics)  # the metrics come from the step's program: done with it
                logger.tick(step)  # the progress bar's rate is per step, though metrics are fetched every few
                stopping = should_stop(step)
                final = step == train.steps
                if step % logging.every == 0 or final or stopping:
                    flush()
                evaluated = None
                if evaluate is not None and ((train.eval_every and step % train.eval_every == 0) or final):
                    flush()
                    last_eval = evaluated = run_eval()
                due = checkpoint.every and step % checkpoint.every == 0
                if due or final or stopping or (evaluated is not None and checkpoint.keep_best):
                    flush()
                    save(evaluated)
            flush()
            stopped_by = stop.received or ("a preemption notice (SIGTERM to a process of the run)" if stopping else None)
            if stopping and saved_at != step:
                save()
            # Still under the handlers: another SIGTERM while the last save completes is only noted.
            run.checkpointer.wait()
            if stopping:
                logger.message(f"{stopped_by}: saved checkpoint at step {step}; exiting" if step > start_step
                               else f"{stopped_by}: stopped before the first step; nothing new to save")
    finally:
        logger.close()
    return FitResult(state, step, stopped_by, last_eval, last_metrics)


def _last_logged(path: str, step: int) -> tuple[dict[str, float], dict[str, float]]:
    """(last eval metrics, last train metrics) logged at or before `step` in a metrics JSONL file."""
    last_eval: dict[str, float] = {}
    last_train: dict[str, float] = {}
    for record in read_jsonl(path):
        if record.get("step", 0) > step:
            continue
        values = {k: v for k, v in record.items() if k != "step"}
        if any(k.startswith("eval/") for k in values):
            last_eval = values
        else:
            last_train = values
    return last_eval, last_train
