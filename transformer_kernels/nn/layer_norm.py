"""``LayerNorm`` and ``RMSNorm``: ``torch.nn``'s modules, computed by ``dropout_add_layer_norm``.

They subclass their ``torch.nn`` namesakes, so the constructor, the parameters, ``state_dict``
keys, ``repr`` and ``isinstance`` checks are exactly torch's; only ``forward`` differs.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from ..ops.dropout_add_layer_norm import dropout_add_layer_norm


def _normalize(module, x: Tensor, bias, eps: float, rms_norm: bool) -> Tensor:
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise ValueError(
            f"{type(module).__name__}: expected input of shape [*, {', '.join(map(str, shape))}], got {list(x.shape)}"
        )
    # A multi-dim normalized_shape is one flattened hidden dim to the op.
    n = math.prod(shape)
    weight = None if module.weight is None else module.weight.reshape(n)
    bias = None if bias is None else bias.reshape(n)
    out = cast(  # a Tensor: prenorm is off
        Tensor,
        dropout_add_layer_norm(
            x.reshape(*x.shape[: x.dim() - len(shape)], n), None, weight, bias, eps=eps, rms_norm=rms_norm
        ),
    )
    return out.view(x.shape)


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm`."""

    def forward(self, x: Tensor) -> Tensor:
        return _normalize(self, x, self.bias, self.eps, rms_norm=False)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` (``eps=None`` means ``torch.finfo(x.dtype).eps``)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return _normalize(self, x, None, eps, rms_norm=True)
