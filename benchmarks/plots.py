"""Plots of a results folder, drawn from its JSON files alone (so any folder can be re-rendered):

- ``<report>_speedup.png``: speed-up over the baseline against the swept size, one panel per case
  group, log-x, a line at 1.0 (reports that sweep a size);
- ``<report>_roofline.png``: achieved GB/s as a fraction of the card's peak DRAM bandwidth
  (``common.PEAK_DRAM_GBPS``), for the memory-bound ops (reports in GB/s); for a card not in that
  table, achieved GB/s without the roof, and the title says so;
- ``<report>.png``: bars of the rate (and of peak memory, where measured) per implementation, for
  reports without a sweep (training throughput, decoding).

    python benchmarks/plots.py DIR        (writes DIR/plots/)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import Report, Row, load_reports, peak_dram_gbps  # noqa: E402


def _panels(report: Report) -> dict[tuple, list[Row]]:
    """Rows grouped by the report's panel keys, in order of appearance."""
    groups: dict[tuple, list[Row]] = {}
    for r in report.rows:
        groups.setdefault(tuple(r.case.get(k) for k in report.panels), []).append(r)
    return groups


def _title(report: Report, key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(report.panels, key, strict=True) if k not in ("dtype",)) or report.name


def _grid(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _lines(ax, rows: list[Row], x: str, y, skip: tuple = ()) -> bool:
    """One line per implementation of ``y(row)`` against ``row.case[x]``; False if nothing was drawn."""
    drawn = False
    for impl in dict.fromkeys(r.impl for r in rows):
        if impl in skip:
            continue
        pts = sorted((r.case[x], y(r)) for r in rows if r.impl == impl and y(r) is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    return drawn


def _finish(fig, report: Report, what: str, path: Path) -> Path:
    env = report.environment
    fig.suptitle(
        f"{report.name}: {what}\n{env.get('card', '?')}, {env.get('date', '?')[:10]}, commit {env.get('commit', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup(report: Report, path: Path) -> Path:
    groups = _panels(report)
    fig, axes = _grid(len(groups))
    for ax, (key, rows) in zip(axes, groups.items(), strict=True):
        if _lines(ax, rows, report.x, lambda r: r.speedup, skip=(report.baseline,)):
            ax.legend(fontsize=7)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(report.x)
        ax.set_ylabel(f"speed-up over {report.baseline}")
        ax.set_title(_title(report, key), fontsize=9)
    dtypes = sorted({str(r.case.get("dtype")) for r in report.rows if "dtype" in r.case})
    return _finish(
        fig, report, f"speed-up over {report.baseline}" + (f" ({', '.join(dtypes)})" if dtypes else ""), path
    )


def roofline(report: Report, path: Path) -> Path:
    card = report.environment.get("card", "")
    peak: float | None = peak_dram_gbps(card)
    copy = report.meta.get("copy_gbps")
    scale = peak or 1.0
    groups = _panels(report)
    fig, axes = _grid(len(groups))
    for ax, (key, rows) in zip(axes, groups.items(), strict=True):
        _lines(ax, rows, report.x, lambda r: None if r.rate is None else r.rate / scale)
        ax.set_ylim(bottom=0)
        if peak:
            ax.axhline(1.0, color="black", linewidth=1, label=f"peak DRAM {peak:.0f} GB/s")
            ax.set_ylim(0, max(1.1, ax.get_ylim()[1]))
        if copy:
            ax.axhline(copy / scale, color="gray", linestyle="--", linewidth=1, label=f"measured copy {copy:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(report.x)
        ax.set_ylabel("fraction of peak DRAM bandwidth" if peak else "achieved GB/s")
        ax.set_title(_title(report, key), fontsize=9)
        ax.legend(fontsize=7)
    what = (
        "achieved bandwidth / peak DRAM bandwidth"
        if peak
        else f"achieved GB/s (no peak DRAM bandwidth known for '{card}': no roof)"
    )
    return _finish(fig, report, what, path)


def bars(report: Report, path: Path) -> Path:
    cases = list(dict.fromkeys(tuple(r.case.items()) for r in report.rows))
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    by = {(tuple(r.case.items()), r.impl): r for r in report.rows}
    memory = any(r.peak_mib is not None for r in report.rows)
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(6.5 * (2 if memory else 1), 4), squeeze=False)
    width = 0.8 / len(impls)
    keys = report.panels or list(report.rows[0].case)
    labels = ["\n".join(f"{k}={dict(c)[k]}" for k in keys) for c in cases]
    # the memory panel only where some row measured its peak (the CPU rows do not)
    panels = ((lambda r: r.rate, report.unit), (lambda r: r.peak_mib, "peak MiB above the inputs"))[: len(axes[0])]
    for ax, (value, ylabel) in zip(axes[0], panels, strict=True):
        for j, impl in enumerate(impls):
            xs = [i + j * width for i in range(len(cases))]
            rows = [by.get((c, impl)) for c in cases]
            heights = [(value(r) or 0) if r else 0 for r in rows]
            ax.bar(xs, heights, width, label=impl)
            for x, h, r in zip(xs, heights, rows, strict=True):
                if ylabel == report.unit and r is not None and r.speedup and h:
                    ax.annotate(f"{r.speedup:.2f}x", (x, h), ha="center", va="bottom", fontsize=7)
                elif not h:
                    ax.annotate("not run", (x, 0), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return _finish(fig, report, f"{report.unit} (speed-up over {report.baseline})", path)


def render(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Every plot of the reports in ``out_dir`` (only the named ones if ``names``) into ``out_dir/plots``."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    for report in load_reports(out_dir):
        if (names is not None and report.name not in names) or not report.rows:
            continue
        if report.x is None:
            paths.append(bars(report, plots / f"{report.name}.png"))
            continue
        paths.append(speedup(report, plots / f"{report.name}_speedup.png"))
        if report.unit == "GB/s":
            paths.append(roofline(report, plots / f"{report.name}_roofline.png"))
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not any(out.glob("*.json")):
        print(f"plots: no result files (*.json) in {out}", file=sys.stderr)
        return 1
    for path in render(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
