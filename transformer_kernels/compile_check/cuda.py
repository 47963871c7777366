"""The CUDA extension's kernels through ``nvcc -Xptxas -v``, for the same table and verdicts.

Each ``csrc/cuda/*.cu`` is compiled as the extension build compiles it (the flags and include
directories of ``setup.py`` and torch's ``BuildExtension``), once per arch, with ptxas's ``-v``
report; ``-keep`` leaves the PTX, whose ``.maxntid`` gives the threads a ``__launch_bounds__``
allows. Every template instantiation is a row: none is autotuned, any of them may run, so none may
spill. What the host code picks at launch (the block shape below the bound, dynamic shared memory)
is not visible here: shared memory is the static part.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import core

ROOT = Path(__file__).resolve().parents[2]

# Today's CUDA offenders (same rules as problems.KNOWN_OFFENDERS): none. The LayerNorm kernels'
# 1024-thread CTAs, capped at 64 registers a thread, spilled their row slices (up to 72 B on sm_90);
# the slices now take at most 512 threads (see the NV lists in dropout_add_layer_norm_kernel.cu).
KNOWN_OFFENDERS: list[core.KnownOffender] = []


def cuda_home() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else "/usr/local/cuda"
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        raise SystemExit(f"compile-check --cuda: no nvcc in {home}; set CUDA_HOME to a CUDA toolkit")
    return home


def _nvidia_wheel_includes() -> list[str]:
    """The nvidia-* wheels' headers, as setup.py adds them (-isystem, after the toolkit's)."""
    import torch

    root = os.path.dirname(os.path.dirname(torch.__file__))
    found = []
    for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
        include = os.path.realpath(include)
        if include not in found:
            found.append(include)
    return found


def nvcc_command(source: str, arch: int, out_dir: str) -> list[str]:
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = [f"-I{p}" for p in [str(ROOT / "csrc"), *include_paths("cuda"), sysconfig.get_paths()["include"]]]
    includes += [f"-I{cuda_home()}/include"]
    for p in _nvidia_wheel_includes():
        includes += ["-isystem", p]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [
        os.path.join(cuda_home(), "bin", "nvcc"),
        "-cubin",  # the device code only: the host side's compile (torch's headers) adds nothing here
        source,
        "-o",
        os.path.join(out_dir, Path(source).stem + ".cubin"),
        *includes,
        *COMMON_NVCC_FLAGS,
        "-O3",
        "-std=c++20",
        "-lineinfo",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        abi,
        "--compiler-options",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-keep",
        f"-keep-dir={out_dir}",
    ]


_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?")
_PTX_ENTRY = re.compile(r"\.entry\s+(\S+?)\s*\(")


def ptx_max_threads(ptx: str) -> dict[str, int]:
    threads, entry = {}, None
    for line in ptx.splitlines():
        if m := _PTX_ENTRY.search(line):
            entry = m.group(1)
        elif (m := _MAXNTID.search(line)) and entry:
            threads[entry] = int(m.group(1)) * int(m.group(2) or 1) * int(m.group(3) or 1)
    return threads


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def split_name(pretty: str) -> tuple[str, str]:
    """``void tk::(anonymous namespace)::k<__half, 8>(tk::P)`` -> ``("k", "<__half, 8>")``."""
    name = pretty.removeprefix("void ").replace("(anonymous namespace)::", "")
    params = name.rfind("(")
    name = name[:params] if params > 0 else name
    base, _, template = name.partition("<")
    return base.split("::")[-1], ("<" + template) if template else ""


def compile_source(source: str, arch: int) -> list[dict]:
    """One row per kernel of ``source`` for ``arch`` (or one error row)."""
    name = Path(source).name
    with tempfile.TemporaryDirectory(prefix="tk-compile-check-cuda-") as out_dir:
        proc = subprocess.run(nvcc_command(source, arch, out_dir), capture_output=True, text=True)
        if proc.returncode != 0:
            return [{"kernel": name, "config": "", "arch": arch, "problems": [name], "error": proc.stderr[-4000:]}]
        threads = {}
        for ptx in glob.glob(os.path.join(out_dir, "*.ptx")):
            threads.update(ptx_max_threads(Path(ptx).read_text()))
    figures = core.parse_ptxas(proc.stderr)
    names = demangle(sorted(figures))
    rows = []
    for mangled, f in sorted(figures.items()):
        kernel, config = split_name(names[mangled])
        rows.append(
            {
                "kernel": kernel,
                "config": config,
                "arch": arch,
                "problems": [name],
                "mangled": mangled,
                "shared": f.static_smem,
                "threads": threads.get(mangled, 1024),
                "registers": f.registers,
                "spill_stores": f.spill_stores,
                "spill_loads": f.spill_loads,
                "stack": f.stack,
                "default": True,  # nothing tunes these: every instantiation may run
            }
        )
    return rows


def run_check(archs, kernel: str | None = None, workers: int = 1) -> dict:
    from . import SPILL_BUDGET, matches_kernel, versions

    sources = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    if not sources:
        raise SystemExit(f"compile-check --cuda: no csrc/cuda/*.cu under {ROOT}: it needs the source tree")
    sources = [s for s in sources if "__global__" in Path(s).read_text()]  # host-only files have no kernels
    start = time.monotonic()
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = list(pool.map(lambda sa: compile_source(*sa), [(s, a) for s in sources for a in archs]))
    rows = [row for result in results for row in result]
    if kernel:
        rows = [r for r in rows if matches_kernel(r["kernel"], kernel)]
    version = "nvcc"
    for row in rows:
        if "error" not in row:
            row["blocks_per_sm"] = core.blocks_per_sm(
                core.ARCHS[row["arch"]], row["threads"], row["registers"], row["shared"]
            )
        row["verdict"], row["reason"] = core.judge(row, SPILL_BUDGET, KNOWN_OFFENDERS, version)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["config"]))
    nvcc = subprocess.run([os.path.join(cuda_home(), "bin", "nvcc"), "--version"], capture_output=True, text=True)
    return {
        "versions": {**versions(), "nvcc": nvcc.stdout.strip().splitlines()[-1] if nvcc.stdout else "?"},
        "archs": list(archs),
        "spill_budget": 0,
        "compiles": len(rows),
        "compile_seconds": round(time.monotonic() - start, 1),
        "rows": rows,
        "unreached": [],
        "stale_known_offenders": [],
        "failed": any(r["verdict"] == "FAIL" for r in rows),
    }
