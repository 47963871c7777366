"""attention_varlen: the reference against padded attention, every backend against the reference
and against padded ``attention``, the dropout mask, the errors at the API boundary."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_reference, device, kernel_backends, seed_for

import transformer_kernels as tk
from transformer_kernels.ops.attention_varlen import OP
from transformer_kernels.ops.seed import draw_seed
from transformer_kernels.reference import attention_ref, attention_varlen_ref

KERNEL_BACKENDS = kernel_backends(OP)
BACKENDS = ["native"] + KERNEL_BACKENDS


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    """On a GPU, one tile config per kernel (correctness tests; the benchmark runs the tuned path)."""
    monkeypatch.setenv("TK_AUTOTUNE", "0")


def _cu(lengths) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device())


def _packed(lens_q, lens_k, hq, hkv, d, dtype, *, requires_grad=True):
    """q [Σ lens_q, Hq, D], k, v [Σ lens_k, Hkv, D], cu_seqlens_q, cu_seqlens_k."""
    dev = device()
    q = torch.randn(sum(lens_q), hq, d, device=dev).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, device=dev).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, device=dev).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], _cu(lens_q), _cu(lens_k)


def _pad(t: torch.Tensor, lengths, max_len: int) -> torch.Tensor:
    """[Σ lengths, H, D] -> [B, max_len, H, D], zeros after each sequence (differentiable)."""
    parts, start = [], 0
    for n in lengths:
        seq = t[start : start + n]
        parts.append(torch.cat([seq, seq.new_zeros(max_len - n, *t.shape[1:])]))
        start += n
    return torch.stack(parts)


def _unpad(t: torch.Tensor, lengths) -> torch.Tensor:
    """[B, L, ...] -> [Σ lengths, ...]: the first lengths[b] rows of each b."""
    return torch.cat([t[b, :n] for b, n in enumerate(lengths)])


def _key_padding(lens_k, max_k):
    return torch.arange(max_k, device=device())[None, :] >= torch.tensor(lens_k, device=device())[:, None]


def _grads(out, inputs, dout):
    return list(torch.autograd.grad(out, inputs, dout.to(out.dtype)))


def _assert_lse_close(fast, same_dtype, exact):
    """lse: -inf exactly where a row sees no key, the error rule elsewhere."""
    empty = torch.isneginf(exact)
    assert torch.equal(torch.isneginf(fast), empty), "lse must be -inf exactly on rows that see no key"
    assert_close_to_reference("lse", fast[~empty], same_dtype[~empty], exact[~empty].float())


# --- the reference is the specification: padded attention, sequence by sequence ---------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_is_padded_attention(causal):
    """Self-attention (equal q/k lengths, where padded causal is per-sequence causal too), with
    dropout: the varlen reference is the padded reference on the real rows (to float64 rounding:
    the matmuls differ in length; a different dropout mask would be off by O(1))."""
    torch.manual_seed(0)
    lens = [5, 0, 1, 9]
    (q, k, v), cu_q, cu_k = _packed(lens, lens, 4, 2, 8, torch.float64, requires_grad=False)
    kw = dict(causal=causal, dropout_p=0.3, seed=1234, softmax_scale=0.4)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, 9, 9, return_lse=True, **kw)
    padded = [_pad(t, lens, 9) for t in (q, k, v)]
    out_p, lse_p = attention_ref(*padded, key_padding_mask=_key_padding(lens, 9), return_lse=True, **kw)
    torch.testing.assert_close(out, _unpad(out_p, lens), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, _unpad(lse_p.transpose(1, 2), lens).transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_reference_cross_attention_pairs_sequences():
    """Cross-attention with causal bottom-right per pair: sequence b of q sees sequence b of k alone."""
    torch.manual_seed(1)
    lens_q, lens_k = [3, 4, 0], [6, 2, 5]
    (q, k, v), cu_q, cu_k = _packed(lens_q, lens_k, 2, 1, 8, torch.float64, requires_grad=False)
    out = attention_varlen_ref(q, k, v, cu_q, cu_k, 4, 6, causal=True)
    for b in range(3):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        expected = attention_ref(q[None, sq], k[None, sk], v[None, sk], causal=True)[0]
        torch.testing.assert_close(out[sq], expected, rtol=0, atol=0)


def test_reference_gradcheck():
    torch.manual_seed(0)
    (q, k, v), cu_q, cu_k = _packed([2, 0, 3], [3, 2, 0], 2, 1, 4, torch.float64)
    kw = dict(causal=True, dropout_p=0.4, seed=99)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, 3, 3, **kw), (q, k, v))


# --- every backend against the float64 reference ----------------------------------------------


def _compare(backend, dtype, lens_q, lens_k, hq, hkv, d, *, causal=False, dropout_p=0.0, max_pad=0):
    """Forward, lse and dq/dk/dv of ``backend`` against the float64 reference, by the error rule."""
    torch.manual_seed(seed_for(dtype, lens_q, lens_k, hq, hkv, d, causal, dropout_p))
    (q, k, v), cu_q, cu_k = _packed(lens_q, lens_k, hq, hkv, d, dtype)
    max_q, max_k = max(lens_q) + max_pad, max(lens_k) + max_pad
    dout = torch.randn(q.shape, device=device())
    kw = dict(causal=causal, dropout_p=dropout_p, return_lse=True)
    torch.manual_seed(7)
    out, lse = tk.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, **kw)
    fast = [out, *_grads(out, (q, k, v), dout)]
    torch.manual_seed(7)
    kw["seed"] = int(draw_seed()) if dropout_p > 0 else None
    ref = attention_varlen_ref
    out_s, lse_s = ref(q, k, v, cu_q, cu_k, max_q, max_k, upcast=False, **kw)
    same_dtype = [out_s, *_grads(out_s, (q, k, v), dout)]
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_e, lse_e = ref(*exact_in, cu_q, cu_k, max_q, max_k, **kw)
    exact = [out_e, *_grads(out_e, exact_in, dout.double())]
    for name, a, s, e in zip(["out", "dq", "dk", "dv"], fast, same_dtype, exact, strict=True):
        assert_close_to_reference(f"{backend} {name}", a, s, e)
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lens_q))
    _assert_lse_close(lse, lse_s, lse_e)


# Lengths 0, 1, 17, 113 mixed in one batch (the empty sequence first, in the middle, last); self-
# and cross-attention, both orders of q/k length; causal (bottom-right per pair), GQA/MQA, dropout.
MIXED = [17, 0, 113, 1]
CASES = {
    # id: (dtype, lens_q, lens_k, Hq, Hkv, D, options)
    "fp32": (torch.float32, MIXED, MIXED, 2, 2, 32, {}),
    "fp16_causal": (torch.float16, MIXED, MIXED, 2, 2, 64, dict(causal=True)),
    "bf16_gqa_causal": (torch.bfloat16, [0, 1, 17, 113], [0, 1, 17, 113], 4, 2, 32, dict(causal=True)),
    "fp32_cross_causal_mqa_d24": (torch.float32, [1, 17, 0, 113], [113, 0, 17, 1], 3, 1, 24, dict(causal=True)),
    "fp16_cross_dropout_gqa_d80": (torch.float16, MIXED, [5, 113, 17, 0], 4, 2, 80, dict(dropout_p=0.25)),
    "bf16_dropout_causal": (torch.bfloat16, MIXED, MIXED, 2, 1, 16, dict(dropout_p=0.3, causal=True)),
    "fp32_max_seqlen_above_longest": (torch.float32, [17, 1], [9, 33], 2, 2, 16, dict(causal=True, max_pad=20)),
    "fp16_d256": (torch.float16, [17, 0, 5], [17, 3, 0], 2, 2, 256, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    dtype, lens_q, lens_k, hq, hkv, d, options = CASES[case]
    _compare(backend, dtype, lens_q, lens_k, hq, hkv, d, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_among_short(backend):
    """One 1023-token sequence beside empty and short ones (small heads)."""
    _compare(backend, torch.float16, [1023, 0, 17, 1], [1023, 0, 17, 1], 1, 1, 16, causal=True)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("min_programs, splits", [(1, 1), (4, 2)], ids=["one_program_per_group", "two_splits"])
def test_gqa_dkdv_splits(monkeypatch, min_programs, splits):
    """dK/dV of a group of 4 query heads summed by 1 or 2 programs per key tile (4 in CASES: the
    interpreter's default), the packed partials' layout included."""
    from transformer_kernels.triton import attention as tri

    if device().type == "cuda":
        monkeypatch.setattr(tri, "_min_programs", lambda dev: min_programs)
    else:
        monkeypatch.setattr(tri, "_INTERPRET_MIN_PROGRAMS", min_programs)
    # 3 sequences x 1 key/value head x one 64-key tile (max_seqlen_k 33) = 3 programs without a split
    assert tri._dkdv_splits(4, 3, min_programs) == splits
    _compare("triton", torch.bfloat16, [17, 0, 40], [33, 5, 0], 4, 1, 32, causal=True, dropout_p=0.2)


# --- against padded attention -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_padded_attention(backend, causal):
    """Self-attention with dropout: the packed call's output and gradients are padded ``attention``'s
    on the same backend with the same seed, by the error rule (the padded call as the yardstick
    against the float64 reference): a different dropout mask would be far off."""
    lens = [17, 0, 40, 1]
    dtype, max_len, p = torch.float16, 40, 0.3
    torch.manual_seed(seed_for("padded", backend, causal))
    (q, k, v), cu, _ = _packed(lens, lens, 2, 1, 32, dtype)
    dout = torch.randn(q.shape, device=device())
    kw = dict(causal=causal, dropout_p=p)

    torch.manual_seed(3)
    out = tk.attention_varlen(q, k, v, cu, cu, max_len, max_len, backend=backend, **kw)
    packed = [out, *_grads(out, (q, k, v), dout)]

    kpm = _key_padding(lens, max_len)
    padded_in = [_pad(t, lens, max_len).detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    out_p = tk.attention(*padded_in, key_padding_mask=kpm, backend=backend, **kw)
    grads_p = _grads(out_p, padded_in, _pad(dout, lens, max_len))
    padded = [_unpad(out_p, lens), _unpad(grads_p[0], lens), _unpad(grads_p[1], lens), _unpad(grads_p[2], lens)]

    torch.manual_seed(3)
    seed = int(draw_seed())
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_e = attention_varlen_ref(*exact_in, cu, cu, max_len, max_len, seed=seed, **kw)
    exact = [out_e, *_grads(out_e, exact_in, dout.double())]
    for name, a, s, e in zip(["out", "dq", "dk", "dv"], packed, padded, exact, strict=True):
        assert_close_to_reference(f"{backend} {name} vs padded attention", a, s, e)


def _revealed_keep_mask(fn, lens_q, lens_k, h, max_k, p):
    """The keep-mask ``fn(q, k, v)`` applies, read off its output: with q = 0 every visible
    probability of sequence b is 1/Lk_b, and with v[j] = e_j (j within the sequence) the output
    is out[i, h, j] = keep_ij / (1 - p) / Lk_b. Returns [Σ lens_q, H, max_k] bool."""
    dev = device()
    q = torch.zeros(sum(lens_q), h, max_k, device=dev)
    k = torch.randn(sum(lens_k), h, max_k, device=dev)
    v = torch.cat([torch.eye(n, max_k, device=dev) for n in lens_k])[:, None, :].expand(-1, h, -1)
    return fn(q, k, v) != 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_padded_attentions(backend):
    """Bit for bit: the mask of the packed call is the padded call's (same seed), and the Philox
    mask of reference/philox.py in the padded [B · Hq · max_q, max_k] layout."""
    lens_q, lens_k, h, p = [5, 0, 33, 1], [17, 4, 0, 40], 2, 0.5
    max_q, max_k = 33, 40
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)

    def packed(q, k, v):
        torch.manual_seed(11)
        return tk.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=p, backend=backend)

    def padded(q, k, v):
        torch.manual_seed(11)
        pad = [_pad(q, lens_q, max_q), _pad(k, lens_k, max_k), _pad(v, lens_k, max_k)]
        out = tk.attention(*pad, key_padding_mask=_key_padding(lens_k, max_k), dropout_p=p, backend=backend)
        return _unpad(out, lens_q)

    kept = _revealed_keep_mask(packed, lens_q, lens_k, h, max_k, p)
    assert torch.equal(kept, _revealed_keep_mask(padded, lens_q, lens_k, h, max_k, p))
    assert kept.any() and not kept.all()
    torch.manual_seed(11)
    seed = int(draw_seed())
    full = tk.reference.dropout_keep_mask(seed, p, len(lens_q) * h * max_q, max_k, device())
    full = full.view(len(lens_q), h, max_q, max_k).transpose(1, 2)  # [B, max_q, H, max_k]
    visible = torch.arange(max_k, device=device()) < torch.tensor(lens_k, device=device())[:, None, None, None]
    assert torch.equal(kept, _unpad(full & visible, lens_q))


# --- errors at the API boundary ------------------------------------------------------------------


def _bad(**kwargs):
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    args = dict(
        q=torch.randn(5, 4, 8),
        k=torch.randn(5, 2, 8),
        v=torch.randn(5, 2, 8),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=3,
        max_seqlen_k=3,
    )
    args.update(kwargs)
    return args


def _cu_cpu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (_bad(q=torch.randn(1, 5, 4, 8)), ValueError, r"q must be 3-D \[total_q, Hq, D\], got shape \[1, 5, 4, 8\]"),
        (_bad(k=torch.randn(5, 2, 16), v=torch.randn(5, 2, 16)), ValueError, r"head dim of k/v \(16\)"),
        (_bad(v=torch.randn(4, 2, 8)), ValueError, r"k shape \[5, 2, 8\] and v shape \[4, 2, 8\]"),
        (
            _bad(k=torch.randn(5, 3, 8), v=torch.randn(5, 3, 8)),
            ValueError,
            r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)",
        ),
        (_bad(k=torch.randn(5, 2, 8, dtype=torch.float64)), TypeError, "k dtype torch.float64 does not match"),
        (
            _bad(cu_seqlens_q=_cu_cpu(0, 2, 5, dtype=torch.int64)),
            TypeError,
            r"cu_seqlens_q must be an int32 tensor \[B \+ 1\], got torch.int64",
        ),
        (_bad(cu_seqlens_k=[0, 2, 5]), TypeError, "cu_seqlens_k must be an int32 tensor"),
        (_bad(cu_seqlens_q=_cu_cpu(0, 2, 5)[None]), ValueError, r"cu_seqlens_q must be 1-D \[B \+ 1\]"),
        (_bad(cu_seqlens_k=_cu_cpu(0, 5)), ValueError, "cu_seqlens_k has 2 entries, cu_seqlens_q 3"),
        (_bad(cu_seqlens_q=_cu_cpu(1, 2, 5)), ValueError, r"cu_seqlens_q\[0\] must be 0, got 1"),
        (
            _bad(cu_seqlens_k=_cu_cpu(0, 4, 5)),
            ValueError,
            r"max_seqlen_k \(3\) is less than the longest sequence \(4\)",
        ),
        (
            _bad(cu_seqlens_q=_cu_cpu(0, 3, 2, 5), cu_seqlens_k=_cu_cpu(0, 2, 2, 5)),
            ValueError,
            r"cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] < cu_seqlens_q\[1\]",
        ),
        (_bad(cu_seqlens_k=_cu_cpu(0, 2, 4)), ValueError, r"cu_seqlens_k\[-1\] \(4\) must equal the number of tokens"),
        (_bad(max_seqlen_q=2), ValueError, r"max_seqlen_q \(2\) is less than the longest sequence \(3\)"),
        (_bad(max_seqlen_q=3.0), TypeError, "max_seqlen_q must be an int, got float"),
        (_bad(max_seqlen_k=-1), ValueError, r"max_seqlen_k must be >= 0, got -1"),
        (_bad(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (_bad(backend="fast"), ValueError, "unknown backend 'fast'"),
    ],
    ids=[
        "rank",
        "head_dim",
        "kv_shape",
        "heads",
        "dtype",
        "cu_dtype",
        "cu_not_tensor",
        "cu_rank",
        "cu_lengths_differ",
        "cu_start",
        "max_seqlen_k_short",
        "cu_decreasing",
        "cu_total",
        "max_seqlen_q_short",
        "max_seqlen_float",
        "max_seqlen_negative",
        "dropout",
        "backend",
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.attention_varlen(**kwargs)


def test_value_checks_can_be_switched_off():
    """check_seqlens=False skips the checks that read cu_seqlens (as on a GPU by default); the
    shape and dtype checks stay."""
    args = _bad(max_seqlen_q=2)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        tk.attention_varlen(**args, check_seqlens=True)
    bad_dtype = _bad(cu_seqlens_q=_cu_cpu(0, 2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32"):
        tk.attention_varlen(**bad_dtype, check_seqlens=False)
    out = tk.attention_varlen(**args, check_seqlens=False, backend="reference")  # not read: no error
    assert out.shape == args["q"].shape


# --- GPU only: the larger sizes ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize(
    "options", [{}, dict(causal=True), dict(causal=True, dropout_p=0.1)], ids=["full", "causal", "causal_dropout"]
)
def test_matches_reference_large(backend, d, options):
    """Many sequences of every length class (0, 1, odd, past the tiles) with GQA, in bf16."""
    lens_q = [1023, 0, 1, 17, 2047, 113, 640, 0, 5]
    lens_k = [1023, 3, 0, 17, 2047, 200, 513, 0, 5]
    _compare(backend, torch.bfloat16, lens_q, lens_k, 8, 2, d, **options)
