"""The command line and the benchmarks run (tiny sizes; benchmarks are never timed in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "transformer_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    for needle in ("torch", "triton", "extension", "dropout_add_layer_norm", "reference"):
        assert needle in out


def _run_bench(name, tmp_path, *args):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), "--quick", "--out", str(tmp_path),
                    *args], check=True, capture_output=True, text=True)


def _timed_rows(json_path):
    data = json.loads(json_path.read_text())
    assert data["environment"]["torch"] and data["unit"] and data["counts"]
    timed = [r for r in data["rows"] if r["ms"] is not None]
    assert timed and all(r["ms"] > 0 and r["rate"] > 0 for r in timed)
    return timed


def test_bench_layer_norm_runs(tmp_path):
    _run_bench("layer_norm", tmp_path, "--hidden", "64", "--dtype", "fp32")
    assert {r["impl"] for r in _timed_rows(tmp_path / "bench_layer_norm.json")} >= {"eager"}
    assert (tmp_path / "bench_layer_norm.png").stat().st_size > 0
    assert (tmp_path / "bench_layer_norm.csv").read_text().startswith("dtype,M,N,pass,impl,ms,GB/s")


@pytest.mark.parametrize("name, reports", [
    ("attention", ["bench_attention"]),
    ("cross_entropy", ["bench_cross_entropy"]),
    ("ffn", ["bench_ffn"]),
    ("layers", ["bench_layers", "bench_decoding"]),
])
def test_other_benchmarks_run(name, reports, tmp_path):
    _run_bench(name, tmp_path)
    for report in reports:
        _timed_rows(tmp_path / f"{report}.json")
        assert (tmp_path / f"{report}.md").read_text().startswith(f"# {report}")
