"""The machines `rlhf-jax compile` plans for: their names, parsed without importing JAX (bad input fails
fast), and `resolve_target`, a name's devices (a TPU topology's compile-only devices via libtpu, or
this machine's) and memory per device.

    v5e:2x4, v6e:4x4, v5p:4x4x2, v4:2x2x1   a TPU generation and its chip grid (libtpu's topology names)
    v5litepod-16, v5e-8, v6e-8, v5p-64, v4-8  Cloud TPU accelerator types: chips for v5e / v6e,
                                              TensorCores (two per chip) for v2-v4 and v5p
    h100-8, h200-8, a100-8                   N GPUs (80 / 141 / 80 GB): compiled for this machine's
                                              platform with N devices, checked against the share of the
                                              GPU's memory JAX lets XLA allocate

A target's memory per device is what a program can have allocated there: on a TPU what XLA:TPU can
allocate (the HBM less what the compiler reserves, `TPU_HBM`), on a GPU the share of its memory JAX
lets XLA allocate (`gpu_memory_fraction`: 75% unless the environment says otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TargetError", "TargetName", "TARGET_FORMS", "GPU_MEMORY_BYTES", "TPU_MEMORY_GIB", "TPU_HBM", "TpuMemory",
           "parse_target_name", "gpu_device_count", "gpu_memory_fraction", "Target", "resolve_target",
           "tpu_topology_devices", "device_memory", "memory_gib", "with_device_memory_gib"]


@dataclasses.dataclass(frozen=True)
class TpuMemory:
    """A TPU generation's memory: `hbm_gib` per chip, `devices_per_chip` that libtpu's compile-only
    devices split it over (TensorCores on v2-v4), `usable_bytes` per such device that XLA:TPU can allocate."""

    generation: str
    hbm_gib: float
    devices_per_chip: int
    usable_bytes: int


# By `device_kind` (longest matching prefix wins). `usable_bytes` is the largest program XLA:TPU compiles for
# one of libtpu's compile-only devices (libtpu 0.0.42.1): the HBM less what the compiler reserves, found by
# compiling ever larger outputs until it refused ("Ran out of memory in memory space hbm. Used 15.75G of
# 15.75G hbm ... reserved 258.00M" on v5e), to the KiB; a real TPU's allocator limit (`memory_stats()`'s
# `bytes_limit`, e.g. 33,550,237,696 on v6e) agrees within 1 KiB. tests/test_compile.py checks each against
# the compiler.
TPU_HBM = {
    "tpu v2": TpuMemory("v2", 16, 2, 8_034_181_120),             # 7.48 GiB: 8 GiB per TensorCore less 530 MiB
    "tpu v3": TpuMemory("v3", 32, 2, 16_624_115_712),            # 15.48 GiB: 16 GiB per TensorCore less 530 MiB
    "tpu v4": TpuMemory("v4", 32, 2, 16_372_985_856),            # 15.25 GiB: 16 GiB per TensorCore less 770 MiB
    "tpu v5 lite": TpuMemory("v5e", 16, 1, 16_909_336_064),      # 15.75 GiB: 16 GiB less 258 MiB
    "tpu v5": TpuMemory("v5p", 96, 1, 102_803_437_568),          # 95.74 GiB: 96 GiB less 263 MiB
    "tpu v6 lite": TpuMemory("v6e", 32, 1, 33_550_236_672),      # 31.25 GiB: 32 GiB less 772 MiB
}
TPU_HBM.update({"tpu v5e": TPU_HBM["tpu v5 lite"], "tpu v5p": TPU_HBM["tpu v5"], "tpu v6e": TPU_HBM["tpu v6 lite"]})
# High-bandwidth memory per TPU chip by `device_kind`, GiB (what the chip has; a plan checks `usable_bytes`).
TPU_MEMORY_GIB = {kind: m.hbm_gib for kind, m in TPU_HBM.items()}
# GPU memory as `nvidia-smi` reports it.
GPU_MEMORY_BYTES = {"h100": 81_559 * 2**20, "h200": 143_771 * 2**20, "a100": 81_920 * 2**20}
# The share of a GPU's memory JAX lets XLA allocate when the environment does not set one
# (`XLA_CLIENT_MEM_FRACTION`'s default: XLA's `GpuAllocatorConfig.memory_fraction`).
JAX_GPU_MEMORY_FRACTION = 0.75
_GPU_ALLOCATORS = ("default", "platform", "bfc", "cuda_async", "vmm")  # jaxlib's XLA_PYTHON_CLIENT_ALLOCATOR values
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
      memory_bytes: memory per device a run may use, for the fit check (None: unknown).
      note: how the figures relate to the target (e.g. a GPU compiled for local shapes).
      memory_source: whose memory that is, completing "X GiB ..." in a verdict (e.g. "XLA:TPU can
        allocate on a v5e chip", "JAX lets XLA allocate on an H100").
      memory_note: how that figure was found and, on a GPU, how to plan for another share.
    """

    name: str
    label: str
    platform: str
    devices: tuple
    memory_bytes: int | None
    note: str = ""
    memory_source: str = ""
    memory_note: str = ""


def resolve_target(name: str | None, *, devices: Sequence[Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> Target:
    """The devices and per-device memory of a target name (`parse_target_name`), or of this machine.

    A GPU's memory is the share JAX lets XLA allocate under `environ` (default `os.environ`, the
    command's environment; `gpu_memory_fraction`).

    Raises:
      TargetError: an unknown or malformed name, no libtpu for a TPU name, a GPU target needing more
        local devices than there are, or a GPU memory setting JAX would refuse (one line naming the
        value and the accepted forms).
    """
    import jax  # noqa: PLC0415 (names parse without JAX)

    if name is None:
        local = list(devices) if devices is not None else jax.devices()
        memory, source, note = _device_memory(local)
        return Target("local", f"{local[0].platform} x{len(local)}", local[0].platform, tuple(local), memory,
                      memory_source=source, memory_note=note)
    parsed = parse_target_name(name)
    if parsed.kind == "gpu":
        local = list(devices) if devices is not None else jax.devices()
        if parsed.count > len(local):
            raise TargetError(f"--topology {name!r} needs {parsed.count} devices but this process has {len(local)}; "
                              f"pass --cpu-devices {parsed.count} (a GPU plan is compiled for this machine's platform)")
        total, gpu = GPU_MEMORY_BYTES[parsed.gpu], parsed.gpu.upper()
        fraction, why = gpu_memory_fraction(os.environ if environ is None else environ)
        memory = int(total * fraction)
        return Target(name, parsed.label, "gpu", tuple(local[:parsed.count]), memory,
                      note=f"compiled for {local[0].platform} devices (no GPU topology to compile for)",
                      memory_source=f"JAX lets XLA allocate on an {gpu}",
                      memory_note=f"{fraction:.0%} of its {total / 2**30:.2f} GiB, {why}; plan for another share "
                                  "with XLA_CLIENT_MEM_FRACTION=.XX (or XLA_PYTHON_CLIENT_ALLOCATOR=platform for "
                                  "all of it) in this command's environment, as the run will have it, or pass "
                                  "--device-memory-gib")
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--topology {name!r} needs libtpu to describe TPU chips: pip install 'rlhf_jax[tpu]'")
    try:
        tpu = tpu_topology_devices(parsed.topology)
    except RuntimeError as e:
        why = str(e.__cause__ or e).strip().splitlines()[0]
        raise TargetError(f"unknown --topology {name!r}: {why}; accepted: {TARGET_FORMS}") from e
    memory, source, note = _device_memory(tpu)
    return Target(name, parsed.label, "tpu", tuple(tpu), memory, memory_source=source, memory_note=note)


def gpu_memory_fraction(environ: Mapping[str, str]) -> tuple[float, str]:
    """The share of a GPU's memory JAX lets XLA allocate under the environment `environ`, and why.

    As JAX 0.10 reads it at start-up (jaxlib's `generate_pjrt_gpu_plugin_options`; XLA's
    `GpuAllocatorConfig`, `CreateBFCAllocator`, `CreateCudaAsyncAllocator`; JAX's "GPU memory
    allocation" page): the allocator (BFC by default; also `cuda_async`, `vmm`) holds at most
    `XLA_CLIENT_MEM_FRACTION` (or its deprecated name `XLA_PYTHON_CLIENT_MEM_FRACTION`) of the
    GPU's total memory, 0.75 when neither is set, whether it preallocates that share or grows to
    it (`XLA_PYTHON_CLIENT_PREALLOCATE=false` keeps the limit); `XLA_PYTHON_CLIENT_ALLOCATOR=platform`
    allocates straight from the driver, up to all of it. A fraction above 1 counts as 1 (more than
    the GPU has needs unified memory, which a plan does not assume).

    Raises:
      TargetError: a setting JAX refuses (both fraction names, a fraction that is not a number > 0,
        an unknown allocator), naming the variable.
    """
    allocator = environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default").lower()
    if allocator not in _GPU_ALLOCATORS:
        raise TargetError(f"XLA_PYTHON_CLIENT_ALLOCATOR={allocator!r} in the environment is not one of "
                          f"{', '.join(_GPU_ALLOCATORS)} (JAX refuses it too)")
    names = [n for n in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION") if environ.get(n)]
    if len(names) == 2:
        raise TargetError("XLA_CLIENT_MEM_FRACTION and XLA_PYTHON_CLIENT_MEM_FRACTION are both set in the "
                          "environment (JAX refuses both): keep XLA_CLIENT_MEM_FRACTION")
    fraction = JAX_GPU_MEMORY_FRACTION
    if names:  # JAX parses it whichever the allocator
        text = environ[names[0]]
        try:
            fraction = float(text)
        except ValueError:
            fraction = math.nan
        if not math.isfinite(fraction) or fraction <= 0:
            raise TargetError(f"{names[0]}={text!r} in the environment is not a share of GPU memory "
                              "(a number > 0, e.g. .9)")
    if allocator == "platform":
        return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform allocates from all of it"
    kept = ("; XLA_PYTHON_CLIENT_PREALLOCATE=false keeps that limit (XLA grows to it)"
            if environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "") in ("false", "False", "0") else "")
    if not names:
        return fraction, f"JAX's default with XLA_CLIENT_MEM_FRACTION unset{kept}"
    return min(fraction, 1.0), f"{names[0]}={environ[names[0]]} in this command's environment{kept}"


def with_device_memory_gib(target: Target, gib: float | None) -> Target:
    """`target` with `--device-memory-gib` as its memory per device (unchanged when `gib` is None)."""
    if gib is None:
        return target
    return dataclasses.replace(target, memory_bytes=int(gib * 2**30), memory_source="given by --device-memory-gib",
                               memory_note="")


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
    """Memory per device a program may use: the allocator's limit of a device here (`memory_stats`),
    what XLA:TPU can allocate on a TPU compile-only device (`TPU_HBM`), or host RAM split over this
    process's CPU devices."""
    return _device_memory(devices)[0]


def _device_memory(devices: Sequence[Any]) -> tuple[int | None, str, str]:
    """`device_memory` with its `Target.memory_source` and `memory_note`."""
    d = devices[0]
    try:
        stats = d.memory_stats()
    except Exception:  # a compile-only device: "MemoryStats is only supported for addressable PjRt devices"
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"the allocator allows on a {d.device_kind}", "memory_stats()['bytes_limit']"
    if d.platform == "tpu":
        kind = d.device_kind.lower().strip()
        for name in sorted(TPU_HBM, key=len, reverse=True):
            if kind.startswith(name):
                m = TPU_HBM[name]
                where = "chip" if m.devices_per_chip == 1 else "TensorCore"
                hbm = m.hbm_gib / m.devices_per_chip
                reserved = hbm * 2**30 - m.usable_bytes
                share = "" if m.devices_per_chip == 1 else f" (half the chip's {m.hbm_gib:g})"
                return (m.usable_bytes, f"XLA:TPU can allocate on a {m.generation} {where}",
                        f"{hbm:g} GiB of HBM{share} less the {reserved / 2**20:.0f} MiB the compiler reserves")
        return None, "", ""
    if d.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = max(1, len([x for x in devices if x.process_index == d.process_index]))
        return total // n, "of this machine's RAM per CPU device", f"{total / 2**30:.1f} GiB over {n} devices"
    return None, "", ""
