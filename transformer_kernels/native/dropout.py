"""The dropout of the native backend: ``residual + x · keep · scale`` from a bool keep-mask, in one pass.

    forward   out = residual + x · k · scale      (k = keep as 0 or 1; in fp32, or fp64 for fp64,
                                                   rounded once to x's dtype; residual optional)
    backward  dx = dout · k · scale,  dresidual = dout

Both directions are the extension's ``tk_C::dropout_apply`` (``csrc/dropout_apply.cpp``): eager
PyTorch's spelling of the same product, ``x * keep`` with a bool ``keep``, copies the mask into a
float temporary first on the CPU and takes a pass per operator; with dropout on, those passes
were what made the native backend slower than eager torch. The arithmetic, and so every bit, is
the reference's. Without the extension, or under ``torch.compile`` (the C++ op has no meta
kernel), the same formula runs as one ``addcmul``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _extension
from ..reference.philox import dropout_scale


@functools.cache
def _fused_available() -> bool:
    return _extension.loaded() and hasattr(torch.ops.tk_C, "dropout_apply")


class _DropoutApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale, residual):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.tk_C.dropout_apply(x, keep, scale, residual)

    @staticmethod
    def backward(ctx, dout):
        (keep,) = ctx.saved_tensors
        dout = dout.contiguous()
        dx = torch.ops.tk_C.dropout_apply(dout, keep, ctx.scale, None) if ctx.needs_input_grad[0] else None
        return dx, None, None, dout if ctx.needs_input_grad[3] else None


def dropout_apply(x: Tensor, keep: Tensor, p: float, residual: Tensor | None = None) -> Tensor:
    """``residual + x · keep / (1 - p)`` (``keep``: bool, x's shape), in x's dtype, differentiable."""
    scale = dropout_scale(p)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and _fused_available():
        return _DropoutApply.apply(x, keep, scale, residual)
    compute = torch.promote_types(x.dtype, torch.float32)
    base = residual.to(compute) if residual is not None else x.new_zeros((), dtype=compute)
    return torch.addcmul(base, x.to(compute), keep, value=scale).to(x.dtype)
