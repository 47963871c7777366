"""Benchmark of ``ffn``: the position-wise feed-forward block ``dropout(act(x W1ᵀ + b1)) W2ᵀ + b2``.

Implementations, all measured in the same run on the same device:
  eager    torch: F.linear -> activation -> F.dropout -> F.linear   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels.ffn, backend='triton'
  cuda     transformer_kernels.ffn, backend='cuda'
  gemm     the bare cuBLAS GEMMs of the same shapes (torch.mm, no bias, activation or dropout):
           2 in the forward, 4 in the backward; the ceiling a fused FFN can reach
On a CPU eager, gemm and the package's native (auto there) and reference backends run; --quick at
smoke sizes, else at 4096 tokens.

    python -m transformer_kernels.bench.bench_ffn [--quick] [--dtype bf16 ...] [--d-model 1024 ...] [--tokens 16384 ...]
                                   [--activation relu] [--dropout 0.1] [--out DIR]

Tile configs: autotuned by default, the first candidate with --quick (autotuning every case costs
minutes of compiles); --autotune / --no-autotune override.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import transformer_kernels as tk

from .common import (
    PASSES,
    Impl,
    Measured,
    Report,
    autotune,
    chosen_dtypes,
    default_device,
    input_sets,
    label,
    measure,
    standalone_parser,
    time_ms,
    time_passes,
)

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


def implementations(device: torch.device) -> list[Impl]:
    """The columns but the last, the bare GEMMs (:func:`bare_gemms`, timed in run_case)."""
    impls = [Impl("eager", eager)]
    if device.type != "cuda":
        impls.append(Impl("native", package("native")))
        impls.append(Impl("reference", package("reference")))
        return impls + [Impl(name, why_not="needs a CUDA device") for name in ("compile", "triton", "cuda")]
    impls.append(Impl("compile", eager, compile=True))
    for backend in ("triton", "cuda"):
        reason = tk.backends.why_not("ffn", backend, device, torch.float16)
        impls.append(Impl.unless(reason, backend, package(backend)))
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


def make_inputs(tokens, d_model, dtype, device, activation, p, seed):
    """((x, w1, b1, w2, b2, activation, p), dout), random."""
    torch.manual_seed(seed)
    d_ff = 4 * d_model
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(d_ff, d_model, device=device) / d_model**0.5).to(dtype).requires_grad_()
    b1 = (0.1 * torch.randn(d_ff, device=device)).to(dtype).requires_grad_()
    w2 = (torch.randn(d_model, d_ff, device=device) / d_ff**0.5).to(dtype).requires_grad_()
    b2 = (0.1 * torch.randn(d_model, device=device)).to(dtype).requires_grad_()
    return (x, w1, b1, w2, b2, activation, p), torch.randn(tokens, d_model, device=device, dtype=dtype)


def run_case(tokens, d_model, dtype, device, impls: list[Impl], activation, p, quick) -> Measured:
    elt = torch.tensor([], dtype=dtype).element_size()
    nbytes = (2 * tokens * d_model + 8 * d_model * d_model) * elt
    sets = input_sets(lambda seed: make_inputs(tokens, d_model, dtype, device, activation, p, seed), device, nbytes)
    inputs = sets[0][0]
    with torch.no_grad():
        ref = eager(*(t.float() for t in inputs[:5]), activation, 0.0)

    def check_one(impl, fn):
        with torch.no_grad():
            check(fn(*inputs[:5], activation, 0.0), ref, impl.name)

    measured = measure(impls, lambda fn: time_passes(fn, sets, device, quick), device, check=check_one)
    calls = [bare_gemms(*(t.detach() for t in (ins[0], ins[1], ins[3])), g) for ins, g in sets]
    for i, ps in enumerate(PASSES):
        measured.timings[ps]["gemm"] = time_ms(
            lambda call: call(), device, quick=quick, inputs=[(c[i],) for c in calls]
        )
    return measured


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    d_models: list[int] | None = None,
    tokens: list[int] | None = None,
    activation: str = "relu",
    dropout: float = 0.1,
    tune: bool | None = None,
) -> list[Report]:
    """The sweep over d_model and tokens; ``tune`` None: autotune unless ``quick``."""
    device = device or default_device()
    tune = (not quick) if tune is None else tune
    if device.type == "cuda":
        dtypes = dtypes or ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16])
        d_models = d_models or ([1024, 4096] if quick else [512, 1024, 4096])
        tokens = tokens or ([16384] if quick else [4096, 16384, 65536])
    else:
        dtypes = dtypes or [torch.float32]
        d_models = d_models or ([64] if quick else [256, 512])
        tokens = tokens or ([128] if quick else [4096])
    impls = implementations(device)
    act = None if activation == "none" else activation

    report = Report(
        "bench_ffn",
        FLOP_COUNTS + f"; activation {activation}, dropout {dropout}",
        str(device),
        unit="TFLOP/s",
        baseline="eager",
        x="tokens",
        panels=["dtype", "d_model", "pass"],
    )
    with autotune(tune):
        for dt in dtypes:
            for d in d_models:
                for t in tokens:
                    measured = run_case(t, d, dt, device, impls, act, dropout, quick)
                    fwd_flops = 4 * t * d * 4 * d
                    for ps, flops in zip(PASSES, (fwd_flops, 2 * fwd_flops, 3 * fwd_flops), strict=True):
                        case = {"dtype": label(dt), "tokens": t, "d_model": d, "d_ff": 4 * d, "pass": ps}
                        report.add_case(case, measured.timings[ps], flops, baseline="eager", notes=measured.notes)
    _note_fraction_of_gemm(report)
    return [report]


def _note_fraction_of_gemm(report: Report) -> None:
    """Each row's rate as a share of the bare GEMMs' rate on the same case."""
    ceiling = {tuple(r.case.values()): r.rate for r in report.rows if r.impl == "gemm"}
    for r in report.rows:
        top = ceiling.get(tuple(r.case.values()))
        if r.rate is not None and top and r.impl != "gemm":
            r.note = f"{100 * r.rate / top:.0f}% of bare GEMMs"


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__, "fewer sizes and repeats, no autotuning")
    parser.add_argument("--d-model", nargs="+", type=int, default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--activation", choices=["none", "relu", "gelu", "gelu_tanh"], default="relu")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    reports = run(
        args.quick,
        chosen_dtypes(args),
        d_models=args.d_model,
        tokens=args.tokens,
        activation=args.activation,
        dropout=args.dropout,
        tune=args.autotune,
    )
    return publish(reports, args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
