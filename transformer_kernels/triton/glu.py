# The gated activation act(gate) ∘ up of SwiGLU / GeGLU feed-forward blocks, forward and backward.
# Modelled on Liger-Kernel's swiglu (one elementwise pass each way, act(gate) recomputed in the
# backward rather than stored). Trade-off: the two projections stay separate GEMMs (their weights
# keep their own parameters and state_dict keys); what is fused is the memory-bound middle, which in
# eager PyTorch is three kernels forward (act, mul, and the saved act output) and five backward.
"""Triton kernels of ``glu`` and their launchers.

Forward, per element (fp32 inside, rounded once to the inputs' dtype):

    out = act(g) · u          silu(g) = g σ(g),  gelu(g) = g Φ(g),  gelu_tanh(g) = g σ(2√(2/π)(g + 0.044715 g³))

Backward (the vector-Jacobian product), from the saved inputs only:

    du = dout · act(g),    dg = dout · u · act'(g),    silu'(g) = σ(g) + g σ(g) σ(-g)

(the GELU derivatives are ``fused_linear``'s, see triton/ffn.py). Reading g and u again costs two
reads of [M, N] in the backward; storing act(g) instead would cost one more write and read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ffn import _activation, _activation_grad, _sigmoid
from .launch import device_ctx

# Activation ids of the kernels: triton/ffn.py's GELUs, plus SiLU.
ACTIVATION_IDS = {"gelu": 2, "gelu_tanh": 3, "silu": 4}
BLOCK = 1024  # elements per program: 4 per thread at 8 warps, 16-byte loads in fp32


@triton.jit
def _glu_act(g, ACTIVATION: tl.constexpr):
    """act(g) and act'(g) of an fp32 block."""
    if ACTIVATION == 4:
        s = _sigmoid(g)
        return g * s, s + g * s * _sigmoid(-g)
    return _activation(g, ACTIVATION), _activation_grad(g, ACTIVATION)


@triton.jit
def _glu_fwd_kernel(
    GATE,  # [numel] contiguous, fp16 / bf16 / fp32
    UP,  # [numel] contiguous, GATE's dtype
    OUT,  # [numel] act(gate) · up, GATE's dtype
    numel,
    ACTIVATION: tl.constexpr,  # an ACTIVATION_IDS value
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _glu_act(g, ACTIVATION)  # act' is dead code here: the compiler drops it
    tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DOUT,  # [numel] contiguous, gradient of out
    GATE,  # [numel] the forward's gate
    UP,  # [numel] the forward's up
    DGATE,  # [numel] dout · up · act'(gate)
    DUP,  # [numel] dout · act(gate)
    numel,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _glu_act(g, ACTIVATION)
    tl.store(DGATE + offs, (dout * u * da).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * a).to(DUP.dtype.element_ty), mask=mask)


def _grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Forward over contiguous tensors of one shape and dtype.

    Args:
        gate, up: the two projections, any shape.
        activation: ``silu``, ``gelu`` or ``gelu_tanh``.

    Returns:
        ``act(gate) * up``, gate's shape and dtype.
    """
    out = torch.empty_like(gate)
    n = gate.numel()
    if n == 0:
        return out
    with device_ctx(gate):
        _glu_fwd_kernel[_grid(n)](gate, up, out, n, ACTIVATION=ACTIVATION_IDS[activation], BLOCK=BLOCK, num_warps=8)
    return out


def glu_bwd(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over contiguous tensors of one shape and dtype.

    Returns:
        ``(dgate, dup)`` in gate's dtype.
    """
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n == 0:
        return dgate, dup
    with device_ctx(gate):
        _glu_bwd_kernel[_grid(n)](
            dout, gate, up, dgate, dup, n, ACTIVATION=ACTIVATION_IDS[activation], BLOCK=BLOCK, num_warps=8
        )
    return dgate, dup
