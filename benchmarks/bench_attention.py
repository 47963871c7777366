"""Benchmark of ``attention``: forward, backward and forward+backward TFLOP/s.

Implementations, all measured in the same run on the same device, on q/k/v in the [B, L, H, D]
layout of a fused projection (SDPA gets [B, H, L, D] views of the same tensors, no copy):
  sdpa            torch.nn.functional.scaled_dot_product_attention, default dispatch (the baseline)
  sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math
                  SDPA restricted to one backend (sdpa_kernel); "—" where it cannot run the case
  triton          transformer_kernels, backend='triton'
  reference       transformer_kernels, backend='reference' (materialises [L, L]: short lengths only)
With a padding mask, SDPA gets the equivalent boolean attn_mask [B, 1, 1, L] (which takes it off
its flash path) and ours the key_padding_mask. On a CPU sdpa and the native
(auto there) and reference backends run; --quick at a tiny size, else at 4096 tokens.

    python benchmarks/bench_attention.py [--quick] [--dtype bf16 ...] [--seqlen 1024 ...] [--out DIR]

Tile configs: autotuned by default, each bucket's first candidate with --quick (autotuning every
case costs minutes of compiles); --autotune / --no-autotune override.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformer_kernels as tk  # noqa: E402
from benchmarks.common import (
    PASSES,
    Report,
    autotune,
    chosen_dtypes,
    default_device,
    input_sets,  # noqa: E402
    label,
    peak_mib,
    standalone_parser,
    time_passes,
)

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
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=causal and mask is None,
            )
        return out.transpose(1, 2)

    return run


def package(backend):
    return lambda q, k, v, causal, kpm: tk.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)


def implementations(device: torch.device) -> dict:
    """name -> callable, or a string saying why it cannot run here."""
    impls = {"sdpa": _sdpa_impl()}
    if device.type != "cuda":
        impls["native"] = package("native")
        impls["reference"] = package("reference")
        for name in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton"):
            impls[name] = "needs a CUDA device"
        return impls
    for name, backend in (
        ("sdpa_flash", "FLASH_ATTENTION"),
        ("sdpa_efficient", "EFFICIENT_ATTENTION"),
        ("sdpa_cudnn", "CUDNN_ATTENTION"),
        ("sdpa_math", "MATH"),
    ):
        impls[name] = _sdpa_impl(backend)
    reason = tk.backends.why_not("attention", "triton", device, torch.float16, head_dim=128)
    impls["triton"] = package("triton") if reason is None else reason
    impls["reference"] = package("reference")
    return impls


def make_inputs(b, seqlen, heads, d, dtype, device, causal, padding, seed):
    """((q, k, v, causal, key_padding_mask), dout), random; with ``padding`` each sequence keeps a
    random length in [L/2, L] and the tail is padding."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(b, seqlen, heads, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    kpm = None
    if padding:
        lengths = torch.randint(seqlen // 2, seqlen + 1, (b,), device=device)
        kpm = torch.arange(seqlen, device=device)[None, :] >= lengths[:, None]
    return (q, k, v, causal, kpm), torch.randn_like(q)


def check(out, expected, name):
    """A sanity check of the forward (tests/ holds the rigorous ones)."""
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol, msg=lambda m: f"{name} is wrong: {m}")


def run_case(b, seqlen, d, dtype, causal, padding, device, impls, quick):
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(
        lambda seed: make_inputs(b, seqlen, HEADS, d, dtype, device, causal, padding, seed),
        device,
        4 * b * seqlen * HEADS * d * elt,
    )
    inputs, g = sets[0]
    timings = {p: {} for p in PASSES}
    notes, peaks = {}, {}
    with torch.no_grad():
        expected = impls["sdpa"](*inputs)
    for name, fn in impls.items():
        skip = fn if isinstance(fn, str) else None
        if skip is None and name in ("sdpa_math", "reference") and seqlen > MAX_LEN_MATERIALISED:
            skip = f"materialises [L, L]; run only for L <= {MAX_LEN_MATERIALISED}"
        if skip is None:
            try:
                with torch.no_grad():
                    check(fn(*inputs), expected, name)
            except RuntimeError as e:  # an SDPA backend that cannot take these inputs
                skip = str(e).splitlines()[0][:120]
        if skip is not None:
            notes[name] = skip
            for p in PASSES:
                timings[p][name] = None
            continue
        for p, ms in time_passes(fn, sets, device, quick).items():
            timings[p][name] = ms
        q, k, v = inputs[:3]
        peaks[name] = peak_mib(
            lambda fn=fn, inputs=inputs, q=q, k=k, v=v: torch.autograd.grad(fn(*inputs), (q, k, v), g), device
        )
    return timings, notes, peaks


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    seqlens: list[int] | None = None,
    head_dims: list[int] | None = None,
    tune: bool | None = None,
) -> list[Report]:
    """The sweep over sequence lengths at B*L constant; ``tune`` None: autotune unless ``quick``."""
    device = device or default_device()
    tune = (not quick) if tune is None else tune
    if device.type == "cuda":
        dtypes = dtypes or ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16])
        seqlens = seqlens or ([1024, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384])
        head_dims = head_dims or ([128] if quick else [64, 128])
        tokens = TOKENS
    else:  # the native and reference backends against SDPA's CPU path
        dtypes = dtypes or [torch.float32]
        seqlens = seqlens or ([64] if quick else [32, 128, 512])
        head_dims = head_dims or [64]
        tokens = 2 * max(seqlens) if quick else 4096
    impls = implementations(device)

    report = Report(
        "bench_attention",
        FLOP_COUNTS + f"; B*L = {tokens} tokens, H = {HEADS}, "
        f"autotune {'on' if tune and device.type == 'cuda' else 'off'}",
        str(device),
        unit="TFLOP/s",
        baseline="sdpa",
        x="L",
        panels=["dtype", "D", "causal", "padding", "pass"],
    )
    with autotune(tune):
        for dt in dtypes:
            for d in head_dims:
                for causal in (False, True):
                    for padding in (False, True):
                        if quick and padding and causal:
                            continue
                        for seqlen in seqlens:
                            if quick and padding and seqlen != max(seqlens):
                                continue
                            b = max(tokens // seqlen, 1)
                            timings, notes, peaks = run_case(b, seqlen, d, dt, causal, padding, device, impls, quick)
                            fwd_flops = 4 * b * HEADS * seqlen * seqlen * d * (0.5 if causal else 1.0)
                            flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
                            for p in PASSES:
                                case = {
                                    "dtype": label(dt),
                                    "D": d,
                                    "causal": causal,
                                    "padding": padding,
                                    "B": b,
                                    "L": seqlen,
                                    "pass": p,
                                }
                                report.add_case(
                                    case,
                                    timings[p],
                                    int(flops[p]),
                                    baseline="sdpa",
                                    notes=notes,
                                    peaks=peaks if p == "fwd+bwd" else None,
                                )
    return [report]


def main(argv=None) -> int:
    from benchmarks.suite import publish

    parser = standalone_parser(__doc__, "a few sizes and repeats")
    parser.add_argument("--seqlen", nargs="+", type=int, default=None)
    parser.add_argument("--head-dim", nargs="+", type=int, default=None)
    parser.add_argument(
        "--autotune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autotune the Triton tiles (default: on, off with --quick)",
    )
    args = parser.parse_args(argv)
    reports = run(args.quick, chosen_dtypes(args), seqlens=args.seqlen, head_dims=args.head_dim, tune=args.autotune)
    return publish(reports, args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
