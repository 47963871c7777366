"""The benchmark methodology, shared by every ``bench_<op>.py``, the suite, the plots and the README.

- Correct first: each benchmark checks each implementation's output against the baseline before
  timing it, on random inputs (never zeros).
- GPU timing: ``triton.testing.do_bench``: warm-up, CUDA events, and the L2 cache flushed before
  every repeat, so one input set serves and small sizes are not flattered; the median of the
  repeats (as many as fit in ``rep`` ms: many for an op, fewer for a long call). Calls too long for
  that (a training step) are timed one by one with CUDA events: :func:`time_steps_ms`.
- CPU timing: wall-clock, a warm-up call per input set, then the median of the repeats, cycling
  through several freshly generated input sets (:func:`input_sets`) so the caches hold no warm copy
  of the next call's inputs. CPU numbers are smoke runs: they check that the benchmark works.
- Results are ratios against the baseline measured in the same run, on the same device, plus the
  achieved rate (GB/s, TFLOP/s, tokens/s) for the byte or FLOP count each benchmark writes down in
  its report's ``counts``; memory-bound ops are also placed against the card's peak DRAM bandwidth
  (:data:`PEAK_DRAM_GBPS`).
- Output: a markdown table on the terminal and in ``<out>/<name>.md``, ``<out>/<name>.csv``, and
  ``<out>/<name>.json`` with the environment (card, driver, torch, triton, commit, date).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from transformer_kernels.info import environment

# The dtypes' one spelling, in case labels, results and on every command line (which also takes
# torch's names: DTYPE_ALIASES).
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
PASSES = ("fwd", "bwd", "fwd+bwd")
UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}

# Peak DRAM bandwidth in GB/s (vendor data sheets), matched on torch.cuda.get_device_name():
# each entry is (words that must all appear in the name, peak). First match wins.
PEAK_DRAM_GBPS = (
    (("H200",), 4800.0),
    (("H100", "PCIe"), 2000.0),
    (("H100", "HBM3"), 3350.0),  # "NVIDIA H100 80GB HBM3" is the SXM card
    (("H100", "SXM"), 3350.0),
    (("A100", "SXM4", "80GB"), 2039.0),
    (("A100", "40GB"), 1555.0),  # SXM4 and PCIe alike
)

CPU_REPEATS = {True: 5, False: 15}  # quick -> repeats
CPU_CACHE_BYTES = 32 * 2**20  # enough input sets to exceed a last-level cache of this size...
CPU_MAX_SETS = 8  # ...but no more than this many


def standalone_parser(
    doc: str, quick_help: str | None = "fewer sizes and repeats", dtype_help: str | None = None
) -> argparse.ArgumentParser:
    """The command line every ``bench_<op>.py`` shares (--quick, --dtype, --out, --plot); each
    benchmark adds its own options to it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dtype", nargs="+", type=parse_dtype, metavar=DTYPE_METAVAR, default=None, help=dtype_help)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    return parser


DTYPE_METAVAR = "{" + ",".join(DTYPES) + "}"


def parse_dtype(text: str) -> torch.dtype:
    """A command line's dtype: ``bf16``, ``fp16``, ``fp32``, or torch's name (``bfloat16``, ...)."""
    key = DTYPE_ALIASES.get(text.lower(), text.lower())
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})"
        )
    return DTYPES[key]


def chosen_dtypes(args: argparse.Namespace) -> list[torch.dtype] | None:
    """The dtypes of a :func:`standalone_parser` command line; None: the benchmark's default."""
    return list(dict.fromkeys(args.dtype)) if args.dtype else None


def label(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    return next(k for k, v in DTYPES.items() if v == dtype) if dtype in DTYPES.values() else str(dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def card(device: torch.device) -> str:
    """The GPU's name as torch reports it, or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_dram_gbps(card_name: str) -> float | None:
    """The card's peak DRAM bandwidth (GB/s), or None for a card not in :data:`PEAK_DRAM_GBPS`."""
    for words, peak in PEAK_DRAM_GBPS:
        if all(w.lower() in card_name.lower() for w in words):
            return peak
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def autotune(on: bool) -> Iterator[None]:
    """Autotune the Triton tiles (or take each bucket's first candidate) inside the block, through
    TK_AUTOTUNE, which the kernels read at each call; the variable is restored afterwards."""
    before = os.environ.get("TK_AUTOTUNE")
    os.environ["TK_AUTOTUNE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TK_AUTOTUNE"]
        else:
            os.environ["TK_AUTOTUNE"] = before


def input_sets(make: Callable[[int], tuple], device: torch.device, nbytes: int) -> list[tuple]:
    """The input sets a timing cycles through: ``make(seed)`` for each seed. One on a GPU (do_bench
    flushes L2 before every repeat); on a CPU enough to exceed :data:`CPU_CACHE_BYTES` of
    ``nbytes`` each, at least 2 and at most :data:`CPU_MAX_SETS`."""
    if device.type == "cuda":
        return [make(0)]
    return [make(seed) for seed in range(min(max(2, math.ceil(CPU_CACHE_BYTES / max(nbytes, 1))), CPU_MAX_SETS))]


def time_ms(
    fn: Callable[..., object], device: torch.device, *, quick: bool = False, inputs: Sequence[tuple] = ((),)
) -> float:
    """Median milliseconds of one call ``fn(*args)``, ``args`` cycling through ``inputs``."""
    if device.type == "cuda":
        import triton.testing

        args = inputs[0]
        return float(
            triton.testing.do_bench(
                lambda: fn(*args), warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"
            )
        )
    for args in inputs:  # warm-up: first-call allocations and lazy initialisation, per set
        fn(*args)
    times = []
    for i in range(max(CPU_REPEATS[quick], len(inputs))):
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_steps_ms(step: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``step()`` for calls too long for do_bench's time budget (a training
    step): ``warmup`` calls, then ``repeats`` calls each timed alone (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, *, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds of each ``fns[name]()``, one per repeat, timed in turn: each repeat calls every
    function once, so a change in a shared machine's load hits them all alike (a CPU A/B test; the
    ratios mean something where the absolute times may not), in an order shuffled anew for every
    repeat (seeded), so that no function always runs first, last, or after the same other one (a
    fixed rotation of three functions puts the second always after the first or the third). One
    warm-up call each first. The i-th times of all functions come from the same repeat: pairs for
    :func:`paired_ratio`."""
    if not fns or repeats < 1:
        raise ValueError(f"interleaved_times: needs at least one function and one repeat (got {len(fns)}, {repeats})")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    order = list(fns.items())
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(base: Sequence[float], other: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """How many times faster ``other`` ran than ``base``, from paired times (the i-th of each timed
    in the same repeat, as :func:`interleaved_times` gives them): the median of the per-repeat
    ratios ``base[i] / other[i]``, and a distribution-free confidence interval for it of at least
    ``level`` coverage: the order statistics ``[r_(j), r_(n+1-j)]`` of the n sorted ratios with
    the largest j whose coverage, ``1 - 2 P(Binomial(n, 1/2) <= j - 1)``, is still >= ``level``
    (the repeats taken as independent). Below 6 repeats no pair of order statistics reaches 95%:
    the interval is then the ratios' range (coverage ``1 - 2^(1-n)``). A ratio taken within one
    repeat cancels the load drifting between repeats, which the ratio of two medians does not; an
    interval that contains 1.00 says the run cannot tell the two apart."""
    if len(base) != len(other) or not base:
        raise ValueError(
            f"paired_ratio: needs two equally long, non-empty lists of times (got {len(base)}, {len(other)})"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_ratio: level must be in (0, 1) (got {level})")
    ratios = sorted(b / o for b, o in zip(base, other, strict=True))
    n = len(ratios)
    j, cdf = 1, (1 + n) / 2**n  # cdf: P(Binomial(n, 1/2) <= j), what the interval of j + 1 leaves out each side
    while j < (n + 1) // 2 and 1.0 - 2.0 * cdf >= level:
        j += 1
        cdf += math.comb(n, j) / 2**n
    return statistics.median(ratios), ratios[j - 1], ratios[n - j]


def time_passes(
    fn: Callable[..., torch.Tensor], sets: Sequence[tuple], device: torch.device, quick: bool
) -> dict[str, float]:
    """Milliseconds of the forward, the backward and forward + backward of ``fn``.

    Each set is ``(inputs, grad)``: ``fn(*inputs)`` returns one tensor, ``grad`` is its incoming
    gradient, and the backward is taken w.r.t. the inputs that require grad."""

    def wrt(inputs):
        return tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)

    with torch.no_grad():
        fwd = time_ms(lambda inputs, g: fn(*inputs), device, quick=quick, inputs=sets)
    outs = [(fn(*inputs), inputs, g) for inputs, g in sets]
    bwd = time_ms(
        lambda out, inputs, g: torch.autograd.grad(out, wrt(inputs), g, retain_graph=True),
        device,
        quick=quick,
        inputs=outs,
    )
    del outs
    both = time_ms(lambda inputs, g: torch.autograd.grad(fn(*inputs), wrt(inputs), g), device, quick=quick, inputs=sets)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
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


@dataclass(frozen=True)
class Impl:
    """One implementation a benchmark measures (a column of its tables), or why it does not run here.

    ``fn`` takes the benchmark's inputs; with ``compile`` it is handed to ``torch.compile`` (static
    shapes, after a dynamo reset) afresh for every case. ``check`` says whether its output is
    compared with the case's expected output before timing (a baseline compared with itself need
    not be). ``refuses``: exceptions of the first call that mean "cannot take these inputs" (an
    SDPA backend that has no kernel for them, an out-of-memory): the case records it as not run,
    with the error's first line, instead of failing the benchmark."""

    name: str
    fn: Callable[..., Any] | None = None
    why_not: str | None = None  # set: not run anywhere in this benchmark (fn is None)
    compile: bool = False
    check: bool = True
    refuses: tuple[type[BaseException], ...] = ()

    @classmethod
    def unless(cls, why_not: str | None, name: str, fn: Callable[..., Any], **kw: Any) -> Impl:
        """``fn`` as ``name``, or not run for the reason ``why_not`` when there is one."""
        return cls(name, why_not=why_not, **kw) if why_not else cls(name, fn, **kw)

    def not_run(self, why: str) -> Impl:
        """This implementation, not run (for one case: a size it cannot hold, ...)."""
        return replace(self, fn=None, why_not=why)


@dataclass
class Measured:
    """What :func:`measure` found for one case: ``timings[pass][impl]`` (ms, None: not run), why
    each implementation that did not run did not, and peak memory per implementation."""

    timings: dict[str, dict[str, float | None]]
    notes: dict[str, str] = field(default_factory=dict)
    peaks: dict[str, float | None] = field(default_factory=dict)


def measure(
    impls: Sequence[Impl],
    timer: Callable[[Callable[..., Any]], dict[str, float]],
    device: torch.device,
    *,
    check: Callable[[Impl, Callable[..., Any]], None] | None = None,
    peak: Callable[[Callable[..., Any]], object] | None = None,
    passes: Sequence[str] = PASSES,
) -> Measured:
    """The one run/skip/compile loop of the op benchmarks, for one case: for each implementation,
    not run (and why), or compiled if asked, checked (``check(impl, fn)`` raises when it is wrong:
    the benchmark fails; an exception in ``impl.refuses`` marks it not run instead), timed
    (``timer(fn)`` -> milliseconds per pass) and, with ``peak``, the peak memory of one ``peak(fn)``."""
    result = Measured({p: {} for p in passes})

    def not_run(impl: Impl, why: str) -> None:
        result.notes[impl.name] = why
        result.peaks[impl.name] = None
        for per_pass in result.timings.values():
            per_pass[impl.name] = None

    for impl in impls:
        if impl.fn is None:
            not_run(impl, impl.why_not or "not available")
            continue
        fn = impl.fn
        if impl.compile:
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        if check is not None and impl.check:
            try:
                check(impl, fn)
            except impl.refuses as e:
                not_run(impl, str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
        for p, ms in timer(fn).items():
            result.timings[p][impl.name] = ms
        if peak is not None:
            result.peaks[impl.name] = peak_mib(lambda fn=fn: peak(fn), device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


@dataclass
class Row:
    """One measurement: an implementation of a case, against the baseline of the same case."""

    case: dict
    impl: str
    ms: float | None
    rate: float | None  # work per second, in the report's unit
    speedup: float | None  # baseline time / this time
    note: str = ""
    peak_mib: float | None = None  # peak memory of one call above its inputs (GPU only)


@dataclass
class Report:
    """One benchmark's results. ``x`` names the swept size (the x axis of its plots) and ``panels``
    the case keys that split the plots into panels; other case keys follow from those."""

    name: str
    counts: str  # how the work (bytes or FLOPs) behind the rate was counted, kept with the results
    device: str  # where it ran: "cpu", "cuda", "cuda:1"
    unit: str = "GB/s"  # a key of UNITS
    baseline: str = "the baseline"  # named in the table's caption
    x: str | None = None
    panels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines printed under the tables
    errors: list[str] = field(default_factory=list)  # measurements that failed (the suite exits non-zero)
    meta: dict = field(default_factory=dict)  # measured context other than rows (copy bandwidth, ...)
    rows: list[Row] = field(default_factory=list)
    environment: dict = field(default_factory=dict)  # filled by write() (and by from_dict)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The report a JSON file written by :meth:`write` holds."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "rows"}
        fields.setdefault("device", "cpu" if data.get("environment", {}).get("card", "cpu") == "cpu" else "cuda")
        return cls(**fields, rows=[Row(**r) for r in data["rows"]])

    def add_case(
        self,
        case: dict,
        timings: dict[str, float | None],
        work: float,
        baseline: str,
        notes: dict[str, str] | None = None,
        peaks: dict[str, float | None] | None = None,
    ) -> None:
        """Rows for one case: ``work`` bytes or FLOPs per call, speed-ups over ``timings[baseline]``."""
        base = timings.get(baseline)
        for impl, ms in timings.items():
            self.rows.append(
                Row(
                    case=case,
                    impl=impl,
                    ms=ms,
                    rate=None if ms is None else work / (ms * 1e-3) / UNITS[self.unit],
                    speedup=None if ms is None or base is None else base / ms,
                    note=(notes or {}).get(impl, ""),
                    peak_mib=(peaks or {}).get(impl),
                )
            )

    def _by_case(self) -> tuple[list[str], list[str], dict[tuple, dict[str, Row]]]:
        keys = list(self.rows[0].case)
        impls = list(dict.fromkeys(r.impl for r in self.rows))
        cases: dict[tuple, dict[str, Row]] = {}
        for r in self.rows:
            cases.setdefault(tuple(r.case[k] for k in keys), {})[r.impl] = r
        return keys, impls, cases

    def markdown(self) -> str:
        """One line per case, one column per implementation: the rate and the speed-up over the
        baseline; then the peak memory, where measured; then the notes."""
        if not self.rows:
            return "(no results)"
        keys, impls, cases = self._by_case()
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
        lines += ["", f"{self.unit} (speed-up over {self.baseline})"]
        if any(r.peak_mib is not None for r in self.rows):
            lines += ["", "Peak memory above the inputs, MiB (x less than the baseline):", ""]
            lines += ["| " + " | ".join(keys + impls) + " |", "|" + "---|" * (len(keys) + len(impls))]
            for case, by_impl in cases.items():
                base = by_impl.get(self.baseline)
                cells = [str(c) for c in case]
                for impl in impls:
                    p = by_impl[impl].peak_mib if impl in by_impl else None
                    ratio = f" ({base.peak_mib / p:.1f}x)" if p and base is not None and base.peak_mib else ""
                    cells.append("—" if p is None else f"{p:.0f}{ratio}")
                lines.append("| " + " | ".join(cells) + " |")
        skipped = {r.impl: r.note for r in self.rows if r.ms is None and r.note}
        lines += [f"- {impl}: not run ({note})" for impl, note in skipped.items()]
        lines += [f"- {n}" for n in self.notes]
        lines += [f"- FAILED: {e}" for e in self.errors]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> dict:
        """``<name>.md``, ``.csv`` and ``.json`` in ``out_dir``; returns the environment recorded."""
        out_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment = run_environment(torch.device(self.device))
        header = (
            f"# {self.name}\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in env.items())
            + f"\n- {self.unit} from: {self.counts}\n\n"
        )
        (out_dir / f"{self.name}.md").write_text(header + self.markdown() + "\n")
        with open(out_dir / f"{self.name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = list(self.rows[0].case) if self.rows else []
            w.writerow(keys + ["impl", "ms", self.unit, "speedup", "peak_mib", "note"])
            for r in self.rows:
                w.writerow([r.case[k] for k in keys] + [r.impl, r.ms, r.rate, r.speedup, r.peak_mib, r.note])
        (out_dir / f"{self.name}.json").write_text(json.dumps(asdict(self), indent=1))
        return env


def run_environment(device: torch.device) -> dict:
    """:func:`transformer_kernels.info.environment` plus the name and peak bandwidth of the card
    that ran (``"cpu"``), the commit and the date: what every result file carries."""
    env = environment()
    name = card(device)
    env.update(
        card=name,
        peak_dram_gbps=peak_dram_gbps(name),
        commit=git_commit(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return env


def load_reports(out_dir: Path) -> list[Report]:
    """Every report in ``out_dir`` (the JSON files :meth:`Report.write` wrote), sorted by name."""
    reports = []
    for path in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and {"name", "rows", "unit", "counts"} <= data.keys():
            reports.append(Report.from_dict(data))
    return reports
