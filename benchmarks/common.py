"""The benchmark methodology, shared by every ``bench_<op>.py``.

- Correct first: each benchmark checks each implementation's output against the baseline before
  timing it, on random inputs (never zeros).
- GPU timing: ``triton.testing.do_bench`` (warm-up, CUDA events, the L2 cache flushed before every
  repeat so small sizes are not flattered), the median of the repeats.
- CPU timing: wall-clock median over repeats after a warm-up (CPU numbers are for smoke runs only).
- Results are ratios against the baseline measured in the same run, on the same device, plus the
  achieved rate (GB/s, TFLOP/s) for the byte or FLOP count each benchmark writes down.
- Output: a markdown table on the terminal and in ``<out>/<name>.md``, ``<out>/<name>.csv``, and
  ``<out>/<name>.json`` with the environment (card, driver, torch, triton, commit, date).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from transformer_kernels.info import environment


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory of one call of ``fn`` above what was allocated before it, in MiB
    (None on a CPU, where ``fn`` still runs once)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Row:
    """One measurement: an implementation of a case, against the baseline of the same case."""

    case: dict
    impl: str
    ms: Optional[float]
    rate: Optional[float]  # work per second, in the report's unit
    speedup: Optional[float]  # baseline time / this time
    note: str = ""


UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}


@dataclass
class Report:
    name: str
    counts: str  # how the work (bytes or FLOPs) behind the rate was counted, kept with the results
    unit: str = "GB/s"  # a key of UNITS
    baseline: str = "the baseline"  # named in the table's caption
    rows: list[Row] = field(default_factory=list)

    def add_case(self, case: dict, timings: dict[str, Optional[float]], work: float, baseline: str,
                 notes: Optional[dict[str, str]] = None) -> None:
        """Rows for one case: ``work`` bytes or FLOPs per call, speed-ups over ``timings[baseline]``."""
        base = timings.get(baseline)
        for impl, ms in timings.items():
            self.rows.append(Row(
                case=case, impl=impl, ms=ms,
                rate=None if ms is None else work / (ms * 1e-3) / UNITS[self.unit],
                speedup=None if ms is None or base is None else base / ms,
                note=(notes or {}).get(impl, ""),
            ))

    def markdown(self) -> str:
        """One line per case, one column per implementation: the rate and the speed-up over the baseline."""
        if not self.rows:
            return "(no results)"
        keys = list(self.rows[0].case)
        impls = list(dict.fromkeys(r.impl for r in self.rows))
        cases: dict[tuple, dict[str, Row]] = {}
        for r in self.rows:
            cases.setdefault(tuple(r.case[k] for k in keys), {})[r.impl] = r
        lines = ["| " + " | ".join(keys + impls) + " |", "|" + "---|" * (len(keys) + len(impls))]
        for case, by_impl in cases.items():
            cells = [str(c) for c in case]
            for impl in impls:
                r = by_impl.get(impl)
                if r is None or r.ms is None:
                    cells.append("—")
                else:
                    cells.append(f"{r.rate:.3g} ({r.speedup:.2f}x)" if r.speedup else f"{r.rate:.3g}")
            lines.append("| " + " | ".join(cells) + " |")
        skipped = {r.impl: r.note for r in self.rows if r.ms is None and r.note}
        lines += ["", f"{self.unit} (speed-up over {self.baseline})"]
        lines += [f"- {impl}: not run ({note})" for impl, note in skipped.items()]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        env = environment()
        env.update(commit=git_commit(), date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        header = (f"# {self.name}\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items())
                  + f"\n- {self.unit} from: {self.counts}\n\n")
        (out_dir / f"{self.name}.md").write_text(header + self.markdown() + "\n")
        with open(out_dir / f"{self.name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = list(self.rows[0].case) if self.rows else []
            w.writerow(keys + ["impl", "ms", self.unit, "speedup", "note"])
            for r in self.rows:
                w.writerow([r.case[k] for k in keys] + [r.impl, r.ms, r.rate, r.speedup, r.note])
        data = {"name": self.name, "environment": env, "unit": self.unit, "counts": self.counts,
                "rows": [asdict(r) for r in self.rows]}
        (out_dir / f"{self.name}.json").write_text(json.dumps(data, indent=1))
        return env
