"""The representative problems the compile check drives through the real Triton launchers.

Each problem builds fake CUDA tensors (shape, strides, dtype; no storage) of a realistic size and
calls a launcher of ``transformer_kernels.triton``; the check records the launches it makes. The set
is chosen so that every constexpr branch of every kernel compiles in each dtype for which it changes
the code, without the full product (which would be thousands of compiles):

- attention: head dims 64/128/256 × fp16/bf16/fp32; "plain" (no mask, no dropout, MHA, lengths a
  multiple of 16) and "masked" (causal + key padding + dropout, GQA 4:1, odd lengths); fp16 takes
  both, bf16 and fp32 the heavier "masked" (their plain compiles differ from fp16's only in the
  element type). Forward and backward (delta, dK/dV, dQ). attention_varlen, the same kernels with
  VARLEN: packed sequences (8 of up to 1000 tokens), causal + dropout, GQA 4:1, every dtype.
- fused_linear: each activation with and without dropout in the forward GEMM's epilogue, then
  dz and the two backward GEMMs (dx, dW with and without the bias row sum); fp16 all, bf16 and
  fp32 the heaviest epilogue (gelu_tanh + dropout).
- dropout_add_layer_norm: widths 1000, 4096, 16384 and the supported maximum 65536; LayerNorm with
  residual, dropout, weight and bias, and bare RMSNorm; forward and backward.
- cross_entropy: vocabularies 1000, 32000 and 128256, with and without the gradient and label
  smoothing; linear_cross_entropy's chunked path.
- glu: each activation in fp16, the heaviest (gelu_tanh) in bf16 and fp32; forward and backward.
- attention_with_kvcache: head dims 64/128/256 × fp16/bf16/fp32, a decoding step of 1 query
  (one split, no mask) and a speculative step of 4 (append + key padding + causal, GQA 4:1, four
  splits and their merge); fp16 takes both, bf16 and fp32 the heavier.
"""

from __future__ import annotations

import torch

from .core import KnownOffender, Problem

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _t(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _seed(p):
    """The dropout seed a launch gets: a 0-dim int64 tensor on the device (the kernels load it), or None."""
    return torch.empty((), dtype=torch.int64, device="cuda") if p else None


def modules():
    """The modules whose ``@triton.jit`` functions every problem set must reach."""
    from ..triton import attention, attention_kvcache, cross_entropy, dropout_add_layer_norm, ffn, glu, philox

    return [attention, attention_kvcache, cross_entropy, dropout_add_layer_norm, ffn, glu, philox]


# ---------------------------------------------------------------------------------------------


def _attention(dtype, d, masked):
    from ..triton.attention import attention_bwd, attention_fwd

    b, hq = 2, 8
    hkv, length, p = (2, 1000, 0.1) if masked else (8, 1024, 0.0)
    q = _t(b, length, hq, d, dtype=dtype)
    k, v = _t(b, length, hkv, d, dtype=dtype), _t(b, length, hkv, d, dtype=dtype)
    kpm = torch.empty(b, length, dtype=torch.bool, device="cuda") if masked else None
    seed = _seed(p)
    out, lse2 = attention_fwd(q, k, v, kpm, masked, p, d**-0.5, seed)
    attention_bwd(torch.empty_like(out), q, k, v, out, lse2, kpm, masked, p, d**-0.5, seed)


def _attention_kvcache(dtype, d, full):
    from ..triton.attention_kvcache import attention_with_kvcache_fwd

    b, hq, hkv, lmax = 8, 32, 8, 4096
    lq = 4 if full else 1
    q = _t(b, lq, hq, d, dtype=dtype)
    k_cache, v_cache = _t(b, lmax, hkv, d, dtype=dtype), _t(b, lmax, hkv, d, dtype=dtype)
    seqlens = torch.empty(b, dtype=torch.int32, device="cuda")
    k, v = (_t(b, lq, hkv, d, dtype=dtype), _t(b, lq, hkv, d, dtype=dtype)) if full else (None, None)
    kpm = torch.empty(b, lmax, dtype=torch.bool, device="cuda") if full else None
    attention_with_kvcache_fwd(q, k_cache, v_cache, seqlens, k, v, kpm, full, d**-0.5, 4 if full else 1)


def _attention_varlen(dtype, d):
    from ..triton.attention import attention_varlen_bwd, attention_varlen_fwd

    b, hq, hkv, total, max_len, p = 8, 8, 2, 5000, 1000, 0.1
    q = _t(total, hq, d, dtype=dtype)
    k, v = _t(total, hkv, d, dtype=dtype), _t(total, hkv, d, dtype=dtype)
    cu = torch.empty(b + 1, dtype=torch.int32, device="cuda")
    args = (cu, cu, max_len, max_len, True, p, d**-0.5, _seed(p))
    out, lse2 = attention_varlen_fwd(q, k, v, *args)
    attention_varlen_bwd(torch.empty_like(out), q, k, v, out, lse2, *args)


def _ffn(dtype, activation, p, has_bias=True, d=1024, hidden=4096, tokens=4096):
    from ..triton.ffn import fused_linear_bwd, fused_linear_fwd

    x, w = _t(tokens, d, dtype=dtype), _t(hidden, d, dtype=dtype)
    bias = _t(hidden, dtype=dtype) if has_bias else None
    seed = _seed(p)
    out, z = fused_linear_fwd(x, w, bias, activation, p, seed)
    fused_linear_bwd(torch.empty_like(out), x, w, out, z, has_bias, activation, p, seed)


def _layer_norm(dtype, n, full):
    from ..triton.dropout_add_layer_norm import dropout_add_layer_norm_bwd, dropout_add_layer_norm_fwd

    m = 4096
    x = _t(m, n, dtype=dtype)
    r = _t(m, n, dtype=dtype) if full else None
    w = _t(n, dtype=dtype)
    bias = _t(n, dtype=dtype) if full else None
    p = 0.1 if full else 0.0
    seed = _seed(p)
    out, s, mean, rstd = dropout_add_layer_norm_fwd(x, r, w, bias, p, 1e-5, seed, not full, full)
    dropout_add_layer_norm_bwd(
        torch.empty_like(out), torch.empty_like(out) if full else None, s if full else x, w, mean, rstd, p, seed,
        not full, full,
    )  # fmt: skip


def _cross_entropy(dtype, v, train):
    from ..triton.cross_entropy import cross_entropy_fwd

    n = 4096
    target = torch.empty(n, dtype=torch.int64, device="cuda")
    scale = torch.empty((), dtype=torch.float32, device="cuda")
    cross_entropy_fwd(_t(n, v, dtype=dtype), target, scale, 0.1 if train else 0.0, -100, train)


def _linear_cross_entropy(dtype, v):
    from ..triton.cross_entropy import linear_cross_entropy_fwd

    n, d = 4096, 1024
    target = torch.empty(n, dtype=torch.int64, device="cuda")
    scale = torch.empty(n, dtype=torch.float32, device="cuda")
    linear_cross_entropy_fwd(_t(n, d, dtype=dtype), _t(v, d, dtype=dtype), target, None, scale, 0.0, -100, True, 0)


def _glu(dtype, activation):
    from ..triton.glu import glu_bwd, glu_fwd

    gate, up = _t(4096, 11008, dtype=dtype), _t(4096, 11008, dtype=dtype)
    out = glu_fwd(gate, up, activation)
    glu_bwd(torch.empty_like(out), gate, up, activation)


def problems() -> list[Problem]:
    out = []
    for name, dtype in DTYPES.items():
        for d in (64, 128, 256):
            for masked in (False, True) if name == "fp16" else (True,):
                label = f"attention {name} d={d} " + ("causal+padding+dropout gqa4 L=1000" if masked else "L=1024")
                out.append(Problem(label, lambda dtype=dtype, d=d, masked=masked: _attention(dtype, d, masked)))
            # "attention <dtype> varlen ...": the attention entries of KNOWN_OFFENDERS match it too
            label = f"attention {name} varlen d={d} causal+dropout gqa4 B=8 max L=1000"
            out.append(Problem(label, lambda dtype=dtype, d=d: _attention_varlen(dtype, d)))
    for name, dtype in DTYPES.items():
        for d in (64, 128, 256):
            for full in (False, True) if name == "fp16" else (True,):
                label = f"attention_kvcache {name} d={d} " + ("Lq=4 append+padding gqa4 splits=4" if full else "Lq=1")
                out.append(Problem(label, lambda dtype=dtype, d=d, full=full: _attention_kvcache(dtype, d, full)))
    for name, dtype in DTYPES.items():
        variants = [("relu", 0.1), ("gelu", 0.0), ("gelu_tanh", 0.1), ("none", 0.0)]
        for activation, p in variants if name == "fp16" else [("gelu_tanh", 0.1)]:
            label = f"fused_linear {name} {activation} dropout={p} 4096x1024->4096"
            out.append(Problem(label, lambda dtype=dtype, a=activation, p=p: _ffn(dtype, a, p)))
    for name, dtype in DTYPES.items():
        for n in (1000, 4096, 16384, 65536):
            for full in (True, False):
                label = f"layer_norm {name} N={n} " + ("residual+dropout+bias" if full else "rms")
                out.append(Problem(label, lambda dtype=dtype, n=n, full=full: _layer_norm(dtype, n, full)))
    for name, dtype in DTYPES.items():
        for v in (1000, 32000, 128256):
            for train in (True, False):
                label = f"cross_entropy {name} V={v} " + ("grad+smoothing" if train else "loss only")
                out.append(Problem(label, lambda dtype=dtype, v=v, train=train: _cross_entropy(dtype, v, train)))
        label = f"linear_cross_entropy {name} V=32000"
        out.append(Problem(label, lambda dtype=dtype: _linear_cross_entropy(dtype, 32000)))
    for name, dtype in DTYPES.items():
        for activation in ("silu", "gelu", "gelu_tanh") if name == "fp16" else ("gelu_tanh",):
            label = f"glu {name} {activation} 4096x11008"
            out.append(Problem(label, lambda dtype=dtype, a=activation: _glu(dtype, a)))
    return out


# ---------------------------------------------------------------------------------------------
# Known offenders: failures that exist today, each being fixed in its kernel. An entry matches
# rows by glob (kernel, problem, config, arch, Triton version); a matched row reports "known" instead
# of failing. The list only shrinks: a full sweep names every entry that no longer matches a failure
# ("STALE"), for its deletion.

KNOWN_OFFENDERS: list[KnownOffender] = []
