"""glu: the reference against torch, every kernel backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_close_to_reference, device, kernel_backends, seed_for, skip_without_kernels

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.ops.glu import OP
from transformer_kernels.reference import glu_ref
from transformer_kernels.reference.glu import GLU_ACTIVATIONS

KERNEL_BACKENDS = kernel_backends(OP)
# the native backend (torch's fast CPU paths) where the tests run on a CPU
NATIVE = ["native"] if backends.why_not(OP, "native", device(), torch.float32) is None else []
needs_kernels = skip_without_kernels(OP)
# Odd on purpose: empty, one element, a prime and non-power-of-2 widths, more than one program.
SHAPES = [(0, 17), (1, 1), (17, 113), (3, 5, 33), (2, 1031)]


def _torch_act(z, activation):
    if activation == "silu":
        return F.silu(z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_reference_matches_torch(activation):
    torch.manual_seed(0)
    g, u = torch.randn(2, 2, 5, 33, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(glu_ref(g, u, activation), _torch_act(g, activation) * u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
def test_reference_gradcheck(activation):
    torch.manual_seed(0)
    g, u = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda g, u: glu_ref(g, u, activation), (g, u))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", GLU_ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(backend, dtype, activation, shape):
    torch.manual_seed(seed_for(backend, dtype, activation, shape))
    # a wide range of gates: the saturated tails of σ and Φ, and the cancelling middle
    g = (4 * torch.randn(shape, device=device())).to(dtype).requires_grad_()
    u = torch.randn(shape, device=device(), dtype=dtype, requires_grad=True)
    dout = torch.randn(shape, device=device(), dtype=dtype)
    g64, u64 = (t.detach().double().requires_grad_() for t in (g, u))

    fast = tk.glu(g, u, activation, backend=backend)
    same = glu_ref(g, u, activation, upcast=False)
    exact = glu_ref(g64, u64, activation)
    assert_close_to_reference("out", fast, same, exact)
    grads_fast = torch.autograd.grad(fast, (g, u), dout)
    grads_same = torch.autograd.grad(same, (g, u), dout)
    grads_exact = torch.autograd.grad(exact, (g64, u64), dout.double())
    for name, a, b, c in zip(("dgate", "dup"), grads_fast, grads_same, grads_exact, strict=True):
        assert_close_to_reference(name, a, b, c)


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    """The halves of one fused gate-up projection, as views."""
    torch.manual_seed(0)
    gu = torch.randn(6, 2 * 40, device=device(), requires_grad=True)
    g, u = gu.chunk(2, dim=-1)
    got = tk.glu(g, u, backend=backend)
    want = glu_ref(g, u)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dout = torch.randn_like(got)
    torch.testing.assert_close(
        torch.autograd.grad(got, gu, dout)[0], torch.autograd.grad(want, gu, dout)[0], rtol=1e-6, atol=1e-6
    )


def test_bad_inputs_name_the_argument():
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="glu: up shape"):
        tk.glu(g, torch.randn(2, 4))
    with pytest.raises(TypeError, match="glu: up dtype"):
        tk.glu(g, g.double())
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        tk.glu(g, g, "relu")
    with pytest.raises(TypeError, match="gate must be a floating-point tensor"):
        tk.glu(g.long(), g)
