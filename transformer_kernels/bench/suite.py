"""The benchmark suite: the op benchmarks, the layers and the end-to-end training step, in one run.

    python -m transformer_kernels bench [ops...] [--quick] [--dtype bf16] [--out DIR] [--device cuda]
    python -m transformer_kernels.bench.suite [ops...] ...                     (the same)

ops: any of layer_norm, attention, ffn, cross_entropy, layers, training, translate (default: all). Each runs
in this process, in turn, with the methodology of ``common.py``; each report's table is
printed and written to ``DIR/<report>.md``, ``.csv`` and ``.json`` (with the environment). Then
``DIR/summary.md`` (each benchmark's status and time, every table) and ``DIR/plots/``.

A failing benchmark is recorded in the summary and the others still run; the exit status is then
1. Running the suite again into the same DIR updates the benchmarks it runs and keeps the others,
so benchmarks can also run one process each (``gpu_check.sh`` does, so that a crash or a timeout
costs one benchmark only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import DTYPE_METAVAR, Report, card, default_device, label, load_reports, parse_dtype, run_environment

# op name on the command line -> its module in this package (each has run(quick, dtypes, device) -> [Report])
BENCHMARKS = {
    "layer_norm": "bench_layer_norm",
    "attention": "bench_attention",
    "attention_kvcache": "bench_attention_kvcache",
    "ffn": "bench_ffn",
    "cross_entropy": "bench_cross_entropy",
    "layers": "bench_layers",
    "training": "bench_training",
    "translate": "bench_translate",
}
STATUS_FILE = "suite.json"


def default_out(device: torch.device) -> Path:
    """``benchmarks/results/<card or cpu>-<date>`` under the current directory (a checkout's results
    folder when run from its root), the card's name as a slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", card(device).lower()).strip("-")
    return Path("benchmarks") / "results" / f"{slug}-{_dt.date.today().isoformat()}"


def draw_plots(out: Path, names: list[str] | None = None) -> tuple[bool, str]:
    """Plots of the named reports in ``out`` (all if None) into ``out/plots``: (ok, what happened).
    Without matplotlib they are skipped, which is not a failure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True, "plots skipped: pip install matplotlib"
    from . import plots

    try:
        paths = plots.render(out, names)
    except Exception as e:  # noqa: BLE001 -- the results are written; report the plots' failure
        traceback.print_exc()
        return False, f"plots FAILED: {type(e).__name__}: {e}"
    return True, f"plots: {len(paths)} in {out / 'plots'}/"


def write_reports(reports: list[Report], out: Path) -> None:
    """Each report's md/csv/json into ``out``, and its table on the terminal."""
    for r in reports:
        r.write(out)
        print(f"\n## {r.name}\n\n{r.markdown()}", flush=True)


def publish(reports: list[Report], out: Path, plot: bool = True) -> int:
    """Write each report into ``out``, print its table, draw its plots: what each benchmark's own
    command line ends with. Returns the exit status: 1 if a measurement or the plots failed."""
    write_reports(reports, out)
    ok, message = draw_plots(out, [r.name for r in reports]) if plot else (True, "")
    print(f"\n{message}\nresults in {out}/")
    return 0 if ok and not any(r.errors for r in reports) else 1


def _load_status(out: Path) -> dict:
    path = out / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run_benchmark(op: str, quick: bool, dtype: torch.dtype, device: torch.device, out: Path) -> dict:
    """Run one benchmark, write its reports; its status entry, a failure included (never raises)."""
    t0 = time.perf_counter()
    entry = {"quick": quick, "dtype": label(dtype), "device": str(device), "reports": []}
    try:
        module = importlib.import_module(f".{BENCHMARKS[op]}", __package__)
        reports = module.run(quick, [dtype], device)
        write_reports(reports, out)
        errors = [e for r in reports for e in r.errors]
        entry.update(status="failed" if errors else "ok", reports=[r.name for r in reports], error="; ".join(errors))
    except Exception as e:  # noqa: BLE001 -- one failing benchmark must not stop the others
        traceback.print_exc()
        entry.update(status="failed", error=f"{type(e).__name__}: {str(e).strip()[:500]}")
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return entry


def write_summary(out: Path, status: dict, device: torch.device, plots_line: str) -> Path:
    """``out/summary.md``: the environment, each benchmark's status, every report's table, the plots."""
    env = run_environment(device)
    lines = ["# Benchmark suite", ""]
    lines += [
        f"- {k}: {env[k]}"
        for k in ("card", "driver", "torch", "torch_cuda", "triton", "extension", "commit", "date")
        if k in env
    ]
    lines += ["", "| benchmark | result | time | reports | error |", "|---|---|---|---|---|"]
    for op, s in status.items():
        lines.append(
            f"| {op} | {s['status']} | {s['seconds']} s | {', '.join(s['reports'])} | "
            f"{s.get('error', '').replace('|', '/')} |"
        )
    order = [name for s in status.values() for name in s["reports"]]
    reports = sorted(load_reports(out), key=lambda r: (order.index(r.name) if r.name in order else len(order), r.name))
    for r in reports:
        lines += ["", f"## {r.name}", "", f"{r.unit} from: {r.counts}", "", r.markdown()]
    lines += ["", "## Plots", "", plots_line, ""]
    lines += [f"- ![{p.stem}](plots/{p.name})" for p in sorted((out / "plots").glob("*.png"))]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_kernels bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ops", nargs="*", metavar="op", help=f"any of: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (what gpu_check.sh runs)")
    parser.add_argument(
        "--dtype",
        type=parse_dtype,
        metavar=DTYPE_METAVAR,
        default=None,
        help="default: bf16 on a GPU, fp32 on a CPU (torch's names, bfloat16 and so on, work too)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: benchmarks/results/<card or cpu>-<date>)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    unknown = [op for op in args.ops if op not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(map(repr, unknown))}; valid: {', '.join(BENCHMARKS)}")
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # do_bench and the memory statistics use the current device
    dtype = args.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)

    status = _load_status(out)
    ops = list(dict.fromkeys(args.ops or BENCHMARKS))
    failed = []
    for op in ops:
        print(f"=== {op}", flush=True)
        status[op] = run_benchmark(op, args.quick, dtype, device, out)
        if status[op]["status"] != "ok":
            failed.append(op)
        (out / STATUS_FILE).write_text(json.dumps(status, indent=1))
        write_summary(out, status, device, "(plots come at the end of the run)")  # what a timeout leaves
    plots_ok, plots_line = draw_plots(out, [name for op in ops for name in status[op]["reports"]])
    summary = write_summary(out, status, device, plots_line)
    print(f"\n{plots_line}\nsummary: {summary}")
    if failed or not plots_ok:
        print(f"FAILED: {', '.join(failed + ([] if plots_ok else ['plots']))} (see {summary})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
