"""Benchmark of ``ffn``: the position-wise feed-forward block ``dropout(act(x W1ᵀ + b1)) W2ᵀ + b2``.

Implementations, all measured in the same run on the same device:
  eager    torch: F.linear -> activation -> F.dropout -> F.linear   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels.ffn, backend='triton'
  cuda     transformer_kernels.ffn, backend='cuda'
  gemm     the bare cuBLAS GEMMs of the same shapes (torch.mm, no bias, activation or dropout):
           2 in the forward, 4 in the backward; the ceiling a fused FFN can reach
On a CPU only eager, gemm and the package's reference backend run (smoke sizes).

    python benchmarks/bench_ffn.py [--quick] [--dtype bf16 ...] [--d-model 1024 ...] [--tokens 16384 ...]
                                   [--activation relu] [--dropout 0.1] [--out DIR]

Tile configs: autotuned by default, the first candidate with --quick (autotuning every case costs
minutes of compiles); --autotune / --no-autotune override (through TK_AUTOTUNE, which the kernels read).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformer_kernels as tk  # noqa: E402
from common import Report, time_ms  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_COUNTS = (
    "fwd = 2 GEMMs = 4*T*d_model*d_ff; bwd = 4 GEMMs = 2 x fwd; fwd+bwd = 3 x fwd "
    "(bias, activation and dropout not counted)"
)


def eager(x, w1, b1, w2, b2, activation, p):
    h = F.linear(x, w1, b1)
    if activation == "relu":
        h = F.relu(h)
    elif activation in ("gelu", "gelu_tanh"):
        h = F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")
    return F.linear(F.dropout(h, p, training=True), w2, b2)


def package(backend):
    return lambda x, w1, b1, w2, b2, activation, p: tk.ffn(x, w1, b1, w2, b2, activation, p, backend=backend)


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"eager": eager}
    if device.type != "cuda":
        impls["reference"] = package("reference")
        impls["compile"] = impls["triton"] = impls["cuda"] = "needs a CUDA device"
    else:
        impls["compile"] = "compile"  # compiled per shape, in run_case
        for backend in ("triton", "cuda"):
            reason = tk.backends.why_not("ffn", backend, device, torch.float16)
            impls[backend] = package(backend) if reason is None else reason
    impls["gemm"] = "gemm"  # its own callables per pass, in run_case
    return impls


def bare_gemms(x, w1, w2, g):
    """(fwd, bwd, fwd+bwd) callables running only the FFN's GEMMs, into preallocated outputs."""
    t, d_ff = x.shape[0], w1.shape[0]
    h = torch.empty(t, d_ff, dtype=x.dtype, device=x.device)
    y, dh, dx = torch.empty_like(g), torch.empty_like(h), torch.empty_like(x)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)

    def fwd():
        torch.mm(x, w1.t(), out=h)
        torch.mm(h, w2.t(), out=y)

    def bwd():
        torch.mm(g, w2, out=dh)
        torch.mm(g.t(), h, out=dw2)
        torch.mm(dh, w1, out=dx)
        torch.mm(dh.t(), x, out=dw1)

    def both():
        fwd()
        bwd()

    return fwd, bwd, both


def check(out, ref, name):
    """A sanity check of the forward without dropout (tests/ holds the rigorous ones)."""
    tol = 1e-3 if out.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=lambda m: f"{name} is wrong: {m}")


def run_case(tokens, d_model, dtype, device, impls, activation, p, quick):
    torch.manual_seed(0)
    d_ff = 4 * d_model
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(d_ff, d_model, device=device) / d_model**0.5).to(dtype).requires_grad_()
    b1 = (0.1 * torch.randn(d_ff, device=device)).to(dtype).requires_grad_()
    w2 = (torch.randn(d_model, d_ff, device=device) / d_ff**0.5).to(dtype).requires_grad_()
    b2 = (0.1 * torch.randn(d_model, device=device)).to(dtype).requires_grad_()
    g = torch.randn(tokens, d_model, device=device, dtype=dtype)
    inputs = (x, w1, b1, w2, b2)
    with torch.no_grad():
        ref = eager(*(t.float() for t in inputs), activation, 0.0)
    timings = {ps: {} for ps in PASSES}
    notes = {}
    for name, fn in impls.items():
        if fn == "gemm":
            detached = [t.detach() for t in (x, w1, w2)]
            for ps, call in zip(PASSES, bare_gemms(*detached, g)):
                timings[ps][name] = time_ms(call, device, quick=quick)
            continue
        if isinstance(fn, str) and fn != "compile":
            notes[name] = fn
            for ps in PASSES:
                timings[ps][name] = None
            continue
        if fn == "compile":
            torch._dynamo.reset()
            fn = torch.compile(eager, dynamic=False)
        with torch.no_grad():
            check(fn(*inputs, activation, 0.0), ref, name)
            timings["fwd"][name] = time_ms(lambda: fn(*inputs, activation, p), device, quick=quick)
        out = fn(*inputs, activation, p)
        timings["bwd"][name] = time_ms(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True),
                                       device, quick=quick)
        del out
        timings["fwd+bwd"][name] = time_ms(lambda: torch.autograd.grad(fn(*inputs, activation, p), inputs, g),
                                           device, quick=quick)
    return timings, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats, no autotuning")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--d-model", nargs="+", type=int, default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--activation", choices=["none", "relu", "gelu", "gelu_tanh"], default="relu")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.autotune is not None or args.quick:
        os.environ["TK_AUTOTUNE"] = "1" if args.autotune else "0"
    activation = None if args.activation == "none" else args.activation

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        dtypes = args.dtype or (["bf16"] if args.quick else ["bf16", "fp16"])
        d_models = args.d_model or ([1024, 4096] if args.quick else [512, 1024, 4096])
        tokens = args.tokens or ([16384] if args.quick else [4096, 16384, 65536])
    else:
        dtypes, d_models, tokens = args.dtype or ["fp32"], args.d_model or [64], args.tokens or [256]
    impls = implementations(device)

    report = Report("bench_ffn", FLOP_COUNTS + f"; activation {args.activation}, dropout {args.dropout}",
                    unit="TFLOP/s", baseline="eager")
    for dt in dtypes:
        for d in d_models:
            for t in tokens:
                timings, notes = run_case(t, d, DTYPES[dt], device, impls, activation, args.dropout, args.quick)
                fwd_flops = 4 * t * d * 4 * d
                for ps, flops in zip(PASSES, (fwd_flops, 2 * fwd_flops, 3 * fwd_flops)):
                    case = {"dtype": dt, "tokens": t, "d_model": d, "d_ff": 4 * d, "pass": ps}
                    report.add_case(case, timings[ps], flops, baseline="eager", notes=notes)
    _note_fraction_of_gemm(report)
    report.write(args.out)
    print(report.markdown())
    print(f"\ndevice: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; results in {args.out}/")
    if args.plot:
        plot(report, args.out / "bench_ffn.png")
    return 0


def _note_fraction_of_gemm(report: Report) -> None:
    """Each row's rate as a share of the bare GEMMs' rate on the same case."""
    ceiling = {tuple(r.case.values()): r.rate for r in report.rows if r.impl == "gemm"}
    for r in report.rows:
        top = ceiling.get(tuple(r.case.values()))
        if r.rate is not None and top and r.impl != "gemm":
            r.note = f"{100 * r.rate / top:.0f}% of bare GEMMs"


def plot(report: Report, path: Path) -> None:
    """TFLOP/s against tokens: one panel per (dtype, d_model) and pass, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.case["dtype"], r.case["d_model"]) for r in report.rows))
    fig, axes = plt.subplots(len(panels), len(PASSES), figsize=(5 * len(PASSES), 3.4 * len(panels)), squeeze=False)
    for i, (dt, d) in enumerate(panels):
        for j, ps in enumerate(PASSES):
            ax = axes[i][j]
            rows = [r for r in report.rows if (r.case["dtype"], r.case["d_model"], r.case["pass"]) == (dt, d, ps)
                    and r.rate]
            for impl in dict.fromkeys(r.impl for r in rows):
                pts = [(r.case["tokens"], r.rate) for r in rows if r.impl == impl]
                ax.plot(*zip(*pts), marker="o", label=impl, linestyle="--" if impl == "gemm" else "-")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dt} d_model={d} {ps}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    fig.suptitle("ffn (d_ff = 4 d_model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
