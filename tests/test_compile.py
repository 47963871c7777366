"""torch.compile(fullgraph=True) over functions that call the ops, and opcheck of the custom ops."""

from __future__ import annotations

import pytest
import torch
from helpers import device, kernel_backends

import transformer_kernels as tk
from transformer_kernels.ops.dropout_add_layer_norm import OP, _bwd, _fwd

BACKENDS = ["reference"] + kernel_backends(OP)


def _block(x, r, w, b, backend, dropout_p):
    # a pre-LN residual step around the op, so the graph has work on both sides of it
    out, s = tk.dropout_add_layer_norm(torch.tanh(x), r, w, b, dropout_p, prenorm=True, backend=backend)
    return out * 2 + s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, r = (torch.randn(6, 40, device=device(), requires_grad=True) for _ in range(2))
    w, b = (torch.randn(40, device=device(), requires_grad=True) for _ in range(2))
    compiled = torch.compile(_block, fullgraph=True, backend=compiler)
    got = compiled(x, r, w, b, backend, 0.0)
    expected = _block(x, r, w, b, backend, 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, r, w, b), g)
    expected_grads = torch.autograd.grad(expected, (x, r, w, b), g)
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_dropout(backend):
    torch._dynamo.reset()
    x, r = (torch.randn(4, 24, device=device(), requires_grad=True) for _ in range(2))
    w, b = (torch.randn(24, device=device(), requires_grad=True) for _ in range(2))
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b, backend, 0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    # The mask really applied: some elements of x got exactly zero gradient.
    assert (x.grad == 0).any() and (x.grad != 0).any()


@pytest.mark.skipif(len(BACKENDS) == 1, reason="no kernel backend runs here")
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_opcheck_custom_ops(backend):
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
            torch.library.opcheck(_fwd, fwd_args)
            out, s, mean, rstd = _fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args])
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
            torch.library.opcheck(_bwd, bwd_args)


def test_compile_follows_the_scoped_backend():
    """Without backend=, a compiled function reads the scoped choice without a graph break (torch 2.11
    could not trace the ContextVar this used to be)."""
    torch._dynamo.reset()
    x, r = torch.randn(3, 16, device=device()), torch.randn(3, 16, device=device())
    w, b = torch.randn(16, device=device()), torch.randn(16, device=device())
    compiled = torch.compile(lambda *t: tk.dropout_add_layer_norm(*t), fullgraph=True, backend="aot_eager")
    expected = torch.nn.functional.layer_norm(x + r, (16,), w, b)
    for backend in BACKENDS:
        with tk.use_backend(backend):
            torch.testing.assert_close(compiled(x, r, w, b), expected, rtol=1e-5, atol=1e-5)
