"""The command line and the benchmarks run (tiny sizes; benchmarks are never timed in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "transformer_kernels", "info"], capture_output=True, text=True,
                         check=True).stdout
    for needle in ("torch", "triton", "extension", "dropout_add_layer_norm", "reference"):
        assert needle in out


def test_bench_layer_norm_runs(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layer_norm.py"), "--quick", "--hidden", "64",
                    "--dtype", "fp32", "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    data = json.loads((tmp_path / "bench_layer_norm.json").read_text())
    assert data["environment"]["torch"] and data["rows"]
    timed = [r for r in data["rows"] if r["ms"] is not None]
    assert {r["impl"] for r in timed} >= {"eager"} and all(r["ms"] > 0 for r in timed)
    assert (tmp_path / "bench_layer_norm.png").stat().st_size > 0
    assert (tmp_path / "bench_layer_norm.csv").read_text().startswith("dtype,M,N,pass,impl")
