#!/usr/bin/env bash
# Set up (or refresh) the virtual environment and install the package into it, editable, with the
# CUDA extension built wherever a CUDA toolkit is found. Safe to run again: it only does what is missing.
#
#   TK_VENV         where the environment lives (default: .venv in the repo)
#   TK_TORCH        the torch requirement (default: torch==2.14.1, the CUDA 13 build)
#   TK_BUILD_CUDA   1 / 0 / unset: force, skip, or auto-detect the extension build (see setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TK_VENV:-.venv}
TORCH_REQ=${TK_TORCH:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  ${PYTHON:-python3} -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch, triton" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_REQ"
  python -m pip install -q "$TORCH_REQ"
fi
python -m pip install -q setuptools wheel ninja pybind11 numpy pytest matplotlib tensorboard tokenizers sacrebleu safetensors tqdm 'transformers>=5'

# The extension builds against the torch installed above: no build isolation.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "bootstrap: installing transformer-kernels (editable)"
python -m pip install -q --no-build-isolation --no-deps -e .
