"""Renders ``benchmarks/results/README.md`` from a results folder: card, date, commit, each kernel's
performance target beside what was measured (misses as plainly as wins), every table and plot.

    python -m transformer_kernels.bench.results_readme [RESULTS_DIR] [--output benchmarks/results/README.md]

RESULTS_DIR is what the suite wrote (``python -m transformer_kernels bench --out DIR``), or the
folder of ``gpu_check.sh``, which keeps the suite's results in ``bench/``. Without it, the newest
GPU results under ``benchmarks/results/`` are used. When there are none (or the folder holds CPU
smoke runs only), the README says that no GPU results exist yet and how to produce them.

The targets are data (:data:`TARGETS`): the text of each kernel's performance target and a function
reading what was measured from the reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import Report, Row, load_reports

# The repository's results folder, relative to the checkout's root (where this runs from).
RESULTS = Path("benchmarks") / "results"
PACKAGE = ("triton", "cuda")  # the package's kernel backends, as the op benchmarks name their rows

Reports = dict[str, Report]
Measured = tuple[str, bool | None]  # (what was measured, whether the target is met; None: no verdict)


@dataclass(frozen=True)
class Target:
    text: str  # the target, as the results page states it
    measure: Callable[[Reports], Measured | None]  # None when the results do not cover it


def _rows(reports: Reports, name: str, impl: str | None = None, **case) -> list[Row]:
    report = reports.get(name)
    if report is None:
        return []
    return [
        r
        for r in report.rows
        if r.ms is not None and (impl is None or r.impl == impl) and all(r.case.get(k) == v for k, v in case.items())
    ]


def _same_case(reports: Reports, name: str, row: Row, impl: str) -> Row | None:
    found = _rows(reports, name, impl, **row.case)
    return found[0] if found else None


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _join(parts: list[Measured]) -> Measured | None:
    """Several backends' measurements as one cell: met if any backend meets the target."""
    if not parts:
        return None
    verdicts = [m for _, m in parts if m is not None]
    return "; ".join(t for t, _ in parts), (any(verdicts) if verdicts else None)


def layer_norm(reports: Reports) -> Measured | None:
    copy = reports["bench_layer_norm"].meta.get("copy_gbps") if "bench_layer_norm" in reports else None
    parts = []
    for impl in PACKAGE:
        rows = _rows(reports, "bench_layer_norm", impl, **{"pass": "fwd+bwd"})
        if not rows or not copy:
            continue
        frac = [r.rate / copy for r in rows]
        eager = [r.speedup for r in rows]
        comp = [c.ms / r.ms for r in rows if (c := _same_case(reports, "bench_layer_norm", r, "compile"))]
        met = min(frac) >= 0.85 and min(eager) >= 2.0 and bool(comp) and min(comp) >= 1.2
        parts.append(
            (
                f"{impl}: {_span([100 * f for f in frac], '{:.0f}')}% of copy bandwidth, "
                f"{_span(eager, '{:.2f}')}x eager, "
                + (f"{_span(comp, '{:.2f}')}x compile" if comp else "compile not measured"),
                met,
            )
        )
    return _join(parts)


def attention(reports: Reports) -> Measured | None:
    name = "bench_attention"
    rows = _rows(reports, name, "triton")
    if not rows:
        return None

    def best_sdpa(row: Row) -> float | None:
        times = [r.ms for r in _rows(reports, name, **row.case) if r.impl.startswith("sdpa")]
        return min(times) if times else None

    parts, met = [], []
    key = [
        r
        for r in rows
        if r.case.get("pass") == "fwd"
        and r.case.get("D") == 128
        and r.case.get("L") == 8192
        and r.case.get("dtype") == "bf16"
        and not r.case.get("causal")
        and not r.case.get("padding")
    ]
    if key and best_sdpa(key[0]):
        ratio = best_sdpa(key[0]) / key[0].ms
        parts.append(f"fwd D=128 L=8k: {ratio:.2f}x SDPA's best")
        met.append(ratio >= 1.1)
    sweep = [r.speedup for r in rows if r.case.get("pass") == "fwd+bwd" and r.speedup]
    if sweep:
        parts.append(f"fwd+bwd {_span(sweep, '{:.2f}')}x SDPA")
        met.append(min(sweep) >= 1.0)
    padded = [r.speedup for r in rows if r.case.get("padding") and r.case.get("pass") == "fwd+bwd" and r.speedup]
    if padded:
        parts.append(f"padded fwd+bwd {_span(padded, '{:.2f}')}x SDPA")
        met.append(min(padded) >= 2.0)
    return ("triton: " + ", ".join(parts), all(met)) if parts else None


def linear_cross_entropy(reports: Reports) -> Measured | None:
    name = "bench_linear_cross_entropy"
    parts = []
    for row in _rows(reports, name, "triton", V=131072):
        eager = _same_case(reports, name, row, "eager")
        if eager is None or not row.peak_mib or not eager.peak_mib:
            continue
        less = eager.peak_mib / row.peak_mib
        parts.append(
            (
                f"N={row.case['N']}: {less:.1f}x less peak memory, {row.speedup:.2f}x eager's speed",
                less >= 3.0 and row.speedup >= 1.0,
            )
        )
    if not parts:
        return None
    return "triton at V=128k: " + "; ".join(t for t, _ in parts), all(m for _, m in parts)


def ffn(reports: Reports) -> Measured | None:
    parts = []
    for impl in PACKAGE:
        rows = _rows(reports, "bench_ffn", impl, **{"pass": "fwd+bwd"})
        gemm = [(r, g) for r in rows if (g := _same_case(reports, "bench_ffn", r, "gemm"))]
        if not rows:
            continue
        eager = [r.speedup for r in rows]
        frac = [r.rate / g.rate for r, g in gemm]
        parts.append(
            (
                f"{impl}: {_span(eager, '{:.2f}')}x eager, "
                + (f"{_span([100 * f for f in frac], '{:.0f}')}% of bare GEMMs" if frac else "no GEMM rate"),
                min(eager) >= 1.15 and bool(frac) and min(frac) >= 0.95,
            )
        )
    return _join(parts)


def layers(reports: Reports) -> Measured | None:
    rows = _rows(reports, "bench_layers", "ours", **{"pass": "train"})
    decode = _rows(reports, "bench_decoding", "kv_cache")
    if not rows and not decode:
        return None
    parts, met = [], []
    if rows:
        eager = [r.speedup for r in rows]
        comp = [c.ms / r.ms for r in rows if (c := _same_case(reports, "bench_layers", r, "compile"))]
        mem = [
            r.peak_mib / e.peak_mib
            for r in rows
            if (e := _same_case(reports, "bench_layers", r, "eager")) and r.peak_mib and e.peak_mib
        ]
        parts.append(
            f"training step {_span(eager, '{:.2f}')}x eager, "
            + (f"{_span(comp, '{:.2f}')}x compiled" if comp else "compiled not measured")
        )
        met += [min(eager) >= 1.5, bool(comp) and min(comp) >= 1.15]
        if mem:
            parts.append(f"memory {_span(mem, '{:.2f}')}x eager's")
            met.append(max(mem) <= 0.6)
    if decode:
        parts.append(f"cached decoding {_span([r.speedup for r in decode], '{:.2f}')}x recompute")
        met.append(min(r.speedup for r in decode) >= 3.0)
    return ", ".join(parts), all(met)


def training(reports: Reports) -> Measured | None:
    parts = []
    for row in _rows(reports, "bench_training", "auto"):
        comp = _same_case(reports, "bench_training", row, "nn_compile")
        parts.append(
            f"{row.case['precision']}: {row.rate:.3g} tokens/s, {row.speedup:.2f}x torch.nn"
            + (f", {comp.ms / row.ms:.2f}x torch.nn compiled" if comp else "")
        )
    return ("; ".join(parts), None) if parts else None


TARGETS = (
    Target("`dropout_add_layer_norm` fwd+bwd ≥ 85% of copy bandwidth, ≥ 2× eager, ≥ 1.2× `torch.compile`", layer_norm),
    Target(
        "`attention` fwd ≥ 1.1× SDPA's best at D=128, L=8k, bf16; fwd+bwd ≥ 1.0× across the sweep; "
        "≥ 2× SDPA with a padding mask",
        attention,
    ),
    Target("`linear_cross_entropy` ≥ 3× less peak memory than eager at V = 128k, and not slower", linear_cross_entropy),
    Target("`ffn` fwd+bwd ≥ 1.15× eager and ≥ 95% of the bare-GEMM rate", ffn),
    Target(
        "layer training step ≥ 1.5× eager and ≥ 1.15× compiled; activation memory ≤ 0.6× eager; "
        "cached decoding ≥ 3× recompute",
        layers,
    ),
    Target(
        "training throughput of the base model: no target; the package (`auto`) against "
        "`torch.nn.Transformer` eager and compiled",
        training,
    ),
)

PENDING = """Once GPU results exist, this file holds the card, driver, versions, date and commit, each
benchmark's table and plots, and each target above beside what was measured, misses as plainly as
wins. To produce them, on a GPU machine:"""
HOW_TO = """    bash benchmarks/gpu_check.sh benchmarks/results/<card>-<date>               # build, tests, quick suite
    python -m transformer_kernels bench --out benchmarks/results/<card>-<date>/bench  # optional: full sizes
    python -m transformer_kernels.bench.results_readme benchmarks/results/<card>-<date>  # rewrites this file"""


def find_results(path: Path) -> Path:
    """The folder holding the report JSON files: ``path`` or its ``bench/``."""
    return path / "bench" if not any(path.glob("*.json")) and (path / "bench").is_dir() else path


def is_gpu(reports: list[Report]) -> bool:
    return bool(reports) and all(r.device.startswith("cuda") for r in reports)


def newest_gpu_results(root: Path = RESULTS) -> Path | None:
    """The results folder under ``root`` with the latest date among those measured on a GPU."""
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        reports = load_reports(find_results(d))
        if is_gpu(reports):
            found.append((max(r.environment.get("date", "") for r in reports), find_results(d)))
    return max(found)[1] if found else None


def _targets_table(reports: Reports) -> list[str]:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for t in TARGETS:
        measured = t.measure(reports) if reports else None
        text, met = measured if measured else ("pending", None)
        verdict = "—" if met is None else "met" if met else "**missed**"
        lines.append(f"| {t.text} | {text} | {verdict} |")
    return lines


def training_runs(readme_dir: Path = RESULTS) -> list[str]:
    """Lines linking the committed training runs (``training/<run>/README.md``: translation quality
    of the train command, each with its command, logs and scores), or none."""
    runs = sorted(readme_dir.glob("training/*/README.md"))
    if not runs:
        return []
    lines = ["## Training runs", ""]
    for readme in runs:
        title = readme.read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"- [{title}]({readme.relative_to(readme_dir).as_posix()})")
    return lines + [""]


def render(results: Path | None, readme_dir: Path = RESULTS) -> str:
    """The README's text for the reports in ``results`` (None: no results)."""
    loaded = load_reports(results) if results else []
    gpu = is_gpu(loaded)
    lines = ["# Benchmark results", ""]
    if not gpu:
        lines += [
            "**No GPU results yet.** No GPU run of the benchmarks has been published here, so every rate, speed-up "
            "and performance target below is still unmeasured."
        ]
        if loaded:
            env = loaded[0].environment
            lines += [
                "",
                f"The results in `{results}` ({env.get('date', '?')[:10]}, commit {env.get('commit', '?')}) "
                "come from a CPU: smoke runs that show the benchmarks work, not measurements of the kernels.",
            ]
        lines += ["", *_targets_table({}), "", PENDING, "", HOW_TO, "", *training_runs(readme_dir)]
        return "\n".join(lines)
    env = loaded[0].environment
    rel = Path(os.path.relpath(results, readme_dir))
    lines += [
        f"The latest GPU results, from `{rel}` (rendered by `python -m transformer_kernels.bench.results_readme`).",
        "",
        f"- card: {env.get('card')} (driver {env.get('driver')}; peak DRAM bandwidth "
        f"{env.get('peak_dram_gbps') or 'not in the table'} GB/s)",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"extension {env.get('extension')}",
        f"- date: {env.get('date')}",
        f"- commit: {env.get('commit')}",
        "",
        "## Targets",
        "",
        *_targets_table({r.name: r for r in loaded}),
        "",
        "Speed-ups are against the baseline measured in the same run (each table names it). "
        "The methodology is in `transformer_kernels/bench/common.py`.",
        "",
    ]
    for r in loaded:
        lines += [f"## {r.name}", "", f"{r.unit} from: {r.counts}", "", r.markdown(), ""]
        for png in sorted((results / "plots").glob(f"{r.name}*.png")):
            lines += [f"![{png.stem}]({(rel / 'plots' / png.name).as_posix()})", ""]
    lines += ["## Reproduce", "", HOW_TO, "", *training_runs(readme_dir)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=None,
        help="results folder (default: the newest GPU results under benchmarks/results/)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "README.md")
    args = parser.parse_args(argv)
    if args.results is not None and not args.results.is_dir():
        parser.error(f"{args.results} is not a folder")
    results = find_results(args.results) if args.results else newest_gpu_results()
    if args.results is not None and not load_reports(results):
        parser.error(f"no benchmark results (*.json) in {args.results}")
    args.output.write_text(render(results, args.output.parent))
    print(f"wrote {args.output}" + ("" if results else " (no GPU results yet)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
