"""attention: the reference against torch's SDPA, every kernel backend against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, device, kernel_backends, seed_for, skip_without_kernels

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.ops.attention import OP
from transformer_kernels.ops.seed import draw_seed
from transformer_kernels.reference import attention_ref, dropout_keep_mask

KERNEL_BACKENDS = kernel_backends(OP)
needs_kernels = skip_without_kernels(OP)


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    """On a GPU, one tile config per kernel: these tests check correctness, and autotuning every
    test shape would cost minutes of compiles (transformer_kernels/bench/bench_attention.py runs the tuned path)."""
    monkeypatch.setenv("TK_AUTOTUNE", "0")


def _qkv(b, lq, lk, hq, hkv, d, dtype, *, requires_grad=True):
    dev = device()
    q = torch.randn(b, lq, hq, d, device=dev).to(dtype)
    k = torch.randn(b, lk, hkv, d, device=dev).to(dtype)
    v = torch.randn(b, lk, hkv, d, device=dev).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _padding(b, lk, kind):
    """Bool [B, Lk] (True = padding): ~30% random; "full_row" also pads every key of batch 0."""
    if kind is None:
        return None
    mask = torch.rand(b, lk, device=device()) < 0.3
    if kind == "full_row":
        mask[0] = True
    return mask


def _run(fn, inputs, dout):
    """(out, lse) of ``fn(*inputs)`` and the gradients of the inputs w.r.t. <out, dout>."""
    out, lse = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
    return out.detach(), lse, list(grads)


def _assert_lse_close(fast, same_dtype, exact):
    """lse: -inf exactly where a row sees no key, the error rule elsewhere."""
    empty = torch.isneginf(exact)
    assert torch.equal(torch.isneginf(fast), empty), "lse must be -inf exactly on rows that see no key"
    assert_close_to_reference("lse", fast[~empty], same_dtype[~empty], exact[~empty].float())


def _compare(
    backend,
    dtype,
    b,
    lq,
    lk,
    hq,
    hkv,
    d,
    *,
    causal=False,
    padding=None,
    dropout_p=0.0,
    softmax_scale=None,
    keep_mask=None,
    op_rng_seed=0,
):
    """Forward, lse and dq/dk/dv of ``backend`` against the float64 reference, with the error rule.

    The op draws its dropout seed after ``torch.manual_seed(op_rng_seed)``; the reference applies
    the Philox mask of that seed, or ``keep_mask`` if given. Returns the backend's (out, lse, grads).
    """
    torch.manual_seed(seed_for(dtype, b, lq, lk, hq, hkv, d, causal, padding, dropout_p))
    q, k, v = _qkv(b, lq, lk, hq, hkv, d, dtype)
    kpm = _padding(b, lk, padding)
    dout = torch.randn(b, lq, hq, d, device=device())
    kw = dict(causal=causal, key_padding_mask=kpm, dropout_p=dropout_p, softmax_scale=softmax_scale, return_lse=True)

    torch.manual_seed(op_rng_seed)
    fast = _run(lambda *t: tk.attention(*t, backend=backend, **kw), [q, k, v], dout)
    torch.manual_seed(op_rng_seed)
    seed = int(draw_seed(device())) if dropout_p > 0 and keep_mask is None else None
    kw.update(seed=seed, keep_mask=keep_mask)
    same_dtype = _run(lambda *t: attention_ref(*t, upcast=False, **kw), [q, k, v], dout)
    exact = _run(
        lambda *t: attention_ref(*t, **kw), [t.detach().double().requires_grad_() for t in (q, k, v)], dout.double()
    )

    for name, a, s, e in zip(
        ["out", "dq", "dk", "dv"],
        [fast[0]] + fast[2],
        [same_dtype[0]] + same_dtype[2],
        [exact[0]] + exact[2],
        strict=True,
    ):
        assert_close_to_reference(f"{backend} {name}", a, s, e)
    assert fast[1].dtype == torch.float32 and fast[1].shape == (b, hq, lq)
    _assert_lse_close(fast[1], same_dtype[1], exact[1])
    return fast


# --- the reference is the specification: check it against torch itself ----------------------


@pytest.mark.parametrize(
    "lq, lk, hq, hkv, causal, padding",
    [
        (17, 17, 2, 2, False, False),
        (17, 17, 2, 2, True, False),
        (5, 17, 4, 2, True, True),
        (17, 9, 4, 1, True, False),
        (1, 9, 2, 1, False, True),
    ],
    ids=["mha", "causal", "causal_bottom_right_gqa_padding", "causal_lq_gt_lk_mqa", "decode_padding"],
)
def test_reference_matches_sdpa(lq, lk, hq, hkv, causal, padding):
    torch.manual_seed(0)
    b, d, scale = 2, 8, 0.3
    q, k, v = _qkv(b, lq, lk, hq, hkv, d, torch.float64, requires_grad=False)
    kpm = torch.rand(b, lk, device=device()) < 0.3 if padding else None
    if kpm is not None:
        kpm[:, -1] = False  # every row keeps a key: SDPA's fully masked rows are not ours (zeros)
    out, lse = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm, softmax_scale=scale, return_lse=True)

    # SDPA in [B, H, L, D]; is_causal is top-left aligned, so Lq != Lk gets an explicit mask.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool, device=device())
    if causal:
        mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=device()).tril(lk - lq)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None, :]
    has_key = mask.any(-1).expand(b, hq, lq)  # [B, Hq, Lq]
    if causal and lq == lk and kpm is None:
        expected = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    out_t = out.transpose(1, 2)
    torch.testing.assert_close(out_t[has_key], expected[has_key], rtol=1e-10, atol=1e-10)
    assert torch.all(out_t[~has_key] == 0), "rows with no visible key must be zero"

    scores = (qt @ kt.repeat_interleave(hq // hkv, 1).transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float())


@pytest.mark.parametrize(
    "variant", [dict(causal=True, padding=True), dict(dropout_p=0.4)], ids=["causal_padding_empty_rows", "dropout_gqa"]
)
def test_reference_gradcheck(variant):
    torch.manual_seed(0)
    q, k, v = _qkv(2, 4, 3, 2, 1, 4, torch.float64)
    kpm = torch.tensor([[False, True, False], [True, True, True]], device=device())
    kw = dict(
        causal=variant.get("causal", False),
        key_padding_mask=kpm if variant.get("padding") else None,
        dropout_p=variant.get("dropout_p", 0.0),
        seed=1234,
    )
    assert torch.autograd.gradcheck(lambda q, k, v: attention_ref(q, k, v, **kw), (q, k, v))


# --- kernel backends against the float64 reference -------------------------------------------

# Every axis, not every combination: dtype, head dim (16, 80, 96, 256: non-powers of two padded),
# lengths 1 / 17 / 113 with Lq != Lk both ways, causal (bottom-right; Lq > Lk leaves rows empty),
# padding (a fully padded batch row), MHA / GQA / MQA, dropout.
CASES = {
    # id: (dtype, B, Lq, Lk, Hq, Hkv, D, options)
    "fp32": (torch.float32, 2, 113, 113, 2, 2, 64, {}),
    "fp16": (torch.float16, 2, 113, 113, 2, 2, 64, {}),
    "bf16": (torch.bfloat16, 2, 113, 113, 2, 2, 64, {}),
    "fp16_causal": (torch.float16, 2, 113, 113, 2, 2, 64, dict(causal=True)),
    "bf16_causal_17x113_d32": (torch.bfloat16, 2, 17, 113, 2, 2, 32, dict(causal=True)),
    "fp32_causal_113x17_d16": (torch.float32, 2, 113, 17, 2, 2, 16, dict(causal=True)),
    "fp16_decode_1x113_d128": (torch.float16, 3, 1, 113, 2, 2, 128, dict(causal=True)),
    "fp32_1x1_d16": (torch.float32, 2, 1, 1, 2, 2, 16, {}),
    "bf16_113x1_d80": (torch.bfloat16, 2, 113, 1, 2, 2, 80, {}),
    "fp32_gqa_17x113_d96": (torch.float32, 1, 17, 113, 4, 2, 96, {}),
    "bf16_mqa_causal": (torch.bfloat16, 1, 113, 113, 4, 1, 64, dict(causal=True)),
    "fp16_padding_full_row": (torch.float16, 2, 113, 113, 2, 2, 64, dict(padding="full_row")),
    "bf16_causal_padding_gqa": (torch.bfloat16, 2, 17, 113, 4, 2, 32, dict(causal=True, padding="random")),
    "fp32_dropout": (torch.float32, 2, 17, 113, 2, 2, 32, dict(dropout_p=0.3)),
    "fp16_dropout_causal_padding_gqa": (
        torch.float16,
        2,
        113,
        113,
        4,
        2,
        64,
        dict(dropout_p=0.2, causal=True, padding="full_row"),
    ),
    "bf16_dropout_mqa_113x17_d80": (torch.bfloat16, 1, 113, 17, 4, 1, 80, dict(dropout_p=0.5)),
    "fp16_d256": (torch.float16, 1, 17, 17, 2, 2, 256, {}),
    "fp16_gqa3_causal_33x47_d40": (torch.float16, 2, 33, 47, 6, 2, 40, dict(causal=True)),
    "fp32_mqa5_padding_1x47_d24": (torch.float32, 3, 1, 47, 5, 1, 24, dict(padding="random")),
}


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    dtype, b, lq, lk, hq, hkv, d, options = CASES[case]
    _compare(backend, dtype, b, lq, lk, hq, hkv, d, **options)


@pytest.mark.parametrize(
    "group, kv_programs, min_programs, expected",
    [(1, 4, 264, 1), (32, 32, 264, 16), (32, 300, 264, 1), (6, 50, 264, 6), (6, 50, 100, 2), (7, 10, 30, 7)],
)
def test_dkdv_splits(group, kv_programs, min_programs, expected):
    """The smallest divisor of the group that fills the GPU, or the whole group."""
    from transformer_kernels.triton import attention as tri

    assert tri._dkdv_splits(group, kv_programs, min_programs) == expected


def test_varlen_takes_its_own_first_candidates(monkeypatch):
    """attention_varlen's untuned launch starts from its own first candidate where the padded one
    spills with VARLEN (compile check); the same candidates otherwise, so autotuning prunes to them."""
    from transformer_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "triton_interpret", lambda: False)
    tile = lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])  # noqa: E731
    assert tri._VARLEN_FIRST
    for kind, firsts in tri._VARLEN_FIRST.items():
        for (size, d), first in firsts.items():
            bucket = tri._CONFIGS[kind][(size, d)]
            padded = [tile(c) for c in tri._heuristics(kind, d, size == 4)]
            packed = [tile(c) for c in tri._heuristics(kind, d, size == 4, varlen=True)]
            assert padded == bucket and first in bucket
            assert packed[0] == first != bucket[0] and sorted(packed) == sorted(bucket)


def test_launch_without_autotuning_falls_back_when_shared_memory_runs_out(monkeypatch):
    """TK_AUTOTUNE=0 on a GPU with less shared memory than an A100 (sm_86/89): the bucket's next
    candidate, not a launch failure; and the error itself once no candidate fits."""
    from triton.runtime.errors import OutOfResources

    from transformer_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "triton_interpret", lambda: False)
    monkeypatch.setattr(tri, "_autotune", lambda: False)
    candidates = tri._CONFIGS["dq"][(4, 256)]
    launched = []

    class Kernel:
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, **config):
                tile = (config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"])
                if tile not in self.fits:
                    raise OutOfResources(167936, 101376, "shared memory")
                launched.append(tile)

            return launch

    tri._launch("dq", Kernel(fits=candidates[1:]), None, (1,), BLOCK_D=256, DOT_PRECISION="ieee")
    assert launched == [candidates[1]]
    with pytest.raises(OutOfResources):
        tri._launch("dq", Kernel(fits=[]), None, (1,), BLOCK_D=256, DOT_PRECISION="ieee")


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("min_programs, splits", [(1, 1), (4, 2)], ids=["one_program_per_group", "two_splits"])
def test_gqa_dkdv_split_over_query_heads(monkeypatch, min_programs, splits):
    """dK/dV of a group of 4 query heads summed by 1, 2 (and, in CASES, 4) programs per key tile."""
    from transformer_kernels.triton import attention as tri

    if device().type == "cuda":
        monkeypatch.setattr(tri, "_min_programs", lambda dev: min_programs)
    else:
        monkeypatch.setattr(tri, "_INTERPRET_MIN_PROGRAMS", min_programs)
    b, lq, lk, hq, hkv = 1, 33, 113, 4, 1
    assert tri._dkdv_splits(hq // hkv, -(-lk // tri._SPLIT_TILE) * b * hkv, min_programs) == splits
    _compare("triton", torch.bfloat16, b, lq, lk, hq, hkv, 48, causal=True, padding="random", dropout_p=0.2)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_stay_finite(backend, dtype):
    """softmax_scale 1e3: logits ~1e4, the softmax one-hot to rounding. Outputs and gradients stay
    finite and the output right. (Not the 2x rule: there the same-dtype path's probabilities are
    exactly 0 and 1, its error ~0, while any recomputation of P leaves O(ulp(1e4)) in the exponent.)"""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 33, 33, 2, 2, 32, dtype)
    out, lse = tk.attention(q, k, v, causal=True, softmax_scale=1e3, return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, t in zip(["out", "lse", "dq", "dk", "dv"], (out, lse) + grads, strict=True):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    expected, expected_lse = attention_ref(
        q.double(), k.double(), v.double(), causal=True, softmax_scale=1e3, return_lse=True
    )
    torch.testing.assert_close(out, expected.to(dtype))
    torch.testing.assert_close(lse, expected_lse)


@needs_kernels
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_rows_without_keys_are_zero_with_zero_gradient(backend):
    torch.manual_seed(0)
    b, lq, lk, h, d = 2, 20, 9, 2, 16
    q, k, v = _qkv(b, lq, lk, h, h, d, torch.float16)
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=device())
    kpm[0] = True  # batch 0: every key padded
    kpm[1, :3] = True  # batch 1: causal rows i < 11 + 3 see no key (query i sees j <= i - 11)
    out, lse = tk.attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
    assert torch.all(out[0] == 0) and torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    assert torch.all(torch.isneginf(lse[0]))
    empty_rows = slice(0, 14)
    assert torch.all(out[1, empty_rows] == 0) and torch.all(dq[1, empty_rows] == 0)
    assert torch.all(torch.isneginf(lse[1, :, empty_rows])) and torch.isfinite(lse[1, :, 14:]).all()
    assert torch.all(out[1, 14:] != 0).item()
    assert torch.all(dk[1, :3] == 0) and torch.all(dv[1, :3] == 0), "padded keys must get zero gradient"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_qkv_layout_needs_no_copy(backend):
    """q, k, v as strided views of one [B, L, 3, H, D] projection: same result as contiguous inputs."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3, 2, 32, device=device(), dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = tk.attention(q, k, v, causal=True, backend=backend)
    (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    expected = tk.attention(qc, kc, vc, causal=True, backend=backend)
    expected_grads = torch.autograd.grad(expected, (qc, kc, vc), torch.ones_like(expected))
    assert torch.equal(out, expected)
    assert torch.equal(dqkv, torch.stack(expected_grads, 2))


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_row_offsets_past_2_31_elements(backend):
    """q, k, v: the three column blocks of one fused [rows, stride] projection whose row stride
    (2^26 + 1,024 elements) puts row 39 at 2.6e9 elements, past int32: row · stride must be int64.
    5.4 GB of storage, of which only the 40 rows are touched (on a CPU, only their pages are mapped).
    With int32 offsets the interpreter reads outside the buffer and crashes; a GPU faults."""
    rows, h, d = 40, 2, 16
    stride = 2**26 + 1024
    buf = torch.empty(rows * stride, device=device(), dtype=torch.float16)
    qkv = buf.as_strided((1, rows, 3, h, d), (rows * stride, stride, h * d, d, 1))
    torch.manual_seed(0)
    qkv.copy_(torch.randn(qkv.shape, device=device()))
    q, k, v = (t.requires_grad_() for t in qkv.detach().unbind(2))
    dout = torch.randn(1, rows, h, d, device=device(), dtype=torch.float16)
    kw = dict(causal=True, dropout_p=0.1, backend=backend)
    torch.manual_seed(1)
    out = tk.attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    torch.manual_seed(1)
    expected = tk.attention(qc, kc, vc, **kw)
    expected_grads = torch.autograd.grad(expected, (qc, kc, vc), dout)
    assert torch.equal(out, expected)
    for name, a, e in zip(["dq", "dk", "dv"], grads, expected_grads, strict=True):
        assert torch.equal(a, e), f"{name} differs from the contiguous inputs'"


# --- dropout ---------------------------------------------------------------------------------


def _recover_keep_mask(backend, b, h, lq, lk, p, rng_seed, dtype=torch.float32):
    """The keep-mask the op draws after ``torch.manual_seed(rng_seed)``, read off its output:
    with q = 0 every visible probability is 1/Lk, and with v[j] = e_j, out[i, h, j] = keep_ij / (1-p) / Lk."""
    q = torch.zeros(b, lq, h, lk, device=device(), dtype=dtype)
    k = torch.randn(b, lk, h, lk, device=device(), dtype=dtype)
    v = torch.eye(lk, device=device(), dtype=dtype)[None, :, None, :].expand(b, lk, h, lk)
    torch.manual_seed(rng_seed)
    out = tk.attention(q, k, v, dropout_p=p, backend=backend)  # [B, Lq, H, Lk]
    kept = out.transpose(1, 2) != 0  # [B, H, Lq, Lk]
    torch.testing.assert_close(
        out.transpose(1, 2)[kept].float(), torch.full((int(kept.sum()),), 1 / (1 - p) / lk, device=device())
    )
    return kept


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics_and_philox_spec(backend, p):
    b, h, lq, lk = 2, 2, 48, 64
    kept = _recover_keep_mask(backend, b, h, lq, lk, p, rng_seed=7)
    n = kept.numel()
    rate = kept.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    torch.manual_seed(7)
    expected = dropout_keep_mask(int(draw_seed(device())), p, b * h * lq, lk, device()).view(b, h, lq, lk)
    assert torch.equal(kept, expected), "the mask must be the Philox mask of reference/philox.py"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_reproducible(backend):
    q, k, v = _qkv(1, 17, 33, 2, 1, 16, torch.float16)
    dout = torch.randn(1, 17, 2, 16, device=device())

    def run(rng_seed=None):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        out = tk.attention(q, k, v, dropout_p=0.5, causal=True, backend=backend)
        return [out] + list(torch.autograd.grad(out, (q, k, v), dout.half()))

    first, again, fresh = run(42), run(42), run()
    for name, a, b in zip(["out", "dq", "dk", "dv"], first, again, strict=True):
        assert torch.equal(a, b), f"same seed must give the same {name}"
    assert not torch.equal(first[0], fresh[0]), "a new draw must give a new mask"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_backward_uses_forward_mask(backend, dtype):
    """The gradients match the reference fed the mask that the op's own output reveals
    (independently of reference/philox.py): the backward regenerates the forward's mask."""
    b, lq, lk, hq, hkv, d = 2, 33, 40, 2, 1, 32
    keep = _recover_keep_mask(backend, b, hq, lq, lk, 0.3, rng_seed=5)
    _compare(
        backend,
        dtype,
        b,
        lq,
        lk,
        hq,
        hkv,
        d,
        causal=True,
        padding="random",
        dropout_p=0.3,
        op_rng_seed=5,
        keep_mask=keep,
    )


# --- errors at the API boundary --------------------------------------------------------------


def _bad(**kwargs):
    args = dict(q=torch.randn(2, 5, 4, 8), k=torch.randn(2, 7, 2, 8), v=torch.randn(2, 7, 2, 8))
    args.update(kwargs)
    return args


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (_bad(q=torch.randn(5, 4, 8)), ValueError, r"q must be 4-D \[B, Lq, Hq, D\], got shape \[5, 4, 8\]"),
        (_bad(k=torch.randn(3, 7, 2, 8), v=torch.randn(3, 7, 2, 8)), ValueError, r"batch size of k/v \(3\)"),
        (_bad(k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16)), ValueError, r"head dim of k/v \(16\)"),
        (_bad(v=torch.randn(2, 6, 2, 8)), ValueError, r"k shape \[2, 7, 2, 8\] and v shape \[2, 6, 2, 8\]"),
        (
            _bad(k=torch.randn(2, 7, 3, 8), v=torch.randn(2, 7, 3, 8)),
            ValueError,
            r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)",
        ),
        (_bad(k=torch.randn(2, 7, 2, 8, dtype=torch.float64)), TypeError, "k dtype torch.float64 does not match"),
        (_bad(key_padding_mask=torch.zeros(2, 7)), TypeError, "key_padding_mask must be a bool tensor"),
        (
            _bad(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask shape \[2, 5\] does not match \[B, Lk\] = \[2, 7\]",
        ),
        (_bad(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\]"),
        (_bad(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (_bad(backend="fast"), ValueError, "unknown backend 'fast'"),
    ],
    ids=[
        "rank",
        "batch",
        "head_dim",
        "kv_shape",
        "heads",
        "dtype",
        "mask_dtype",
        "mask_shape",
        "dropout_neg",
        "dropout_big",
        "backend",
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.attention(**kwargs)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
def test_triton_head_dim_limit():
    q = torch.randn(1, 3, 1, 300, device=device())
    with pytest.raises(
        backends.BackendError,
        match=r"attention: the triton backend cannot run these inputs: "
        r"head_dim 300 is not supported \(max 256\)",
    ):
        tk.attention(q, q, q, backend="triton")
    # auto falls back to a backend that can (the reference)
    assert tk.attention(q, q, q).shape == q.shape


# --- GPU only: the larger sizes --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d", [64, 80, 256])
@pytest.mark.parametrize("lq, lk", [(1023, 1023), (1, 1023), (513, 1023)], ids=str)
@pytest.mark.parametrize(
    "dtype, options",
    [(torch.bfloat16, dict(causal=True)), (torch.float16, dict(padding="full_row", dropout_p=0.1))],
    ids=["bf16_causal", "fp16_padding_dropout"],
)
def test_matches_reference_large(backend, d, lq, lk, dtype, options):
    _compare(backend, dtype, 2, lq, lk, 4, 2, d, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_65535_batch_heads(backend):
    """4,100 x 16 query heads (4 key/value heads): more (batch, head) pairs than a grid's axis 1 holds."""
    _compare(backend, torch.float16, 4100, 3, 5, 16, 4, 16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp32_is_not_tf32(backend):
    # tf32 keeps 10 mantissa bits: its error at D=128 is ~1e-3, far above fp32's.
    _compare(backend, torch.float32, 2, 257, 257, 2, 2, 128)


# --- the benchmark runs (tiny sizes, never timed in tests) -----------------------------------


def test_bench_attention_runs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer_kernels.bench.bench_attention",
            "--quick",
            "--seqlen",
            "64",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads((tmp_path / "bench_attention.json").read_text())
    timed = [r for r in data["rows"] if r["ms"] is not None]
    assert {r["impl"] for r in timed} >= {"sdpa", "reference"} and all(r["ms"] > 0 for r in timed)
    assert (tmp_path / "plots" / "bench_attention_speedup.png").stat().st_size > 0
    assert (tmp_path / "bench_attention.csv").read_text().startswith("dtype,D,causal,padding,B,L,pass,impl")


# --- ahead-of-time compiles: what the GPU would see, checked without one -----------------------

# Shared memory per block (opt-in maximum) of an A100 (sm_80) and an H100 (sm_90).
SMEM_PER_BLOCK = {80: 166912, 90: 232448}


def compile_resources(kind, dtype, block_d, config, arch, varlen=False):
    """(shared memory bytes, registers, spill-store bytes) of one attention kernel compiled for
    ``arch`` as a launch specialises it (16-byte aligned pointers and row strides, unit head-dim
    strides), with causal + padding + dropout, read off the ptxas -v log of Triton's own compile.
    Needs TRITON_DUMP_PTXAS_LOG=1 and TRITON_ALWAYS_COMPILE=1 in the environment."""
    import contextlib
    import io
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from transformer_kernels.triton import attention as tri

    kernel = getattr(tri, "_attention_fwd_kernel" if kind == "fwd" else f"_attention_bwd_{kind}_kernel")
    m, n, warps, stages = config
    # attention_varlen: the same kernels with VARLEN (packed rows from cu_seqlens, no padding mask)
    consts = dict(
        CAUSAL=True, HAS_KPM=not varlen, HAS_DROPOUT=True, VARLEN=varlen, BLOCK_D=block_d, BLOCK_M=m, BLOCK_N=n
    )
    consts["DOT_PRECISION"] = "ieee" if dtype == "fp32" else None
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "KPM": "*u8", "DK": "*fp32", "DV": "*fp32"}  # dK/dV: the partials
    pointers["SEED"] = "*i64"  # the dropout seed, loaded on the device
    pointers.update(CU_Q="*i32", CU_K="*i32")
    scalars = {"scale_log2": "fp32", "softmax_scale": "fp32", "drop_scale": "fp32"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.startswith("stride") and name.endswith("d"):
            consts[name], signature[name] = 1, "constexpr"
        elif name in ("Q", "K", "V", "OUT", "DOUT", "DQ", *pointers):
            signature[name] = pointers.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = scalars.get(name, "i32")
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(kernel, signature, consts, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=warps, num_stages=stages),
        )
    registers = int(re.search(r"Used (\d+) registers", log.getvalue()).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log.getvalue()).group(1))
    return compiled.metadata.shared, registers, spills


def _first_configs_fit(cases):
    from transformer_kernels.triton import attention as tri

    failures = []
    for kind, dtype, block_d in cases:
        config = tri._CONFIGS[kind][tri._bucket_of(block_d, dtype == "fp32")][0]
        for arch, smem_limit in SMEM_PER_BLOCK.items():
            smem, regs, spills = compile_resources(kind, dtype, block_d, config, arch)
            print(f"{kind} {dtype} D={block_d} {config} sm_{arch}: {smem} B smem, {regs} regs, {spills} B spilled")
            if smem > smem_limit or spills > 0:
                failures.append(f"{kind} {dtype} D={block_d} {config} sm_{arch}: {smem} B smem, {spills} B spilled")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_first_configs_fit_a100_and_h100(dtype):
    """The configs TK_AUTOTUNE=0 launches at head dims 129-256 (the largest tiles), compiled for
    sm_80 and sm_90: each fits the shared memory per block and spills no register. (The fp32
    dQ kernel once needed 167,936 B on sm_80 and could not launch; its backward spilled 10-26 KB.)"""
    cases = [(kind, dtype, 256) for kind in ("fwd", "dkdv", "dq")]
    code = f"import test_attention; test_attention._first_configs_fit({cases!r})"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
