#!/usr/bin/env bash
# Runs the test suite, Triton kernels in the interpreter, under the older of the two version pairs
# the package is tested with (torch 2.11 + Triton 3.6; the other is torch 2.14 + Triton 3.8) in a
# venv of its own, so that an API the older pair lacks shows up on a CPU; then the offline compile
# check of the Triton kernels with that Triton (its registers and spills differ from newer Triton's).
# Not part of CI: the venv costs a ~3 GB download. numpy < 2.3, because Triton 3.6's interpreter
# converts 1-element arrays with int(), which newer numpy refuses. Extra arguments go to pytest;
# TK_COMPILE_CHECK_ARGS to the compile check (e.g. "--arch 90 --kernel ffn.").
#
#   bash scripts/check_gpu_image_versions.sh [-x] [-k pattern]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TK_COMPAT_VENV:-/tmp/tk-venv-torch2.11}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.3" setuptools wheel
  # The package's dependencies from pyproject.toml (the pins above hold); PYTHONPATH below imports
  # the working tree, so the package itself (installed without the extension) is never imported.
  TK_BUILD_CUDA=0 "$VENV/bin/pip" install -q --no-build-isolation ".[test]" "torch==2.11.0" "triton==3.6.0" "numpy<2.3"
fi
# The extension built here is for this machine's torch: it does not load there, and its tests skip.
TRITON_INTERPRET=1 PYTHONPATH=$PWD "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider \
  --ignore=tests/test_cmake_build.py -W ignore::DeprecationWarning "$@"
# shellcheck disable=SC2086  # the extra arguments are meant to split
env -u TRITON_INTERPRET PYTHONPATH=$PWD "$VENV/bin/python" -m transformer_kernels compile-check \
  --jobs "${TK_COMPILE_JOBS:-$(nproc)}" ${TK_COMPILE_CHECK_ARGS:-}
