#!/usr/bin/env bash
# Configures and builds libtk_C.so with CMake into build/cmake (the ops without the Python
# package): load it with torch.ops.load_library("build/cmake/libtk_C.so").
#
#   TK_CMAKE_BUILD_DIR    where to build (default: build/cmake)
#   TORCH_CUDA_ARCH_LIST  target GPUs (default "8.0;9.0")
#   CUDA_HOME             CUDA toolkit (default: /usr/local/cuda, else the one holding nvcc)
#   MAX_JOBS              parallel compile jobs (default: all cores)
#   PYTHON                the Python whose torch to build against (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
BUILD_DIR="${TK_CMAKE_BUILD_DIR:-build/cmake}"

if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cmake_build.sh: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi

# Paths from the torch install: its CMake package, and the nvidia-* wheels next to it (headers
# such as cusparse.h that a bare toolkit may lack, and libnvrtc that torch's CMake package wants).
read -r TORCH_CMAKE_PREFIX NVIDIA_INCLUDES NVRTC_LIB < <("$PYTHON" - <<'PY'
import glob, os, torch, torch.utils
site = os.path.dirname(os.path.dirname(torch.__file__))
major = (torch.version.cuda or "0").split(".")[0]
names = [f"cu{major}", "cuda_runtime", "cublas", "cusparse", "cusolver", "curand", "cufft",
         "cuda_nvrtc", "nvtx"]
includes = [d for n in names for d in glob.glob(os.path.join(site, "nvidia", n, "include"))]
nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
print(torch.utils.cmake_prefix_path, ";".join(includes) or "-", nvrtc[0] if nvrtc else "-")
PY
)

CMAKE_ARGS=(
  -S . -B "$BUILD_DIR"
  -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_PREFIX_PATH="$TORCH_CMAKE_PREFIX"
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc"
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
  -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"
)
[[ "$NVIDIA_INCLUDES" != "-" ]] && CMAKE_ARGS+=(-DTK_EXTRA_CUDA_INCLUDE_DIRS="$NVIDIA_INCLUDES")
[[ "$NVRTC_LIB" != "-" ]] && CMAKE_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC_LIB")
command -v ninja > /dev/null && CMAKE_ARGS+=(-G Ninja)

cmake "${CMAKE_ARGS[@]}"
cmake --build "$BUILD_DIR" --parallel "${MAX_JOBS:-$(nproc)}"
echo "built $(cd "$BUILD_DIR" && pwd)/libtk_C.so"
