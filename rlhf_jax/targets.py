"""The machines `rlhf-jax compile` plans for: their names, parsed without importing JAX (bad input fails
fast), and `resolve_target`, a name's devices (a TPU topology's compile-only devices via libtpu, or
this machine's) and memory per device.

    v5e:2x4, v6e:4x4, v5p:4x4x2, v4:2x2x1   a TPU generation and its chip grid (libtpu's topology names)
    v5litepod-16, v5e-8, v6e-8, v5p-64, v4-8  Cloud TPU accelerator types: chips for v5e / v6e,
                                              TensorCores (two per chip) for v2-v4 and v5p
    h100-8, h200-8, a100-8                   N GPUs (80 / 141 / 80 GB): compiled for this machine's
                                              platform with N devices, checked against the GPU's memory
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["TargetError", "TargetName", "TARGET_FORMS", "GPU_MEMORY_BYTES", "TPU_MEMORY_GIB", "parse_target_name",
           "gpu_device_count", "Target", "resolve_target", "tpu_topology_devices", "device_memory", "memory_gib"]

# High-bandwidth memory per TPU chip by `device_kind` (longest matching name wins), GiB.
TPU_MEMORY_GIB = {"tpu v2": 16.0, "tpu v3": 32.0, "tpu v4": 32.0, "tpu v5 lite": 16.0, "tpu v5e": 16.0,
                  "tpu v5": 95.0, "tpu v5p": 95.0, "tpu v6 lite": 32.0, "tpu v6e": 32.0}
# GPU memory as `nvidia-smi` reports it.
GPU_MEMORY_BYTES = {"h100": 81_559 * 2**20, "h200": 143_771 * 2**20, "a100": 81_920 * 2**20}
_TPU_GRID_SIDES = {"v2": 2, "v3": 2, "v4": 3, "v5p": 3, "v5e": 2, "v5litepod": 2, "v6e": 2}
_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
TARGET_FORMS = ("TPU topologies 'v5e:2x4', 'v6e:4x4', 'v5p:4x4x2', 'v4:2x2x1' (generation:chip grid), "
                "TPU accelerator types 'v5litepod-16', 'v5e-8', 'v6e-8', 'v5p-64', 'v4-8', "
                "GPUs 'h100-8', 'h200-8' (80 / 141 GB each, N devices; compiled for this machine's platform)")
_GPU = re.compile(r"(h100|h200|a100)(?:[-:x](\d+))?")


class TargetError(ValueError):
    """An unknown or malformed target name (`--topology`); the message lists the accepted forms."""


@dataclasses.dataclass(frozen=True)
class TargetName:
    """A parsed target name: `kind` "tpu" (with libtpu's `topology`) or "gpu" (`gpu`, `count`)."""

    name: str
    kind: str
    label: str
    topology: str = ""
    chips: int = 0
    gpu: str = ""
    count: int = 0


def _bad(name: str, why: str = "") -> TargetError:
    return TargetError(f"unknown --topology {name!r}{': ' + why if why else ''}; accepted: {TARGET_FORMS}")


def _grid(chips: int, sides: int) -> list[int] | None:
    """The chip grid Cloud TPU gives an accelerator type of `chips` chips (double the last smallest side)."""
    if chips < 1 or chips & (chips - 1):
        return None
    grid = [2, 2, 1] if sides == 3 and chips >= 4 else [1] * sides
    while math.prod(grid) < chips:
        k = max(i for i, v in enumerate(grid) if v == min(grid))
        grid[k] *= 2
    return grid if math.prod(grid) == chips else None


def gpu_device_count(name: str | None) -> int:
    """N of a GPU target name ("h100-8" -> 8, "h200" -> 1); 0 for anything else."""
    m = _GPU.fullmatch((name or "").strip().lower())
    return 0 if m is None else int(m.group(2) or 1)


def parse_target_name(name: str) -> TargetName:
    """Parse a target name (see the module docstring).

    Raises:
      TargetError: an unknown generation, a grid of the wrong rank, a slice size that does not exist.
    """
    text = name.strip().lower()
    gpu = _GPU.fullmatch(text)
    if gpu:
        n = int(gpu.group(2) or 1)
        if n < 1:
            raise _bad(name, "a GPU count is at least 1")
        return TargetName(name, "gpu", f"{gpu.group(1).upper()} x{n}", gpu=gpu.group(1), count=n)
    topo = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", text)
    accel = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if topo:
        gen, grid = topo.group(1), topo.group(2)
        gen = "v5e" if gen == "v5litepod" else gen
        if gen not in _TPU_GRID_SIDES:
            raise _bad(name, f"generation {gen!r} is not one of {sorted(set(_TPU_GRID_SIDES) - {'v5litepod'})}")
        sides = _TPU_GRID_SIDES[gen]
        if grid.count("x") + 1 != sides:
            raise _bad(name, f"a {gen} chip grid has {sides} sides, e.g. {gen}:{'x'.join(['2'] * sides)}")
        chips = math.prod(int(v) for v in grid.split("x"))
        if chips < 1:
            raise _bad(name, "every side of the grid is at least 1")
        return TargetName(name, "tpu", f"{gen}:{grid}", topology=f"{gen}:{grid}", chips=chips)
    if accel:
        gen, count = accel.group(1), int(accel.group(2))
        if gen not in _TPU_GRID_SIDES:
            raise _bad(name)
        per_chip = _CORES_PER_CHIP[gen]
        grid = _grid(count // per_chip, _TPU_GRID_SIDES[gen]) if count % per_chip == 0 else None
        if grid is None:
            unit = "TensorCores, two per chip" if per_chip == 2 else "chips"
            raise _bad(name, f"{count} is not a {gen} slice size (a power of two of {unit})")
        gen = "v5e" if gen == "v5litepod" else gen
        topology = f"{gen}:{'x'.join(map(str, grid))}"
        return TargetName(name, "tpu", f"{topology} ({name})", topology=topology, chips=math.prod(grid))
    raise _bad(name)


def tpu_topology_devices(topology: str, **kwargs) -> list:
    """Compile-only devices of a TPU topology (e.g. "v5e:4x4", "v4:2x2x2", "v5p:4x4x4") via libtpu.

    The name is `<generation>:<chip grid>`, the form libtpu's topology description takes; extra
    keyword arguments (e.g. `num_slices=2`) go to `jax.experimental.topologies.get_topology_desc`.

    Raises:
      RuntimeError: libtpu is not installed (install the `[tpu]` extra) or the name is unknown.
    """
    from jax.experimental import topologies

    _quiet_libtpu()
    try:
        try:
            return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
        except Exception as e:
            if "chips_per_host_bounds" in kwargs or "not divisible by" not in str(e):
                raise
            # A slice smaller than a host's default 2x2x1 chips (v5e:1x1 is a v5litepod-1, v6e:2x1 a
            # v6e-2): one host holds the whole grid.
            return list(topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=_small_host_bounds(topology),
                                                     **kwargs).devices)
    except Exception as e:  # libtpu missing or the topology unknown: explain both
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r}: {e}. It needs libtpu (pip install 'rlhf_jax[tpu]') "
            "and a name such as 'v5e:4x4', 'v4:2x2x2' or 'v5p:4x4x4'."
        ) from e


def _small_host_bounds(topology: str) -> tuple[int, int, int]:
    """Per-host chip bounds for a slice that does not fill libtpu's default 2x2x1 host: the largest that
    divide the grid (its gcd with 2x2x1 per side), e.g. (1, 1, 1) for "v5e:1x1", (2, 1, 1) for "v6e:2x1"."""
    grid = [int(n) for n in topology.split(":")[-1].split("x")] + [1]
    return tuple(math.gcd(g, h) for g, h in zip(grid[:3], (2, 2, 1)))


def _quiet_libtpu() -> None:
    """Settings for describing a TPU topology on a machine without TPUs (set before libtpu loads).

    libtpu otherwise looks for the TPU VM's metadata and worker addresses and prints warnings, and
    takes a lock file that lets one process at a time use it (compile-only devices need neither).
    """
    from jax._src import hardware_utils  # noqa: PLC0415

    try:
        on_tpu = hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:
        on_tpu = False
    if on_tpu:
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a plan is compiled for.

    Attributes:
      name: as given (e.g. "v5litepod-16").
      label: what reports show (e.g. "v5e:4x4 (v5litepod-16)").
      platform: "tpu", "gpu" or the local platform ("cpu").
      devices: the devices the mesh is laid over (a TPU topology's compile-only devices, or local).
      memory_bytes: memory per device for the fit check (None: unknown).
      note: how the figures relate to the target (e.g. a GPU compiled for local shapes).
    """

    name: str
    label: str
    platform: str
    devices: tuple
    memory_bytes: int | None
    note: str = ""


def resolve_target(name: str | None, *, devices: Sequence[Any] | None = None) -> Target:
    """The devices and per-device memory of a target name (`parse_target_name`), or of this machine.

    Raises:
      TargetError: an unknown or malformed name, no libtpu for a TPU name, or a GPU target needing
        more local devices than there are (one line naming the value and the accepted forms).
    """
    import jax  # noqa: PLC0415 (names parse without JAX)

    if name is None:
        local = list(devices) if devices is not None else jax.devices()
        return Target("local", f"{local[0].platform} x{len(local)}", local[0].platform, tuple(local),
                      device_memory(local))
    parsed = parse_target_name(name)
    if parsed.kind == "gpu":
        local = list(devices) if devices is not None else jax.devices()
        if parsed.count > len(local):
            raise TargetError(f"--topology {name!r} needs {parsed.count} devices but this process has {len(local)}; "
                              f"pass --cpu-devices {parsed.count} (a GPU plan is compiled for this machine's platform)")
        memory = GPU_MEMORY_BYTES[parsed.gpu]
        return Target(name, parsed.label, "gpu", tuple(local[:parsed.count]), memory,
                      note=f"compiled for {local[0].platform} devices (no GPU topology to compile for); memory "
                           f"checked against {memory / 2**30:.1f} GiB per {parsed.gpu.upper()}")
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--topology {name!r} needs libtpu to describe TPU chips: pip install 'rlhf_jax[tpu]'")
    try:
        tpu = tpu_topology_devices(parsed.topology)
    except RuntimeError as e:
        why = str(e.__cause__ or e).strip().splitlines()[0]
        raise TargetError(f"unknown --topology {name!r}: {why}; accepted: {TARGET_FORMS}") from e
    memory = device_memory(tpu)
    if memory is not None and len(tpu) > parsed.chips:  # v2-v4 list each TensorCore: they share the chip's HBM
        memory = memory * parsed.chips // len(tpu)
    return Target(name, parsed.label, "tpu", tuple(tpu), memory)


def memory_gib(text: str) -> float:
    """`--device-memory-gib`: a finite number of GiB > 0 (argparse reports anything else, exit status 2)."""
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (GiB per device), got {text!r}")
    return gib


def device_memory(devices: Sequence[Any]) -> int | None:
    """Memory per device: TPU HBM from the device kind, CPU host RAM split over the devices."""
    d = devices[0]
    if d.platform == "tpu":
        kind = d.device_kind.lower().strip()
        for name, gib in sorted(TPU_MEMORY_GIB.items(), key=lambda kv: -len(kv[0])):
            if kind.startswith(name):
                return int(gib * 2**30)
        return None
    try:
        stats = d.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if d.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // max(1, len([x for x in devices if x.process_index == d.process_index]))
    return None
