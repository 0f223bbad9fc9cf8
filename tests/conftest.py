"""Test setup: JAX on CPU with 8 simulated devices, configured before jax is imported."""

import gc
import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Two-thirds of the suite's time is XLA:CPU compiling small programs, much of it in LLVM's
# optimisation passes. At LLVM's optimisation level 0 the whole suite compiled in 953 s instead of
# at least 1,557 s (two workers, summed) and ran in 13 min 36 s instead of 19-20 min, in the same
# slow phase of the host. XLA's own HLO passes (fusion, layout, sharding) are unchanged; only the
# machine code of each kernel is less optimised, which the tiny test models do not notice.
# Benchmarks and real runs keep the default level; an XLA_FLAGS that sets the level itself wins.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
# XLA:CPU's fusion emitters (fusions lowered through MLIR) took over half of each compile's time at
# that level: with its elemental IR emitter instead, test_rl_steps + test_models compiled in 16 s
# instead of 41 s (503 programs) and ran in 33 s instead of 58. Same HLO passes and fusions; only
# how each fused kernel is emitted changes. Benchmarks and real runs keep XLA's default.
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# The suite compiles hundreds of short programs; there, keeping freed host memory (rlhf_jax.host_memory,
# made for long training loops) cost ~8% wall time and 2.7x the kernel time (test_sampling + test_steps_sft,
# twice each). test_host_memory.py checks that mode in its own interpreters.
os.environ.setdefault("RLHF_JAX_HOST_MEMORY", "system")
# One on-disk compilation cache (JAX's persistent cache) for the session, inherited by both xdist
# workers and every process a test starts (CLI runs, multi-process launches, notebook kernels): a
# program that several tests build, or a relaunch rebuilds, is compiled once. The controller makes
# it before the workers start and removes it at the end; an environment that names one keeps it.
_CACHE_MADE_HERE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_MADE_HERE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_finish(session):
    """Python's cyclic garbage collector, made to scan less in the long-lived test workers.

    A worker accumulates ~2.5 million objects (modules, collected tests, JAX's trace and compile
    caches); at CPython's default thresholds each full collection walked all of them, 29 and 41 full
    collections per worker taking 14 and 38 s of a 14-minute suite (gc.callbacks, measured). The
    objects that exist once collection is done are frozen out of every later collection, and a
    collection runs after 20,000 net allocations instead of 700. Cycles are still collected; reference
    counting frees everything else as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def pytest_collection_modifyitems(config, items):
    """Modules with a `slow` (end-to-end) test first, each module's tests kept together and in order.

    pytest-xdist's load scheduling hands tests out in this order, so the long runs start early and
    the short tests fill both workers' tails instead of one worker finishing a long run alone.
    """
    slow_modules = {item.module.__name__ for item in items
                    if item.get_closest_marker("slow") is not None and getattr(item, "module", None) is not None}
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", None) not in slow_modules)


def pytest_unconfigure(config):
    """The session's compilation cache goes with the process that made it."""
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)
