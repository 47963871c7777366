"""The command line and the benchmark suite (tiny sizes on the CPU; benchmarks are never timed in tests)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer_kernels.bench import bench_layer_norm, common, results_readme, suite

REPORTS = {  # benchmark -> the reports it writes
    "layer_norm": ["bench_layer_norm"],
    "attention": ["bench_attention"],
    "attention_kvcache": ["bench_attention_kvcache"],
    "ffn": ["bench_ffn"],
    "cross_entropy": ["bench_cross_entropy", "bench_linear_cross_entropy"],
    "layers": ["bench_layers", "bench_decoding"],
    "training": ["bench_training"],
    "translate": ["bench_translate"],
}


def test_info_reports_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "transformer_kernels", "info"], capture_output=True, text=True, check=True
    ).stdout
    for needle in ("torch", "triton", "extension", "dropout_add_layer_norm", "reference"):
        assert needle in out


def _timed_rows(json_path: Path) -> list[dict]:
    data = json.loads(json_path.read_text())
    assert data["environment"]["torch"] and data["environment"]["card"] and data["unit"] and data["counts"]
    timed = [r for r in data["rows"] if r["ms"] is not None]
    assert timed and all(r["ms"] > 0 and r["rate"] > 0 for r in timed)
    return timed


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    """The whole suite, quick, on the CPU: (exit status, results folder)."""
    out = tmp_path_factory.mktemp("suite")
    return suite.main(["--quick", "--device", "cpu", "--out", str(out)]), out


def test_suite_writes_every_table(suite_out):
    rc, out = suite_out
    assert rc == 0
    status = json.loads((out / "suite.json").read_text())
    assert {op: s["status"] for op, s in status.items()} == {op: "ok" for op in REPORTS}
    assert {s["dtype"] for s in status.values()} == {"fp32"}  # one dtype spelling, also in the results
    summary = (out / "summary.md").read_text()
    for op, reports in REPORTS.items():
        assert f"| {op} | ok |" in summary
        for name in reports:
            _timed_rows(out / f"{name}.json")
            assert (out / f"{name}.md").read_text().startswith(f"# {name}")
            assert (out / f"{name}.csv").read_text().splitlines()[0].split(",")[-5:] == [
                "ms",
                json.loads((out / f"{name}.json").read_text())["unit"],
                "speedup",
                "peak_mib",
                "note",
            ]
            assert f"## {name}" in summary


def test_suite_draws_plots(suite_out):
    pytest.importorskip("matplotlib")
    _, out = suite_out
    plots = {p.name for p in (out / "plots").glob("*.png") if p.stat().st_size > 0}
    assert {
        "bench_layer_norm_speedup.png",
        "bench_layer_norm_roofline.png",
        "bench_cross_entropy_roofline.png",
        "bench_attention_speedup.png",
        "bench_training.png",
    } <= plots
    for name in plots:
        assert f"plots/{name}" in (out / "summary.md").read_text()
    from transformer_kernels.bench import plots as plots_module

    shutil.rmtree(out / "plots")
    assert plots_module.main([str(out)]) == 0  # re-rendered from the JSON files alone
    assert {p.name for p in (out / "plots").glob("*.png")} == plots


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert suite.draw_plots(tmp_path) == (True, "plots skipped: pip install matplotlib")


def test_training_rows_are_finite(suite_out):
    _, out = suite_out
    rows = {r["impl"]: r for r in json.loads((out / "bench_training.json").read_text())["rows"]}
    # what runs on a CPU (auto: the native backend); the packed rows run the same sentences without padding
    for impl in ("nn_eager", "auto", "reference", "auto_packed", "reference_packed"):
        assert math.isfinite(rows[impl]["rate"]) and rows[impl]["rate"] > 0
        assert "matmuls in" in rows[impl]["note"] and "fp32" in rows[impl]["note"]
    assert rows["nn_compile"]["ms"] is None and "CUDA" in rows["nn_compile"]["note"]


def test_a_failing_benchmark_is_reported_and_the_rest_run(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("boom: the kernel fell over")

    monkeypatch.setattr(bench_layer_norm, "run", boom)
    assert suite.main(["layer_norm", "ffn", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| layer_norm | failed |" in summary and "boom: the kernel fell over" in summary
    assert "| ffn | ok |" in summary
    _timed_rows(tmp_path / "bench_ffn.json")


def test_unknown_benchmark_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["layer_nrom"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'layer_nrom'" in err and ", ".join(REPORTS) in err


def test_bench_script_runs_on_its_own(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer_kernels.bench.bench_layer_norm",
            "--quick",
            "--hidden",
            "64",
            "--dtype",
            "fp32",
            "--no-plot",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert {r["impl"] for r in _timed_rows(tmp_path / "bench_layer_norm.json")} >= {"eager", "reference"}
    assert (tmp_path / "bench_layer_norm.csv").read_text().startswith("dtype,M,N,pass,impl,ms,GB/s")


@pytest.mark.parametrize(
    "module, args",
    [
        ("bench_attention", ["--seqlen", "32"]),
        ("bench_attention_kvcache", ["--seqlen", "32"]),
        ("bench_cross_entropy", ["--dtype", "float32"]),  # torch's name for a dtype works too
        ("bench_ffn", ["--tokens", "64"]),
        ("bench_training", ["--batch", "2", "--max-len", "8"]),
    ],
)
def test_bench_command_lines(module, args, tmp_path):
    main = __import__(f"transformer_kernels.bench.{module}", fromlist=["main"]).main
    assert main(["--quick", "--no-plot", "--out", str(tmp_path), *args]) == 0
    assert list(tmp_path.glob("*.json"))


def test_bench_packing_command_line(tmp_path, capsys):
    from transformer_kernels.bench import bench_packing

    args = ["--pairs", "300", "--vocab-size", "120", "--preset", "tiny", "--batch-tokens", "400"]
    assert bench_packing.main([*args, "--steps", "2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_packing.json").read_text())
    padded, packed = result["padding"]["padded"], result["padding"]["packed"]
    assert 0 < padded["padding"] < 1 and packed["padding"] == 0 and packed["batches"] <= padded["batches"]
    t = result["throughput"]
    assert t["ratio_to_padded_median"]["padded"] == 1 and all(r > 0 for r in t["tokens_per_s_median"].values())
    assert "| packed |" in capsys.readouterr().out


def test_interleaved_timing_calls_each_side_once_per_repeat():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = common.interleaved_times(fns, repeats=30)
    # a warm-up call each, then every repeat runs each once, in an order shuffled per repeat
    assert calls[:3] == ["a", "b", "c"]
    repeats = [tuple(calls[i : i + 3]) for i in range(3, len(calls), 3)]
    assert len(repeats) == 30 and all(sorted(r) == ["a", "b", "c"] for r in repeats)
    assert {r[0] for r in repeats} == set("abc") and len(set(repeats)) > 3  # no fixed order or rotation
    assert set(times) == {"a", "b", "c"} and all(len(ts) == 30 and min(ts) >= 0 for ts in times.values())
    again: list[str] = []
    common.interleaved_times({n: (lambda n=n: again.append(n)) for n in "abc"}, repeats=30)
    assert again == calls  # seeded
    with pytest.raises(ValueError, match="at least one function"):
        common.interleaved_times({}, repeats=3)


def test_interleaved_times_are_paired_by_repeat():
    # both sides sleep in the odd repeats: the i-th time of each side comes from repeat i
    import time as _time

    calls = {"n": 0}

    def side():
        k = calls["n"]
        calls["n"] += 1
        if k >= 2 and (k - 2) // 2 % 2 == 1:  # after the two warm-up calls, two calls a repeat
            _time.sleep(0.005)

    times = common.interleaved_times({"a": side, "b": lambda: side()}, repeats=6)
    slow = {name: [t > 2.5 for t in ts] for name, ts in times.items()}  # ms
    assert slow["a"] == slow["b"] == [False, True, False, True, False, True]


def test_paired_ratio_median_and_interval():
    # other ran twice as fast in every repeat, whatever the repeat's load: exactly 2, no spread
    base = [10.0, 30.0, 20.0, 50.0, 12.0]
    assert common.paired_ratio(base, [t / 2 for t in base]) == (2.0, 2.0, 2.0)
    # ratios 1..15: the median 8, and the order statistics 4 and 12 (coverage 1 - 2 P(Bin(15, 1/2) <= 3)
    # = 96.5%; the next pair, 5 and 11, covers only 88%)
    assert common.paired_ratio([float(r) for r in range(15, 0, -1)], [1.0] * 15) == (8.0, 4.0, 12.0)
    # too few repeats for 95%: the range
    assert common.paired_ratio([0.9, 1.3, 1.0, 1.2, 1.1], [1.0] * 5) == pytest.approx((1.1, 0.9, 1.3))
    # a lower level, a narrower interval
    assert common.paired_ratio([float(r) for r in range(1, 16)], [1.0] * 15, level=0.5) == (8.0, 6.0, 10.0)
    with pytest.raises(ValueError, match="equally long"):
        common.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        common.paired_ratio([1.0], [1.0], level=1.0)


def test_bench_cpu_tables_run_and_print_one_row_per_case(capsys):
    from transformer_kernels.bench import bench_cpu

    bench_cpu.layers([("encoder", 64, 16), ("decoder", 64, 16)], quick=True)
    bench_cpu.training(quick=True, vocab=64, batch=4, length=8)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 6  # 2 layers x dropout 0.1 / 0, the training step x dropout 0.1 / 0
    assert all(" (1.00x) | " in r and r.count("ms (") == 3 and " again " in r for r in rows)  # with the control
    # each cell after the first: its median ratio and a 95% interval around it
    for r in rows:
        for cell in r.strip("| ").split(" | ")[2:]:
            ratio, lo, hi = (float(x) for x in re.findall(r"\((\d+\.\d+)x, (\d+\.\d+)-(\d+\.\d+)\)", cell)[0])
            assert lo <= ratio <= hi, cell
    assert rows[-1].startswith("| training step") and "dropout 0.0" in rows[-1]


def test_bench_cpu_row_filter_and_repeats(monkeypatch, capsys):
    from transformer_kernels.bench import bench_cpu

    calls = []
    monkeypatch.setattr(bench_cpu, "ROW_FILTER", "wanted")
    monkeypatch.setattr(bench_cpu, "REPEATS", 2)
    assert bench_cpu.row("other row", {"a": lambda: calls.append("other")}, 5) == {}
    assert set(bench_cpu.row("the wanted row", {"a": lambda: calls.append("a")}, 5, control=True)) == {"a", "a again"}
    assert calls == ["a"] * 6  # two warm-ups (the side, its control), two repeats of both; nothing of the other row
    assert capsys.readouterr().out.count("| the wanted row |") == 1


@pytest.mark.parametrize(
    "args, error",
    [
        (["bogus"], "no table 'bogus'"),
        (["layers", "--case", "encoder-x-16"], "KIND-D-L"),
        (["--case", "mlp-64-16"], "kind"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bench_cpu_rejects_bad_arguments(args, error, capsys):
    from transformer_kernels.bench import bench_cpu

    with pytest.raises(SystemExit) as e:
        bench_cpu.main(args)
    assert e.value.code == 2 and error in capsys.readouterr().err


def test_dtypes_have_one_spelling_and_take_torchs_names_too(capsys):
    for short, long, dtype in (("bf16", "bfloat16", torch.bfloat16), ("fp16", "float16", torch.float16)):
        assert common.parse_dtype(short) is common.parse_dtype(long) is dtype
        assert common.label(dtype) == short
    with pytest.raises(argparse.ArgumentTypeError, match="expected one of fp16, bf16, fp32"):
        common.parse_dtype("int8")
    with pytest.raises(SystemExit) as e:
        suite.main(["layer_norm", "--dtype", "int8"])
    assert e.value.code == 2 and "unknown dtype 'int8'" in capsys.readouterr().err


def test_the_harness_loop_runs_checks_and_skips(monkeypatch):
    """One loop for every op benchmark: a callable is checked and timed, a reason is a "not run"
    note, a refusal of the inputs is one too, a wrong result fails the benchmark, and a compiled
    implementation is compiled afresh for the case."""
    cpu = torch.device("cpu")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: compiled.append(fn) or (lambda: 2 * fn()))

    def refuse():
        raise RuntimeError("No available kernel for these inputs.\nmore detail")

    def one():
        return 1.0

    impls = [
        common.Impl("baseline", one, check=False),
        common.Impl("compiled", one, compile=True),
        common.Impl.unless("needs a CUDA device", "gpu_only", one),
        common.Impl("refusing", refuse, refuses=(RuntimeError,)),
        common.Impl("too_long", one).not_run("materialises [L, L]"),
    ]
    checked = []
    measured = common.measure(
        impls,
        lambda fn: {"fwd": fn(), "bwd": 10 * fn()},
        cpu,
        check=lambda impl, fn: checked.append((impl.name, fn())),
        passes=("fwd", "bwd"),
    )
    assert measured.timings == {
        "fwd": {"baseline": 1.0, "compiled": 2.0, "gpu_only": None, "refusing": None, "too_long": None},
        "bwd": {"baseline": 10.0, "compiled": 20.0, "gpu_only": None, "refusing": None, "too_long": None},
    }
    assert measured.notes == {
        "gpu_only": "needs a CUDA device",
        "refusing": "No available kernel for these inputs.",
        "too_long": "materialises [L, L]",
    }
    assert compiled == [one] and checked == [("compiled", 2.0)]  # the baseline is not checked

    def wrong(impl, fn):
        raise AssertionError(f"{impl.name} is wrong")

    with pytest.raises(AssertionError, match="refusing is wrong"):  # a refusal is not a wrong result
        common.measure(impls[3:4], lambda fn: {"fwd": fn()}, cpu, check=wrong)
    with pytest.raises(RuntimeError, match="No available kernel"):  # nor is an error it does not expect
        common.measure([common.Impl("strict", refuse)], lambda fn: {"fwd": fn()}, cpu, check=lambda i, f: f())


def test_results_readme_says_when_there_are_no_gpu_results(suite_out, tmp_path):
    _, out = suite_out
    readme = tmp_path / "README.md"
    assert results_readme.main([str(out), "--output", str(readme)]) == 0
    text = readme.read_text()
    assert "No GPU results yet" in text and "come from a CPU" in text and "gpu_check.sh" in text
    assert text.count("| pending | — |") == len(results_readme.TARGETS)
    assert results_readme.render(None).count("| pending |") == len(results_readme.TARGETS)


def test_results_readme_renders_gpu_results(suite_out, tmp_path):
    """The GPU rendering, from the CPU results relabelled as a GPU run (their numbers mean nothing)."""
    _, out = suite_out
    results = tmp_path / "h100-2030-01-01"
    shutil.copytree(out, results)
    for path in results.glob("*.json"):
        data = json.loads(path.read_text())
        if "rows" not in data:
            continue
        data["device"] = "cuda"
        data["environment"].update(card="NVIDIA H100 80GB HBM3", peak_dram_gbps=3350.0)
        for r in data["rows"]:  # the reference rows stand in for the kernels' (training has its auto row)
            if data["name"] != "bench_training":
                r["impl"] = {"reference": "triton"}.get(r["impl"], r["impl"])
        path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    assert results_readme.main([str(results), "--output", str(readme)]) == 0
    text = readme.read_text()
    assert "No GPU results yet" not in text and "NVIDIA H100 80GB HBM3" in text
    assert "% of copy bandwidth" in text and "tokens/s" in text and "## bench_training" in text
    if (results / "plots").is_dir():
        assert "](h100-2030-01-01/plots/bench_training.png)" in text


def test_gpu_check_writes_its_summary_even_when_no_step_fits(tmp_path):
    """The GPU check runs once, unattended, on a rented machine: whatever happens it must leave its
    summary. With no budget every step is recorded as skipped (nothing is built or run)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "TK_GPU_CHECK_BUDGET": "1", "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.md").read_text()
    steps = ("build", "info", "tests (kernels)", "bench layer_norm", "bench training", "tests (autotuned kernels)")
    for step in steps + ("tests (the rest)",):
        assert f"| {step} | SKIPPED (budget of 1s spent) |" in summary, step
    assert "- tests (kernels): no report" in summary
