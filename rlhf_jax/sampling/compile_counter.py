"""Counts XLA compilations per jitted function name (what `Sampler.num_compiled` reads).

Fed by JAX's compile events through `jax.monitoring`; the listener is registered by the first
`Sampler` (`_count_compiles`), never at import.
"""

from __future__ import annotations

import collections
import itertools
import threading

import jax

# XLA compilations per jitted function name, counted from JAX's compile events (a program served
# again from the dispatch cache is not counted; a recompilation is). The listener is registered
# when the first `Sampler` is built, never at import.
_COMPILES: collections.Counter = collections.Counter()
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_INSTANCES = itertools.count()
_LISTENING = threading.Lock()
_listener_registered = False


def _count_compile(event: str, duration: float, **kwargs) -> None:
    del duration
    if event == _COMPILE_EVENT and kwargs.get("fun_name"):
        _COMPILES[kwargs["fun_name"]] += 1


def _count_compiles() -> None:
    """Register the compile counter with `jax.monitoring` once per process (first `Sampler`)."""
    global _listener_registered
    with _LISTENING:
        if not _listener_registered:
            jax.monitoring.register_event_duration_secs_listener(_count_compile)
            _listener_registered = True
