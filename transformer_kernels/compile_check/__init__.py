"""Offline compile check: every kernel compiled and resource-checked for the A100 and H100, no GPU needed.

``python -m transformer_kernels compile-check [--arch 80,90] [--kernel PATTERN] [--jobs N] [--json FILE]``

Triton kernels: the package's real launchers run representative problems on fake CUDA tensors
(``problems.py``); each launch is specialised as a GPU launch would be, each autotuner expanded into
every config its pruning keeps, and each compiled for sm_80 and sm_90 by Triton's bundled ptxas.
``--cuda`` does the same for the CUDA extension's kernels (``cuda.py``, nvcc ``-Xptxas -v``).

A row fails when it does not compile, cannot launch (shared memory over the arch's opt-in maximum,
more than 1024 threads, more registers than an SM has), or spills: the launch that runs untuned
(``TK_AUTOTUNE=0``, and every kernel that is not autotuned) must not spill at all, an autotune
candidate may spill up to ``SPILL_BUDGET`` bytes. A ``@triton.jit`` function of the package that no
problem reaches fails the run too. Today's exceptions sit in ``problems.KNOWN_OFFENDERS``.

What this proves: the kernels compile for both GPUs and every config can launch there, with the
resources listed. What it cannot: that a kernel computes the right thing (the test suite, against
the references) or how fast it runs (the benchmarks, on a GPU).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from . import core

# Spill budget of an autotune candidate that is not the untuned default, in bytes per thread
# (spill stores + spill loads, as ptxas reports them). Local memory is cached in L1, so a few
# hundred bytes of spill traffic per thread costs a few percent at most, and the autotuner only
# keeps such a config where it measured it fastest; kilobytes mean the tile does not fit the
# register file and the candidate only wastes tuning time. The untuned default (what TK_AUTOTUNE=0
# and every untuned kernel runs) has a budget of 0: nothing measured chose it.
SPILL_BUDGET = 512


def run_check(
    problems: Iterable[core.Problem],
    modules: Iterable,
    archs: Iterable[int] = (80, 90),
    kernel: str | None = None,
    workers: int = 1,
    spill_budget: int = SPILL_BUDGET,
    known: Iterable[core.KnownOffender] = (),
    progress=None,
) -> dict:
    """Capture, compile and judge; returns the report (``rows``, ``unreached``, ``stale``, ``failed``)."""
    known = list(known)
    archs = list(archs)
    modules = list(modules)
    launches = core.capture(problems)
    reached = set()
    for launch in launches:
        reached.add(core.kernel_name(launch.fn))
        reached |= core.callees(launch.fn)
    if kernel:
        launches = [x for x in launches if matches_kernel(core.kernel_name(x.fn), kernel)]
    rows: dict[core.Job, dict] = {}
    for launch in launches:
        for arch in archs:
            job = core.specialise(launch, arch)
            row = rows.setdefault(
                job,
                {
                    "kernel": core.kernel_name(launch.fn),
                    "config": core.config_label(launch),
                    "flags": core.flags_label(launch),
                    "arch": arch,
                    "problems": [],
                    "default": False,
                    "tuned": False,
                },
            )
            if launch.problem not in row["problems"]:
                row["problems"].append(launch.problem)
            row["default"] |= launch.default
            row["tuned"] |= launch.tuned
    # Round robin over the kernels, so that an interrupted run has looked at each of them.
    by_kernel: dict[str, list[core.Job]] = {}
    for job in rows:
        by_kernel.setdefault(job.qualname, []).append(job)
    queues = list(by_kernel.values())
    jobs = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    start = time.monotonic()
    results = core.compile_all(jobs, workers, progress)
    seconds = time.monotonic() - start
    out = [{**rows[job], **result} for job, result in zip(jobs, results, strict=True) if result is not None]
    unreached = sorted(set(core.jit_functions(modules)) - reached) if kernel is None else []
    full_sweep = kernel is None and set(archs) == set(core.ARCHS)
    report = {"versions": versions(), "archs": archs, "compile_seconds": round(seconds, 1), "unreached": unreached}
    report["not_compiled"] = len(jobs) - len(out)  # interrupted
    return finish(report, out, spill_budget, known, full_sweep and not report["not_compiled"])


def finish(report: dict, rows: list[dict], spill_budget: int, known: list[core.KnownOffender], full_sweep: bool):
    """Occupancy and verdict of every compiled row; the stale known offenders; pass or fail."""
    version = report["versions"]["triton"]
    for row in rows:
        if "error" not in row:
            row["blocks_per_sm"] = core.blocks_per_sm(
                core.ARCHS[row["arch"]], row["threads"], row["registers"], row["shared"]
            )
        row["verdict"], row["reason"] = core.judge(row, spill_budget, known, version)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["problems"][0], r["config"]))
    stale = []
    if full_sweep:
        stale = [
            o
            for o in known
            if fnmatch.fnmatchcase(version, o.triton)
            and not any(r["verdict"] == "known" and o.matches(r, version) for r in rows)
        ]
    # A stale entry is reported, not failed: a kernel fixed on one branch must not turn another's CI
    # red before its entry can be deleted in the same merge.
    failed = any(r["verdict"] == "FAIL" for r in rows) or bool(report["unreached"] or report.get("not_compiled"))
    return {
        **report,
        "spill_budget": spill_budget,
        "compiles": len(rows),
        "rows": rows,
        "stale_known_offenders": [vars(o) for o in stale],
        "failed": failed,
    }


def rejudge(paths: list[Path]) -> dict:
    """Saved Triton reports (one, or several such as one per ``--kernel`` group) judged again with
    today's known offenders and budget, without compiling; reachability is the reports' own."""
    from . import problems

    reports = [json.loads(Path(p).read_text()) for p in paths]
    drop = ("verdict", "reason", "blocks_per_sm")
    rows = [{k: v for k, v in r.items() if k not in drop} for x in reports for r in x["rows"]]
    report = {
        "versions": reports[0]["versions"],
        "archs": sorted({a for x in reports for a in x["archs"]}),
        "compile_seconds": round(sum(x["compile_seconds"] for x in reports), 1),
        "unreached": sorted({k for x in reports for k in x["unreached"]}),
        "not_compiled": sum(x.get("not_compiled", 0) for x in reports),
    }
    return finish(report, rows, SPILL_BUDGET, problems.KNOWN_OFFENDERS, full_sweep=False)


def matches_kernel(name: str, patterns: str) -> bool:
    """Whether ``name`` contains one of the comma-separated globs ``patterns``."""
    return any(fnmatch.fnmatchcase(name, f"*{p.strip()}*") for p in patterns.split(",") if p.strip())


def versions() -> dict:
    import torch
    import triton

    info = {"triton": triton.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        info["triton_ptxas"] = get_ptxas(90).version
    except Exception:  # noqa: BLE001 -- older Triton spells it differently; the version is a nicety
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
    except OSError:
        pass
    return info


def _spill(r: dict) -> str:
    return f"{r['spill_stores']}/{r['spill_loads']}" if "error" not in r else "-"


def table(report: dict, markdown: bool = False) -> str:
    """One row per compile: kernel, problem, config, arch, shared memory, registers, spills, blocks/SM,
    verdict. ``spill st/ld``: bytes of spill stores / loads per thread."""
    head = ["kernel", "problem", "config", "arch", "smem B", "regs", "spill st/ld", "blocks/SM", "verdict"]
    lines = []
    for r in report["rows"]:
        problem = r["problems"][0] + (f" (+{len(r['problems']) - 1})" if len(r["problems"]) > 1 else "")
        config = r["config"] + (" [default]" if r["default"] else "")
        verdict = r["verdict"] + (f": {r['reason']}" if r["reason"] else "")
        ok = "error" not in r
        lines.append(
            [
                r["kernel"].rsplit(".", 1)[-1],
                problem,
                config,
                f"sm_{r['arch']}",
                f"{r['shared']:,}" if ok else "-",
                str(r["registers"]) if ok else "-",
                _spill(r),
                str(r["blocks_per_sm"]) if ok else "-",
                verdict,
            ]
        )
    if markdown:
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
        return "\n".join(rows)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*line) for line in [head, *lines])


def summary(report: dict) -> str:
    rows = report["rows"]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("ok", "known", "FAIL")}
    lines = [
        f"{report['compiles']} compiles for {', '.join(f'sm_{a}' for a in report['archs'])} in "
        f"{report['compile_seconds']} s: {counts['ok']} ok, {counts['known']} known offenders, "
        f"{counts['FAIL']} failed (spill budget of autotune candidates: {report['spill_budget']} B)"
    ]
    lines += [f"UNREACHED: {name}: no problem launches it" for name in report["unreached"]]
    if report.get("not_compiled"):
        lines.append(f"INCOMPLETE: {report['not_compiled']} compiles not run (interrupted)")
    lines += [
        f"STALE known offender {o['kernel']} / {o['problem']} / {o['config']} / arch {o['arch']}: it no "
        f"longer fails; delete its entry (the list only shrinks)"
        for o in report["stale_known_offenders"]
    ]
    lines.append("FAILED" if report["failed"] else "PASSED")
    return "\n".join(lines)


def markdown(report: dict, what: str) -> str:
    v = report["versions"]
    tools = ", ".join(f"{k} {v[k]}" for k in ("triton", "triton_ptxas", "nvcc", "torch", "torch_cuda") if k in v)
    return "\n".join(
        [
            f"# Offline compile check: {what}",
            "",
            f"`python -m transformer_kernels compile-check{' --cuda' if 'nvcc' in v else ''}` at commit "
            f"{v.get('commit', '?')}; {tools}. Shared memory per block, registers per thread, spill "
            "bytes per thread (stores/loads) from ptxas, resident blocks per SM; `[default]` marks the "
            "config that runs untuned (TK_AUTOTUNE=0).",
            "",
            "```",
            summary(report),
            "```",
            "",
            table(report, markdown=True),
            "",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer_kernels compile-check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument(
        "--kernel", help="only kernels whose qualified name contains one of these comma-separated globs"
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile workers (default 1)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown here")
    parser.add_argument("--cuda", action="store_true", help="check the CUDA extension's kernels instead")
    parser.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    parser.add_argument(
        "--rejudge", type=Path, nargs="+", metavar="JSON", help="judge saved reports again, without compiling"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.cuda:
        parser.error("TRITON_INTERPRET=1 turns the kernels into interpreted functions; unset it to compile them")
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        parser.error(f"--arch takes comma-separated compute capabilities such as 80,90 (got {args.arch!r})")
    if unknown := set(archs) - set(core.ARCHS):
        parser.error(f"--arch {sorted(unknown)} not supported; choose from {sorted(core.ARCHS)}")
    if args.rejudge:
        report = rejudge(args.rejudge)
    elif args.cuda:
        from . import cuda

        report = cuda.run_check(archs, kernel=args.kernel, workers=args.jobs)
    else:
        from . import problems

        report = run_check(
            problems.problems(),
            problems.modules(),
            archs,
            kernel=args.kernel,
            workers=args.jobs,
            known=problems.KNOWN_OFFENDERS,
            progress=_progress,
        )
    failed = {**report, "rows": [r for r in report["rows"] if r["verdict"] != "ok"]}
    if not args.quiet:
        print(table(report))
        if failed["rows"]:
            # Again, next to the summary: a log read from its tail shows what failed, not the last rows.
            print("\nnot ok:")
    if failed["rows"] or args.quiet:
        print(table(failed))
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report, "CUDA extension" if args.cuda else "Triton kernels"))
    return 1 if report["failed"] else 0


def _progress(done: int, total: int) -> None:
    if done == total or done % 25 == 0:
        print(f"compiled {done}/{total}", file=sys.stderr, flush=True)
