"""Benchmark of ``linear_cross_entropy``: the output layer's loss + backward, time and peak memory.

Implementations, all measured in the same run on the same device (loss, then backward to hidden
and weight):
  eager    torch: F.cross_entropy(F.linear(hidden, weight), target)   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels.linear_cross_entropy, backend='triton'
On a CPU only eager and the package's reference backend run (smoke sizes).

Peak memory: torch.cuda.max_memory_allocated() during one loss + backward, minus what was allocated
before it (the inputs); on a CPU it is not measured.

    python benchmarks/bench_cross_entropy.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformer_kernels as tk  # noqa: E402
from common import Report, peak_mib, time_ms  # noqa: E402

NAME = "bench_cross_entropy"
FLOP_COUNTS = ("the three GEMMs of loss + backward: logits = hidden weightᵀ, dhidden = dlogits weight, "
               "dweight = dlogitsᵀ hidden: 3 x 2*N*V*d (the softmax and loss are not counted)")


def eager(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def package(backend):
    return lambda h, w, t: tk.linear_cross_entropy(h, w, t, backend=backend)


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"eager": eager}
    if device.type != "cuda":
        impls["reference"] = package("reference")
        impls["compile"] = impls["triton"] = "needs a CUDA device"
        return impls
    impls["compile"] = "compile"  # compiled per shape, in run_case
    reason = tk.backends.why_not("linear_cross_entropy", "triton", device, torch.bfloat16)
    impls["triton"] = package("triton") if reason is None else reason
    return impls


def run_case(n, v, d, dtype, device, impls, quick):
    torch.manual_seed(0)
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device=device) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    timings, peaks, notes = {}, {}, {}
    ref = None
    for name, fn in impls.items():
        if isinstance(fn, str) and fn != "compile":
            notes[name], timings[name], peaks[name] = fn, None, None
            continue
        if fn == "compile":
            torch._dynamo.reset()
            fn = torch.compile(eager, dynamic=False)

        def step(fn=fn):
            return torch.autograd.grad(fn(h, w, t), (h, w))

        try:
            loss = fn(h, w, t).item()
        except torch.OutOfMemoryError:
            notes[name], timings[name], peaks[name] = "out of memory", None, None
            torch.cuda.empty_cache()
            continue
        ref = loss if ref is None else ref
        assert abs(loss - ref) <= 1e-2 * abs(ref), f"{name}: loss {loss} != eager's {ref}"
        peaks[name] = peak_mib(step, device)
        timings[name] = time_ms(step, device, quick=quick)
        if peaks[name] is not None:
            notes[name] = f"peak {peaks[name]:.0f} MiB"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return timings, peaks, notes


def memory_markdown(report: Report, peaks: dict) -> str:
    """One line per case: the peak memory of each implementation and its saving over eager."""
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    lines = ["| dtype | N | V | d | " + " | ".join(f"{i} peak" for i in impls) + " |",
             "|" + "---|" * (4 + len(impls))]
    for case, by_impl in peaks.items():
        base = by_impl.get("eager")
        cells = []
        for impl in impls:
            p = by_impl.get(impl)
            cells.append("—" if p is None else f"{p:.0f} MiB" + (f" ({base / p:.1f}x less)" if base and p else ""))
        lines.append("| " + " | ".join(map(str, case)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        dtype, d = torch.bfloat16, 1024
        cases = [(8192, 131072), (32768, 32768)] if args.quick else [(n, v) for n in (8192, 32768)
                                                                      for v in (32768, 131072)]
    else:
        dtype, d, cases = torch.float32, 64, [(256, 1000)]
    impls = implementations(device)
    report = Report(NAME, FLOP_COUNTS, unit="TFLOP/s", baseline="eager")
    peaks = {}
    for n, v in cases:
        timings, case_peaks, notes = run_case(n, v, d, dtype, device, impls, args.quick)
        dt = str(dtype).removeprefix("torch.")
        report.add_case({"dtype": dt, "N": n, "V": v, "d": d}, timings, 6 * n * v * d,
                        baseline="eager", notes=notes)
        peaks[(dt, n, v, d)] = case_peaks
    report.write(args.out)
    memory = memory_markdown(report, peaks)
    with open(args.out / f"{NAME}.md", "a") as f:
        f.write("\n## Peak memory (loss + backward, above the inputs)\n\n" + memory + "\n")
    print(report.markdown())
    print("\n" + memory)
    print(f"\ndevice: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; results in {args.out}/")
    if args.plot:
        plot(report, peaks, args.out / f"{NAME}.png")
    return 0


def plot(report: Report, peaks: dict, path: Path) -> None:
    """Time and peak memory per case, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(peaks)
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    ms = {(tuple(r.case.values()), r.impl): r.ms for r in report.rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(cases))]
        axes[0].bar(xs, [ms.get((c, impl)) or 0 for c in cases], width, label=impl)
        axes[1].bar(xs, [peaks[c].get(impl) or 0 for c in cases], width, label=impl)
    labels = [f"N={c[1]}\nV={c[2]}" for c in cases]
    for ax, title in zip(axes, ["loss + backward (ms)", "peak memory (MiB)"]):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], labels)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"linear_cross_entropy ({cases[0][0]}, d={cases[0][3]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
