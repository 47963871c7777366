"""The ops under ``torch.autocast``: each follows the policy torch gives the op it replaces.

Under autocast with fp32 inputs and parameters, an op must give exactly what it gives outside
autocast on the inputs autocast would have cast (the autocast dtype for the GEMM-like ops as
``F.linear``/SDPA, fp32 for layer norm as ``F.layer_norm``, the logits as they are for
cross-entropy), gradients reaching the fp32 leaves in fp32; and it must run — the kernels'
launchers see autocast off (a launcher's ``torch.mm(..., out=fp32)`` used to be recast and fail).
"""

from __future__ import annotations

import pytest
import torch
from helpers import device, kernel_backends, seed_for

import transformer_kernels as tk

AMP_DTYPES = [torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


def _leaves(*shapes, dev):
    return [torch.randn(*s, device=dev, requires_grad=True) for s in shapes]


def _run(fn, leaves, amp_dtype, autocast: bool):
    """fn(*leaves)'s output and the gradients of a fixed random projection of it w.r.t. the leaves."""
    dev = leaves[0].device
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=autocast):
        out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out, grads


def _assert_same(fn_amp, fn_manual, leaves, amp_dtype, out_dtype):
    out, grads = _run(fn_amp, leaves, amp_dtype, autocast=True)
    expected, expected_grads = _run(fn_manual, leaves, amp_dtype, autocast=False)
    assert out.dtype == out_dtype
    assert torch.equal(out, expected)
    for leaf, got, want in zip(leaves, grads, expected_grads, strict=True):
        assert got is not None and got.dtype == leaf.dtype == torch.float32
        assert torch.equal(got, want)


def _cases(op):
    return [
        pytest.param(b, dt, id=f"{b}-{str(dt)[6:]}") for b in ["reference"] + kernel_backends(op) for dt in AMP_DTYPES
    ]


@pytest.mark.parametrize("backend, amp_dtype", _cases("ffn"))
def test_ffn_casts_like_linear(backend, amp_dtype):
    torch.manual_seed(seed_for("ffn", backend, amp_dtype))
    leaves = _leaves((3, 17, 24), (40, 24), (40,), (24, 40), (24,), dev=device())

    def fast(x, w1, b1, w2, b2):
        return tk.ffn(x, w1, b1, w2, b2, "relu", backend=backend)

    def manual(*ts):
        return fast(*(t.to(amp_dtype) for t in ts))

    _assert_same(fast, manual, leaves, amp_dtype, amp_dtype)


@pytest.mark.parametrize("backend, amp_dtype", _cases("fused_linear"))
def test_fused_linear_casts_like_linear(backend, amp_dtype):
    torch.manual_seed(seed_for("fused_linear", backend, amp_dtype))
    leaves = _leaves((5, 33), (17, 33), (17,), dev=device())

    def fast(x, w, b):
        return tk.fused_linear(x, w, b, "gelu", backend=backend)

    def manual(*ts):
        return fast(*(t.to(amp_dtype) for t in ts))

    _assert_same(fast, manual, leaves, amp_dtype, amp_dtype)
    # the same dtype torch's own layer gives under autocast
    x, w, b = leaves
    with torch.autocast(x.device.type, dtype=amp_dtype):
        assert torch.nn.functional.linear(x, w, b).dtype == amp_dtype


@pytest.mark.parametrize("backend, amp_dtype", _cases("attention"))
def test_attention_casts_like_sdpa(backend, amp_dtype):
    torch.manual_seed(seed_for("attention", backend, amp_dtype))
    leaves = _leaves((2, 17, 2, 16), (2, 13, 2, 16), (2, 13, 2, 16), dev=device())
    mask = torch.zeros(2, 13, dtype=torch.bool, device=device())
    mask[1, 9:] = True

    def fast(q, k, v):
        return tk.attention(q, k, v, key_padding_mask=mask, backend=backend)

    def manual(*ts):
        return fast(*(t.to(amp_dtype) for t in ts))

    _assert_same(fast, manual, leaves, amp_dtype, amp_dtype)


@pytest.mark.parametrize("backend, amp_dtype", _cases("dropout_add_layer_norm"))
def test_layer_norm_follows_torch_add_then_layer_norm(backend, amp_dtype):
    torch.manual_seed(seed_for("ln", backend, amp_dtype))
    leaves = _leaves((4, 7, 48), (4, 7, 48), (48,), (48,), dev=device())
    x, r, w, b = leaves
    with torch.autocast(x.device.type, dtype=amp_dtype):  # torch's own dtype for this block
        torch_dtype = torch.nn.functional.layer_norm(r + x.to(amp_dtype), (48,), w, b).dtype

    def fast(x, r, w, b):
        return tk.dropout_add_layer_norm(x, r, w, b, backend=backend)

    def mixed(x, r, w, b):  # a sublayer's output in the autocast dtype beside the fp32 residual stream
        return fast(x.to(amp_dtype), r, w, b)

    def manual(x, r, w, b):  # what autocast does with it: x up to the residual's fp32
        return fast(x.to(amp_dtype).float(), r, w, b)

    _assert_same(mixed, manual, leaves, amp_dtype, torch_dtype)


@pytest.mark.parametrize("backend, amp_dtype", _cases("linear_cross_entropy"))
def test_linear_cross_entropy_casts_the_projection(backend, amp_dtype):
    torch.manual_seed(seed_for("lce", backend, amp_dtype))
    leaves = _leaves((19, 32), (37, 32), (37,), dev=device())
    target = torch.randint(0, 37, (19,), device=device())

    def fast(h, w, b):
        return tk.linear_cross_entropy(h, w, target, b, label_smoothing=0.1, backend=backend)

    def manual(*ts):
        return fast(*(t.to(amp_dtype) for t in ts))

    _assert_same(fast, manual, leaves, amp_dtype, torch.float32)


@pytest.mark.parametrize("backend, amp_dtype", _cases("cross_entropy"))
def test_cross_entropy_keeps_the_logits(backend, amp_dtype):
    torch.manual_seed(seed_for("ce", backend, amp_dtype))
    (logits,) = _leaves((19, 37), dev=device())
    target = torch.randint(0, 37, (19,), device=device())

    def fast(z):
        return tk.cross_entropy(z, target, backend=backend)

    _assert_same(fast, fast, [logits], amp_dtype, torch.float32)


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_model_trains_under_autocast(amp_dtype):
    """The paper's model, one training step under autocast: every op takes what autocast hands it."""
    from transformer_kernels.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 50, 50, dropout=0.1, pad_id=0, bos_id=1, eos_id=2).to(device())
    src = torch.randint(3, 50, (3, 11), device=device())
    tgt = torch.randint(3, 50, (3, 9), device=device())
    with torch.autocast(device().type, dtype=amp_dtype):
        loss = model.loss(src, tgt[:, :-1], tgt[:, 1:], label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )


def test_autocast_compiles_fullgraph():
    """The policy is read inside compiled graphs too (no graph break at the autocast checks)."""
    torch._dynamo.reset()
    x, w, b = (t.detach() for t in _leaves((6, 24), (40, 24), (40,), dev=device()))

    def f(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return tk.fused_linear(x, w, b, "relu", backend="reference")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, f(x))
