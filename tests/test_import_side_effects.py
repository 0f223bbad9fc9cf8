"""Importing rlhf_jax changes nothing process-wide; library code does not import `rlhf_jax.testing`.

Checked in a fresh interpreter, before and after `import rlhf_jax, rlhf_jax.models, rlhf_jax.train,
rlhf_jax.sampling, rlhf_jax.checkpoint`:
- glibc malloc: whether a 64 MiB `malloc` is served by `mmap` (`mallinfo2().hblks` grows by one),
  which `host_memory.keep_freed_memory` turns off (`M_MMAP_MAX=0`), and `host_memory.status()`;
- absl: `absl.logging.get_verbosity()` and the level of the `absl` logger;
- JAX: the lengths of `jax._src.monitoring`'s four listener lists, and that no backend started.
The control case calls `host_memory.configure_from_env()` and sees the malloc probe change, so the
probe can see the setting.
"""

import ast
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MODULES = ("rlhf_jax", "rlhf_jax.models", "rlhf_jax.train", "rlhf_jax.sampling", "rlhf_jax.checkpoint")

_PROBE = """
import ctypes, importlib, json, logging, platform, sys
import absl.logging
import jax._src.monitoring as monitoring
from jax._src import xla_bridge

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
if GLIBC:
    libc = ctypes.CDLL("libc.so.6")
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

def big_malloc_is_mmapped():
    if not GLIBC:
        return None
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblks - before
    libc.free(block)
    return mmapped == 1

def state():
    return {
        "big_malloc_is_mmapped": big_malloc_is_mmapped(),
        "absl_verbosity": absl.logging.get_verbosity(),
        "absl_logger_level": logging.getLogger("absl").level,
        "jax_listeners": [len(getattr(monitoring, name)) for name in (
            "_event_listeners", "_event_duration_secs_listeners", "_event_time_span_listeners",
            "_scalar_listeners")],
        "jax_backend_started": xla_bridge.backends_are_initialized(),
    }

before = state()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
after = state()
if sys.argv[2] == "configure":
    from rlhf_jax import host_memory
    host_memory.configure_from_env()
    configured = state()
else:
    configured = None
print(json.dumps({"before": before, "after": after, "configured": configured,
                  "host_memory": sys.modules["rlhf_jax.host_memory"].status()
                  if "rlhf_jax.host_memory" in sys.modules else None}))
"""


def _probe(modules, then: str = "nothing", **env) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_HOST_MEMORY"}
    full_env.update(JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(modules), then], capture_output=True, text=True,
                         env=full_env, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_changes_nothing_process_wide():
    # `keep` would switch malloc whatever the platform, had the import done it.
    result = _probe(MODULES, RLHF_JAX_HOST_MEMORY="keep")
    before, after = result["before"], result["after"]
    assert after == before
    assert after["jax_listeners"] == [0, 0, 0, 0]
    assert after["jax_backend_started"] is False
    assert result["host_memory"] in (None, "not configured")
    if GLIBC:
        assert after["big_malloc_is_mmapped"] is True


@pytest.mark.skipif(not GLIBC, reason="the probe reads glibc's mallinfo2")
def test_the_malloc_probe_sees_an_explicit_configure():
    result = _probe(("rlhf_jax",), "configure", RLHF_JAX_HOST_MEMORY="keep")
    assert result["after"]["big_malloc_is_mmapped"] is True
    assert result["configured"]["big_malloc_is_mmapped"] is False
    assert result["host_memory"] == "keep freed memory (glibc: 1 arena, no mmap chunks, no trim)"


def test_the_sampler_registers_its_compile_listener_when_first_built():
    code = (
        "import jax._src.monitoring as m\n"
        "from rlhf_jax.models import CausalLM\n"
        "from rlhf_jax.models.presets import get_config\n"
        "from rlhf_jax.sampling import Sampler\n"
        "n = len(m._event_duration_secs_listeners)\n"
        "Sampler(CausalLM(get_config('tiny')), max_len=16)\n"
        "Sampler(CausalLM(get_config('tiny')), max_len=16)\n"
        "print(n, len(m._event_duration_secs_listeners))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "1"]   # none at import, one for all samplers


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_library_code_does_not_import_the_testing_package():
    package = REPO / "rlhf_jax"
    sources = [p for p in package.rglob("*.py") if "testing" not in p.relative_to(package).parts]
    assert len(sources) > 40
    offenders = {}
    for path in sources:
        found = sorted(n for n in _imports(ast.parse(path.read_text(encoding="utf-8")))
                       if n == "rlhf_jax.testing" or n.startswith("rlhf_jax.testing."))
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert offenders == {}
    # The scan does see such an import.
    assert "rlhf_jax.testing" in _imports(ast.parse("from rlhf_jax.testing import tiny_config"))
    assert "rlhf_jax.testing.tokenizer" in _imports(ast.parse("def f():\n    import rlhf_jax.testing.tokenizer"))


# The CLI in a fresh interpreter where torch cannot be imported, as in a fresh `pip install rlhf_jax`.
_CLI_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from rlhf_jax.cli import main; sys.exit(main())"


@pytest.mark.slow
def test_a_normal_run_and_export_print_no_dependency_warnings(tmp_path):
    """transformers' "PyTorch was not found" and orbax's absl warnings on reading a checkpoint are ours to silence."""
    quiet = ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    env["JAX_PLATFORMS"] = "cpu"
    run_dir = tmp_path / "run"
    small = ["--set", f"workdir={run_dir}", "--set", "train.steps=2", "--set", "train.eval_every=0",
             "--set", "data.num_train=64", "--set", "data.num_eval=16", "--set", "data.batch_size=8",
             "--set", "train.eval_batches=1", "--set", "checkpoint.every=1", "--set", "logging.tensorboard=false"]
    outs = []
    for args in (["run", "experiments/sft_tiny.py", *small], ["export", str(run_dir), str(tmp_path / "hf")]):
        out = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_TORCH, *args], capture_output=True, text=True,
                             env=env, cwd=REPO, check=False, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out)
    stderr = "".join(o.stderr for o in outs)
    assert "2/2" in outs[0].stderr and "exported" in outs[1].stdout    # the commands did run
    assert "PyTorch was not found" not in stderr
    assert "absl" not in stderr and "WARNING" not in stderr and "Warning" not in stderr, stderr
    # Without the CLI's setup, the same process does print transformers' notice: the check can see it.
    bare = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import transformers"],
                          capture_output=True, text=True, env=env, check=False)
    assert "PyTorch was not found" in bare.stderr
