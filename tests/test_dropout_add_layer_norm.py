"""dropout_add_layer_norm: the reference against torch, every kernel backend against the reference."""

from __future__ import annotations

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
from transformer_kernels.ops.dropout_add_layer_norm import OP
from transformer_kernels.ops.seed import draw_seed
from transformer_kernels.reference import dropout_add_layer_norm_ref, dropout_keep_mask

KERNEL_BACKENDS = kernel_backends(OP)
needs_kernels = skip_without_kernels(OP)


# --- the reference is the specification: check it against torch itself ----------------------


@pytest.mark.parametrize("rms_norm", [False, True])
@pytest.mark.parametrize("shape", [(3, 1), (5, 17), (2, 3, 1000)])
def test_reference_matches_torch(shape, rms_norm):
    torch.manual_seed(0)
    x, r = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    b = None if rms_norm else torch.randn(shape[-1], dtype=torch.float64)
    out, s = dropout_add_layer_norm_ref(x, r, w, b, 0.0, 1e-5, prenorm=True, rms_norm=rms_norm)
    h = x + r
    if rms_norm:
        expected = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5) * w  # RMSNorm written out
    else:
        expected = F.layer_norm(h, (shape[-1],), w, b, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, h, rtol=0, atol=0)


@pytest.mark.parametrize("rms_norm", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_reference_gradcheck(rms_norm, dropout_p):
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = None if rms_norm else torch.randn(7, dtype=torch.float64, requires_grad=True)
    inputs = (x, r, w) + (() if b is None else (b,))

    def f(x, r, w, b=None):
        return dropout_add_layer_norm_ref(x, r, w, b, dropout_p, 1e-5, prenorm=True, rms_norm=rms_norm, seed=1234)

    assert torch.autograd.gradcheck(f, inputs)


# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints, written from Salmon et al. independently of reference/philox.py."""
    (c0, c1, c2, c3), (k0, k1) = ctr, key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("ctr, key, words", PHILOX_KAT)
def test_philox_known_answers(ctr, key, words):
    from transformer_kernels.reference.philox import philox4x32

    assert _philox_scalar(ctr, key) == words
    seed = key[0] | key[1] << 32
    seed = seed - 2**64 if seed >= 2**63 else seed  # the same 64 key bits as an int64
    counters = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    got = philox4x32(seed, *counters)
    assert tuple(int(w) for w in got) == words
    # The seed may be a 0-dim tensor (inside compiled graphs) and gives the same numbers.
    assert tuple(int(w) for w in philox4x32(torch.tensor(seed), *counters)) == words


def test_dropout_mask_specification_known_answer():
    """Element (row, col) takes word col % 4 of Philox4x32-10((col // 4, row_lo, row_hi, 0), seed)."""
    from transformer_kernels.reference.philox import dropout_keep_mask, dropout_threshold, dropout_words

    # Row 0, columns 0-3, seed 0: Random123's all-zero vector, word by word.
    assert dropout_words(0, 1, 4).tolist() == [list(PHILOX_KAT[0][2])]
    seed = 0x0123456789ABCDEF
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for first_row, rows, cols in [(0, 3, 11), (2**32 - 2, 4, 9), (2**40 + 3, 1, 5)]:
        words = dropout_words(seed, rows, cols, first_row=first_row)
        for i in range(rows):
            row = first_row + i
            for j in range(cols):
                expected = _philox_scalar((j // 4, row & 0xFFFFFFFF, row >> 32, 0), key)[j % 4]
                assert words[i, j].item() == expected, (row, j)
    # keep iff the word's top 24 bits reach the threshold
    words = dropout_words(seed, 5, 13)
    for p in (0.0, 0.1, 0.5, 1.0):
        assert torch.equal(dropout_keep_mask(seed, p, 5, 13), (words >> 8) >= dropout_threshold(p))


def test_reference_depends_on_torch_alone():
    """reference/ is the specification: it imports torch, the standard library and itself, never
    the extension or Triton (the op layer picks faster implementations of its masks)."""
    import ast
    import pathlib
    import sys

    import transformer_kernels.reference as ref

    for path in pathlib.Path(ref.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside reference/"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names, f"{path.name} imports {name}"


# --- kernel backends against the float64 reference -------------------------------------------


def _make_inputs(shape, dtype, *, residual=True, weight=True, bias=True, weight_dtype=None, requires_grad=True):
    dev = device()
    n = shape[-1]
    wd = weight_dtype or dtype
    x = torch.randn(shape, dtype=dtype, device=dev)
    r = torch.randn(shape, dtype=dtype, device=dev) if residual else None
    w = (1 + 0.5 * torch.randn(n, device=dev)).to(wd) if weight else None
    b = (0.5 * torch.randn(n, device=dev)).to(wd) if bias else None
    tensors = [x, r, w, b]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_()
    return tensors


def _run(fn, tensors, grads, prenorm):
    """Outputs of ``fn(*tensors)`` and the gradients of every input w.r.t. <outputs, grads>."""
    outs = fn(*tensors)
    outs = outs if prenorm else (outs,)
    leaves = [t for t in tensors if t is not None]
    dtensors = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    return [o.detach() for o in outs], list(dtensors)


def _compare(
    backend,
    shape,
    dtype,
    *,
    dropout_p=0.0,
    prenorm=False,
    rms_norm=False,
    residual=True,
    weight=True,
    bias=True,
    weight_dtype=None,
):
    torch.manual_seed(seed_for(shape, dtype, dropout_p, prenorm, rms_norm))
    bias = bias and not rms_norm
    tensors = _make_inputs(shape, dtype, residual=residual, weight=weight, bias=bias, weight_dtype=weight_dtype)
    # Output gradients in x's dtype, so every path (fast, same-dtype, float64) sees the same values.
    grads = [torch.randn(shape, device=tensors[0].device).to(dtype) for _ in range(1 + prenorm)]

    seed_state = rng_state()
    fast = _run(
        lambda *t: tk.dropout_add_layer_norm(*t, dropout_p, 1e-5, prenorm=prenorm, rms_norm=rms_norm, backend=backend),
        tensors,
        grads,
        prenorm,
    )
    # The seed the op drew, replayed: the reference applies the very same Philox mask.
    set_rng_state(seed_state)
    seed = int(draw_seed(device())) if dropout_p > 0 else None
    kw = dict(prenorm=prenorm, rms_norm=rms_norm, seed=seed)
    same_dtype = _run(
        lambda *t: dropout_add_layer_norm_ref(*t, dropout_p, 1e-5, upcast=False, **kw), tensors, grads, prenorm
    )
    exact_inputs = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    exact = _run(lambda *t: dropout_add_layer_norm_ref(*t, dropout_p, 1e-5, **kw), exact_inputs, grads, prenorm)

    names = ["out", "s"][: 1 + prenorm] + [
        n for n, t in zip(["dx", "dresidual", "dweight", "dbias"], tensors, strict=True) if t is not None
    ]
    for name, a, b, c in zip(names, fast[0] + fast[1], same_dtype[0] + same_dtype[1], exact[0] + exact[1], strict=True):
        assert_close_to_reference(f"{backend} {name}", a, b, c)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 17), (3, 113), (2, 1000), (1, 1023), (2, 3, 512)], ids=str)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layer", "rms"])
def test_matches_reference(backend, dtype, shape, rms_norm):
    _compare(backend, shape, dtype, rms_norm=rms_norm)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
def test_dropout_matches_reference(backend, dtype, rms_norm, prenorm):
    _compare(backend, (5, 333), dtype, dropout_p=0.3, prenorm=prenorm, rms_norm=rms_norm)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "variant",
    [
        dict(residual=False),
        dict(weight=False, bias=False),
        dict(bias=False),
        dict(residual=False, dropout_p=0.2, prenorm=True),
        dict(weight_dtype=torch.float32),
    ],
    ids=["no_residual", "no_affine", "no_bias", "no_residual_dropout", "fp32_weight"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optional_arguments(backend, variant, dtype):
    _compare(backend, (6, 96), dtype, **variant)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hidden", [4096, 16384])
def test_large_hidden(backend, hidden):
    _compare(backend, (3, hidden), torch.float16, dropout_p=0.1)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "variant",
    [dict(dropout_p=0.1), dict(dropout_p=0.1, rms_norm=True, prenorm=True), dict(residual=False)],
    ids=["dropout", "rms_prenorm_dropout", "no_residual"],
)
@pytest.mark.parametrize("hidden", [4097, 8209, 40000])
def test_wide_rows(backend, hidden, variant):
    """Rows wider than a program keeps in registers: the kernels loop over blocks of the row."""
    _compare(backend, (3, hidden), torch.bfloat16, **variant)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hidden", [113, 8209])
def test_forward_without_stored_s_matches(backend, hidden):
    """Without autograd s is not stored: the wide-row forward recomputes it from x, the residual
    and the mask for its second pass, and must give the output of the pass that stores it."""
    x, r, w, b = _make_inputs((3, hidden), torch.bfloat16)
    torch.manual_seed(5)
    with_grad = tk.dropout_add_layer_norm(x, r, w, b, 0.3, backend=backend).detach()
    torch.manual_seed(5)
    with torch.no_grad():
        without = tk.dropout_add_layer_norm(x, r, w, b, 0.3, backend=backend)
    assert torch.equal(with_grad, without)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_rows(backend):
    x, r, w, b = _make_inputs((0, 64), torch.float32)
    out, s = tk.dropout_add_layer_norm(x, r, w, b, 0.1, prenorm=True, backend=backend)
    assert out.shape == (0, 64) and s.shape == (0, 64)
    dx, dr, dw, db = torch.autograd.grad(out.sum(), [x, r, w, b])
    assert dx.shape == (0, 64) and dr.shape == (0, 64)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_input(backend):
    torch.manual_seed(0)
    x = torch.randn(40, 6, device=device()).t()  # [6, 40], not contiguous
    w = torch.randn(40, device=device())
    out = tk.dropout_add_layer_norm(x, None, w, None, backend=backend)
    expected = dropout_add_layer_norm_ref(x.double(), None, w.double(), None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# --- dropout ---------------------------------------------------------------------------------


def _dropout_only(backend, x, p, **kw):
    """(out, s) with no residual and no affine, so s = dropout(x) exposes the mask."""
    return tk.dropout_add_layer_norm(x, None, None, None, p, prenorm=True, backend=backend, **kw)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(backend, p):
    torch.manual_seed(0)
    x = torch.randn(64, 1536, device=device()) + 3.0  # never zero, so s == 0 means dropped
    _, s = _dropout_only(backend, x, p)
    kept = s != 0
    n = kept.numel()
    rate = kept.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    torch.testing.assert_close(s[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_reproducible_and_matches_philox_spec(backend):
    x = torch.randn(7, 301, device=device()) + 3.0
    torch.manual_seed(42)
    _, s1 = _dropout_only(backend, x, 0.5)
    torch.manual_seed(42)
    _, s2 = _dropout_only(backend, x, 0.5)
    _, s3 = _dropout_only(backend, x, 0.5)
    assert torch.equal(s1, s2), "same seed must give the same mask"
    assert not torch.equal(s1, s3), "a new draw must give a new mask"
    torch.manual_seed(42)
    expected = dropout_keep_mask(int(draw_seed(device())), 0.5, 7, 301, x.device)
    assert torch.equal(s1 != 0, expected), "the mask must be the Philox mask of reference/philox.py"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_backward_uses_forward_mask(backend, dtype):
    """The backward regenerates the mask: its gradients match the reference fed the mask that the
    forward's own output reveals (independently of reference/philox.py)."""
    torch.manual_seed(3)
    shape = (9, 130)
    x = (torch.randn(shape, device=device()) + 3.0).to(dtype).requires_grad_()  # never zero
    w = torch.randn(shape[-1], device=device(), requires_grad=True)
    grads = [torch.randn(shape, device=device()).to(dtype) for _ in range(2)]
    fast = _run(
        lambda x, w: tk.dropout_add_layer_norm(x, None, w, None, 0.4, prenorm=True, backend=backend),
        [x, w],
        grads,
        prenorm=True,
    )
    keep = fast[0][1] != 0
    assert torch.all(fast[1][0][~keep] == 0), "dropped elements must get zero gradient"

    def ref(upcast):
        return lambda x, w: dropout_add_layer_norm_ref(
            x, None, w, None, 0.4, prenorm=True, keep_mask=keep, upcast=upcast
        )

    same_dtype = _run(ref(False), [x, w], grads, prenorm=True)
    exact = _run(
        ref(True), [x.detach().double().requires_grad_(), w.detach().double().requires_grad_()], grads, prenorm=True
    )
    for name, a, b, c in zip(
        ["out", "s", "dx", "dweight"],
        fast[0] + fast[1],
        same_dtype[0] + same_dtype[1],
        exact[0] + exact[1],
        strict=True,
    ):
        assert_close_to_reference(f"{backend} {name}", a, b, c)


def test_eval_mode_skips_dropout():
    x = torch.randn(4, 8, device=device())
    state = rng_state()
    out = tk.dropout_add_layer_norm(x, None, None, None, 0.9, training=False)
    assert torch.equal(rng_state(), state), "training=False must draw no random numbers"
    torch.testing.assert_close(out, F.layer_norm(x, (8,)))


# --- errors at the API boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(residual=torch.randn(4, 9)), ValueError, r"residual shape \[4, 9\] does not match x shape \[4, 8\]"),
        (dict(residual=torch.randn(4, 8, dtype=torch.float64)), TypeError, "residual dtype"),
        (dict(weight=torch.randn(8, dtype=torch.float64)), TypeError, "weight dtype torch.float64 is not supported"),
        (dict(weight=torch.randn(7)), ValueError, r"weight shape \[7\] does not match the hidden size 8"),
        (dict(bias=torch.randn(8), rms_norm=True), ValueError, "bias must be None when rms_norm=True"),
        (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (dict(backend="fast"), ValueError, "unknown backend 'fast'"),
    ],
    ids=["residual_shape", "residual_dtype", "weight_dtype", "weight_shape", "rms_bias", "dropout_p", "backend"],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(x=torch.randn(4, 8), residual=None, weight=None, bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        tk.dropout_add_layer_norm(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_backend_on_cpu_tensor_is_a_clear_error():
    with pytest.raises(backends.BackendError, match="dropout_add_layer_norm: the cuda backend cannot run"):
        tk.dropout_add_layer_norm(torch.randn(2, 8), None, None, None, backend="cuda")


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
def test_triton_hidden_size_limit():
    x = torch.randn(1, 65537, device=device())
    with pytest.raises(backends.BackendError, match=r"hidden size 65537 is not supported \(max 65536\)"):
        tk.dropout_add_layer_norm(x, None, None, None, backend="triton")
