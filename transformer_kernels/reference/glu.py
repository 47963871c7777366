"""The specification of ``glu``, the gated activation of SwiGLU / GeGLU feed-forward blocks, in plain PyTorch.

    out = act(gate) ∘ up                 gate, up [..., N];  act ∈ silu (SwiGLU), gelu (GeGLU), gelu_tanh

A gated FFN is ``glu(x W_gateᵀ, x W_upᵀ) W_downᵀ`` (Shazeer, "GLU Variants Improve Transformer",
2020; Llama's and Qwen's MLP). With ``upcast`` (the default) the product is computed in fp32 or wider
and rounded once to the inputs' dtype; ``upcast=False`` is what eager PyTorch computes in the input
dtype (``F.silu(gate) * up``, each step rounded): the "same-dtype PyTorch path" of the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ffn import activation_ref

GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":  # z σ(z)
        return z * torch.sigmoid(z)
    return activation_ref(z, activation)


def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, upcast: bool = True) -> torch.Tensor:
    """Differentiable reference of ``act(gate) * up``."""
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {GLU_ACTIVATIONS}")
    if not upcast:
        if activation == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (_act(gate.to(compute), activation) * up.to(compute)).to(gate.dtype)
