"""Integrity manifests of checkpoint steps: the size and SHA-256 of every file, checked before a restore.

A step directory `<root>/<step>/` written by `Checkpointer` holds `MANIFEST_NAME`, a JSON file
listing every file under the step's item directories (`params/`, `train/`, `meta/`, `extras/`, ...)
with its size in bytes and its SHA-256:

    {"format": 1, "algorithm": "sha256", "files": {"params/d/05a4...": {"size": 247, "sha256": "..."}}}

Orbax's own files at the top of the step directory (`_CHECKPOINT_METADATA`, `commit_success.txt`)
are not listed: orbax rewrites the first when it commits the step, after the manifest is written.

The manifest is written when the save is finalized, before orbax commits the step (renames its
temporary directory), async saves included: a step that is visible at all has its manifest, and a
process killed before the commit leaves no step. `verify_step` compares sizes first (a truncated or
missing file is found without reading anything), then checksums, reading files on a few threads.

How `Checkpointer` uses it:
- `latest_step()` verifies steps newest first (a verdict is cached per step; steps the checkpointer
  saved itself are trusted). Under `CheckpointConfig.on_corrupt="fallback"` (the default) a corrupt
  step is passed over with a warning naming the step directory and the bad file, and a writable
  checkpointer renames it to `<step>.corrupt` (kept for inspection; orbax ignores it), so that the
  resumed run's next saves of that step are not refused; under "raise" it raises
  `CheckpointCorruptError` with that one line. When no step is intact it raises either way.
- `restore(step=N)` verifies step N and raises `CheckpointCorruptError` if it is corrupt (a step
  asked for by number never silently becomes another); `restore()` uses `latest_step()`.
- A step without a manifest is "unverified": one written before manifests existed (its `meta` has
  no `manifest` key) loads as before, and if orbax cannot read it that is a `CheckpointCorruptError`
  without a file name; one whose `meta` says it was saved with a manifest has lost it: corrupt.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Literal, NamedTuple

__all__ = ["MANIFEST_NAME", "Verdict", "build_manifest", "write_manifest", "verify_step", "set_aside"]

MANIFEST_NAME = "rlhf_jax_manifest.json"
_FORMAT = 1
_ALGORITHM = "sha256"


class Verdict(NamedTuple):
    """The state of one step directory.

    Attributes:
      status: "intact" (every listed file has its size and checksum), "unverified" (no manifest:
        a checkpoint written before manifests existed), or "corrupt".
      problem: for "corrupt", the bad file relative to the step directory and what is wrong with
        it, e.g. `params/d/05a4...: 120 bytes, the manifest says 247`; None otherwise.
    """

    status: Literal["intact", "unverified", "corrupt"]
    problem: str | None = None


def _item_files(step_dir: str) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of every file below the step's subdirectories."""
    out = []
    for top in sorted(os.listdir(step_dir)):
        if not os.path.isdir(os.path.join(step_dir, top)):
            continue
        for root, dirs, files in os.walk(os.path.join(step_dir, top)):
            dirs.sort()
            for name in files:
                out.append(os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/"))
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, _ALGORITHM).hexdigest()


def _checksums(step_dir: str, names: list[str]) -> dict[str, str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL
        digests = pool.map(_sha256, [os.path.join(step_dir, n) for n in names])
        return dict(zip(names, digests))


def build_manifest(step_dir: str | os.PathLike) -> dict:
    """The manifest of the files now in `step_dir` (sizes and SHA-256 of every item file)."""
    step_dir = os.fspath(step_dir)
    names = _item_files(step_dir)
    digests = _checksums(step_dir, names)
    files = {n: {"size": os.path.getsize(os.path.join(step_dir, n)), _ALGORITHM: digests[n]} for n in names}
    return {"format": _FORMAT, "algorithm": _ALGORITHM, "files": files}


def write_manifest(step_dir: str | os.PathLike) -> str:
    """Write `step_dir/MANIFEST_NAME` atomically (temporary file, fsync, rename); return its path."""
    step_dir = os.fspath(step_dir)
    manifest = build_manifest(step_dir)
    path = os.path.join(step_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def verify_step(step_dir: str | os.PathLike) -> Verdict:
    """Check the files of `step_dir` against its manifest (sizes first, then checksums).

    Returns:
      A `Verdict`: "intact", "unverified" (no manifest), or "corrupt" with the first bad file.
    """
    step_dir = os.fspath(step_dir)
    path = os.path.join(step_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return Verdict("unverified")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or manifest.get("algorithm") != _ALGORITHM:
            raise ValueError(f"format {manifest.get('format')!r} / {manifest.get('algorithm')!r}")
        expected = {str(n): (int(e["size"]), str(e[_ALGORITHM])) for n, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Verdict("corrupt", f"{MANIFEST_NAME}: unreadable ({type(err).__name__}: {err})")
    for name, (size, _) in sorted(expected.items()):
        file = os.path.join(step_dir, name)
        if not os.path.isfile(file):
            return Verdict("corrupt", f"{name}: missing ({size} bytes in the manifest)")
        actual = os.path.getsize(file)
        if actual != size:
            return Verdict("corrupt", f"{name}: {actual} bytes, the manifest says {size}")
    try:
        digests = _checksums(step_dir, sorted(expected))
    except OSError as err:
        return Verdict("corrupt", f"{getattr(err, 'filename', None) or '?'}: unreadable ({err.strerror or err})")
    for name, (_, digest) in sorted(expected.items()):
        if digests[name] != digest:
            return Verdict("corrupt", f"{name}: checksum differs from the manifest (the file's bytes changed)")
    return Verdict("intact")


def set_aside(step_dir: str | os.PathLike) -> str:
    """Rename a corrupt step directory to `<step_dir>.corrupt` (`.corrupt1`, ... when taken); the new path.

    Orbax lists numbered directories only, so the step disappears from the run while its files stay.
    """
    step_dir = os.fspath(step_dir)
    dst, n = step_dir + ".corrupt", 1
    while os.path.exists(dst):
        dst, n = f"{step_dir}.corrupt{n}", n + 1
    os.rename(step_dir, dst)
    return dst
