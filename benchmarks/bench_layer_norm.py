"""Benchmark of ``dropout_add_layer_norm``: the post-LN step ``LayerNorm(residual + dropout(x))``.

Implementations, all measured in the same run on the same device:
  eager    torch: F.layer_norm(F.dropout(x) + residual)   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels, backend='triton'
  cuda     transformer_kernels, backend='cuda'
On a CPU only the eager baseline and the package's reference backend run (smoke sizes).

    python benchmarks/bench_layer_norm.py [--quick] [--dtype bf16 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformer_kernels as tk  # noqa: E402
from common import Report, time_ms  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwd+bwd")
DROPOUT_P = 0.1
EPS = 1e-5
BYTE_COUNTS = (
    "fwd: read x, residual, write out = 3*M*N*elt; bwd: read dout, s, write dx, dresidual = 4*M*N*elt; "
    "fwd+bwd: read x, residual, dout, write out, dx, dresidual = 6*M*N*elt (+ weight/bias and their "
    "grads, 2*N*elt each way); intermediates a fused kernel keeps (s, statistics) are not counted"
)


def eager(x, r, w, b, p=DROPOUT_P):
    return F.layer_norm(F.dropout(x, p, training=True) + r, (x.shape[-1],), w, b, EPS)


def package(backend):
    return lambda x, r, w, b, p=DROPOUT_P: tk.dropout_add_layer_norm(x, r, w, b, p, EPS, backend=backend)


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"eager": eager}
    if device.type != "cuda":
        impls["reference"] = package("reference")
        impls["compile"] = impls["triton"] = impls["cuda"] = "needs a CUDA device"
        return impls
    impls["compile"] = "compile"  # compiled per shape, in run_case
    for backend in ("triton", "cuda"):
        reason = tk.backends.why_not("dropout_add_layer_norm", backend, device, torch.float16, hidden=1)
        impls[backend] = package(backend) if reason is None else reason
    return impls


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """The measured device-copy ceiling: bytes read + written by a large clone, per second."""
    src = torch.randn(2**26 if device.type == "cuda" else 2**22, device=device)
    ms = time_ms(lambda: src.clone(), device, quick=quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def check(out, ref, name):
    """A sanity check of the package's forward without dropout (tests/ holds the rigorous ones)."""
    tol = 1e-4 if out.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=lambda m: f"{name} is wrong: {m}")


def run_case(n: int, m: int, dtype: torch.dtype, device: torch.device, impls: dict, quick: bool):
    torch.manual_seed(0)
    x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    g = torch.randn(m, n, device=device, dtype=dtype)
    inputs = (x, r, w, b)
    timings = {p: {} for p in PASSES}
    notes = {}
    with torch.no_grad():
        ref = F.layer_norm(x.float() + r.float(), (n,), w.float(), b.float(), EPS)
    for name, fn in impls.items():
        if isinstance(fn, str) and fn != "compile":
            notes[name] = fn
            for p in PASSES:
                timings[p][name] = None
            continue
        if fn == "compile":
            torch._dynamo.reset()
            fn = torch.compile(eager, dynamic=False)
        elif fn is not eager:
            with torch.no_grad():
                check(fn(*inputs, 0.0), ref, name)
        with torch.no_grad():
            timings["fwd"][name] = time_ms(lambda: fn(*inputs), device, quick=quick)
        out = fn(*inputs)
        timings["bwd"][name] = time_ms(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True),
                                       device, quick=quick)
        timings["fwd+bwd"][name] = time_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, g), device,
                                           quick=quick)
    return timings, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--hidden", nargs="+", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtypes = args.dtype or (list(DTYPES) if on_gpu else ["fp32"])
    hidden = args.hidden or ([1024, 4096, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 12288, 16384])
    if not on_gpu:
        hidden = args.hidden or [256, 1024]
    # Rows such that each [M, N] tensor is 64 MiB of fp16 on the GPU (L2 is 50 MiB): data >> L2.
    elements = (2**25 if args.quick else 2**26) if on_gpu else 2**16
    impls = implementations(device)
    copy_gbps = copy_bandwidth_gbps(device, args.quick)

    report = Report("bench_layer_norm", BYTE_COUNTS + f"; measured copy bandwidth: {copy_gbps:.0f} GB/s",
                    baseline="eager")
    for dt in dtypes:
        dtype = DTYPES[dt]
        elt = torch.tensor([], dtype=dtype).element_size()
        for n in hidden:
            m = max(elements // n, 1)
            timings, notes = run_case(n, m, dtype, device, impls, args.quick)
            per_pass_bytes = {"fwd": 3 * m * n * elt + 2 * n * elt, "bwd": 4 * m * n * elt + 4 * n * elt,
                              "fwd+bwd": 6 * m * n * elt + 6 * n * elt}
            for p in PASSES:
                case = {"dtype": dt, "M": m, "N": n, "pass": p}
                report.add_case(case, timings[p], per_pass_bytes[p], baseline="eager", notes=notes)
    for row in report.rows:
        if row.rate is not None:
            row.note = f"{100 * row.rate / copy_gbps:.0f}% of copy bandwidth"
    report.write(args.out)
    print(report.markdown())
    print(f"\ndevice: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; copy bandwidth {copy_gbps:.0f} GB/s; "
          f"results in {args.out}/")
    if args.plot:
        plot(report, args.out / "bench_layer_norm.png", copy_gbps)
    return 0


def plot(report: Report, path: Path, copy_gbps: float) -> None:
    """GB/s against hidden size: one panel per (dtype, pass), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r.case["dtype"] for r in report.rows})
    fig, axes = plt.subplots(len(dtypes), len(PASSES), figsize=(5 * len(PASSES), 3.6 * len(dtypes)),
                             squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, p in enumerate(PASSES):
            ax = axes[i][j]
            rows = [r for r in report.rows if r.case["dtype"] == dt and r.case["pass"] == p and r.rate]
            for impl in dict.fromkeys(r.impl for r in rows):
                pts = [(r.case["N"], r.rate) for r in rows if r.impl == impl]
                ax.plot(*zip(*pts), marker="o", label=impl)
            ax.axhline(copy_gbps, color="gray", linestyle="--", label="copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dt} {p}")
            ax.set_xlabel("hidden size N")
            ax.set_ylabel("GB/s")
            ax.legend(fontsize=7)
    fig.suptitle("dropout_add_layer_norm (post-LN, p=0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
