#!/usr/bin/env bash
# Runs on each TPU worker (tpu/setup.sh starts it there): installs the checkout around it into
# .venv, a Python >= 3.11 virtual environment, with the [tpu] extra.
# Which Python: the image's python3 when it is >= 3.11, else a standalone CPython $PYTHON_VERSION
# (default 3.12) that uv downloads into its own directory. The TPU VM images (v2-alpha-tpuv5-lite,
# v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base) are Ubuntu 22.04 with Python 3.10, which
# rlhf_jax does not support; uv needs neither apt (no deadsnakes PPA, no apt lock held by the
# image's unattended upgrades at boot) nor root, and leaves the system Python alone. uv itself comes
# from the image's pip (`pip install --user uv`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv > /dev/null; then
  python3 -m pip install --user --quiet uv \
    || python3 -m pip install --user --quiet --break-system-packages uv   # PEP 668 images
fi
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  python=$(command -v python3)
else
  python=${PYTHON_VERSION:-3.12}
fi
[ -x .venv/bin/python3 ] || uv venv --python "$python" .venv
uv pip install --python .venv/bin/python3 -e '.[tpu]'
.venv/bin/python3 -c 'import sys, jax, rlhf_jax; print(f"{sys.version.split()[0]}, jax {jax.__version__}: ready")'
