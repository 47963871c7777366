"""The specification of ``dropout_add_layer_norm``, in plain PyTorch.

    s   = residual + dropout(x)            (residual optional; s rounded to x's dtype)
    out = LayerNorm(s) * weight + bias     (or RMSNorm(s) * weight with rms_norm=True)

Statistics are taken over the last dim, in fp32 (or in the input dtype with ``upcast=False``,
which is the "same-dtype PyTorch path" the tests measure the fast backends' error against).
``s`` is rounded to the input dtype before the statistics, so the forward and the backward of
every backend see the same numbers: the backward recomputes from the stored ``s``.
"""

from __future__ import annotations

import torch

from .philox import dropout_keep_mask, dropout_scale


def dropout_add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dropout_p: float = 0.0,
    eps: float = 1e-5,
    *,
    prenorm: bool = False,
    rms_norm: bool = False,
    seed: int | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    upcast: bool = True,
):
    """Differentiable reference. Dropout keeps where ``keep_mask`` is True, or where the Philox
    mask of ``seed`` says so (see :mod:`.philox`); with ``dropout_p == 0`` neither is needed.

    Returns ``out``, or ``(out, s)`` with ``prenorm=True``; both in x's dtype.
    """
    if dropout_p > 0.0 and keep_mask is None:
        if seed is None:
            raise ValueError("dropout_add_layer_norm_ref: dropout_p > 0 needs a seed or a keep_mask")
        n = x.shape[-1]
        keep_mask = dropout_keep_mask(seed, dropout_p, x.numel() // max(n, 1), n, x.device).view(x.shape)
    if not upcast:
        return _eager(x, residual, weight, bias, dropout_p, eps, prenorm, rms_norm, keep_mask)

    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    h = x.to(compute)
    if dropout_p > 0.0:
        h = h * keep_mask.to(compute) * dropout_scale(dropout_p)
    if residual is not None:
        h = h + residual.to(compute)
    s = h.to(dtype)
    h = s.to(compute)
    if rms_norm:
        out = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    else:
        centered = h - h.mean(dim=-1, keepdim=True)
        out = centered * torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(compute)
    if bias is not None:
        out = out + bias.to(compute)
    out = out.to(dtype)
    return (out, s) if prenorm else out


def _eager(x, residual, weight, bias, dropout_p, eps, prenorm, rms_norm, keep_mask):
    """What eager PyTorch computes in the input dtype: each step rounded, torch's own norms."""
    dtype = x.dtype
    s = x * keep_mask.to(dtype) * dropout_scale(dropout_p) if dropout_p > 0.0 else x
    if residual is not None:
        s = s + residual
    n = (x.shape[-1],)
    w = None if weight is None else weight.to(dtype)
    if rms_norm:
        out = torch.nn.functional.rms_norm(s, n, w, eps)
    else:
        out = torch.nn.functional.layer_norm(s, n, w, None if bias is None else bias.to(dtype), eps)
    return (out, s) if prenorm else out
