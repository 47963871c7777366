"""Builds the CUDA extension transformer_kernels._C next to the pure-Python package.

Package metadata lives in pyproject.toml; this file only adds the extension. The extension is
built when a CUDA toolkit (nvcc) and a CUDA build of torch are both present; without them the
package installs alone (the 'cuda' backend then reports itself unavailable).

    TK_BUILD_CUDA=1   build the extension or fail
    TK_BUILD_CUDA=0   never build it
    (unset)           build it when possible
    MAX_JOBS=N        parallel compile jobs (read by torch's BuildExtension)
    TORCH_CUDA_ARCH_LIST="8.0;9.0"   target GPUs; defaults to that list when no GPU is visible

Install with `pip install --no-build-isolation [-e] .` so the build sees the installed torch.

Where torch's CUDA pieces live (the nvidia-* wheels' headers, cuBLASLt) is found here only:
scripts/cmake_build.sh imports this file (`import setup`, which builds nothing) and passes
:func:`cmake_cache_args` to CMake.
"""

import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def log(message: str) -> None:
    # pip runs this file once for metadata and once for the build; say things once, at the build.
    if not {"egg_info", "dist_info"} & set(sys.argv):
        print(f"transformer-kernels: {message}", file=sys.stderr, flush=True)


def is_cuda_toolkit(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, *parts)) for parts in (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def locate_cuda_home() -> None:
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc on PATH is a wrapper
    script outside the toolkit; prefer a real toolkit when CUDA_HOME is unset."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if is_cuda_toolkit(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


def cuda_unavailable_reason() -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    locate_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:
        return f"torch is not importable in the build environment ({e}); use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not is_cuda_toolkit(CUDA_HOME):
        return f"CUDA_HOME={CUDA_HOME} is not a CUDA toolkit (no bin/nvcc, include/cuda_runtime.h)"
    return None


def want_cuda_extension() -> bool:
    mode = os.environ.get("TK_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"transformer-kernels: TK_BUILD_CUDA must be 0, 1 or unset (got {mode!r})")
    if mode == "0":
        log("TK_BUILD_CUDA=0: installing without the CUDA extension transformer_kernels._C")
        return False
    reason = cuda_unavailable_reason()
    if reason is None:
        return True
    if mode == "1":
        sys.exit(f"transformer-kernels: TK_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    log(f"installing without the CUDA extension transformer_kernels._C: {reason}")
    return False


def resolve_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST the build uses; sets the default when no GPU can be asked."""
    import torch

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list:
        return arch_list
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {DEFAULT_ARCH_LIST}")
        return DEFAULT_ARCH_LIST
    # torch picks the visible GPUs' architectures itself; recorded here for _C.CUDA_ARCHS.
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def nvidia_wheel_include_dirs(cuda_major: str) -> list[str]:
    """Headers of the nvidia-* wheels torch depends on (cusparse.h, cublas_v2.h, ...), which a
    bare CUDA toolkit may lack: cu13 wheels share nvidia/cu13/include, cu12 wheels have one
    nvidia/<library>/include each."""
    import torch

    roots = [os.path.dirname(os.path.dirname(torch.__file__))]  # the site-packages holding torch
    roots += getattr(site, "getsitepackages", list)() + [sysconfig.get_path("purelib")]
    names = [
        f"cu{cuda_major}",
        "cuda_runtime",
        "cublas",
        "cusparse",
        "cusolver",
        "curand",
        "cufft",
        "cuda_nvrtc",
        "nvtx",
    ]
    found = []
    for root in roots:
        for name in names:
            for include in glob.glob(os.path.join(root, "nvidia", name, "include")):
                include = os.path.realpath(include)
                if os.path.isdir(include) and include not in found:
                    found.append(include)
    return found


def cublaslt_library(cuda_home: str, cuda_major: str) -> str | None:
    """The cuBLASLt to link (used by fused_linear): the toolkit's libcublasLt.so, else the nvidia
    wheel's libcublasLt.so.<major> that torch itself loads (a toolkit without the math libraries).
    None, found neither: the symbols still resolve through libtorch_cuda.so, which depends on it."""
    for lib in ("lib64", "lib"):
        path = os.path.join(cuda_home, lib, "libcublasLt.so")
        if os.path.isfile(path):
            return path
    name = f"libcublasLt.so.{cuda_major}"
    for include in nvidia_wheel_include_dirs(cuda_major):
        path = os.path.join(os.path.dirname(include), "lib", name)
        if os.path.isfile(path):
            return path
    return None


def cublaslt_link(cuda_home: str, cuda_major: str) -> dict:
    """The extension's link arguments for :func:`cublaslt_library`."""
    path = cublaslt_library(cuda_home, cuda_major)
    if path is None:
        log(f"no libcublasLt.so in {cuda_home}, no .so.{cuda_major} in the nvidia wheels: relying on torch's")
        return {}
    if os.path.dirname(path) in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")):
        return {"libraries": ["cublasLt"]}  # the toolkit's lib directory is on the link path
    return {"extra_link_args": [path]}


def cmake_cache_args(cuda_home: str) -> list[str]:
    """The -D arguments CMakeLists.txt takes from the torch install: its CMake package, the
    nvidia-* wheels' headers (searched after the toolkit's), the cuBLASLt to link, and the wheel's
    libnvrtc that torch's CMake package asks for when the toolkit has none."""
    import torch
    import torch.utils

    major = (torch.version.cuda or "0").split(".")[0]
    includes = nvidia_wheel_include_dirs(major)
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if includes:
        args.append("-DTK_EXTRA_CUDA_INCLUDE_DIRS=" + ";".join(includes))
    cublaslt = cublaslt_library(cuda_home, major)
    if cublaslt:
        args.append(f"-DTK_CUBLASLT_LIBRARY={cublaslt}")
    nvrtc = sorted(
        path
        for include in includes
        for path in glob.glob(os.path.join(os.path.dirname(include), "lib", "libnvrtc.so*"))
        if "builtins" not in path and ".alt." not in path
    )
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return args


def cuda_extension():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    arch_list = resolve_arch_list()
    # -isystem keeps the toolkit's own headers (passed with -I by torch) ahead of the wheels'.
    system_includes = []
    for include in nvidia_wheel_include_dirs(torch.version.cuda.split(".")[0]):
        system_includes += ["-isystem", include]
    # Shell-safe spelling ("8.0,9.0+PTX") of the list, exposed as transformer_kernels._C.CUDA_ARCHS.
    archs = [a for a in arch_list.replace(" ", ";").split(";") if a]
    archs_define = "-DTK_CUDA_ARCHS=" + ",".join(archs)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        name="transformer_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", archs_define] + system_includes,
            # No --use_fast_math: expf / rsqrtf / divisions keep their IEEE-faithful forms.
            "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + system_includes,
        },
        **cublaslt_link(CUDA_HOME, torch.version.cuda.split(".")[0]),
    )


def build_options() -> dict:
    if not want_cuda_extension():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": [cuda_extension()], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__; cmake_build.sh imports it
    setup(**build_options())
