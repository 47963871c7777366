"""Benchmark of ``attention_with_kvcache``: one decoding step (one query per sequence, its key and
value appended) over a preallocated KV cache, in GB/s of cache read.

Implementations, all measured in the same run on the same device, every sequence of the batch at
the same length ``L`` (so that the sliced baselines can take the batch whole):
  attention        transformer_kernels.attention on the caches sliced to L + 1 after writing the new
                   row (what decoding does without this op; the baseline)
  sdpa             torch's scaled_dot_product_attention on the same slices (GQA via enable_gqa)
  triton, cuda     transformer_kernels.attention_with_kvcache, backend='triton' / 'cuda' (split-KV
                   heuristic, the append inside the kernel)
  flash_attn       flash_attn.flash_attn_with_kvcache, where the package is importable
On a CPU the native (auto there) and reference backends take the place of the kernels.

    python -m transformer_kernels.bench.bench_attention_kvcache [--quick] [--dtype bf16 ...] [--seqlen 4096 ...]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import transformer_kernels as tk

from .common import DTYPES, Impl, Report, chosen_dtypes, default_device, label, measure, standalone_parser, time_ms

HQ, HKV_CHOICES, HEAD_DIM = 32, (32, 8), 128
BYTE_COUNTS = "read K and V of the visible keys = 2*B*(L+1)*Hkv*D*elt (q, the new row and the output are not counted)"


def sliced(backend):
    """Write the new row with a tensor copy, then attend to the slice: decoding without the op."""

    def fn(q, k_cache, v_cache, seqlens, k, v, n):
        k_cache[:, n : n + 1] = k
        v_cache[:, n : n + 1] = v
        return tk.attention(q, k_cache[:, : n + 1], v_cache[:, : n + 1], causal=True, backend=backend)

    return fn


def sdpa(q, k_cache, v_cache, seqlens, k, v, n):
    k_cache[:, n : n + 1] = k
    v_cache[:, n : n + 1] = v
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k_cache[:, : n + 1], v_cache[:, : n + 1]))
    # One query, the last position: bottom-right causal sees every key, so no mask.
    return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def package(backend):
    def fn(q, k_cache, v_cache, seqlens, k, v, n):
        return tk.attention_with_kvcache(q, k_cache, v_cache, seqlens, k, v, backend=backend)

    return fn


def flash_attn_impl() -> Impl:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        return Impl("flash_attn", why_not=f"flash_attn is not importable ({type(e).__name__})")

    def fn(q, k_cache, v_cache, seqlens, k, v, n):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)

    return Impl("flash_attn", fn, refuses=(RuntimeError,))


def implementations(device: torch.device) -> list[Impl]:
    impls = [Impl("attention", sliced(None), check=False), Impl("sdpa", sdpa)]
    if device.type != "cuda":
        return impls + [Impl("native", package("native")), Impl("reference", package("reference"))]
    op = "attention_with_kvcache"
    for backend in ("triton", "cuda"):
        impls.append(
            Impl.unless(
                tk.backends.why_not(op, backend, device, torch.float16, head_dim=HEAD_DIM), backend, package(backend)
            )
        )
    return impls + [flash_attn_impl()]


def make_inputs(b, n, lmax, hkv, dtype, device):
    torch.manual_seed(0)
    q = torch.randn(b, 1, HQ, HEAD_DIM, device=device, dtype=dtype)
    k_cache = torch.randn(b, lmax, hkv, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.randn(b, lmax, hkv, HEAD_DIM, device=device, dtype=dtype)
    k, v = (torch.randn(b, 1, hkv, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((b,), n, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seqlens, k, v, n


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    seqlens: list[int] | None = None,
) -> list[Report]:
    """The sweep over cache lengths, batch sizes and KV heads; ``dtypes`` None: fp16 and bf16 on a
    GPU, fp32 on a CPU."""
    device = device or default_device()
    on_gpu = device.type == "cuda"
    dtypes = dtypes or ([DTYPES["fp16"], DTYPES["bf16"]] if on_gpu else [torch.float32])
    if seqlens is None:
        seqlens = ([512, 8192] if quick else [512, 2048, 8192, 32768]) if on_gpu else [256] if quick else [256, 1024]
    batches = ([1, 16] if quick else [1, 4, 16, 64]) if on_gpu else [1, 4]
    impls = implementations(device)
    report = Report(
        "bench_attention_kvcache",
        BYTE_COUNTS + f"; Hq = {HQ}, D = {HEAD_DIM}, one query per sequence",
        str(device),
        baseline="attention",
        x="L",
        panels=["dtype", "Hkv", "B"],
    )
    for dt in dtypes:
        elt = torch.tensor([], dtype=dt).element_size()
        for hkv in HKV_CHOICES:
            for b in batches:
                for n in seqlens:
                    cache_bytes = 2 * b * (n + 64) * hkv * HEAD_DIM * elt
                    if on_gpu and cache_bytes > 8 * 2**30:
                        continue
                    inputs = make_inputs(b, n, n + 64, hkv, dt, device)
                    with torch.no_grad():
                        ref = sliced("reference")(*inputs).float()

                    def check(impl, fn, inputs=inputs, ref=ref, dt=dt):
                        with torch.no_grad():
                            out = fn(*inputs).float()
                        tol = 1e-4 if dt == torch.float32 else 2e-2
                        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=lambda m, i=impl: f"{i.name}: {m}")

                    def timer(fn, inputs=inputs):
                        with torch.no_grad():
                            return {"fwd": time_ms(lambda: fn(*inputs), device, quick=quick)}

                    measured = measure(impls, timer, device, check=check, passes=("fwd",))
                    case = {"dtype": label(dt), "Hkv": hkv, "B": b, "L": n}
                    work = 2 * b * (n + 1) * hkv * HEAD_DIM * elt
                    report.add_case(case, measured.timings["fwd"], work, baseline="attention", notes=measured.notes)
                    del inputs
                    if on_gpu:
                        torch.cuda.empty_cache()
    return [report]


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__)
    parser.add_argument("--seqlen", nargs="+", type=int, default=None)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args), seqlens=args.seqlen), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
