"""``fused_linear`` and ``ffn`` on torch's CPU GEMM (``F.linear``: one addmm with the bias) and
its activation kernels.

These are the ops eager PyTorch runs for ``Linear`` + activation; the differences are the
package's: the Philox dropout mask (applied in one pass, :func:`.dropout.dropout_apply`), and
for fp16/bf16 the accumulation torch's CPU GEMMs already do in fp32, rounded once per GEMM
output, as the reference's ``upcast=False`` path that the tests measure against.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from ..reference.ffn import ACTIVATIONS
from .dropout import dropout_apply


def _activation(z: Tensor, activation: str | None) -> Tensor:
    """The activation of ``z``, a GEMM's fresh output (not a view: see :func:`fused_linear`): ReLU
    in place (its backward needs only the result), which saves eager's extra [N, d_ff] tensor and
    a pass over it."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z, inplace=True)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    dropout_p: float = 0.0,
    *,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """As :func:`~transformer_kernels.reference.fused_linear_ref`.

    The GEMM runs on x's rows as one 2-D matrix and its result is reshaped only at the end: on
    [B, L, d] input ``F.linear`` returns a view of its 2-D addmm output, and an in-place ReLU on a
    view makes autograd copy the whole [N, d_ff] gradient through ``CopySlices`` and
    ``as_strided`` in the backward."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y = _activation(F.linear(rows, weight, bias), activation)
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("fused_linear: dropout_p > 0 needs the keep-mask")
        y = dropout_apply(y, keep_mask.view(y.shape), dropout_p)
    return y.view(*x.shape[:-1], y.shape[-1])


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str | None = "relu",
    dropout_p: float = 0.0,
    *,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """As :func:`~transformer_kernels.reference.ffn_ref`."""
    return F.linear(fused_linear(x, w1, b1, activation, dropout_p, keep_mask=keep_mask), w2, b2)
