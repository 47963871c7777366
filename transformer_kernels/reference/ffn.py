"""The specification of ``fused_linear`` and ``ffn``, in plain PyTorch.

    z   = x Wᵀ + b                               x [..., K], W [N, K] (nn.Linear's layout), b [N]
    out = dropout(act(z))                        act ∈ none, relu, gelu (erf), gelu_tanh
    ffn = fused_linear(fused_linear(x, W1, b1, act, p), W2, b2)

With ``upcast`` (the default) everything is computed in fp32 or wider and only ``out`` is rounded
to x's dtype (in ``ffn`` the hidden activation too, as every backend stores it). ``upcast=False``
is what eager PyTorch computes in the input dtype (``F.linear``, then each elementwise step
rounded): the "same-dtype PyTorch path" the tests measure the fast backends' error against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .philox import dropout_keep_mask, dropout_scale

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def activation_ref(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(z), written out (the tests hold it to torch's own F.relu / F.gelu)."""
    if activation is None:
        return z
    if activation == "relu":
        return z.clamp_min(0)
    if activation == "gelu":  # z Φ(z)
        return 0.5 * z * (1 + torch.erf(z * (1 / math.sqrt(2))))
    if activation == "gelu_tanh":  # z σ(2u), u = √(2/π) (z + 0.044715 z³); 0.5 (1 + tanh u) = σ(2u)
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z * z * z)))
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _eager_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")
    return z


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    dropout_p: float = 0.0,
    *,
    seed: int | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Differentiable reference of ``dropout(act(x @ weight.T + bias))``.

    Dropout keeps where ``keep_mask`` ([..., N] bool) is True, or where the Philox mask of
    ``seed`` over the [M, N] view of the output says so; with ``dropout_p == 0`` neither is needed.
    """
    n = weight.shape[0]
    if dropout_p > 0.0 and keep_mask is None:
        if seed is None:
            raise ValueError("fused_linear_ref: dropout_p > 0 needs a seed or a keep_mask")
        keep_mask = dropout_keep_mask(seed, dropout_p, math.prod(x.shape[:-1]), n, x.device).view(*x.shape[:-1], n)
    if not upcast:
        y = _eager_activation(F.linear(x, weight, bias), activation)
        return y * keep_mask.to(y.dtype) * dropout_scale(dropout_p) if dropout_p > 0.0 else y
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    z = x.to(compute) @ weight.to(compute).T
    if bias is not None:
        z = z + bias.to(compute)
    y = activation_ref(z, activation)
    if dropout_p > 0.0:
        y = y * keep_mask.to(compute) * dropout_scale(dropout_p)
    return y.to(dtype)


def ffn_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str | None = "relu",
    dropout_p: float = 0.0,
    *,
    seed: int | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """The position-wise feed-forward block: ``fused_linear(dropout(act(x W1ᵀ + b1)), W2, b2)``;
    ``seed``/``keep_mask`` are those of the first layer's dropout ([..., d_ff])."""
    h = fused_linear_ref(x, w1, b1, activation, dropout_p, seed=seed, keep_mask=keep_mask, upcast=upcast)
    return fused_linear_ref(h, w2, b2, upcast=upcast)
