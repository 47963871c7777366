"""Benchmark of ``dropout_add_layer_norm``: the post-LN step ``LayerNorm(residual + dropout(x))``.

Implementations, all measured in the same run on the same device:
  eager    torch: F.layer_norm(F.dropout(x) + residual)   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels, backend='triton'
  cuda     transformer_kernels, backend='cuda'
On a CPU the eager baseline, the package's native backend (what auto runs there) and its
reference run; --quick at smoke sizes, else at ~4k-token batches.

    python benchmarks/bench_layer_norm.py [--quick] [--dtype bf16 ...] [--hidden 1024 ...] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformer_kernels as tk  # noqa: E402
from benchmarks.common import (
    DTYPES,
    PASSES,
    Report,
    chosen_dtypes,
    default_device,
    input_sets,
    label,  # noqa: E402
    mark_not_run,
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


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"eager": eager}
    if device.type != "cuda":
        impls["native"] = package("native")
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


def run_case(n: int, m: int, dtype: torch.dtype, device: torch.device, impls: dict, quick: bool):
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(lambda seed: make_inputs(m, n, dtype, device, seed), device, 3 * m * n * elt)
    x, r, w, b = sets[0][0]
    with torch.no_grad():
        ref = F.layer_norm(x.float() + r.float(), (n,), w.float(), b.float(), EPS)
    timings = {p: {} for p in PASSES}
    notes = {}
    for name, fn in impls.items():
        if isinstance(fn, str) and fn != "compile":
            mark_not_run(timings, notes, name, fn)
            continue
        if fn == "compile":
            torch._dynamo.reset()
            fn = torch.compile(eager, dynamic=False)
        elif fn is not eager:
            with torch.no_grad():
                check(fn(x, r, w, b, 0.0), ref, name)
        for p, ms in time_passes(fn, sets, device, quick).items():
            timings[p][name] = ms
    return timings, notes


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
            timings, notes = run_case(n, m, dt, device, impls, quick)
            per_pass_bytes = {
                "fwd": 3 * m * n * elt + 2 * n * elt,
                "bwd": 4 * m * n * elt + 4 * n * elt,
                "fwd+bwd": 6 * m * n * elt + 6 * n * elt,
            }
            for p in PASSES:
                case = {"dtype": label(dt), "M": m, "N": n, "pass": p}
                report.add_case(case, timings[p], per_pass_bytes[p], baseline="eager", notes=notes)
    for row in report.rows:
        if row.rate is not None:
            row.note = f"{100 * row.rate / copy_gbps:.0f}% of copy bandwidth"
    return [report]


def main(argv=None) -> int:
    from benchmarks.suite import publish

    parser = standalone_parser(__doc__)
    parser.add_argument("--hidden", nargs="+", type=int, default=None)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args), hidden=args.hidden), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
