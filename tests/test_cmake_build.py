"""CMakeLists.txt configures and builds csrc/ into libtk_C.so, which torch.ops.load_library loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_TOOLS = shutil.which("cmake") is not None and (
    Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists() or shutil.which("nvcc")
)


@pytest.mark.skipif(not HAVE_TOOLS, reason="needs cmake and a CUDA toolkit")
def test_cmake_build_loads_with_torch_ops(tmp_path):
    build = tmp_path / "cmake"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "cmake_build.sh")],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "TK_CMAKE_BUILD_DIR": str(build), "TORCH_CUDA_ARCH_LIST": "9.0"},
    )
    lib = build / "libtk_C.so"
    assert lib.exists()
    # A fresh interpreter: the package's own _C registers the same tk_C ops.
    code = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); "
        "print(torch.ops.tk_C.dropout_add_layer_norm_fwd.default._schema)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(lib)], check=True, capture_output=True, text=True).stdout
    assert out.startswith("tk_C::dropout_add_layer_norm_fwd(Tensor x, Tensor? residual")
