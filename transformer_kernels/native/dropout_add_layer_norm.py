"""``dropout_add_layer_norm`` on torch's fused CPU norms.

    s   = residual + dropout(x)        one pass in fp32 (or wider), rounded once to x's dtype
    out = F.layer_norm(s) / F.rms_norm(s)

torch's CPU norms take their statistics in fp32 for fp16/bf16 inputs (and accept fp32 weights
beside them), so this is the reference's arithmetic with two kernels per direction instead of a
dozen whole-tensor steps. The mask is the package's Philox mask (the C++ loop on the CPU), applied
with the residual add in one pass (:func:`.dropout.dropout_apply`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import dropout_apply


def dropout_add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    dropout_p: float = 0.0,
    eps: float = 1e-5,
    *,
    prenorm: bool = False,
    rms_norm: bool = False,
    keep_mask: Tensor | None = None,
):
    """As :func:`~transformer_kernels.reference.dropout_add_layer_norm_ref`."""
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    n = x.shape[-1]
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("dropout_add_layer_norm: dropout_p > 0 needs the keep-mask")
        s = dropout_apply(x, keep_mask.view(x.shape), dropout_p, residual)
    elif residual is not None:
        s = torch.add(residual.to(compute), x.to(compute)).to(dtype)
    else:
        s = x
    if rms_norm:
        # torch's fused RMSNorm wants the weight in the input's dtype; an fp32 weight beside fp16/bf16
        # runs in fp32 instead (rounding the weight would add an error the reference does not make)
        mixed = weight is not None and weight.dtype != dtype
        out = F.rms_norm(s.to(compute) if mixed else s, (n,), weight, eps)
    else:
        out = F.layer_norm(s, (n,), weight, bias, eps)
    if out.dtype != dtype:  # fp32 weights beside fp16/bf16 x: the result in x's dtype, as every backend's
        out = out.to(dtype)
    return (out, s) if prenorm else out
