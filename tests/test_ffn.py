"""fused_linear and ffn: the reference against torch, every kernel backend against the reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    assert_close_to_reference,
    device,
    kernel_backends,
    rng_state,
    seed_for,
    set_rng_state,
    skip_without_kernels,
)

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.ops.ffn import OP
from transformer_kernels.ops.seed import draw_seed
from transformer_kernels.reference import dropout_keep_mask, ffn_ref, fused_linear_ref

KERNEL_BACKENDS = kernel_backends(OP)
needs_kernels = skip_without_kernels(OP)
ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh"]
ACT_IDS = ["none", "relu", "gelu", "gelu_tanh"]


def _torch_activation(z, activation):
    if activation == "relu":
        return F.relu(z)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")
    return z


# --- the reference is the specification: check it against torch itself ----------------------


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_matches_torch(activation, dropout_p):
    torch.manual_seed(0)
    linear = torch.nn.Linear(17, 33, dtype=torch.float64)
    x = torch.randn(2, 5, 17, dtype=torch.float64)
    # torch's own dropout draws the mask; the reference, fed that mask, must give F.dropout's result.
    dropped = F.dropout(torch.ones(2, 5, 33, dtype=torch.float64), dropout_p, training=True)
    keep = dropped != 0
    expected = _torch_activation(linear(x), activation) * dropped
    got = fused_linear_ref(x, linear.weight, linear.bias, activation, dropout_p, keep_mask=keep)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    eager = fused_linear_ref(x, linear.weight, linear.bias, activation, dropout_p, keep_mask=keep, upcast=False)
    torch.testing.assert_close(eager, expected, rtol=1e-12, atol=1e-12)


def test_ffn_reference_matches_torch():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(12, 48, dtype=torch.float64), torch.nn.Linear(48, 12, dtype=torch.float64)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    dropped = F.dropout(torch.ones(3, 7, 48, dtype=torch.float64), 0.25, training=True)
    expected = second(F.gelu(first(x)) * dropped)
    got = ffn_ref(x, first.weight, first.bias, second.weight, second.bias, "gelu", 0.25, keep_mask=dropped != 0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACT_IDS)
def test_reference_gradcheck(activation):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fused_linear_ref(x, w, b, activation, 0.4, seed=99), (x, w, b))


def test_reference_dropout_uses_philox_mask():
    x, w = torch.randn(6, 8, dtype=torch.float64) + 3, torch.rand(10, 8, dtype=torch.float64) + 0.1  # z > 0
    out = fused_linear_ref(x, w, None, None, 0.5, seed=1234)
    assert torch.equal(out != 0, dropout_keep_mask(1234, 0.5, 6, 10))


# --- kernel backends against the float64 reference -------------------------------------------


def _run(fn, tensors, grad):
    """``fn(*tensors)`` and the gradients of every tensor (None ones skipped) w.r.t. <out, grad>."""
    out = fn(*tensors)
    leaves = [t for t in tensors if t is not None]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def _linear_params(dtype, k, n, bias=True):
    """weight ~ N(0, 1/k), so z = x Wᵀ + b is O(1) where the activations bend."""
    w = (torch.randn(n, k, device=device()) / math.sqrt(max(k, 1))).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(n, device=device())).to(dtype).requires_grad_() if bias else None
    return [w, b]


def _compare(op, backend, lead, dims, dtype, activation, dropout_p, bias=True):
    """Check ``op`` ("fused_linear" or "ffn") on ``backend`` against the reference: ``lead`` are x's
    leading dims, ``dims`` the feature sizes (in, out) or (d_model, d_ff, d_out)."""
    torch.manual_seed(seed_for(op, lead, dims, dtype, activation, dropout_p, bias))
    x = torch.randn(*lead, dims[0], device=device()).to(dtype).requires_grad_()
    params = [p for k, n in itertools.pairwise(dims) for p in _linear_params(dtype, k, n, bias)]
    tensors = [x, *params]
    grad = torch.randn(*lead, dims[-1], device=device()).to(dtype)  # every path gets the same dout
    fast_fn, ref_fn = (tk.fused_linear, fused_linear_ref) if op == "fused_linear" else (tk.ffn, ffn_ref)

    state = rng_state()
    fast = _run(lambda *t: fast_fn(*t, activation, dropout_p, backend=backend), tensors, grad)
    # The seed the op drew, replayed: the reference applies the very same Philox mask.
    set_rng_state(state)
    seed = int(draw_seed(device())) if dropout_p > 0 else None
    same_dtype = _run(lambda *t: ref_fn(*t, activation, dropout_p, seed=seed, upcast=False), tensors, grad)
    exact_inputs = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    exact = _run(lambda *t: ref_fn(*t, activation, dropout_p, seed=seed), exact_inputs, grad)

    names = ["out", "dx"] + [
        f"d{name}"
        for name, t in zip(
            ["weight", "bias"] if op == "fused_linear" else ["w1", "b1", "w2", "b2"], params, strict=True
        )
        if t is not None
    ]
    assert len(names) == len(fast) == len(exact)
    for name, a, b, c in zip(names, fast, same_dtype, exact, strict=True):
        assert_close_to_reference(f"{op} {backend} {name}", a, b, c)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_fused_linear_matches_reference(backend, dtype, activation, dropout_p):
    _compare("fused_linear", backend, (5,), (17, 33), dtype, activation, dropout_p)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize(
    "lead, dims",
    [((1,), (1, 1)), ((1,), (17, 33)), ((3,), (1, 5)), ((2, 3), (24, 1)), ((), (40, 9)), ((70,), (48, 40))],
    ids=["M1_K1_N1", "single_row", "K1", "N1_3d", "1d_x", "multi_tile"],
)
def test_odd_shapes(backend, dtype, activation, lead, dims):
    _compare("fused_linear", backend, lead, dims, dtype, activation, 0.2)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias(backend, dtype):
    _compare("fused_linear", backend, (4,), (19, 35), dtype, "relu", 0.0, bias=False)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "activation, dropout_p",
    [("relu", 0.0), ("gelu", 0.25), ("gelu_tanh", 0.1), (None, 0.5)],
    ids=["relu", "gelu_dropout", "gelu_tanh_dropout", "none_dropout"],
)
def test_ffn_matches_reference(backend, dtype, activation, dropout_p):
    _compare("ffn", backend, (2, 3), (20, 44, 20), dtype, activation, dropout_p)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ffn_odd_shapes_no_bias(backend):
    # Three rows, not one: with one row the error rule compares maxima over three fp16 outputs,
    # which the output rounding alone decides (under the four-per-call Philox rule, one draw had
    # the same-dtype path 0.3 ulp off and the kernel 0.9, its hidden activations exactly the
    # correctly rounded exact ones). Single rows are covered by test_odd_shapes.
    _compare("ffn", backend, (3,), (7, 29, 3), torch.float16, "gelu", 0.3, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_ffn_large(backend, dtype, activation):
    # fp32 at K = 4096 also shows the GEMMs are fp32-accurate (tf32 would miss the 2x bound).
    _compare("ffn", backend, (4, 300), (1024, 4096, 1024), dtype, activation, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_linear_large_odd(backend):
    _compare("fused_linear", backend, (1000,), (4000, 3001), torch.bfloat16, "gelu", 0.1)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_rows(backend):
    x = torch.randn(0, 16, device=device(), requires_grad=True)
    w, b = _linear_params(torch.float32, 16, 24)
    out = tk.fused_linear(x, w, b, "gelu", 0.1, backend=backend)
    assert out.shape == (0, 24)
    dx, dw, db = torch.autograd.grad(out.sum(), [x, w, b])
    assert dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_input(backend):
    torch.manual_seed(0)
    x = torch.randn(24, 6, device=device()).t()  # [6, 24], not contiguous
    w, b = _linear_params(torch.float32, 24, 10)
    out = tk.fused_linear(x, w.t().contiguous().t(), b, "relu", backend=backend)  # weight not contiguous either
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


# --- dropout ---------------------------------------------------------------------------------


def _positive_linear(rows, k, n):
    """x, W, b whose z = x Wᵀ + b is never zero, so out == 0 means dropped."""
    x = torch.rand(rows, k, device=device()) + 0.5
    return x, torch.rand(n, k, device=device()) + 0.1, torch.rand(n, device=device())


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(backend, p):
    torch.manual_seed(0)
    x, w, b = _positive_linear(64, 32, 96)
    out = tk.fused_linear(x, w, b, None, p, backend=backend)
    kept = out != 0
    rate = kept.float().mean().item()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    torch.testing.assert_close(out[kept], (F.linear(x, w, b) / (1 - p))[kept], rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_reproducible_and_matches_philox_spec(backend):
    x, w, b = _positive_linear(7, 16, 45)
    torch.manual_seed(42)
    out1 = tk.fused_linear(x, w, b, "gelu", 0.5, backend=backend)
    torch.manual_seed(42)
    out2 = tk.fused_linear(x, w, b, "gelu", 0.5, backend=backend)
    out3 = tk.fused_linear(x, w, b, "gelu", 0.5, backend=backend)
    assert torch.equal(out1, out2), "same seed must give the same output"
    assert not torch.equal(out1 != 0, out3 != 0), "a new draw must give a new mask"
    torch.manual_seed(42)
    expected = dropout_keep_mask(int(draw_seed(device())), 0.5, 7, 45, x.device)
    assert torch.equal(out1 != 0, expected), "the mask must be the Philox mask of reference/philox.py"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACT_IDS)
def test_dropout_backward_uses_forward_mask(backend, dtype, activation):
    """The backward regenerates the mask (or reads it from out): its gradients match the reference
    fed the mask that the forward's own output reveals (independently of reference/philox.py)."""
    torch.manual_seed(seed_for(dtype, activation))
    x, w, b = (t.to(dtype) for t in _positive_linear(9, 21, 37))
    if activation == "relu":  # both signs; where z <= 0 the mask does not matter to out or its gradient
        x = x - 1.0
    tensors = [t.requires_grad_() for t in (x, w, b)]
    grad = torch.randn(9, 37, device=device()).to(dtype)
    fast = _run(lambda *t: tk.fused_linear(*t, activation, 0.4, backend=backend), tensors, grad)
    keep = fast[0] != 0
    assert torch.all(fast[0][~keep] == 0)

    def ref(upcast):
        return lambda *t: fused_linear_ref(*t, activation, 0.4, keep_mask=keep, upcast=upcast)

    same_dtype = _run(ref(False), tensors, grad)
    exact = _run(ref(True), [t.detach().double().requires_grad_() for t in tensors], grad)
    for name, a, b_, c in zip(["out", "dx", "dweight", "dbias"], fast, same_dtype, exact, strict=True):
        assert_close_to_reference(f"{backend} {name}", a, b_, c)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_eval_mode_skips_dropout(backend):
    x, w, b = _positive_linear(4, 8, 6)
    state = rng_state()
    out = tk.fused_linear(x, w, b, "relu", 0.9, training=False, backend=backend)
    y = tk.ffn(x, w, b, w.t().contiguous(), None, "relu", 0.9, training=False, backend=backend)
    assert torch.equal(rng_state(), state), "training=False must draw no random numbers"
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)))
    torch.testing.assert_close(y, F.linear(out, w.t()))


# --- errors at the API boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(weight=torch.randn(6, 7)),
            ValueError,
            r"fused_linear: weight shape \[6, 7\] does not match x's last dim 8 \(expected \[out_features, 8\]\)",
        ),
        (dict(weight=torch.randn(6)), ValueError, "weight must be a 2-D tensor"),
        (dict(bias=torch.randn(5)), ValueError, r"bias shape \[5\] does not match weight's out_features 6"),
        (
            dict(weight=torch.randn(6, 8, dtype=torch.float64)),
            TypeError,
            "weight dtype torch.float64 does not match x dtype torch.float32",
        ),
        (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias dtype torch.float16 does not match"),
        (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight is on meta, x on cpu"),
        (dict(activation="swish"), ValueError, "unknown activation 'swish'; expected one of None, 'relu'"),
        (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\], got 1.5"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\]"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    ],
    ids=[
        "weight_shape",
        "weight_1d",
        "bias_shape",
        "weight_dtype",
        "bias_dtype",
        "weight_device",
        "activation",
        "dropout_high",
        "dropout_negative",
        "x_int",
        "backend",
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tk.fused_linear(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(w1=torch.randn(32, 9)), r"ffn: w1 shape \[32, 9\] does not match x's last dim 8"),
        (dict(w2=torch.randn(8, 31)), r"ffn: w2 shape \[8, 31\] does not match w1's out_features 32"),
        (dict(b2=torch.randn(32)), r"ffn: b2 shape \[32\] does not match w2's out_features 8"),
        (dict(activation="tanh"), "ffn: unknown activation 'tanh'"),
    ],
    ids=["w1_shape", "w2_shape", "b2_shape", "activation"],
)
def test_ffn_bad_inputs(kwargs, match):
    args = dict(
        x=torch.randn(4, 8), w1=torch.randn(32, 8), b1=torch.randn(32), w2=torch.randn(8, 32), b2=torch.randn(8)
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tk.ffn(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_backend_on_cpu_tensor_is_a_clear_error():
    with pytest.raises(backends.BackendError, match="ffn: the cuda backend cannot run"):
        tk.ffn(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, backend="cuda")


def _extension_has_fused_linear() -> bool:
    from transformer_kernels._extension import loaded

    return loaded() and hasattr(torch.ops.tk_C, "fused_linear_fwd")


@pytest.mark.skipif(not _extension_has_fused_linear(), reason="the extension has no tk_C::fused_linear_* yet")
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh"])
def test_extension_fakes_give_right_shapes(activation):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = torch.empty(5, 17), torch.empty(33, 17), torch.empty(33)
        seed = torch.empty((), dtype=torch.int64)
        out, preact = torch.ops.tk_C.fused_linear_fwd(x, w, b, activation, 0.1, seed)
        assert out.shape == (5, 33)
        assert preact.shape == ((5, 33) if activation.startswith("gelu") else (0,))
        dx, dw, db = torch.ops.tk_C.fused_linear_bwd(out, x, w, out, preact, True, activation, 0.1, seed)
        assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (33,)
        _, _, db = torch.ops.tk_C.fused_linear_bwd(out, x, w, out, preact, False, activation, 0.1, seed)
        assert db.shape == (0,)


# --- what the interpreter cannot see ---------------------------------------------------------


def test_fp32_dots_follow_torch_tf32_flag():
    from transformer_kernels.triton.precision import matmul_dot_precision as _dot_precision

    # Set through torch's own setter and restored by hand: allow_tf32 is a property of a module
    # object, which monkeypatch cannot always undo.
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _dot_precision(torch.float32) == "tf32"
        assert _dot_precision(torch.bfloat16) is None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="the triton backend does not run here")
def test_backward_over_many_token_counts_tunes_once_per_size_bucket(monkeypatch):
    """Token-budget batches change the token count every step, and it is the weight-gradient GEMM's
    K: every size in the tuning key is bucketed, so each GEMM is tuned once per bucket, not per batch.
    Runs Triton's own autotuner with its timings faked (the interpreter cannot time kernels)."""
    from transformer_kernels.triton import ffn as tri

    tuner = tri._tuned_gemm
    monkeypatch.setattr(tri, "_autotune", lambda: True)
    monkeypatch.setattr(tuner, "cache", {})
    # the smallest tile "wins", so the interpreter runs the GEMMs quickly
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **meta: [float(config.kwargs["BLOCK_M"])] * 3)
    token_counts = range(33, 129, 8)  # 12 batches in two buckets, 64 and 128
    for tokens in token_counts:
        torch.manual_seed(seed_for("tuning", tokens))
        x = torch.randn(tokens, 24, device=device(), requires_grad=True)
        w = torch.randn(40, 24, device=device(), requires_grad=True)
        b = torch.randn(40, device=device(), requires_grad=True)
        tk.fused_linear(x, w, b, activation="gelu", backend="triton").sum().backward()
        assert torch.isfinite(w.grad).all()
    buckets = {triton_next_power_of_2(t) for t in token_counts}
    # per bucket: the forward, dx and dW GEMMs
    assert len(tuner.cache) == 3 * len(buckets), sorted(map(str, tuner.cache))


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
