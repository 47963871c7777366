"""Small kernels for tests/test_compile_check.py: one that passes, one for each verdict that must fire.

Compiled for real (sm_90), so they run in a process without ``TRITON_INTERPRET`` (under it,
``triton.jit`` gives interpreted functions, with nothing to compile): ``main()`` prints the report of
the check over them, and two facts about the package's own problems, as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def dot_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C[BM, BN] = A[BM, K] @ B[K, BN]: a pipelined loop holds num_stages (A, B) tile pairs in shared
    # memory, num_stages · (BM + BN) · BK · 2 bytes for fp16.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + offs_m[:, None] * K + (k + offs_k)[None, :])
        b = tl.load(B + (k + offs_k)[:, None] * BLOCK_N + offs_n[None, :])
        acc += tl.dot(a, b)
    tl.store(C + offs_m[:, None] * BLOCK_N + offs_n[None, :], acc)


@triton.jit
def softmax_kernel(X, Y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Row softmax of one fp32 tile: the tile stays live across two reductions, BM · BN / threads
    # values per thread (256 with one warp and 64 x 128: more than 255 registers, so it spills).
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    x = tl.load(X + offs)
    e = tl.exp(x - tl.max(x, 1)[:, None])
    tl.store(Y + offs, e / tl.sum(e, 1)[:, None])


softmax_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=1),
    ],
    key=[],
)(softmax_kernel)


@triton.jit
def unreached_kernel(X):
    tl.store(X, 0.0)


def _t(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _softmax():
    # as the package's launchers do: autotuned, or the first config with TK_AUTOTUNE=0
    x, y = _t(64, 128, dtype=torch.float32), _t(64, 128, dtype=torch.float32)
    if os.environ.get("TK_AUTOTUNE", "1") != "0":
        softmax_tuned[(1,)](x, y)
    else:
        softmax_kernel[(1,)](x, y, BLOCK_M=64, BLOCK_N=128, num_warps=8)


def _oversized():
    # 4 stages of (64 + 64) x 256 fp16 tiles, 262,144 B: over the opt-in maximum of both archs
    a, b, c = _t(64, 4096), _t(4096, 64), _t(64, 64, dtype=torch.float32)
    dot_kernel[(1,)](a, b, c, 4096, BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4)


def problems():
    from transformer_kernels.compile_check.core import Problem

    return [
        Problem("copy", lambda: copy_kernel[(1,)](_t(1000), _t(1000), 1000, BLOCK=1024)),
        Problem("oversized", _oversized),
        Problem("spilling", _softmax),
    ]


def main() -> None:
    from transformer_kernels import compile_check
    from transformer_kernels.compile_check import core
    from transformer_kernels.compile_check import problems as package

    report = compile_check.run_check(problems(), [sys.modules[__name__]], archs=[90])
    # The package's problems reach every @triton.jit function of the package (capture only).
    reached = set()
    for launch in core.capture(package.problems()):
        reached |= {core.kernel_name(launch.fn), *core.callees(launch.fn)}
    # One GEMM tile compiled as the runtime specialises it, and as the bare signature compiles.
    gemm = next(
        x
        for x in core.capture([p for p in package.problems() if p.name.startswith("fused_linear fp16 relu")])
        if x.fn.fn.__name__ == "_gemm_kernel"
        and core.config_label(x) == "BLOCK_K=32 BLOCK_M=64 BLOCK_N=64 GROUP_M=8 w4 s4"
    )
    job = core.specialise(gemm, 90)
    bare = core.Job(job.module, job.qualname, job.arch, job.signature, job.constexprs, (), job.options)
    print(
        json.dumps(
            {
                "report": report,
                "package_kernels": sorted(core.jit_functions(package.modules())),
                "reached": sorted(reached),
                "gemm_shared": core.compile_job(job).get("shared"),
                "gemm_shared_bare": core.compile_job(bare).get("shared"),
            },
            default=str,
        )
    )
