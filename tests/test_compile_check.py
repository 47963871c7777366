"""The offline compile check (``python -m transformer_kernels compile-check``): each verdict fires on a
bad kernel, the figures it reads are the ones ptxas and the hardware give, and the package's problems
reach every kernel. The full sweep over the package runs in CI (``.ci/run``), not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transformer_kernels.compile_check import core

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def result():
    """The check over compile_check_kernels.py's kernels for sm_90, in a process without the
    interpreter (a handful of compiles, about half a minute)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", "import compile_check_kernels as k; k.main()"],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _rows(result, problem):
    return [r for r in result["report"]["rows"] if problem in r["problems"]]


def test_a_good_kernel_passes_with_its_figures(result):
    (row,) = _rows(result, "copy")
    assert row["verdict"] == "ok", row
    assert row["threads"] == 128 and 0 < row["registers"] <= 255
    assert row["spill_stores"] == row["spill_loads"] == 0
    assert row["blocks_per_sm"] == core.blocks_per_sm(core.ARCHS[90], 128, row["registers"], row["shared"]) > 0


def test_an_oversized_tile_fails(result):
    (row,) = _rows(result, "oversized")
    assert row["shared"] == 4 * (64 + 64) * 256 * 2  # num_stages copies of both pipelined tiles
    assert row["verdict"] == "FAIL" and "shared memory 262,144 B > 232,448 B" in row["reason"], row


def test_a_spilling_config_fails_and_the_other_passes(result):
    rows = {r["config"]: r for r in _rows(result, "spilling")}
    assert set(rows) == {"BLOCK_M=64 BLOCK_N=128 w1 s3", "BLOCK_M=64 BLOCK_N=128 w8 s3"}  # both kept
    spilling, fitting = rows["BLOCK_M=64 BLOCK_N=128 w1 s3"], rows["BLOCK_M=64 BLOCK_N=128 w8 s3"]
    assert spilling["spill_stores"] + spilling["spill_loads"] > 512
    assert spilling["verdict"] == "FAIL" and "spills" in spilling["reason"], spilling
    assert fitting["verdict"] == "ok" and fitting["default"], fitting  # TK_AUTOTUNE=0 launches it


def test_an_unreached_kernel_fails_the_run(result):
    report = result["report"]
    assert report["unreached"] == ["compile_check_kernels.unreached_kernel"]
    assert report["failed"]


def test_the_package_problems_reach_every_kernel(result):
    assert result["package_kernels"]
    assert set(result["package_kernels"]) <= set(result["reached"])


def test_a_launch_compiles_as_the_runtime_specialises_it(result):
    # fp16 64x64x32 tile, 4 stages: all four stages pipelined once the pointers are known aligned.
    assert result["gemm_shared"] == 4 * (64 + 64) * 32 * 2
    assert result["gemm_shared_bare"] < result["gemm_shared"]


# --- the pure parts, without compiling ------------------------------------------------------


PTXAS_LOG = """\
ptxas info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function '_kernel' for 'sm_80'
ptxas info    : Function properties for _kernel
    6912 bytes stack frame, 10592 bytes spill stores, 17864 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 6912 bytes cumulative stack size, 544 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelILi4EEvv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi4EEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas():
    figures = core.parse_ptxas(PTXAS_LOG)
    assert set(figures) == {"_kernel", "_Z6kernelILi4EEvv"}
    k = figures["_kernel"]
    assert (k.registers, k.spill_stores, k.spill_loads, k.stack) == (32, 10592, 17864, 6912)
    t = figures["_Z6kernelILi4EEvv"]
    assert (t.registers, t.spill_stores, t.static_smem) == (40, 0, 4096)


def test_launch_limits_and_occupancy():
    a100, h100 = core.ARCHS[80], core.ARCHS[90]
    assert core.launch_problems(a100, 256, 255, 166_912) == []
    assert core.launch_problems(a100, 256, 128, 166_913) == ["shared memory 166,913 B > 166,912 B"]
    assert core.launch_problems(h100, 2048, 32, 0) == ["2048 threads > 1024"]
    assert core.launch_problems(h100, 1024, 65, 0) == ["65 registers x 1024 threads > 65,536"]  # 72 allocated
    # 128 threads, 64 registers: 2048 registers a warp, so 8 blocks by registers; 33 KiB of shared
    # memory a block (1 KiB reserved): 4 in an A100's 164 KiB, 6 in an H100's 228 KiB
    assert core.blocks_per_sm(a100, 128, 64, 32 * 1024) == 4
    assert core.blocks_per_sm(h100, 128, 64, 32 * 1024) == 6
    assert core.blocks_per_sm(h100, 256, 255, 0) == 1  # 8 warps of 8192 registers


def _row(**kw):
    row = dict(kernel="m.k", problems=["p"], config="BLOCK=64 w4 s3", arch=80, default=False, tuned=True)
    row.update(shared=1024, threads=128, registers=64, spill_stores=0, spill_loads=0)
    row.update(kw)
    return row


def test_verdicts_and_known_offenders():
    assert core.judge(_row(), 512, [], "3.8.0") == ("ok", "")
    assert core.judge(_row(spill_stores=200, spill_loads=200), 512, [], "3.8.0") == ("ok", "")
    verdict, reason = core.judge(_row(spill_stores=200, spill_loads=200, default=True), 512, [], "3.8.0")
    assert verdict == "FAIL" and "untuned" in reason
    verdict, reason = core.judge(_row(spill_stores=400, spill_loads=400), 512, [], "3.8.0")
    assert verdict == "FAIL" and "800 B > budget 512 B" in reason
    assert core.judge(_row(error="PTXASError: boom"), 512, [], "3.8.0")[0] == "FAIL"
    known = [core.KnownOffender("m.k", config="BLOCK=64 *", arch=80, why="being fixed")]
    verdict, reason = core.judge(_row(spill_stores=400, spill_loads=400), 512, known, "3.8.0")
    assert verdict == "known" and "being fixed" in reason
    # an entry is narrow: another arch, config or Triton version still fails
    assert core.judge(_row(spill_stores=999, arch=90), 512, known, "3.8.0")[0] == "FAIL"
    assert core.judge(_row(spill_stores=999, config="BLOCK=32 w4 s3"), 512, known, "3.8.0")[0] == "FAIL"
    by_path = [core.KnownOffender("m.k", flags="*HAS_DROPOUT=True*", why="the dropout path")]
    assert core.judge(_row(spill_stores=999, flags="HAS_DROPOUT=True"), 512, by_path, "3.8.0")[0] == "known"
    assert core.judge(_row(spill_stores=999, flags="HAS_DROPOUT=False"), 512, by_path, "3.8.0")[0] == "FAIL"
    only_36 = [core.KnownOffender("m.k", triton="3.6.*", why="3.6 only")]
    assert core.judge(_row(spill_stores=999), 512, only_36, "3.8.0")[0] == "FAIL"
