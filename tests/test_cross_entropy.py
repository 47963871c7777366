"""cross_entropy / linear_cross_entropy: the reference against torch, the kernels against the reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_close_to_reference, device, kernel_backends, max_err, seed_for, skip_without_kernels

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.ops.cross_entropy import CE_OP
from transformer_kernels.reference import cross_entropy_ref, linear_cross_entropy_ref

KERNEL_BACKENDS = kernel_backends(CE_OP)
BACKENDS = ["reference"] + KERNEL_BACKENDS
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
needs_kernels = skip_without_kernels(CE_OP)


def _targets(n: int, v: int, *, ignore_every: int = 3, ignore_index: int = IGNORE) -> torch.Tensor:
    """Random class indices with every ``ignore_every``-th row ignored (row 1, 4, ...)."""
    t = torch.randint(0, v, (n,), device=device())
    t[1::ignore_every] = ignore_index
    return t


def _upstream(loss: torch.Tensor, scalar: float = 0.75) -> torch.Tensor:
    """A random incoming gradient of the loss (fp32, like the loss); ``scalar`` for a reduced loss."""
    return torch.randn(loss.shape, device=loss.device) if loss.dim() else torch.tensor(scalar, device=loss.device)


def _loss_and_grads(fn, inputs, g=None, scalar=0.75):
    loss = fn(*inputs)
    g = _upstream(loss, scalar) if g is None else g
    grads = torch.autograd.grad(loss, [t for t in inputs if t is not None], g.to(loss.dtype))
    return loss.detach(), list(grads), g


# --- the reference is the specification: check it against torch itself ----------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("v", [1, 7, 50])
@pytest.mark.parametrize("ignore_index", [IGNORE, 2])
def test_reference_matches_torch(reduction, label_smoothing, v, ignore_index):
    torch.manual_seed(v)
    x = (3 * torch.randn(9, v, dtype=torch.float64)).requires_grad_()
    t = _targets(9, v, ignore_index=ignore_index).cpu()
    kw = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    ours, (dours,), g = _loss_and_grads(lambda x: cross_entropy_ref(x, t, **kw), [x])
    theirs, (dtheirs,), _ = _loss_and_grads(lambda x: F.cross_entropy(x, t, **kw), [x], g)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dours, dtheirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_all_ignored_matches_torch(reduction):
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.full((4,), IGNORE)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(cross_entropy_ref(x, t, **kw), F.cross_entropy(x, t, **kw), equal_nan=True)


# --- kernel backends against the float64 reference -------------------------------------------


def _torch_ce(logits, target, **kw):
    """The same-dtype PyTorch path: what a plain PyTorch user gets for low-precision logits, i.e.
    F.cross_entropy as torch.autocast runs it (upcast to fp32: it is on autocast's fp32 list); the
    gradient comes back in the logits' dtype, rounded once. (F.cross_entropy straight on bf16
    logits rounds the log-probabilities and the loss to bf16: a far looser bar.)"""
    return F.cross_entropy(logits.float(), target, **kw)


def _assert_loss_close(name, fast, same, exact):
    """The tolerance rule for the loss. A reduced loss is one number, and torch's error on it can be
    zero by luck of rounding, so the rule's floor there is one ulp of the fp32 result (an error any
    fp32 sum of per-row losses can make) instead of the tiny atol meant for O(1) elements."""
    if fast.dim():
        return assert_close_to_reference(name, fast, same, exact)
    assert fast.dtype == torch.float32 and (torch.isfinite(fast) or torch.isnan(exact)), f"{name}: {fast}"
    err, err_pt = max_err(fast, exact), max_err(same, exact)
    bound = 2 * err_pt + exact.abs().item() * torch.finfo(torch.float32).eps
    assert err <= bound or (torch.isnan(fast) and torch.isnan(exact)), f"{name}: error {err:.3e} > {bound:.3e}"


def _compare_ce(backend, n, v, dtype, reduction, label_smoothing, scale=1.0):
    torch.manual_seed(seed_for(n, v, dtype, reduction, label_smoothing))
    x = (scale * torch.randn(n, v, device=device())).to(dtype).requires_grad_()
    t = _targets(n, v)
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    fast, dfast, g = _loss_and_grads(lambda x: tk.cross_entropy(x, t, backend=backend, **kw), [x])
    same, dsame, _ = _loss_and_grads(lambda x: _torch_ce(x, t, **kw), [x], g)
    xd = x.detach().double().requires_grad_()
    exact, dexact, _ = _loss_and_grads(lambda x: cross_entropy_ref(x, t, **kw), [xd], g)
    assert fast.dtype == torch.float32
    _assert_loss_close(f"{backend} loss", fast, same, exact)
    assert_close_to_reference(f"{backend} dlogits", dfast[0], dsame[0], dexact[0])
    assert torch.all(dfast[0][t == IGNORE] == 0), "ignored rows must get zero gradient"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", [(9, 1), (13, 7), (6, 300), (3, 32003)], ids=str)
def test_cross_entropy_matches_reference(backend, n, v, dtype, label_smoothing, reduction):
    _compare_ce(backend, n, v, dtype, reduction, label_smoothing)


def _compare_lce(backend, n, d, v, dtype, reduction, *, bias=True, label_smoothing=0.1, chunk_size=None):
    torch.manual_seed(seed_for(n, d, v, dtype, reduction, bias, chunk_size))
    dev = device()
    h = torch.randn(n, d, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=dev) / d**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, device=dev)).to(dtype).requires_grad_() if bias else None
    t = _targets(n, v)
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    inputs = [h, w, b]
    # A reduced loss: its gradients are computed in the forward and rounded to the input dtype there;
    # the backward multiplies them by the incoming gradient, exactly when that is 1 (loss.backward()),
    # as checked here, else with a second rounding (test_linear_cross_entropy_scaled_upstream).
    fast, dfast, g = _loss_and_grads(
        lambda h, w, b=None: tk.linear_cross_entropy(h, w, t, b, chunk_size=chunk_size, backend=backend, **kw),
        inputs,
        scalar=1.0,
    )
    same, dsame, _ = _loss_and_grads(lambda h, w, b=None: _torch_ce(F.linear(h, w, b), t, **kw), inputs, g)
    exact_inputs = [None if a is None else a.detach().double().requires_grad_() for a in inputs]
    exact, dexact, _ = _loss_and_grads(lambda h, w, b=None: linear_cross_entropy_ref(h, w, t, b, **kw), exact_inputs, g)
    _assert_loss_close(f"{backend} loss", fast, same, exact)
    names = ["dhidden", "dweight", "dbias"][: len(dfast)]  # no dbias without a bias
    for name, a, s, e in zip(names, dfast, dsame, dexact, strict=True):
        assert_close_to_reference(f"{backend} {name}", a, s, e)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_cross_entropy_matches_reference(backend, dtype, reduction, bias):
    _compare_lce(backend, 11, 16, 37, dtype, reduction, bias=bias, chunk_size=4)  # 4 does not divide 11


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_linear_cross_entropy_chunk_sizes(backend, chunk_size):
    _compare_lce(backend, 20, 8, 33, torch.bfloat16, "mean", chunk_size=chunk_size)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_scaled_upstream(backend, dtype):
    """A reduced loss's incoming gradient g != 1 scales the stored gradients: g · (gradient at g = 1),
    rounded once more."""
    torch.manual_seed(0)
    h = torch.randn(9, 8, device=device()).to(dtype).requires_grad_()
    w = torch.randn(21, 8, device=device()).to(dtype).requires_grad_()
    t = _targets(9, 21)
    loss = tk.linear_cross_entropy(h, w, t, chunk_size=4, backend=backend)
    at_one = torch.autograd.grad(loss, (h, w), retain_graph=True)
    scaled = torch.autograd.grad(loss, (h, w), torch.tensor(0.3, device=device()))
    for a, s in zip(at_one, scaled, strict=True):
        assert s.dtype == dtype
        torch.testing.assert_close(s, (a.float() * 0.3).to(dtype), rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_linear_cross_entropy_big_vocab(backend):
    _compare_lce(backend, 4, 8, 32003, torch.float16, "sum", label_smoothing=0.0, chunk_size=3)


def _lce_grads(hidden, weight, target, chunk_size):
    from transformer_kernels.triton.cross_entropy import linear_cross_entropy_fwd

    scale = torch.tensor(1.0 / hidden.shape[0], device=hidden.device)
    return linear_cross_entropy_fwd(hidden, weight, target, None, scale, 0.0, IGNORE, True, chunk_size)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU path, under the Triton interpreter")
def test_linear_cross_entropy_makes_no_vocab_sized_temporary(monkeypatch):
    """dweight accumulates over the chunks without a temporary as large as itself: the one
    allocation of [V, d] fp32 size is the accumulator; bf16 products are staged in fp32 a few rows
    at a time, within the chunk budget (here a quarter of [V, d] fp32)."""
    from torch.profiler import ProfilerActivity, profile

    from transformer_kernels.triton import cross_entropy as tce

    n, v, d = 96, 300, 32
    vd_fp32 = v * d * 4
    monkeypatch.setattr(tce, "_CPU_CHUNK_BYTES", vd_fp32 // 4)
    torch.manual_seed(seed_for("lce memory"))
    hidden, weight = torch.randn(n, d, dtype=torch.bfloat16), torch.randn(v, d, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _lce_grads(hidden, weight, torch.randint(0, v, (n,)), chunk_size=48)  # two chunks
    big = [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage >= vd_fp32]
    assert len(big) == 1, big


@pytest.mark.gpu
def test_linear_cross_entropy_peak_memory():
    """Peak memory of the chunked forward with gradients: the fp32 dweight accumulator, one chunk's
    logits, the fp32 staging (at most the chunk budget, 256 MiB) and dhidden; no second [V, d] fp32."""
    from transformer_kernels.triton.cross_entropy import _chunk_budget

    n, v, d, chunk = 2048, 65536, 2048, 1024
    torch.manual_seed(seed_for("lce peak"))
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / 64
    target = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _lce_grads(hidden, weight, target, chunk)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    acc, logits, dhidden = v * d * 4, chunk * v * 2, n * d * 2
    staging = min(v, _chunk_budget(hidden.device) // (d * 4)) * d * 4
    assert peak <= acc + max(logits + staging, v * d * 2) + dhidden + 2**20, peak / 2**20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_tied_weights(backend, reduction):
    """The weight is also the embedding that makes the hidden states: both gradients add up."""
    torch.manual_seed(0)
    v, d, n = 29, 12, 10
    emb = torch.randn(v, d, device=device(), requires_grad=True)
    ids, t = torch.randint(0, v, (n,), device=device()), _targets(n, v)

    def model(loss_fn):
        hidden = torch.tanh(F.embedding(ids, emb) * 1.5)
        return loss_fn(hidden, emb, t, None, label_smoothing=0.1, reduction=reduction)

    ours = model(lambda *a, **kw: tk.linear_cross_entropy(*a, chunk_size=3, backend=backend, **kw))
    theirs = model(lambda h, w, t, b, **kw: F.cross_entropy(h @ w.t(), t, **kw))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = _upstream(ours)
    (dours,) = torch.autograd.grad(ours, emb, g)
    (dtheirs,) = torch.autograd.grad(theirs, emb, g)
    torch.testing.assert_close(dours, dtheirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_partial_requires_grad(backend):
    """A frozen weight (only hidden trains), and inference under no_grad."""
    torch.manual_seed(0)
    h = torch.randn(6, 8, device=device(), requires_grad=True)
    w, t = torch.randn(11, 8, device=device()), _targets(6, 11)
    loss = tk.linear_cross_entropy(h, w, t, backend=backend)
    (dh,) = torch.autograd.grad(loss, h)
    h2 = h.detach().requires_grad_()
    (dh2,) = torch.autograd.grad(F.cross_entropy(h2 @ w.t(), t), h2)
    torch.testing.assert_close(dh, dh2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(tk.linear_cross_entropy(h, w, t, backend=backend), loss.detach())


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, reduction):
    x = torch.randn(5, 9, device=device(), requires_grad=True)
    h = torch.randn(5, 4, device=device(), requires_grad=True)
    w = torch.randn(9, 4, device=device(), requires_grad=True)
    t = torch.full((5,), IGNORE, device=device())
    expected = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    for loss, leaves in (
        (tk.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, backend=backend), [x]),
        (tk.linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=0.1, backend=backend), [h, w]),
    ):
        torch.testing.assert_close(loss, expected, equal_nan=True)
        if reduction != "mean":  # mean is nan (0 / 0), as torch's; its gradient too
            assert torch.all(loss == 0)
            for grad in torch.autograd.grad(loss.sum(), leaves):
                assert torch.all(grad == 0)
    if reduction == "mean":
        assert torch.isnan(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, scale", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e5)], ids=["fp32", "fp16", "bf16"]
)
def test_huge_logits_stay_finite(backend, dtype, scale):
    torch.manual_seed(0)
    x = (torch.rand(6, 40, device=device()) * 2 - 1).mul(scale).to(dtype)
    x[0] = scale  # a row of equal huge logits
    x = x.requires_grad_()
    t = _targets(6, 40)
    loss = tk.cross_entropy(x, t, label_smoothing=0.1, reduction="none", backend=backend)
    (dx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all()
    exact = cross_entropy_ref(x.detach().double(), t, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=scale * 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad, match",
    [
        (40000, "target contains 40000, out of range for 32003 classes"),
        (
            -5,
            r"target contains -5, which is neither a class index in "
            r"\[0, 32003\) nor ignore_index \(-100\)",
        ),
    ],
)
def test_target_out_of_range_is_a_clear_error(backend, bad, match):
    x = torch.randn(3, 32003, device=device())
    t = torch.tensor([0, bad, IGNORE], device=device())
    with pytest.raises(ValueError, match=f"cross_entropy: {match}"):
        tk.cross_entropy(x, t, backend=backend)
    h, w = torch.randn(3, 4, device=device()), torch.randn(32003, 4, device=device())
    with pytest.raises(ValueError, match=f"linear_cross_entropy: {match}"):
        tk.linear_cross_entropy(h, w, t, backend=backend)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_logits(backend):
    torch.manual_seed(0)
    x = torch.randn(20, 6, device=device()).t().requires_grad_()  # [6, 20], column-major
    t = _targets(6, 20)
    loss = tk.cross_entropy(x, t, label_smoothing=0.1, backend=backend)
    (dx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().requires_grad_()
    expected = F.cross_entropy(x2, t, label_smoothing=0.1)
    (dx2,) = torch.autograd.grad(expected, x2)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(dx, dx2)


# --- errors at the API boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=torch.randn(2, 3, 5)), ValueError, r"logits must be a 2-D floating-point tensor \[N, V\]"),
        (dict(logits=torch.zeros(4, 5, dtype=torch.int64)), ValueError, "logits must be a 2-D floating-point"),
        (dict(logits=torch.randn(4, 0)), ValueError, "logits must have at least one class"),
        (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, r"target shape \[3\] does not match the 4 rows"),
        (
            dict(target=torch.zeros(4, 5)),
            TypeError,
            "target must be an int64 tensor of class indices, got torch.float32",
        ),
        (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError, "target must be an int64 tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    ],
    ids=[
        "logits_3d",
        "logits_int",
        "no_classes",
        "target_shape",
        "target_float",
        "target_int32",
        "reduction",
        "smoothing",
        "backend",
    ],
)
def test_cross_entropy_bad_inputs(kwargs, error, match):
    args = dict(logits=torch.randn(4, 5), target=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=f"cross_entropy: {match}" if "backend" not in kwargs else match):
        tk.cross_entropy(**args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hidden=torch.randn(4)), ValueError, r"hidden must be a 2-D floating-point tensor \[N, d\]"),
        (dict(weight=torch.randn(5, 7)), ValueError, r"weight shape \[5, 7\] does not match hidden size 3"),
        (dict(weight=torch.randn(5, 3, dtype=torch.float64)), TypeError, "weight dtype torch.float64 does not match"),
        (dict(bias=torch.randn(4)), ValueError, r"bias shape \[4\] does not match the 5 classes"),
        (dict(bias=torch.randn(5, dtype=torch.float16)), TypeError, "bias dtype torch.float16 does not match"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int or None, got 0"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
    ],
    ids=["hidden_1d", "weight_shape", "weight_dtype", "bias_shape", "bias_dtype", "chunk_size", "reduction"],
)
def test_linear_cross_entropy_bad_inputs(kwargs, error, match):
    args = dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), target=torch.zeros(4, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=f"linear_cross_entropy: {match}"):
        tk.linear_cross_entropy(**args)


@pytest.mark.skipif("triton" in KERNEL_BACKENDS, reason="checks the error where triton cannot run")
def test_triton_backend_unavailable_is_a_clear_error():
    with pytest.raises(backends.BackendError, match="cross_entropy: the triton backend cannot run"):
        tk.cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), backend="triton")


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
def test_triton_rejects_float64():
    with pytest.raises(
        backends.BackendError,
        match="linear_cross_entropy: the triton backend cannot run these inputs: dtype float64 is not supported",
    ):
        tk.linear_cross_entropy(
            torch.randn(2, 3, dtype=torch.float64),
            torch.randn(5, 3, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64),
            backend="triton",
        )


# --- on a GPU: realistic sizes, and the memory the fusion saves --------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_linear_cross_entropy_large(backend, reduction):
    _compare_lce(backend, 2048, 512, 32000, torch.bfloat16, reduction, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_cross_entropy_large(dtype):
    _compare_ce("triton", 1024, 50257, dtype, "mean", 0.1)


@pytest.mark.gpu
def test_gpu_linear_cross_entropy_saves_memory():
    torch.manual_seed(0)
    n, d, v = 4096, 1024, 65536
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")

    def peak(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda: F.cross_entropy(F.linear(h, w), t))
    ours = peak(lambda: tk.linear_cross_entropy(h, w, t, backend="triton"))
    assert 3 * ours <= eager, f"peak {ours / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"
