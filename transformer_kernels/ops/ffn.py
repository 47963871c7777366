"""``fused_linear`` and ``ffn``: the functional ops, their custom-op registration and autograd.

The kernel backends (``triton``, ``cuda``) are reached through two ``torch.library`` custom ops,
``transformer_kernels::fused_linear_fwd`` / ``_bwd``, with fake implementations and registered
autograd, so ``torch.compile(fullgraph=True)`` sees each call whole. ``ffn`` is two of them (the
second without activation or dropout). The direct backends (``reference``, ``native``) are plain
differentiable PyTorch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.ffn import ACTIVATIONS
from . import autocast as amp
from .custom_ops import kernel_op
from .dropout_mask import keep_mask_for
from .seed import draw_seed, seed_on

OP = "fused_linear"
FFN_OP = "ffn"
# ffn runs on fused_linear's kernels, so both ops declare the same backends.
for _op in (OP, FFN_OP):
    backends.register_op(
        _op,
        reference=backends.reference("ffn"),
        native=backends.native("ffn"),
        triton=backends.triton_kernels("ffn"),
        cuda=backends.cuda_kernels(),
    )


# ---------------------------------------------------------------------------------------------
# Custom ops over x [M, K], weight [N, K]. `activation` is "none", "relu", "gelu" or "gelu_tanh";
# `seed` is a 0-dim int64 tensor on the inputs' device (or None without dropout; see ops/seed.py),
# so drawing it stays in the graph.


def _fwd_fake(x, weight, bias, activation, dropout_p, seed, backend):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, torch.empty_like(out) if activation in ("gelu", "gelu_tanh") else x.new_empty(0)


@kernel_op("fused_linear_fwd", _fwd_fake)
def _fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    activation: str,
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd = backends.kernel(OP, backend, "fused_linear_fwd")
    with amp.disabled(x.device):
        return fwd(x, weight, bias, activation, dropout_p, seed_on(seed, x.device))


def _bwd_fake(dout, x, weight, out, preact, has_bias, activation, dropout_p, seed, backend):
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(weight.shape[0] if has_bias else 0)


@kernel_op("fused_linear_bwd", _bwd_fake)
def _bwd(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    preact: Tensor,
    has_bias: bool,
    activation: str,
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    bwd = backends.kernel(OP, backend, "fused_linear_bwd")
    with amp.disabled(x.device):
        return bwd(dout, x, weight, out, preact, has_bias, activation, dropout_p, seed_on(seed, dout.device))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, seed, backend = inputs
    out, preact = output
    ctx.save_for_backward(x, weight, out, preact, seed)
    ctx.args = (bias is not None, activation, dropout_p, backend)


def _backward(ctx, dout, _dpreact):
    x, weight, out, preact, seed = ctx.saved_tensors
    has_bias, activation, dropout_p, backend = ctx.args
    dx, dweight, dbias = _bwd(dout.contiguous(), x, weight, out, preact, has_bias, activation, dropout_p, seed, backend)
    return dx, dweight, dbias if has_bias else None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_inputs(op, x, layers, activation, dropout_p) -> None:
    """``layers``: (weight name, weight, bias name, bias) per linear layer, in order."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"{op}: x must be a floating-point tensor with at least one dim")
    features, source = x.shape[-1], "x's last dim"
    for w_name, w, b_name, b in layers:
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise ValueError(f"{op}: {w_name} must be a 2-D tensor [out_features, in_features]")
        if w.shape[1] != features:
            raise ValueError(
                f"{op}: {w_name} shape {list(w.shape)} does not match {source} {features} "
                f"(expected [out_features, {features}])"
            )
        params = ((w_name, w),) if b is None else ((w_name, w), (b_name, b))
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(
                f"{op}: {b_name} shape {list(b.shape)} does not match {w_name}'s out_features "
                f"{w.shape[0]} (expected [{w.shape[0]}])"
            )
        for name, p in params:
            if p.dtype != x.dtype:
                raise TypeError(f"{op}: {name} dtype {p.dtype} does not match x dtype {x.dtype}")
            if p.device != x.device:
                raise ValueError(f"{op}: {name} is on {p.device}, x on {x.device}")
        features, source = w.shape[0], f"{w_name}'s out_features"
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}"
        )
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")


def _rows(x: Tensor) -> Tensor:
    """x [..., K] as a contiguous [M, K] (reshape(-1, K) fails for K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _linear(
    x2: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    activation: Optional[str],
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> Tensor:
    """One fused linear layer on a kernel backend, over x2 [M, K]."""
    out, _ = _fwd(
        x2,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        activation or "none",
        float(dropout_p),
        seed,
        backend,
    )
    return out


def fused_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """``dropout(act(x @ weight.T + bias))``, the GEMM with its epilogue fused.

    Args:
        x: ``[..., in_features]``; fp16, bf16 or fp32 (fp64 on the reference and native backends).
        weight: ``[out_features, in_features]`` (``torch.nn.Linear``'s layout), x's dtype.
        bias: ``[out_features]`` in x's dtype, or None.
        activation: None, ``"relu"``, ``"gelu"`` (exact, erf) or ``"gelu_tanh"``.
        dropout_p: probability of zeroing an output element; applied only when ``training``.
        training: ``False`` disables dropout (and draws no random numbers).
        backend: ``reference``, ``native``, ``triton``, ``cuda`` or ``auto``; wins over the global choice.

    Returns:
        ``[..., out_features]`` in x's dtype. fp32 GEMMs run on TF32 tensor cores exactly when
        ``F.linear``'s do (``torch.backends.cuda.matmul.fp32_precision == "tf32"``).
    """
    if isinstance(x, Tensor):  # under autocast: F.linear's policy, everything in the autocast dtype
        x, weight, bias = amp.cast(amp.lower_dtype(x.device), x, weight, bias)
    _check_inputs(OP, x, [("weight", weight, "bias", bias)], activation, dropout_p)
    if not training:
        dropout_p = 0.0
    name = backends.resolve(OP, backend, x.device, x.dtype)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    direct = backends.direct(OP, name)
    if direct is not None:
        with amp.disabled(x.device):
            return direct(
                x,
                weight,
                bias,
                activation,
                dropout_p,
                keep_mask=keep_mask_for(seed, dropout_p, (*x.shape[:-1], weight.shape[0]), x.device),
            )
    out = _linear(_rows(x), weight, bias, activation, dropout_p, seed, name)
    return out.view(*x.shape[:-1], weight.shape[0])


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    activation: Optional[str] = "relu",
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """The position-wise feed-forward block ``dropout(act(x W1ᵀ + b1)) W2ᵀ + b2``, two fused GEMMs.

    Args:
        x: ``[..., d_model]``; fp16, bf16 or fp32 (fp64 on the reference and native backends).
        w1, b1: ``[d_ff, d_model]`` and ``[d_ff]`` (or None); w2, b2: ``[d_out, d_ff]`` and
            ``[d_out]`` (or None); all in x's dtype.
        activation, dropout_p, training, backend: as in :func:`fused_linear`, for the first layer
            (the dropout is on the hidden activation; the residual dropout belongs to
            ``dropout_add_layer_norm``).

    Returns:
        ``[..., d_out]`` in x's dtype.
    """
    if isinstance(x, Tensor):  # under autocast: F.linear's policy, everything in the autocast dtype
        x, w1, b1, w2, b2 = amp.cast(amp.lower_dtype(x.device), x, w1, b1, w2, b2)
    _check_inputs(FFN_OP, x, [("w1", w1, "b1", b1), ("w2", w2, "b2", b2)], activation, dropout_p)
    if not training:
        dropout_p = 0.0
    name = backends.resolve(FFN_OP, backend, x.device, x.dtype)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    direct = backends.direct(FFN_OP, name)
    if direct is not None:
        with amp.disabled(x.device):
            return direct(
                x,
                w1,
                b1,
                w2,
                b2,
                activation,
                dropout_p,
                keep_mask=keep_mask_for(seed, dropout_p, (*x.shape[:-1], w1.shape[0]), x.device),
            )
    h = _linear(_rows(x), w1, b1, activation, dropout_p, seed, name)
    out = _linear(h, w2, b2, None, 0.0, None, name)
    return out.view(*x.shape[:-1], w2.shape[0])
