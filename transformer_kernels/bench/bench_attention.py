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

    python -m transformer_kernels.bench.bench_attention [--quick] [--dtype bf16 ...] [--seqlen 1024 ...] [--out DIR]

A report bench_attention_varlen times ``attention_varlen`` on packed batches of sentences of
random lengths (uniform in [L/8, L]) against the same sentences padded to L: ``attention`` with a
key-padding mask, SDPA with the equivalent boolean mask, and FlashAttention's
``flash_attn_varlen_func`` where the flash-attn package is installed; on a CPU, the native and
reference backends. The rate counts the real tokens' work only, so padding shows as lost speed.

A second report, bench_attention_gqa, times the backward of GQA and MQA (causal, B = 1, Hq = 32)
against the same shape with as many key/value heads as query heads: the dK/dV kernel sums each
group's query heads, so with few key/value heads it must split the group to fill the GPU.

Tile configs: autotuned by default, each bucket's first candidate with --quick (autotuning every
case costs minutes of compiles); --autotune / --no-autotune override.
"""

from __future__ import annotations

import argparse
import contextlib
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


def implementations(device: torch.device) -> list[Impl]:
    """The columns. Any of them may refuse a case with a RuntimeError (an SDPA backend without a
    kernel for it): that case records it as not run."""
    refuses = (RuntimeError,)
    impls = [Impl("sdpa", _sdpa_impl(), refuses=refuses)]
    if device.type != "cuda":
        impls.append(Impl("native", package("native"), refuses=refuses))
        impls.append(Impl("reference", package("reference"), refuses=refuses))
        names = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "triton")
        return impls + [Impl(name, why_not="needs a CUDA device") for name in names]
    for name, backend in (
        ("sdpa_flash", "FLASH_ATTENTION"),
        ("sdpa_efficient", "EFFICIENT_ATTENTION"),
        ("sdpa_cudnn", "CUDNN_ATTENTION"),
        ("sdpa_math", "MATH"),
    ):
        impls.append(Impl(name, _sdpa_impl(backend), refuses=refuses))
    reason = tk.backends.why_not("attention", "triton", device, torch.float16, head_dim=128)
    impls.append(Impl.unless(reason, "triton", package("triton"), refuses=refuses))
    impls.append(Impl("reference", package("reference"), refuses=refuses))
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


def run_case(b, seqlen, d, dtype, causal, padding, device, impls: list[Impl], quick) -> Measured:
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(
        lambda seed: make_inputs(b, seqlen, HEADS, d, dtype, device, causal, padding, seed),
        device,
        4 * b * seqlen * HEADS * d * elt,
    )
    inputs, g = sets[0]
    q, k, v = inputs[:3]
    with torch.no_grad():
        expected = next(i.fn for i in impls if i.name == "sdpa")(*inputs)
    if seqlen > MAX_LEN_MATERIALISED:
        why = f"materialises [L, L]; run only for L <= {MAX_LEN_MATERIALISED}"
        impls = [i.not_run(why) if i.fn and i.name in ("sdpa_math", "reference") else i for i in impls]

    def check_one(impl, fn):
        with torch.no_grad():
            check(fn(*inputs), expected, impl.name)

    return measure(
        impls,
        lambda fn: time_passes(fn, sets, device, quick),
        device,
        check=check_one,
        peak=lambda fn: torch.autograd.grad(fn(*inputs), (q, k, v), g),
    )


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
                            measured = run_case(b, seqlen, d, dt, causal, padding, device, impls, quick)
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
                                    measured.timings[p],
                                    int(flops[p]),
                                    baseline="sdpa",
                                    notes=measured.notes,
                                    peaks=measured.peaks if p == "fwd+bwd" else None,
                                )
        if device.type == "cuda":
            gqa = run_gqa(quick, dtypes, device, 4096, 128)
        else:
            gqa = run_gqa(quick, dtypes, device, 64, 16)
        dropout = dropout_cost(device, impls, quick)
        varlen = run_varlen(quick, dtypes, device)
    return [report, varlen, gqa, dropout]


# ---------------------------------------------------------------------------------------------
# attention_varlen: packed sentences against the same sentences padded.


def _flash_attn_varlen():
    """FlashAttention's varlen function, or the reason it cannot run here."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        return None, f"flash-attn is not installed ({str(e).splitlines()[0][:80]})"
    return flash_attn_varlen_func, None


def _varlen_impls(device: torch.device) -> dict[str, tuple]:
    """name -> (fn, layout, why not): ``fn`` takes the packed inputs ``(q, k, v, cu, max_len,
    causal)`` or the padded ``(q, k, v, causal, key_padding_mask)``, as ``layout`` says."""

    def varlen(backend):
        return lambda q, k, v, cu, m, causal: tk.attention_varlen(q, k, v, cu, cu, m, m, causal=causal, backend=backend)

    def padded(backend):
        return lambda q, k, v, causal, kpm: tk.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)

    impls = {"sdpa_padded": (_sdpa_impl(), "padded", None)}
    if device.type != "cuda":
        impls["native_varlen"] = (varlen("native"), "packed", None)
        impls["native_padded"] = (padded("native"), "padded", None)
        impls["reference_varlen"] = (varlen("reference"), "packed", None)
        impls["triton_varlen"] = (None, "packed", "needs a CUDA device")
        impls["flash_attn_varlen"] = (None, "packed", "needs a CUDA device")
        return impls
    reason = tk.backends.why_not("attention_varlen", "triton", device, torch.float16, head_dim=128)
    impls["triton_varlen"] = (None if reason else varlen("triton"), "packed", reason)
    impls["triton_padded"] = (None if reason else padded("triton"), "padded", reason)
    fa, why = _flash_attn_varlen()
    if fa is not None:
        fa_fn = lambda q, k, v, cu, m, causal: fa(q, k, v, cu, cu, m, m, causal=causal)  # noqa: E731
        impls["flash_attn_varlen"] = (fa_fn, "packed", None)
    else:
        impls["flash_attn_varlen"] = (None, "packed", why)
    return impls


def _varlen_inputs(lengths, max_len, heads, d, dtype, device, causal, seed):
    """{"packed": ((q, k, v, cu, max_len, causal), dout), "padded": ((q, k, v, causal, kpm), dout)}:
    the same sentences both ways."""
    torch.manual_seed(seed)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, heads, d, device=device, dtype=dtype) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(lengths, device=device)
    kpm = torch.arange(max_len, device=device)[None, :] >= lens[:, None]

    def pad(t):
        out = t.new_zeros(len(lengths), max_len, heads, d)
        out[~kpm] = t
        return out

    packed = tuple(t.clone().requires_grad_() for t in (q, k, v))
    padded = tuple(pad(t).requires_grad_() for t in (q, k, v))
    return {
        "packed": ((*packed, cu, max_len, causal), dout),
        "padded": ((*padded, causal, kpm), pad(dout)),
    }


def run_varlen(quick, dtypes, device) -> Report:
    """attention_varlen against padded attention on batches of random sentence lengths."""
    if device.type == "cuda":
        max_lens, head_dims, tokens = ([1024] if quick else [128, 512, 2048]), ([128] if quick else [64, 128]), TOKENS
    else:
        max_lens, head_dims, tokens = ([32] if quick else [64, 256]), [32], (256 if quick else 2048)
    dtypes = dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    report = Report(
        "bench_attention_varlen",
        "fwd = 4*H*D*sum_b L_b^2 over the real tokens (x0.5 causal); bwd = 2.5 x fwd; fwd+bwd = 3.5 x fwd; "
        f"~{tokens} real tokens per batch, lengths uniform in [L/8, L], H = {HEADS}",
        str(device),
        unit="TFLOP/s",
        baseline="sdpa_padded",
        x="L",
        panels=["dtype", "D", "causal", "pass"],
    )
    impls = _varlen_impls(device)
    gen = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for d in head_dims:
            for causal in (False, True):
                for max_len in max_lens:
                    lengths = []
                    while sum(lengths) < tokens:
                        lengths.append(int(torch.randint(max(max_len // 8, 1), max_len + 1, (1,), generator=gen)))
                    inputs = _varlen_inputs(lengths, max_len, HEADS, d, dt, device, causal, 0)
                    sets = {layout: [inputs[layout]] for layout in inputs}  # one input set each
                    padded_args = inputs["padded"][0]
                    kpm = padded_args[4]
                    with torch.no_grad():
                        expected = _sdpa_impl()(*padded_args)[~kpm]  # the real rows, packed
                    timings, notes = {}, {}
                    for name, (fn, layout, why) in impls.items():
                        if fn is None:
                            timings[name], notes[name] = None, why
                            continue
                        try:
                            with torch.no_grad():
                                out = fn(*sets[layout][0][0])
                        except RuntimeError as e:  # an SDPA / flash-attn build without a kernel for this
                            timings[name], notes[name] = None, str(e).strip().splitlines()[0][:120]
                            continue
                        check(out if layout == "packed" else out[~kpm], expected, name)
                        timings[name] = time_passes(fn, sets[layout], device, quick)
                    work = 4 * HEADS * d * sum(n * n for n in lengths) * (0.5 if causal else 1.0)
                    pad_frac = 1 - sum(lengths) / (len(lengths) * max_len)
                    for p in PASSES:
                        case = {
                            "dtype": label(dt),
                            "D": d,
                            "causal": causal,
                            "B": len(lengths),
                            "L": max_len,
                            "padding": f"{pad_frac:.0%}",
                            "pass": p,
                        }
                        per_pass = {n: (t[p] if t else None) for n, t in timings.items()}
                        mult = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[p]
                        report.add_case(case, per_pass, int(work * mult), baseline="sdpa_padded", notes=notes)
    return report


GQA_QUERY_HEADS = 32


def _gqa_impl(name, hkv):
    """``name``'s attention with the keys and values cut to their first ``hkv`` heads (views)."""

    def run(q, k, v, causal, kpm):
        k, v = k[:, :, :hkv], v[:, :, :hkv]
        if name == "sdpa":
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
            )
            return out.transpose(1, 2)
        return tk.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=name)

    return run


def run_gqa(quick, dtypes, device, seqlen, d) -> Report:
    """Backward of GQA / MQA against the same shape with Hkv = Hq, per implementation."""
    ours = "triton" if device.type == "cuda" else "reference"
    report = Report(
        "bench_attention_gqa",
        f"bwd = 2.5 x 4*B*Hq*L*L*D x 0.5 (causal), whatever Hkv; B = 1, Hq = {GQA_QUERY_HEADS}",
        str(device),
        unit="TFLOP/s",
        baseline=f"{ours} with Hkv = Hq",
        x="Hkv",
        panels=["dtype", "D", "L", "pass"],
    )
    hq = GQA_QUERY_HEADS
    for dt in dtypes:
        for hkv in (1, 8):
            impls = {f"{ours}_hkv=hq": _gqa_impl(ours, hq), ours: _gqa_impl(ours, hkv), "sdpa": _gqa_impl("sdpa", hkv)}
            sets = input_sets(
                lambda seed, dt=dt: make_inputs(1, seqlen, hq, d, dt, device, True, False, seed),
                device,
                4 * seqlen * hq * d * torch.tensor([], dtype=dt).element_size(),
            )
            timings, notes = {}, {}
            for name, fn in impls.items():
                try:
                    timings[name] = time_passes(fn, sets, device, quick)["bwd"]
                except RuntimeError as e:  # an SDPA build without enable_gqa on this device
                    timings[name], notes[name] = None, str(e).splitlines()[0][:120]
            case = {"dtype": label(dt), "D": d, "L": seqlen, "Hkv": hkv, "pass": "bwd"}
            flops = 2.5 * 4 * hq * seqlen * seqlen * d * 0.5
            report.add_case(case, timings, int(flops), baseline=f"{ours}_hkv=hq", notes=notes)
    return report


def dropout_cost(device: torch.device, impls: list[Impl], quick: bool) -> Report:
    """What the dropout mask costs: the Triton kernels at p = 0 and at p = 0.1, L = 2048, D = 64, bf16."""
    seqlen, d, dt = 2048, 64, torch.bfloat16
    b = max(TOKENS // seqlen, 1)
    report = Report(
        "bench_attention_dropout",
        FLOP_COUNTS + f"; B*L = {TOKENS} tokens, H = {HEADS}",
        str(device),
        unit="TFLOP/s",
        baseline="p=0",
        x="L",
        panels=["pass"],
    )
    triton = next(i for i in impls if i.name == "triton")

    def with_p(p):
        def fn(q, k, v, causal, kpm):
            return tk.attention(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=p, backend="triton")

        return fn

    cands = [Impl.unless(triton.why_not, name, with_p(p)) for name, p in (("p=0", 0.0), ("p=0.1", 0.1))]
    sets = (
        input_sets(
            lambda seed: make_inputs(b, seqlen, HEADS, d, dt, device, False, False, seed),
            device,
            4 * b * seqlen * HEADS * d * 2,
        )
        if triton.fn is not None
        else []
    )
    measured = measure(cands, lambda fn: time_passes(fn, sets, device, quick), device)
    fwd_flops = 4 * b * HEADS * seqlen * seqlen * d
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
    for ps in PASSES:
        case = {"dtype": label(dt), "D": d, "B": b, "L": seqlen, "pass": ps}
        report.add_case(case, measured.timings[ps], int(flops[ps]), baseline="p=0", notes=measured.notes)
    return report


def main(argv=None) -> int:
    from .suite import publish

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
