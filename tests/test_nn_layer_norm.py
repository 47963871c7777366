"""transformer_kernels.nn.LayerNorm / RMSNorm are drop-ins for torch.nn's."""

from __future__ import annotations

import pytest
import torch
from helpers import device, kernel_backends

import transformer_kernels as tk
from transformer_kernels.ops.dropout_add_layer_norm import OP

BACKENDS = ["reference"] + kernel_backends(OP)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(elementwise_affine=False), dict(bias=False), dict(eps=1e-3)],
    ids=["affine", "no_affine", "no_bias", "eps"],
)
@pytest.mark.parametrize("normalized_shape", [37, (3, 5)], ids=["1d", "2d"])
def test_layer_norm_is_drop_in(backend, kwargs, normalized_shape):
    torch.manual_seed(0)
    ours = tk.nn.LayerNorm(normalized_shape, device=device(), **kwargs)
    theirs = torch.nn.LayerNorm(normalized_shape, device=device(), **kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():  # give the parameters non-trivial values, then copy them both ways
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours).removeprefix("LayerNorm") == repr(theirs).removeprefix("LayerNorm")

    shape = (2, 4) + ((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    x = torch.randn(shape, device=device(), requires_grad=True)
    with tk.use_backend(backend):
        y = ours(x)
    y_ref = theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *theirs.parameters()], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_is_drop_in(backend, eps):
    torch.manual_seed(0)
    ours = tk.nn.RMSNorm(48, eps=eps, device=device())
    theirs = torch.nn.RMSNorm(48, eps=eps, device=device())
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 48, device=device())
    with tk.use_backend(backend):
        y = ours(x)
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LayerNorm: expected input of shape \[\*, 3, 5\], got \[2, 5, 3\]"):
        tk.nn.LayerNorm((3, 5))(torch.randn(2, 5, 3))
