"""Writing the files of a Hugging Face export: shard planning, safetensors writes, atomic publishing.

Used by `rlhf_jax.models.hf.save_hf` (and the PEFT adapter export): `_plan_shards` splits the
tensors at `max_shard_size` (`parse_size`), `write_tensors` writes one file into the staging
directory and `_publish` renames the finished directory into place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from rlhf_jax.models.hf_tensors import _TensorSpec


def write_tensors(tensors: dict, file: Path, target: Path, *, caller: str) -> None:
    """`safetensors.numpy.save_file` into a staging directory; a failed write (disk full, a file size
    limit) raises OSError naming the file and the directory being written, which is left as it was."""
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"{caller}: writing {file.name} of {target} failed ({err}); {target} was left as it was"
                      ) from err


def _plan_shards(specs: list[_TensorSpec], itemsize: int, limit: int) -> list[list[_TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished staging directory to `target`, replacing an old one if present.

    The staging directory (and safetensors' files) are created private; the published checkpoint
    gets the permissions the process umask gives ordinary new files and directories.
    """
    umask = os.umask(0)
    os.umask(umask)
    for file in staging.rglob("*"):
        os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)
    os.chmod(staging, 0o777 & ~umask)
    if not target.exists():
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(retired)
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of `max_shard_size`: an int, or a string of bytes or like "2GB" (10^9) or "500MiB" (2^20);
    ValueError otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = (match.group(2) or "b").lower() if match else None
        if unit not in _SIZE_UNITS:
            raise ValueError(f"save_hf: max_shard_size must be bytes or like '2GB'/'500MiB', got {size!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"save_hf: max_shard_size must be positive, got {size!r}")
    return value
