"""``glu`` on torch's fast CPU paths: ``act(gate) * up`` with torch's fused activations.

Same semantics as :func:`transformer_kernels.reference.glu_ref`: computed in fp32 (or wider) and
rounded once to the inputs' dtype; the reference spells SiLU as ``z σ(z)``, here it is one
``F.silu`` (and ``F.gelu``) pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def glu(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    """As :func:`~transformer_kernels.reference.glu_ref`."""
    compute = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(compute)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (act * up.to(compute)).to(gate.dtype)
