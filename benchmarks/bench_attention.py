"""Benchmark of ``attention``: forward, backward and forward+backward TFLOP/s.

Implementations, all measured in the same run on the same device, on q/k/v in the [B, L, H, D]
layout of a fused projection (SDPA gets [B, H, L, D] views of the same tensors, no copy):
  sdpa            torch.nn.functional.scaled_dot_product_attention, default dispatch (the baseline)
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  SDPA restricted to one backend (sdpa_kernel); "—" where it cannot run the case
  triton          transformer_kernels, backend='triton'
  reference       transformer_kernels, backend='reference' (materialises [L, L]: short lengths only)
With a padding mask, SDPA gets the equivalent boolean attn_mask [B, 1, 1, L] (which takes it off
its flash path) and ours the key_padding_mask. On a CPU only sdpa and the reference run (tiny sizes).

    python benchmarks/bench_attention.py [--quick] [--dtype bf16 ...] [--seqlen 1024 ...] [--out DIR]

Tile configs: autotuned by default, heuristic with --quick (autotuning every case costs minutes of
compiles); --autotune / --no-autotune override (through TK_AUTOTUNE, which the kernels read).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformer_kernels as tk  # noqa: E402
from common import Report, peak_mib, time_ms  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwd+bwd")
TOKENS = 16384  # B · L, constant over the sweep
HEADS = 16
# FLOPs of the two matmuls per (query, key) pair and head dim: 2 for QKᵀ + 2 for PV; the backward
# has five such matmuls (recomputed QKᵀ, dV, dP, dQ, dK) = 2.5x; causal halves all of them.
FLOP_COUNTS = (
    "fwd = 4*B*H*L*L*D (x0.5 causal); bwd = 2.5 x fwd; fwd+bwd = 3.5 x fwd; with a padding mask the "
    "padded keys are still counted"
)
MAX_LEN_MATERIALISED = 4096  # sdpa_math and the reference build [B, H, L, L]: skipped above this


def _sdpa_impl(backend=None):
    """SDPA on [B, L, H, D] tensors; ``backend`` an SDPBackend name, or None for the default dispatch."""

    def run(q, k, v, causal, kpm):
        mask = None
        if kpm is not None:  # is_causal cannot be combined with a mask: causal goes into the mask
            lq, lk = q.shape[1], k.shape[1]
            mask = ~kpm[:, None, None, :]
            if causal:
                mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([getattr(SDPBackend, backend)])
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=causal and mask is None)
        return out.transpose(1, 2)

    return run


def package(backend):
    return lambda q, k, v, causal, kpm: tk.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"sdpa": _sdpa_impl()}
    if device.type != "cuda":
        impls["reference"] = package("reference")
        for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton"):
            impls[name] = "needs a CUDA device"
        return impls
    for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                          ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH")):
        impls[name] = _sdpa_impl(backend)
    reason = tk.backends.why_not("attention", "triton", device, torch.float16, head_dim=128)
    impls["triton"] = package("triton") if reason is None else reason
    impls["reference"] = package("reference")
    return impls


def make_inputs(b, seqlen, heads, d, dtype, device, padding):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, seqlen, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    kpm = None
    if padding:  # each sequence keeps a random length in [L/2, L]: the tail is padding
        lengths = torch.randint(seqlen // 2, seqlen + 1, (b,), device=device)
        kpm = torch.arange(seqlen, device=device)[None, :] >= lengths[:, None]
    return q, k, v, kpm


def check(out, expected, name):
    """A sanity check of the forward (tests/ holds the rigorous ones)."""
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol,
                               msg=lambda m: f"{name} is wrong: {m}")


def run_case(b, seqlen, d, dtype, causal, padding, device, impls, quick):
    q, k, v, kpm = make_inputs(b, seqlen, HEADS, d, dtype, device, padding)
    inputs = (q, k, v)
    g = torch.randn_like(q)
    timings = {p: {} for p in PASSES}
    notes = {}
    with torch.no_grad():
        expected = impls["sdpa"](q, k, v, causal, kpm)
    for name, fn in impls.items():
        skip = fn if isinstance(fn, str) else None
        if skip is None and name in ("sdpa_math", "reference") and seqlen > MAX_LEN_MATERIALISED:
            skip = f"materialises [L, L]; run only for L <= {MAX_LEN_MATERIALISED}"
        if skip is None:
            try:
                with torch.no_grad():
                    check(fn(q, k, v, causal, kpm), expected, name)
            except RuntimeError as e:  # an SDPA backend that cannot take these inputs
                skip = str(e).splitlines()[0][:120]
        if skip is not None:
            notes[name] = skip
            for p in PASSES:
                timings[p][name] = None
            continue
        with torch.no_grad():
            timings["fwd"][name] = time_ms(lambda: fn(q, k, v, causal, kpm), device, quick=quick)
        out = fn(q, k, v, causal, kpm)
        timings["bwd"][name] = time_ms(lambda: torch.autograd.grad(out, inputs, g, retain_graph=True), device,
                                       quick=quick)
        step = lambda: torch.autograd.grad(fn(q, k, v, causal, kpm), inputs, g)  # noqa: E731
        timings["fwd+bwd"][name] = time_ms(step, device, quick=quick)
        peak = peak_mib(step, device)
        notes[name] = "" if peak is None else f"peak +{peak:.0f} MiB"
        del out
    return timings, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few sizes and repeats")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--seqlen", nargs="+", type=int, default=None)
    parser.add_argument("--head-dim", nargs="+", type=int, default=None)
    parser.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None,
                        help="autotune the Triton tiles (default: on, off with --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    autotune = (not args.quick) if args.autotune is None else args.autotune
    os.environ["TK_AUTOTUNE"] = "1" if autotune else "0"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        dtypes = args.dtype or (["bf16"] if args.quick else ["bf16", "fp16"])
        seqlens = args.seqlen or ([1024, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
        head_dims = args.head_dim or ([128] if args.quick else [64, 128])
        tokens = TOKENS
    else:  # smoke sizes: only the reference against SDPA's CPU path
        dtypes = args.dtype or ["fp32"]
        seqlens = args.seqlen or [128, 256]
        head_dims = args.head_dim or [64]
        tokens = 2 * max(seqlens)
    impls = implementations(device)

    report = Report("bench_attention", FLOP_COUNTS + f"; B*L = {tokens} tokens, H = {HEADS}, "
                    f"autotune {'on' if autotune and on_gpu else 'off'}", unit="TFLOP/s", baseline="sdpa")
    for dt in dtypes:
        for d in head_dims:
            for causal in (False, True):
                for padding in (False, True):
                    if args.quick and padding and causal:
                        continue
                    for seqlen in seqlens:
                        if args.quick and padding and seqlen != max(seqlens):
                            continue
                        b = max(tokens // seqlen, 1)
                        timings, notes = run_case(b, seqlen, d, DTYPES[dt], causal, padding, device, impls,
                                                  args.quick)
                        fwd_flops = 4 * b * HEADS * seqlen * seqlen * d * (0.5 if causal else 1.0)
                        flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
                        for p in PASSES:
                            case = {"dtype": dt, "D": d, "causal": causal, "padding": padding, "B": b, "L": seqlen,
                                    "pass": p}
                            report.add_case(case, timings[p], int(flops[p]), baseline="sdpa",
                                            notes=notes if p == "fwd+bwd" else
                                            {k: n for k, n in notes.items() if timings[p][k] is None})
    report.write(args.out)
    print(report.markdown())
    print(f"\ndevice: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; results in {args.out}/")
    if args.plot:
        plot(report, args.out / "bench_attention.png")
    return 0


def plot(report: Report, path: Path) -> None:
    """TFLOP/s against sequence length: one panel per (pass, D, causal, padding), one line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = report.rows[0].case["dtype"]
    groups = list(dict.fromkeys((r.case["D"], r.case["causal"], r.case["padding"]) for r in report.rows))
    fig, axes = plt.subplots(len(PASSES), len(groups), figsize=(4.2 * len(groups), 3.4 * len(PASSES)),
                             squeeze=False)
    for i, p in enumerate(PASSES):
        for j, (d, causal, padding) in enumerate(groups):
            ax = axes[i][j]
            rows = [r for r in report.rows if r.case["pass"] == p and r.rate and r.case["dtype"] == dtype
                    and (r.case["D"], r.case["causal"], r.case["padding"]) == (d, causal, padding)]
            for impl in dict.fromkeys(r.impl for r in rows):
                pts = [(r.case["L"], r.rate) for r in rows if r.impl == impl]
                ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{p} D={d}{' causal' if causal else ''}{' padded' if padding else ''}", fontsize=9)
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=6)
    fig.suptitle(f"attention ({dtype}, B*L = const, H = {HEADS})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
