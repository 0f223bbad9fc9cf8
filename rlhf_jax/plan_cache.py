"""A file of compiled-program figures keyed by the program itself: plans re-checked without recompiling.

Compiling a real-size run for a TPU slice takes minutes on a small host (XLA:TPU's code generation
dominates), too long for every test run. A compilation is a pure function of the lowered module
(StableHLO text), the compile options, the compiler (jax, jaxlib, libtpu versions) and the target;
JAX's own persistent cache keys executables the same way. `PlanCache` stores, under the SHA-256 of
exactly those, what `rlhf_jax.compile.compile_program` reads from a compiled program (its memory
analysis, FLOPs, collectives, largest buffers, output shardings). Inside `use_plan_cache(path)` a
program whose key is in the file is lowered (seconds) but not compiled; any change to the model,
config, code, shardings, options or library versions changes the key, and the program compiles for
real (and, with `write=True`, is stored).

    with use_plan_cache("tests/data/tpu_plans.json", write=True):   # refresh the file
        plan = plan_run(config, target=resolve_target("v5e:2x4"))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
from typing import Any

__all__ = ["PlanCache", "use_plan_cache", "active_cache", "program_key"]

_ACTIVE: contextvars.ContextVar[PlanCache | None] = contextvars.ContextVar("rlhf_jax_plan_cache", default=None)


def _versions() -> str:
    out = []
    for dist in ("jax", "jaxlib", "libtpu"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return ",".join(out)


_MODULE_NAME = re.compile(r"^module @[\w.$-]+", re.MULTILINE)


def program_key(module_text: str, *, target: str, compiler_options: dict[str, Any] | None = None) -> str:
    """SHA-256 of what a compilation depends on: the lowered module, options, compiler versions, target.

    The module's own name (`module @jit_<function name>`) is left out: it names the program, it does
    not change what compiles, and a sampler's programs carry a per-process instance number in it.
    """
    module_text = _MODULE_NAME.sub("module @program", module_text, count=1)
    h = hashlib.sha256()
    for part in (module_text, json.dumps(compiler_options or {}, sort_keys=True, default=str), _versions(), target):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclasses.dataclass
class PlanCache:
    """Figures of compiled programs by `program_key`, in a JSON file; `hits` / `misses` counted."""

    path: str
    write: bool = False
    entries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    target: str = ""
    refresh: bool = False

    @property
    def same_compiler(self) -> bool:
        """The file was written by this jax / jaxlib / libtpu (so every unchanged program should hit)."""
        return self.entries.get("_compiler") == _versions()

    @classmethod
    def load(cls, path: str, *, write: bool = False, refresh: bool = False) -> PlanCache:
        entries = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                try:
                    entries = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"plan cache {path!r} is not valid JSON ({e}); restore it or delete it to "
                                     "record the plans again") from e
            if not isinstance(entries, dict):
                raise ValueError(f"plan cache {path!r} must hold a JSON object of program figures by key, got "
                                 f"{type(entries).__name__}")
        return cls(path, write=write or refresh, entries=entries, refresh=refresh)

    def get(self, key: str) -> dict[str, Any] | None:
        entry = None if self.refresh else self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.write:
            self.entries[key] = entry

    def save(self) -> None:
        if not self.write:
            return
        self.entries["_compiler"] = _versions()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.entries, f, indent=0, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.path)


@contextlib.contextmanager
def use_plan_cache(path: str, *, write: bool = False, refresh: bool = False):
    """Within the block, `compile_program` answers from (and with `write`, adds to) the file at `path`.

    `refresh=True` compiles every program for real and stores its figures (replacing a stored entry).
    """
    cache = PlanCache.load(path, write=write, refresh=refresh)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
        cache.save()


def active_cache() -> PlanCache | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def cache_target(label: str):
    """Programs compiled within are keyed with `label` (the target: v5e:2x4, cpu x8, ...)."""
    cache = _ACTIVE.get()
    if cache is None:
        yield
        return
    before, cache.target = cache.target, label
    try:
        yield
    finally:
        cache.target = before
