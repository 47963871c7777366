"""Benchmark of ``dropout_add_layer_norm``: the post-LN step ``LayerNorm(residual + dropout(x))``.

Implementations, all measured in the same run on the same device:
  eager    torch: F.layer_norm(F.dropout(x) + residual)   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels, backend='triton'
  cuda     transformer_kernels, backend='cuda'
On a CPU the eager baseline, the package's native backend (what auto runs there) and its
reference run; --quick at smoke sizes, else at ~4k-token batches.

    python -m transformer_kernels.bench.bench_layer_norm [--quick] [--dtype bf16 ...] [--hidden 1024 ...] [--out DIR]
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import transformer_kernels as tk

from .common import (
    DTYPES,
    PASSES,
    Impl,
    Measured,
    Report,
    chosen_dtypes,
    default_device,
    input_sets,
    label,
    measure,
    standalone_parser,
    time_ms,
    time_passes,
)

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


def implementations(device: torch.device) -> list[Impl]:
    """The columns; the baseline and the compiled baseline are not checked (the check runs without
    dropout, which would compile a second graph)."""
    impls = [Impl("eager", eager, check=False)]
    if device.type != "cuda":
        impls.append(Impl("native", package("native")))
        impls.append(Impl("reference", package("reference")))
        return impls + [Impl(name, why_not="needs a CUDA device") for name in ("compile", "triton", "cuda")]
    impls.append(Impl("compile", eager, compile=True, check=False))
    for backend in ("triton", "cuda"):
        reason = tk.backends.why_not("dropout_add_layer_norm", backend, device, torch.float16, hidden=1)
        impls.append(Impl.unless(reason, backend, package(backend)))
    return impls


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """The measured device-copy ceiling: bytes read + written by a large clone, per second."""
    src = torch.randn(2**26 if device.type == "cuda" else 2**20 if quick else 2**22, device=device)
    ms = time_ms(lambda: src.clone(), device, quick=quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def check(out, ref, name):
    """A sanity check of the package's forward without dropout (tests/ holds the rigorous ones)."""
    tol = 1e-4 if out.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=lambda m: f"{name} is wrong: {m}")


def make_inputs(m, n, dtype, device, seed):
    """((x, residual, weight, bias), dout), random."""
    torch.manual_seed(seed)
    x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    return (x, r, w, b), torch.randn(m, n, device=device, dtype=dtype)


def run_case(n: int, m: int, dtype: torch.dtype, device: torch.device, impls: list[Impl], quick: bool) -> Measured:
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(lambda seed: make_inputs(m, n, dtype, device, seed), device, 3 * m * n * elt)
    x, r, w, b = sets[0][0]
    with torch.no_grad():
        ref = F.layer_norm(x.float() + r.float(), (n,), w.float(), b.float(), EPS)

    def check_one(impl, fn):
        with torch.no_grad():
            check(fn(x, r, w, b, 0.0), ref, impl.name)

    return measure(impls, lambda fn: time_passes(fn, sets, device, quick), device, check=check_one)


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    hidden: list[int] | None = None,
) -> list[Report]:
    """The sweep over hidden sizes; ``dtypes`` None: all three on a GPU, fp32 on a CPU."""
    device = device or default_device()
    on_gpu = device.type == "cuda"
    dtypes = dtypes or (list(DTYPES.values()) if on_gpu else [torch.float32])
    if hidden is None:
        hidden = (
            ([1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 12288, 16384])
            if on_gpu
            else [256]
            if quick
            else [256, 512, 1024]
        )
    # Rows such that each [M, N] tensor is 64 MiB of fp16 on the GPU (L2 is 50 MiB): data >> L2.
    # On a CPU, without --quick: a batch of 4096 tokens at N = 512 (a CPU training batch).
    elements = (2**25 if quick else 2**26) if on_gpu else 2**14 if quick else 2**21
    impls = implementations(device)
    copy_gbps = copy_bandwidth_gbps(device, quick)

    report = Report(
        "bench_layer_norm",
        BYTE_COUNTS + f"; measured copy bandwidth: {copy_gbps:.0f} GB/s",
        str(device),
        baseline="eager",
        x="N",
        panels=["dtype", "pass"],
        meta={"copy_gbps": copy_gbps},
    )
    for dt in dtypes:
        elt = torch.tensor([], dtype=dt).element_size()
        for n in hidden:
            m = max(elements // n, 1)
            measured = run_case(n, m, dt, device, impls, quick)
            per_pass_bytes = {
                "fwd": 3 * m * n * elt + 2 * n * elt,
                "bwd": 4 * m * n * elt + 4 * n * elt,
                "fwd+bwd": 6 * m * n * elt + 6 * n * elt,
            }
            for p in PASSES:
                case = {"dtype": label(dt), "M": m, "N": n, "pass": p}
                report.add_case(case, measured.timings[p], per_pass_bytes[p], baseline="eager", notes=measured.notes)
    for row in report.rows:
        if row.rate is not None:
            row.note = f"{100 * row.rate / copy_gbps:.0f}% of copy bandwidth"
    return [report, dropout_cost(device, impls, quick)]


def dropout_cost(device: torch.device, impls: list[Impl], quick: bool) -> Report:
    """What the dropout mask costs: each kernel backend at p = 0 and at p = 0.1, 16k x 4096 bf16."""
    m, n, dt = 16384, 4096, torch.bfloat16
    elt = 2
    per_pass_bytes = {"fwd": 3 * m * n * elt, "bwd": 4 * m * n * elt, "fwd+bwd": 6 * m * n * elt}
    report = Report(
        "bench_layer_norm_dropout", BYTE_COUNTS, str(device), baseline="p=0", x="N", panels=["backend", "pass"]
    )
    for backend in ("triton", "cuda"):
        impl = next(i for i in impls if i.name == backend)
        cands = [
            Impl.unless(impl.why_not, name, functools.partial(impl.fn, p=p) if impl.fn else None)
            for name, p in (("p=0", 0.0), ("p=0.1", DROPOUT_P))
        ]
        sets = (
            input_sets(lambda seed: make_inputs(m, n, dt, device, seed), device, 3 * m * n * elt)
            if impl.fn is not None
            else []
        )
        measured = measure(cands, lambda fn, sets=sets: time_passes(fn, sets, device, quick), device)
        for ps in PASSES:
            case = {"backend": backend, "dtype": label(dt), "M": m, "N": n, "pass": ps}
            report.add_case(case, measured.timings[ps], per_pass_bytes[ps], baseline="p=0", notes=measured.notes)
    return report


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__)
    parser.add_argument("--hidden", nargs="+", type=int, default=None)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args), hidden=args.hidden), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
