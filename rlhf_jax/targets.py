"""Names of the machines `rlhf-jax compile` plans for, parsed without importing JAX (bad input fails fast).

    v5e:2x4, v6e:4x4, v5p:4x4x2, v4:2x2x1   a TPU generation and its chip grid (libtpu's topology names)
    v5litepod-16, v5e-8, v6e-8, v5p-64, v4-8  Cloud TPU accelerator types: chips for v5e / v6e,
                                              TensorCores (two per chip) for v2-v4 and v5p
    h100-8, h200-8, a100-8                   N GPUs (80 / 141 / 80 GB): compiled for this machine's
                                              platform with N devices, checked against the GPU's memory
"""

from __future__ import annotations

import dataclasses
import math
import re

__all__ = ["TargetError", "TargetName", "TARGET_FORMS", "GPU_MEMORY_BYTES", "parse_target_name", "gpu_device_count"]

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
