"""`rlhf_jax.host_memory`: the allocator decision at import, and its effect on page faults.

Each case runs in a fresh interpreter, because the settings only act before JAX starts its CPU client.
"""

import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
KEEP = "keep freed memory (glibc: 1 arena, no mmap chunks, no trim)"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_HOST_MEMORY"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=False)


def _status(prelude: str = "", **env) -> str:
    out = _run(prelude + "import rlhf_jax\nprint(rlhf_jax.host_memory.status())", **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc malloc options")
def test_import_keeps_freed_memory_on_a_cpu_only_jax():
    assert _status(JAX_PLATFORMS="cpu") == KEEP
    assert _status(JAX_PLATFORMS="cpu", RLHF_JAX_HOST_MEMORY="keep") == KEEP


def test_other_platforms_an_opt_out_and_a_running_backend_leave_the_allocator_alone():
    assert _status(JAX_PLATFORMS="cpu", RLHF_JAX_HOST_MEMORY="system") == "system allocator (RLHF_JAX_HOST_MEMORY=system)"
    assert _status(JAX_PLATFORMS="cuda,cpu") == "system allocator (an accelerator platform is available)"
    started = "import jax\njax.numpy.ones(2).block_until_ready()\n"
    assert _status(started, JAX_PLATFORMS="cpu") == (
        "system allocator (a JAX backend was already running when rlhf_jax was imported)")


def test_a_bad_setting_names_the_variable():
    out = _run("import rlhf_jax", JAX_PLATFORMS="cpu", RLHF_JAX_HOST_MEMORY="sometimes")
    assert out.returncode != 0
    assert "RLHF_JAX_HOST_MEMORY must be 'auto', 'keep' or 'system', got 'sometimes'" in out.stderr


_FAULTS = """
import resource
import rlhf_jax
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))   # a 64 MiB temporary per call
x = jnp.ones((4096, 64), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc malloc options")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    """Minor page faults per call of a program with a large temporary (here ~4,200 against ~2)."""
    faults = {}
    for mode in ("keep", "system"):
        out = _run(_FAULTS, JAX_PLATFORMS="cpu", RLHF_JAX_HOST_MEMORY=mode)
        assert out.returncode == 0, out.stderr
        faults[mode] = float(out.stdout.strip().splitlines()[-1])
    if faults["system"] < 500:
        pytest.skip(f"this kernel barely faults freed pages back in ({faults}): nothing to compare")
    assert faults["keep"] < faults["system"] / 5, faults
