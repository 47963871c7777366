"""torch.compile(fullgraph=True) over functions that call each op, and opcheck of every custom op.

One table per test: ``COMPILE_CASES`` maps an op to a function that builds its inputs and the block
around it (work on both sides of the op, so the graph is more than the op); ``OPCHECK_CASES`` maps
an op to a function yielding ``(custom_op, args)`` pairs. Each kernel custom op's last argument is
the backend name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import device, kernel_backends

import transformer_kernels as tk
from transformer_kernels.ops.attention import OP as ATTENTION_OP
from transformer_kernels.ops.attention import _bwd as _attention_bwd
from transformer_kernels.ops.attention import _fwd as _attention_fwd
from transformer_kernels.ops.attention_varlen import OP as VARLEN_OP
from transformer_kernels.ops.attention_varlen import _bwd as _varlen_bwd
from transformer_kernels.ops.attention_varlen import _fwd as _varlen_fwd
from transformer_kernels.ops.cross_entropy import CE_OP, _ce_fwd, _lce_fwd
from transformer_kernels.ops.dropout_add_layer_norm import OP as DLA_OP
from transformer_kernels.ops.dropout_add_layer_norm import _bwd as _dla_bwd
from transformer_kernels.ops.dropout_add_layer_norm import _fwd as _dla_fwd
from transformer_kernels.ops.ffn import OP as FFN_OP
from transformer_kernels.ops.ffn import _bwd as _ffn_bwd
from transformer_kernels.ops.ffn import _fwd as _ffn_fwd
from transformer_kernels.ops.glu import OP as GLU_OP
from transformer_kernels.ops.glu import _bwd as _glu_bwd
from transformer_kernels.ops.glu import _fwd as _glu_fwd

IGNORE = -100


@dataclass
class Compiled:
    """One compile case: ``block(*args)`` compiled against eager, differentiated with respect to ``wrt``."""

    block: Callable
    args: tuple
    wrt: tuple
    tol: float = 1e-5
    rng_seed: int | None = None  # reseed before the compiled and the eager call (same dropout mask)
    compare_forward: bool = True
    compare_grads: bool = True
    mask_input: torch.Tensor | None = None  # whose gradient shows the dropout mask


# --- the blocks around each op ---------------------------------------------------------------


def _dla_block(x, r, w, b, backend, dropout_p):
    # a pre-LN residual step around the op, so the graph has work on both sides of it
    out, s = tk.dropout_add_layer_norm(torch.tanh(x), r, w, b, dropout_p, prenorm=True, backend=backend)
    return out * 2 + s


def _attention_block(q, k, v, kpm, backend, dropout_p):
    out = tk.attention(torch.tanh(q), k, v, causal=True, key_padding_mask=kpm, dropout_p=dropout_p, backend=backend)
    return out * 2 + q


def _varlen_block(q, k, v, cu_q, cu_k, backend, dropout_p):
    out = tk.attention_varlen(torch.tanh(q), k, v, cu_q, cu_k, 9, 13, causal=True, dropout_p=dropout_p, backend=backend)
    return out * 2 + q


def _ffn_block(x, w1, b1, w2, b2, backend, dropout_p):
    return torch.tanh(tk.ffn(x * 2, w1, b1, w2, b2, "gelu", dropout_p, backend=backend)) + x


def _ce_block(h, w, b, t, backend):
    # the output layer of a model
    hidden = torch.tanh(h)
    loss = tk.linear_cross_entropy(hidden, w, t, b, label_smoothing=0.1, chunk_size=4, backend=backend)
    return 2 * loss + tk.cross_entropy(hidden @ w.t(), t, reduction="sum", backend=backend)


def _glu_block(g, u, backend):
    return tk.glu(torch.tanh(g), u, "silu", backend=backend) * 2


# --- inputs per op -----------------------------------------------------------------------------


def _targets(n: int, v: int) -> torch.Tensor:
    """Random class indices with every third row ignored (row 1, 4, ...)."""
    t = torch.randint(0, v, (n,), device=device())
    t[1::3] = IGNORE
    return t


def _ffn_params(d_model, d_ff):
    return [
        t.requires_grad_()
        for t in (
            torch.randn(d_ff, d_model, device=device()) / math.sqrt(d_model),
            torch.randn(d_ff, device=device()),
            torch.randn(d_model, d_ff, device=device()) / math.sqrt(d_ff),
            torch.randn(d_model, device=device()),
        )
    ]


def _dla_case(backend, dropout_p):
    if dropout_p == 0:
        torch.manual_seed(0)
        x, r = (torch.randn(6, 40, device=device(), requires_grad=True) for _ in range(2))
        w, b = (torch.randn(40, device=device(), requires_grad=True) for _ in range(2))
        return Compiled(_dla_block, (x, r, w, b, backend, dropout_p), (x, r, w, b))
    x, r = (torch.randn(4, 24, device=device(), requires_grad=True) for _ in range(2))
    w, b = (torch.randn(24, device=device(), requires_grad=True) for _ in range(2))
    # no eager comparison: the two calls draw different masks
    return Compiled(
        _dla_block,
        (x, r, w, b, backend, dropout_p),
        (x, r, w, b),
        compare_forward=False,
        compare_grads=False,
        mask_input=x,
    )


def _attention_case(backend, dropout_p):
    torch.manual_seed(0)
    dev = device()
    q = torch.randn(2, 17, 2, 16, device=dev).requires_grad_()
    k = torch.randn(2, 17, 1, 16, device=dev).requires_grad_()
    v = torch.randn(2, 17, 1, 16, device=dev).requires_grad_()
    kpm = torch.rand(2, 17, device=dev) < 0.3  # True = padding
    return Compiled(_attention_block, (q, k, v, kpm, backend, dropout_p), (q, k, v), rng_seed=1)


def _varlen_case(backend, dropout_p):
    torch.manual_seed(0)
    dev = device()
    cu_q = torch.tensor([0, 9, 9, 10], dtype=torch.int32, device=dev)  # lengths 9, 0, 1
    cu_k = torch.tensor([0, 13, 15, 15], dtype=torch.int32, device=dev)  # lengths 13, 2, 0
    q = torch.randn(10, 2, 16, device=dev).requires_grad_()
    k = torch.randn(15, 1, 16, device=dev).requires_grad_()
    v = torch.randn(15, 1, 16, device=dev).requires_grad_()
    return Compiled(_varlen_block, (q, k, v, cu_q, cu_k, backend, dropout_p), (q, k, v), rng_seed=1)


def _ffn_case(backend, dropout_p):
    if dropout_p == 0:
        torch.manual_seed(0)
        x = torch.randn(2, 5, 24, device=device(), requires_grad=True)
        params = _ffn_params(24, 40)
        return Compiled(_ffn_block, (x, *params, backend, dropout_p), (x, *params))
    x = torch.randn(4, 24, device=device(), requires_grad=True)
    params = _ffn_params(24, 40)
    # b1's gradient: some hidden units dropped, some kept
    return Compiled(
        _ffn_block,
        (x, *params, backend, dropout_p),
        (x, *params),
        rng_seed=5,
        compare_grads=False,
        mask_input=params[1],
    )


def _ce_case(backend, dropout_p):
    torch.manual_seed(0)
    dev = device()
    h = torch.randn(10, 8, device=dev, requires_grad=True)
    w = torch.randn(13, 8, device=dev, requires_grad=True)
    b = torch.randn(13, device=dev, requires_grad=True)
    t = _targets(10, 13)
    return Compiled(_ce_block, (h, w, b, t, backend), (h, w, b))


def _glu_case(backend, dropout_p):
    torch.manual_seed(0)
    g, u = (torch.randn(5, 24, device=device(), requires_grad=True) for _ in range(2))
    return Compiled(_glu_block, (g, u, backend), (g, u), tol=1e-6)


COMPILE_CASES = {
    "dropout_add_layer_norm": _dla_case,
    "attention": _attention_case,
    "attention_varlen": _varlen_case,
    "ffn": _ffn_case,
    "cross_entropy": _ce_case,
    "glu": _glu_case,
}


def _inductor_once(reason):
    return pytest.mark.skip(reason=f"inductor once, {reason} (the compile takes a while on a CPU)")


def _compile_params():
    """(case, backend, compiler, dropout_p) per op."""
    dla = ["reference"] + kernel_backends(DLA_OP)
    yield from (
        (c, b, comp, 0.0) for c in ["dropout_add_layer_norm"] for b in dla for comp in ("aot_eager", "inductor")
    )
    yield from (("dropout_add_layer_norm", b, "aot_eager", 0.5) for b in dla)

    yield "attention", "reference", "aot_eager", 0.0
    for b in kernel_backends(ATTENTION_OP):
        for comp, p in (("aot_eager", 0.0), ("aot_eager", 0.3), ("inductor", 0.0)):
            yield "attention", b, comp, p

    # The reference loops over the sequences on the host (a graph break); native and the kernels trace.
    yield from (("attention_varlen", "native", "aot_eager", p) for p in (0.0, 0.3))
    for b in kernel_backends(VARLEN_OP):
        for comp, p in (("aot_eager", 0.0), ("aot_eager", 0.3), ("inductor", 0.0)):
            yield "attention_varlen", b, comp, p

    ffn_kernels = kernel_backends(FFN_OP)
    for b in ["reference"] + ffn_kernels:
        yield "ffn", b, "aot_eager", 0.0
        if b == (ffn_kernels or ["reference"])[0]:
            yield "ffn", b, "inductor", 0.0
        else:
            yield pytest.param("ffn", b, "inductor", 0.0, marks=_inductor_once("on the first kernel backend"))
    yield from (("ffn", b, "aot_eager", 0.5) for b in ["reference"] + ffn_kernels)

    for b in ["reference"] + kernel_backends(CE_OP):
        yield "cross_entropy", b, "aot_eager", 0.0
        if b == "reference":
            yield pytest.param("cross_entropy", b, "inductor", 0.0, marks=_inductor_once("over the custom ops"))
        else:
            yield "cross_entropy", b, "inductor", 0.0

    yield from (("glu", b, "aot_eager", 0.0) for b in ["reference"] + kernel_backends(GLU_OP))


@pytest.mark.parametrize("case, backend, compiler, dropout_p", list(_compile_params()))
def test_compile_fullgraph(monkeypatch, case, backend, compiler, dropout_p):
    if case in ("attention", "attention_varlen"):
        # one tile config on a GPU: autotuning every shape would cost minutes of compiles
        monkeypatch.setenv("TK_AUTOTUNE", "0")
    torch._dynamo.reset()
    c = COMPILE_CASES[case](backend, dropout_p)
    tol = dict(rtol=c.tol, atol=c.tol)
    compiled = torch.compile(c.block, fullgraph=True, backend=compiler)
    if c.rng_seed is not None:
        torch.manual_seed(c.rng_seed)
    got = compiled(*c.args)
    if c.compare_forward:
        if c.rng_seed is not None:
            torch.manual_seed(c.rng_seed)
        expected = c.block(*c.args)
        torch.testing.assert_close(got, expected, **tol)
    if c.compare_grads:
        g = torch.randn_like(got) if got.dim() else None  # a scalar loss is differentiated as is
        grads = torch.autograd.grad(got, c.wrt, g)
        expected_grads = torch.autograd.grad(expected, c.wrt, g)
        for a, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a, e, **tol)
    if c.mask_input is not None:
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(c.mask_input.grad).all()
        # The mask really applied: some elements got exactly zero gradient.
        assert (c.mask_input.grad == 0).any() and (c.mask_input.grad != 0).any()


def test_compile_follows_the_scoped_backend():
    """Without backend=, a compiled function reads the scoped choice without a graph break (torch 2.11
    could not trace the ContextVar this used to be)."""
    torch._dynamo.reset()
    x, r = torch.randn(3, 16, device=device()), torch.randn(3, 16, device=device())
    w, b = torch.randn(16, device=device()), torch.randn(16, device=device())
    compiled = torch.compile(lambda *t: tk.dropout_add_layer_norm(*t), fullgraph=True, backend="aot_eager")
    expected = torch.nn.functional.layer_norm(x + r, (16,), w, b)
    for backend in ["reference"] + kernel_backends(DLA_OP):
        with tk.use_backend(backend):
            torch.testing.assert_close(compiled(x, r, w, b), expected, rtol=1e-5, atol=1e-5)


def test_compiled_op_compiles_once(monkeypatch):
    """The ops' own bookkeeping (the device-type memo) does not fail a compiled graph's guards: a
    compiled call compiles once, even on a device the memo has not seen yet."""
    from torch._dynamo.testing import CompileCounter

    from transformer_kernels import backends

    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_DEVICE_TYPE", {})
    counter = CompileCounter()
    compiled = torch.compile(lambda *t: tk.dropout_add_layer_norm(*t), fullgraph=True, backend=counter)
    x, r = torch.randn(3, 16, device=device()), torch.randn(3, 16, device=device())
    w, b = torch.randn(16, device=device()), torch.randn(16, device=device())
    for _ in range(3):
        compiled(x, r, w, b)
    assert counter.frame_count == 1


# --- opcheck: (custom op, args) per op ---------------------------------------------------------


def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _dla_opchecks(backend):
    _fwd, _bwd = _dla_fwd, _dla_bwd
    torch.manual_seed(0)
    dev = device()
    x, r = torch.randn(5, 33, device=dev), torch.randn(5, 33, device=dev)
    w, b = torch.randn(33, device=dev), torch.randn(33, device=dev)
    seed = torch.tensor(7)
    for rms_norm, bias in ((False, b), (True, None)):
        for p in (0.0, 0.25):
            fwd_args = (
                x.requires_grad_(),
                r.requires_grad_(),
                w.requires_grad_(),
                bias,
                p,
                1e-5,
                seed if p else None,
                rms_norm,
                True,
                backend,
            )
            yield _fwd, fwd_args
            out, s, mean, rstd = _fwd(*_detached(fwd_args))
            bwd_args = (
                torch.randn_like(out),
                torch.randn_like(s),
                s,
                w.detach(),
                mean,
                rstd,
                p,
                seed if p else None,
                rms_norm,
                bias is not None,
                backend,
            )
            yield _bwd, bwd_args


def _attention_opchecks(backend):
    _fwd, _bwd = _attention_fwd, _attention_bwd
    torch.manual_seed(0)
    dev = device()
    q = torch.randn(1, 9, 2, 16, device=dev)
    k = torch.randn(1, 17, 1, 16, device=dev)
    v = torch.randn(1, 17, 1, 16, device=dev)
    kpm = torch.rand(1, 17, device=dev) < 0.3  # True = padding
    seed = torch.tensor(7)
    for p, mask in ((0.0, None), (0.25, kpm)):
        fwd_args = (
            q.requires_grad_(),
            k.requires_grad_(),
            v.requires_grad_(),
            mask,
            True,
            p,
            0.25,
            seed if p else None,
            backend,
        )
        yield _fwd, fwd_args
        out, lse = _fwd(*_detached(fwd_args))
        bwd_args = (
            torch.randn_like(out),
            q.detach(),
            k.detach(),
            v.detach(),
            out,
            lse,
            mask,
            True,
            p,
            0.25,
            seed if p else None,
            backend,
        )
        yield _bwd, bwd_args


def _varlen_opchecks(backend):
    torch.manual_seed(0)
    dev = device()
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=dev)  # lengths 5, 0, 9
    cu_k = torch.tensor([0, 17, 18, 18], dtype=torch.int32, device=dev)  # lengths 17, 1, 0
    q = torch.randn(14, 2, 16, device=dev)
    k = torch.randn(18, 1, 16, device=dev)
    v = torch.randn(18, 1, 16, device=dev)
    seed = torch.tensor(7)
    for p, causal in ((0.0, False), (0.25, True)):
        sizes = (cu_q, cu_k, 9, 17, causal, p, 0.25, seed if p else None, backend)
        fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *sizes)
        yield _varlen_fwd, fwd_args
        out, lse = _varlen_fwd(*_detached(fwd_args))
        yield _varlen_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *sizes)


def _ffn_opchecks(backend):
    _fwd, _bwd = _ffn_fwd, _ffn_bwd
    torch.manual_seed(0)
    dev = device()
    x, w, b = torch.randn(5, 17, device=dev), torch.randn(33, 17, device=dev), torch.randn(33, device=dev)
    seed = torch.tensor(7)
    for activation, bias, p in (("gelu", b, 0.25), ("relu", None, 0.0), ("none", b, 0.5)):
        fwd_args = (x.requires_grad_(), w.requires_grad_(), bias, activation, p, seed if p else None, backend)
        yield _fwd, fwd_args
        out, preact = _fwd(*_detached(fwd_args))
        bwd_args = (
            torch.randn_like(out),
            x.detach(),
            w.detach(),
            out,
            preact,
            bias is not None,
            activation,
            p,
            seed if p else None,
            backend,
        )
        yield _bwd, bwd_args


def _ce_opchecks(backend):
    torch.manual_seed(0)
    dev = device()
    x, t = torch.randn(5, 9, device=dev, requires_grad=True), _targets(5, 9)
    h = torch.randn(5, 4, device=dev, requires_grad=True)
    w, b = torch.randn(9, 4, device=dev, requires_grad=True), torch.randn(9, device=dev, requires_grad=True)
    for reduction in ("mean", "none"):
        yield _ce_fwd, (x, t, 0.1, IGNORE, reduction, backend)
        yield _lce_fwd, (h, w, t, b, 0.1, IGNORE, reduction, 2, reduction != "none", backend)


def _glu_opchecks(backend):
    g, u, dout = (torch.randn(4, 9, device=device()) for _ in range(3))
    yield _glu_fwd, (g, u, "silu", backend)
    yield _glu_bwd, (dout, g, u, "gelu", backend)


OPCHECK_CASES = {
    "dropout_add_layer_norm": (DLA_OP, _dla_opchecks),
    "attention": (ATTENTION_OP, _attention_opchecks),
    "attention_varlen": (VARLEN_OP, _varlen_opchecks),
    "ffn": (FFN_OP, _ffn_opchecks),
    "cross_entropy": (CE_OP, _ce_opchecks),
    "glu": (GLU_OP, _glu_opchecks),
}


def _opcheck_params():
    """(case, backend) for every kernel backend of every op; one skipped case for an op without one."""
    for case, (op, _) in OPCHECK_CASES.items():
        backends = kernel_backends(op)
        yield from ((case, b) for b in backends)
        if not backends:
            yield pytest.param(case, None, marks=pytest.mark.skip(reason=f"no kernel backend runs {op} here"))


@pytest.mark.parametrize("case, backend", list(_opcheck_params()))
def test_opcheck_custom_ops(monkeypatch, case, backend):
    if case in ("attention", "attention_varlen"):
        monkeypatch.setenv("TK_AUTOTUNE", "0")
    for custom_op, args in OPCHECK_CASES[case][1](backend):
        torch.library.opcheck(custom_op, args)
