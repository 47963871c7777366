"""The specification of ``cross_entropy`` and ``linear_cross_entropy``, in plain PyTorch.

``torch.nn.functional.cross_entropy`` for class-index targets, written out. Per row ``i`` with
target ``t``, over ``V`` classes, with ``logp = log_softmax(x_i)`` and smoothing ``ε``:

    loss_i = (1 - ε) · (-logp[t]) + (ε / V) · Σ_j (-logp[j])        (0 where t == ignore_index)

``"sum"`` adds the rows, ``"mean"`` divides that sum by the number of rows not ignored (so it is
nan when every row is ignored, as in torch), ``"none"`` returns them. Low-precision inputs are
upcast: the loss and the softmax are computed, and the loss returned, in fp32 (fp64 stays fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Label-smoothed cross-entropy of ``logits [N, V]`` against class indices ``target [N]``."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    v = x.shape[-1]
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)  # [N, V]
    valid = target != ignore_index  # [N]
    t = torch.where(valid, target, 0)
    nll = -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)  # [N]
    smooth = -logp.sum(-1)  # [N]
    loss = (1.0 - label_smoothing) * nll + (label_smoothing / v) * smooth
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def linear_cross_entropy_ref(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """``cross_entropy_ref(hidden @ weight.T + bias, target, **kwargs)``, the logits in the input dtype."""
    return cross_entropy_ref(F.linear(hidden, weight, bias), target, **kwargs)
