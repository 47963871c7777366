"""``glu``: the gated activation ``act(gate) * up`` of SwiGLU / GeGLU blocks; custom op and autograd.

The kernel backend (``triton``) is reached through two ``torch.library`` custom ops,
``transformer_kernels::glu_fwd`` / ``_bwd``, with fake implementations and registered autograd, so
``torch.compile(fullgraph=True)`` sees each call whole. The ``reference`` backend is plain
differentiable PyTorch and needs neither.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.glu import GLU_ACTIVATIONS
from . import autocast as amp
from .custom_ops import kernel_op

OP = "glu"
backends.register_op(
    OP, reference=backends.reference("glu"), native=backends.native("glu"), triton=backends.triton_kernels("glu")
)


# ---------------------------------------------------------------------------------------------
# Custom ops over contiguous gate and up of one shape; `activation` is "silu", "gelu" or "gelu_tanh".


def _fwd_fake(gate, up, activation, backend):
    return torch.empty_like(gate)


@kernel_op("glu_fwd", _fwd_fake)
def _fwd(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    fwd = backends.kernel(OP, backend, "glu_fwd")
    with amp.disabled(gate.device):
        return fwd(gate, up, activation)


def _bwd_fake(dout, gate, up, activation, backend):
    return torch.empty_like(gate), torch.empty_like(up)


@kernel_op("glu_bwd", _bwd_fake)
def _bwd(dout: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    bwd = backends.kernel(OP, backend, "glu_bwd")
    with amp.disabled(gate.device):
        return bwd(dout, gate, up, activation)


def _setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.args = (activation, backend)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    activation, backend = ctx.args
    dgate, dup = _bwd(dout.contiguous(), gate, up, activation, backend)
    return dgate, dup, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_inputs(gate, up, activation) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating-point tensor")
    if up.shape != gate.shape:
        raise ValueError(f"{OP}: up shape {list(up.shape)} does not match gate shape {list(gate.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{OP}: up dtype {up.dtype} does not match gate dtype {gate.dtype}")
    if up.device != gate.device:
        raise ValueError(f"{OP}: up is on {up.device}, gate on {gate.device}")
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(
            f"{OP}: unknown activation {activation!r}; expected one of {', '.join(map(repr, GLU_ACTIVATIONS))}"
        )


def glu(gate: Tensor, up: Tensor, activation: str = "silu", *, backend: Optional[str] = None) -> Tensor:
    """The gated activation ``act(gate) * up``, forward and backward one elementwise kernel each.

    Args:
        gate, up: the gate and up projections of a gated FFN, one shape, one dtype: fp16, bf16
            or fp32 (fp64 on the reference backend).
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (GeGLU, exact) or ``"gelu_tanh"``.
        backend: ``reference``, ``native``, ``triton`` or ``auto``; wins over the global choice.

    Returns:
        ``act(gate) * up`` in gate's shape and dtype, computed in fp32 and rounded once. Like
        eager elementwise ops, it runs in the inputs' dtype under autocast.
    """
    _check_inputs(gate, up, activation)
    name = backends.resolve(OP, backend, gate.device, gate.dtype)
    direct = backends.direct(OP, name)
    if direct is not None:
        with amp.disabled(gate.device):
            return direct(gate, up, activation)
    return _fwd(gate.contiguous(), up.contiguous(), activation, name)
