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

# From the torch install (setup.py finds them, for both builds): its CMake package, the nvidia-*
# wheels' headers a bare toolkit may lack (cusparse.h, ...), the cuBLASLt to link and the libnvrtc
# that torch's CMake package wants. Importing setup.py builds nothing.
mapfile -t TORCH_ARGS < <(CUDA_HOME="$CUDA_HOME" "$PYTHON" -c \
  'import os, sys; sys.path.insert(0, "."); import setup; print(*setup.cmake_cache_args(os.environ["CUDA_HOME"]), sep="\n")')
[[ ${#TORCH_ARGS[@]} -gt 0 ]] || { echo "cmake_build.sh: could not ask setup.py for torch's paths" >&2; exit 1; }

CMAKE_ARGS=(
  -S . -B "$BUILD_DIR"
  -DCMAKE_BUILD_TYPE=Release
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc"
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
  -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"
  "${TORCH_ARGS[@]}"
)
command -v ninja > /dev/null && CMAKE_ARGS+=(-G Ninja)

cmake "${CMAKE_ARGS[@]}"
cmake --build "$BUILD_DIR" --parallel "${MAX_JOBS:-$(nproc)}"
echo "built $(cd "$BUILD_DIR" && pwd)/libtk_C.so"
