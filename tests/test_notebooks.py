"""Every notebook in notebooks/ runs top to bottom in a fresh kernel, with the suite's JAX CPU setup.

Each notebook is executed by nbclient in an ipykernel started from this interpreter (so it imports
the package under test) with this process's environment (`tests/conftest.py`: JAX on CPU, 8
simulated devices, offline Hugging Face). A cell that raises fails the test with the cell and its
traceback; a notebook slower than `LIMIT_S` fails too. Each notebook's wall time is printed and
recorded as the test property `wall_s`.

The stored outputs are refreshed with the same runner:

    python tests/test_notebooks.py --write                     # every notebook
    python tests/test_notebooks.py --write 02_rl_step_by_hand  # one
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LIMIT_S = 120.0
KERNEL = "rlhf_jax_tests"


def _kernel_manager(spec_dir: Path):
    """A kernel manager for an ipykernel run by this interpreter (`sys.executable`)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel = spec_dir / KERNEL
    kernel.mkdir(parents=True, exist_ok=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlhf_jax (tests)", "language": "python",
    }))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))


def execute(path: Path, *, timeout: float = LIMIT_S):
    """Run the notebook at `path` top to bottom; return `(executed notebook, wall seconds)`.

    Raises:
      nbclient.exceptions.CellExecutionError: a cell raised (the message holds the cell and traceback).
      nbclient.exceptions.CellTimeoutError: a cell ran longer than `timeout` seconds.
    """
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    # The package under test even without an editable install; inline figures (PNG outputs).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_kernels_") as spec_dir:
        client = nbclient.NotebookClient(
            nb, km=_kernel_manager(Path(spec_dir)), timeout=int(timeout), record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        client.execute(env=env)
        return nb, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, record_property):
    _, wall = execute(path)
    record_property("wall_s", round(wall, 1))
    print(f"{path.name}: {wall:.1f} s")
    assert wall < LIMIT_S, f"{path.name} took {wall:.0f} s (limit {LIMIT_S:.0f} s)"


def test_notebooks_are_present():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_losses_as_math", "02_rl_step_by_hand", "03_sharding_strategies",
                     "04_hf_checkpoint_to_export"], names


def _write(names: list[str]) -> int:
    """Execute the notebooks (all, or those named) and store their outputs in place."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401, PLC0415 - the suite's JAX environment, before any kernel starts

    chosen = [p for p in NOTEBOOKS if not names or p.stem in names or p.name in names]
    for path in chosen:
        nb, wall = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {wall:.1f} s, outputs written")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"]:
        sys.exit("usage: python tests/test_notebooks.py --write [NOTEBOOK ...]")
    sys.exit(_write(sys.argv[2:]))
