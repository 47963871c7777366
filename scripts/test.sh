#!/usr/bin/env bash
# The test suite: set everything up, then run every test. Without a GPU, Triton kernels run in
# Triton's CPU interpreter (TRITON_INTERPRET=1) and GPU-only tests are skipped. Where a CUDA
# toolkit is present the extension must have been built (TK_REQUIRE_EXTENSION=1), so a silently
# skipped build fails the run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. "${TK_VENV:-.venv}/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && [ "${TK_BUILD_CUDA:-}" != 0 ]; then
  export TK_REQUIRE_EXTENSION=${TK_REQUIRE_EXTENSION:-1}
fi
python -m pytest tests -q -rs "$@"
