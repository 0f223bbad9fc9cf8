"""One program on N processes: start JAX's multi-controller runtime, and the few agreements a run needs.

Multi-host runs use `jax.distributed` (as MaxText and Levanter do): every process runs the same
`rlhf-jax run`, holds the devices of its host, reads its share of each global batch and builds
global arrays with `jax.make_array_from_process_local_data`. `initialize` starts the runtime before
anything runs JAX:

- explicitly, from `--coordinator HOST:PORT --num-processes N --process-id I` (or the environment
  variables `RLHF_JAX_COORDINATOR`, `RLHF_JAX_NUM_PROCESSES`, `RLHF_JAX_PROCESS_ID`), for CPU and
  GPU clusters (e.g. one Slurm task per host);
- automatically, with `jax.distributed.initialize()` and no arguments (JAX finds the slice from the
  TPU metadata or the cluster's environment), when `RLHF_JAX_DISTRIBUTED=auto` (what `tpu/launch.sh`
  sets on every worker of a TPU VM pod) or in the environments that announce several processes
  (`TPU_WORKER_HOSTNAMES` on GKE, `SLURM_NTASKS` > 1, `OMPI_COMM_WORLD_SIZE` > 1);
- not at all for a single process, which behaves exactly as without it.

On CPU the cross-process collectives use gloo. Errors are `DistributedError`s with one line naming
the value at fault; a coordinator that never answers, or processes that never all join, fail after
`timeout_s` with one line, never hang. A preemption notice (SIGTERM) on any process is agreed on
through JAX's preemption service (`preemption_sync_point`): every process stops at the same step.
Before a run starts, its processes `agree` on what they run (`run_record`: the resolved config, the
experiment file, the installed packages): a `--set` given to one process only, or a host with other
code, is refused on every process by one line naming the key and the processes, instead of a run
whose processes diverge (and wait for each other in a collective until one is killed).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

__all__ = ["DistributedConfig", "DistributedError", "from_env", "initialize", "is_main", "any_process",
           "gather_rows", "sum_over_processes", "preemption_sync_point", "agree", "run_record",
           "max_over_processes", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"
# Environments in which `jax.distributed.initialize()` finds the cluster by itself (more than one process).
_AUTO = {"RLHF_JAX_DISTRIBUTED": lambda v: v == "auto", "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
         "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1, "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1}


INIT_TIMEOUT_S = 300  # seconds to wait for every process to join (pods, clusters)
LOCAL_INIT_TIMEOUT_S = 20  # the same when the coordinator is on this machine


class DistributedError(RuntimeError):
    """A multi-process start-up problem (bad flags, unreachable coordinator), in one line."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    Attributes:
      coordinator: `HOST:PORT` of process 0's coordination service (None: detected by JAX).
      num_processes: the number of processes.
      process_id: this process's index in `[0, num_processes)`.
      timeout_s: how long to wait for every process to join. None: `LOCAL_INIT_TIMEOUT_S` when the
        coordinator is on this machine (a loopback address: the processes start together, so a wrong
        `--num-processes` is reported within half a minute), `INIT_TIMEOUT_S` otherwise (pod hosts
        and cluster nodes may start minutes apart).
      heartbeat_s: after this long without a heartbeat a process is declared dead, and the others
        fail instead of waiting.
    """

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int | None = None
    heartbeat_s: int = 100

    def __post_init__(self):
        if self.timeout_s is None:
            local = _loopback(self.coordinator or "")
            object.__setattr__(self, "timeout_s", LOCAL_INIT_TIMEOUT_S if local else INIT_TIMEOUT_S)
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise DistributedError("give --coordinator, --num-processes and --process-id together (or "
                                   f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got coordinator="
                                   f"{self.coordinator!r}, num_processes={self.num_processes!r}, "
                                   f"process_id={self.process_id!r}")
        if self.coordinator is not None:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise DistributedError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
            if not isinstance(self.num_processes, int) or self.num_processes < 1:
                raise DistributedError(f"--num-processes must be a positive int, got {self.num_processes!r}")
            if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
                raise DistributedError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id!r}")
        for name in ("timeout_s", "heartbeat_s"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DistributedError(f"{name} must be a positive int, got {getattr(self, name)!r}")

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def _int_or_none(text: str | None, name: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name} must be an int, got {text!r}") from None


def from_env(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
             timeout_s: int | None = None, heartbeat_s: int = 100,
             environ: Mapping[str, str] = os.environ) -> DistributedConfig:
    """The `DistributedConfig` of flags, falling back to the `RLHF_JAX_*` environment variables."""
    return DistributedConfig(
        coordinator if coordinator is not None else (environ.get(ENV_COORDINATOR) or None),
        num_processes if num_processes is not None else _int_or_none(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
        process_id if process_id is not None else _int_or_none(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID),
        timeout_s=timeout_s, heartbeat_s=heartbeat_s)


def _auto_detected(environ: Mapping[str, str]) -> bool:
    return any(check(environ[k]) for k, check in _AUTO.items() if k in environ)


def initialize(config: DistributedConfig, *, environ: Mapping[str, str] = os.environ, fail=None) -> bool:
    """Join the multi-process run `config` describes (or the one JAX detects); return whether one was joined.

    Must run before anything runs JAX. A single process without flags or a detected cluster does
    nothing.

    When not every process has joined after `timeout_s` (a wrong `--num-processes`, a process
    that never started), `fail(message)` is called with one line and the process ends with exit
    status 2 (default: the line on stderr): JAX's client would end it a few seconds later with a
    fatal C++ error and a stack trace instead (its `initialization_timeout` is set past ours).

    Raises:
      DistributedError: the coordinator did not answer within `timeout_s`, or JAX refused the flags.
    """
    import jax  # noqa: PLC0415

    if not config.explicit and not _auto_detected(environ):
        return False
    if config.explicit:  # the CPU client's cross-process collectives (GPUs and TPUs use their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.explicit and config.process_id != 0:
        _wait_for_coordinator(config)
    kwargs = dict(initialization_timeout=config.timeout_s + _JAX_GRACE_S, heartbeat_timeout_seconds=config.heartbeat_s)
    if config.explicit:
        kwargs.update(coordinator_address=config.coordinator, num_processes=config.num_processes,
                      process_id=config.process_id)
        if _loopback(config.coordinator):  # JAX's service listens on every interface ([::]) unless told
            kwargs.update(coordinator_bind_address=config.coordinator)
        if config.process_id == 0:
            _check_port_free(config, kwargs.get("coordinator_bind_address"))
    where = f"coordinator {config.coordinator}" if config.explicit else "the detected cluster"
    who = f"process {config.process_id} of {config.num_processes}" if config.explicit else "this process"
    joined = _watchdog(config.timeout_s, fail, f"could not join {where} as {who} within {config.timeout_s} s: not "
                       "every process joined (check --num-processes, that every process was started, that process 0's "
                       "coordinator started (its own output says why not), and --init-timeout)")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 (JAX raises several types; all mean "could not join")
        joined.set()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join {where} as {who} within {config.timeout_s} s: {first}") from None
    joined.set()
    return True


_JAX_GRACE_S = 15  # JAX's own join deadline is this much later than ours


def _watchdog(timeout_s: int, fail, message: str):
    """An event to set once joined; unset after `timeout_s`, `fail(message)` and exit status 2.

    JAX's client releases the GIL while it waits to register, so this thread runs meanwhile.
    """
    import sys  # noqa: PLC0415
    import threading  # noqa: PLC0415

    done = threading.Event()

    def watch():
        if done.wait(timeout_s):
            return
        if fail is not None:
            fail(message)
        else:
            sys.stderr.write(f"rlhf-jax: error: {message}\n")
        sys.stderr.flush()
        os._exit(2)

    threading.Thread(target=watch, name="rlhf-jax-join-watchdog", daemon=True).start()
    return done


def _loopback(coordinator: str) -> bool:
    """Whether `HOST:PORT` names this machine's loopback interface."""
    host = coordinator.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _check_port_free(config: DistributedConfig, bind: str | None) -> None:
    """Process 0: raise one line when the coordinator's port is taken (JAX's service would crash the
    process with a segmentation fault, and the other processes would wait for it until `timeout_s`)."""
    import errno  # noqa: PLC0415
    import socket  # noqa: PLC0415

    host, _, port = (bind or config.coordinator).rpartition(":")
    host = host.strip("[]")
    if bind is None:  # JAX binds [::]:PORT (every interface)
        family, address = socket.AF_INET6, ("::", int(port))
    else:
        family, address = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to gRPC too
            s.bind(address)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            return  # e.g. no IPv6 on this machine: leave it to JAX
        raise DistributedError(f"cannot start the coordinator on {config.coordinator} as process 0 of "
                               f"{config.num_processes}: port {port} is already in use (another run or program "
                               "holds it; choose a free port for --coordinator on every process)") from None


def _wait_for_coordinator(config: DistributedConfig) -> None:
    """Wait until process 0's coordinator accepts connections, or raise one line after `timeout_s`.

    JAX's client ends the process with a fatal error (no Python exception) when it cannot register;
    probing the address first turns an unreachable coordinator into a `DistributedError`.
    """
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    host, _, port = config.coordinator.rpartition(":")
    deadline = time.monotonic() + config.timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"could not join coordinator {config.coordinator} as process "
                                       f"{config.process_id} of {config.num_processes} within {config.timeout_s} s: "
                                       f"{e.strerror or e}") from None
            time.sleep(0.5)


def is_main() -> bool:
    """Whether this is process 0, the one that writes files, logs and shows progress."""
    import jax  # noqa: PLC0415

    return jax.process_index() == 0


def preemption_sync_point():
    """`step -> whether to stop and save at step` from JAX's preemption service, or None for one process.

    In a multi-process run JAX's preemption notifier holds SIGTERM (what a TPU VM's maintenance
    event or preemption and Slurm's `scancel` send). A notice on any process reaches all of them
    through the coordination service, which picks the step after the furthest one any process has
    reached; `multihost_utils.reached_preemption_sync_point(step)` (what orbax's
    `CheckpointManager.reached_preemption` asks) is True on every process at that same step.
    Called at every step, from the same first step, on every process. None when there is one
    process or the service is off (`jax_enable_preemption_service`): then the run's own signal
    flag decides.
    """
    import jax  # noqa: PLC0415
    from jax._src import distributed as _state  # noqa: PLC0415 (whether the service runs; no public accessor)

    if jax.process_count() == 1 or _state.global_state.preemption_sync_manager is None:
        return None
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return lambda step: bool(multihost_utils.reached_preemption_sync_point(int(step)))


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (all processes call this; one process: `flag`)."""
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def gather_rows(x):
    """Every process's rows of a host array, concatenated in process order (one process: `x`).

    The processes' row counts may differ (each is padded to the largest for the exchange).
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils  # noqa: PLC0415

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int64), tiled=True))
    most = int(counts.max())
    padded = np.concatenate([x, np.zeros((most - x.shape[0], *x.shape[1:]), x.dtype)])
    blocks = np.asarray(multihost_utils.process_allgather(padded))  # [processes, most, ...]
    return np.concatenate([block[:int(n)] for block, n in zip(blocks, counts)])


def sum_over_processes(values):
    """The element-wise sum of a float vector over all processes (every process calls this)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.sum(multihost_utils.process_allgather(values[None]), axis=0).reshape(values.shape)


def max_over_processes(values):
    """The element-wise maximum of an int vector over all processes (every process calls this)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.max(multihost_utils.process_allgather(values[None]), axis=0).reshape(values.shape)


def _flat(record, prefix: str = "") -> dict:
    if isinstance(record, Mapping):
        out = {}
        for k, v in record.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: record}


def agree(record: Mapping, *, what: str = "run") -> None:
    """Check that every process passes an equal JSON-able `record` (every process calls this; one process: nothing).

    Raises (on every process alike):
      DistributedError: the processes hold different numbers of devices; or one line naming the
        first keys (dotted paths) whose values differ, with the value on process 0 and on the first
        process that differs.
    """
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if jax.process_count() == 1:
        return
    held = [0] * jax.process_count()  # every process knows every device's process: no collective needed
    for device in jax.devices():
        held[device.process_index] += 1
    if len(set(held)) > 1:
        raise DistributedError(f"the processes of this {what} hold different numbers of devices "
                               f"({', '.join(f'process {i}: {n}' for i, n in enumerate(held))}); every process "
                               "needs the same number (check each host's XLA_FLAGS, CUDA_VISIBLE_DEVICES or chips)")
    from jax.experimental import multihost_utils  # noqa: PLC0415

    text = json.dumps(record, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    if (digests == digests[0]).all():
        return
    rows = gather_rows(np.frombuffer(text, np.uint8)[:, None])  # every process's text, in process order
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(text)], np.int64), tiled=True))
    ends = np.cumsum(sizes)
    texts = [bytes(rows[e - n:e, 0]).decode() for e, n in zip(ends, sizes)]
    flats = [_flat(json.loads(t)) for t in texts]
    keys = sorted(set().union(*flats))
    missing = object()
    differ = []
    for key in keys:
        values = [f.get(key, missing) for f in flats]
        first = next((i for i, v in enumerate(values) if v != values[0]), None)
        if first is not None:
            show = lambda v: "absent" if v is missing else repr(v)  # noqa: E731
            differ.append(f"{key} is {show(values[0])} on process 0 but {show(values[first])} on process {first}")
    more = f" (and {len(differ) - 2} more keys)" if len(differ) > 2 else ""
    raise DistributedError(f"the processes of this {what} differ (give every process the same command, code "
                           f"and packages): {'; '.join(differ[:2])}{more}")


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def run_record(config: Mapping, experiment_file: str | None = None) -> dict:
    """What every process of a run must have alike: `config` (a `to_dict`), the experiment file's
    contents, the versions of the packages the steps run on and a digest of `rlhf_jax`'s source."""
    import hashlib  # noqa: PLC0415
    import importlib.metadata  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    import rlhf_jax  # noqa: PLC0415

    def digest(paths, root):
        h = hashlib.sha256()
        for p in paths:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    root = pathlib.Path(rlhf_jax.__file__).parent
    versions["rlhf_jax"] = f"{rlhf_jax.__version__} (source {digest(sorted(root.rglob('*.py')), root)})"
    record = {"config": dict(config), "packages": versions}
    if experiment_file is not None:
        path = pathlib.Path(experiment_file)
        record["experiment file"] = f"{path.name} ({digest([path], path.parent)})"
    return record
