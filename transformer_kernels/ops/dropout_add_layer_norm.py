"""``dropout_add_layer_norm``: the functional op, its custom-op registration and autograd.

The kernel backends (``triton``, ``cuda``) are reached through two ``torch.library`` custom ops,
``transformer_kernels::dropout_add_layer_norm_fwd`` / ``_bwd``, with fake implementations and
registered autograd, so ``torch.compile(fullgraph=True)`` sees each call whole. The direct
backends (``reference``, ``native``) are plain differentiable PyTorch and need neither.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from . import autocast as amp
from .custom_ops import kernel_op
from .dropout_mask import keep_mask_for
from .seed import draw_seed, seed_on

OP = "dropout_add_layer_norm"
TRITON_MAX_HIDDEN = 65536
CUDA_MAX_HIDDEN = 16384


def _max_hidden(limit: int):
    def check(hidden: int, **_) -> Optional[str]:
        return f"hidden size {hidden} is not supported (max {limit})" if hidden > limit else None

    return check


backends.register_op(
    OP,
    reference=backends.reference("dropout_add_layer_norm"),
    native=backends.native("dropout_add_layer_norm"),
    triton=backends.triton_kernels("dropout_add_layer_norm", check=_max_hidden(TRITON_MAX_HIDDEN)),
    cuda=backends.cuda_kernels(check=_max_hidden(CUDA_MAX_HIDDEN)),
)


# ---------------------------------------------------------------------------------------------
# Custom ops over contiguous [M, N] views. `seed` is a 0-dim int64 tensor on the inputs'
# device (or None without dropout; see ops/seed.py), so drawing it stays inside a compiled graph.


def _fwd_fake(x, residual, weight, bias, dropout_p, eps, seed, rms_norm, store_s, backend):
    m = x.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(x) if store_s else x.new_empty(0),
        x.new_empty(0 if rms_norm else m, dtype=torch.float32),
        x.new_empty(m, dtype=torch.float32),
    )


@kernel_op("dropout_add_layer_norm_fwd", _fwd_fake)
def _fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    dropout_p: float,
    eps: float,
    seed: Optional[Tensor],
    rms_norm: bool,
    store_s: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fwd = backends.kernel(OP, backend, "dropout_add_layer_norm_fwd")
    with amp.disabled(x.device):
        return fwd(x, residual, weight, bias, dropout_p, eps, seed_on(seed, x.device), rms_norm, store_s)


def _bwd_fake(dout, ds_in, s, weight, mean, rstd, dropout_p, seed, rms_norm, has_bias, backend):
    n = dout.shape[1]
    return (
        torch.empty_like(dout),
        torch.empty_like(dout) if dropout_p > 0.0 else dout.new_empty(0),
        dout.new_empty(n if weight is not None else 0, dtype=torch.float32),
        dout.new_empty(n if has_bias else 0, dtype=torch.float32),
    )


@kernel_op("dropout_add_layer_norm_bwd", _bwd_fake)
def _bwd(
    dout: Tensor,
    ds_in: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    dropout_p: float,
    seed: Optional[Tensor],
    rms_norm: bool,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    bwd = backends.kernel(OP, backend, "dropout_add_layer_norm_bwd")
    with amp.disabled(dout.device):
        return bwd(dout, ds_in, s, weight, mean, rstd, dropout_p, seed_on(seed, dout.device), rms_norm, has_bias)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, dropout_p, eps, seed, rms_norm, store_s, backend = inputs
    _, s, mean, rstd = output
    # Without a residual and without dropout, s is x itself and was not stored.
    saved_s = s if store_s else x
    ctx.save_for_backward(saved_s, weight, mean, rstd, seed)
    ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.has_residual = residual is not None
    ctx.args = (dropout_p, rms_norm, backend)


def _backward(ctx, dout, ds_in, _dmean, _drstd):
    s, weight, mean, rstd, seed = ctx.saved_tensors
    dropout_p, rms_norm, backend = ctx.args
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    if ds_in is not None and ds_in.numel() == 0:
        ds_in = None
    ds, dx, dweight, dbias = _bwd(
        dout.contiguous(),
        None if ds_in is None else ds_in.contiguous(),
        s,
        weight,
        mean,
        rstd,
        dropout_p,
        seed,
        rms_norm,
        b_dtype is not None,
        backend,
    )
    if dropout_p == 0.0:
        dx = ds
    return (
        dx,
        ds if ctx.has_residual else None,
        None if w_dtype is None else dweight.to(w_dtype),
        None if b_dtype is None else dbias.to(b_dtype),
        None,
        None,
        None,
        None,
        None,
        None,
    )


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_inputs(x, residual, weight, bias, dropout_p, eps, rms_norm) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"{OP}: x must be a floating-point tensor with at least one dim")
    n = x.shape[-1]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{OP}: residual shape {list(residual.shape)} does not match x shape {list(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{OP}: residual dtype {residual.dtype} does not match x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{OP}: residual is on {residual.device}, x on {x.device}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (n,):
            raise ValueError(f"{OP}: {name} shape {list(p.shape)} does not match the hidden size {n} (expected [{n}])")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{OP}: {name} dtype {p.dtype} is not supported (must be x's dtype {x.dtype} or torch.float32)"
            )
        if p.device != x.device:
            raise ValueError(f"{OP}: {name} is on {p.device}, x on {x.device}")
    if rms_norm and bias is not None:
        raise ValueError(f"{OP}: bias must be None when rms_norm=True (RMSNorm has no bias)")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1], got {dropout_p}")
    if eps < 0.0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


def dropout_add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    dropout_p: float = 0.0,
    eps: float = 1e-5,
    *,
    prenorm: bool = False,
    rms_norm: bool = False,
    training: bool = True,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``LayerNorm(residual + dropout(x))`` over the last dim, fused.

    Args:
        x: input of the dropout, any leading shape ``[..., N]``; fp16, bf16 or fp32
            (fp64 on the reference and native backends).
        residual: added after the dropout, same shape and dtype as ``x``; or None.
        weight, bias: ``[N]``, x's dtype or fp32; either may be None (no scale / no shift).
        dropout_p: probability of zeroing an element of ``x``; applied only when ``training``.
        eps: added to the variance (mean square for RMSNorm).
        prenorm: also return ``s = residual + dropout(x)``, the residual stream of a pre-LN block.
        rms_norm: RMSNorm instead of LayerNorm (``bias`` must be None).
        training: ``False`` disables dropout (and draws no random numbers).
        backend: ``reference``, ``native``, ``triton``, ``cuda`` or ``auto``; wins over the global choice.

    Returns:
        The normalised tensor in x's dtype, or ``(normed, s)`` with ``prenorm=True``.
    """
    if isinstance(x, Tensor) and isinstance(residual, (Tensor, type(None))):
        # under autocast: as torch's F.layer_norm(residual + x) (fp32 on CUDA; the add's promotion on the CPU)
        dtype = amp.norm_dtype(x, residual)
        if dtype is not None:  # the weights may stay fp32 beside any x; else they follow it
            x, residual = amp.cast(dtype, x, residual)
            weight, bias = (
                amp.cast(dtype, t)[0] if isinstance(t, Tensor) and t.dtype != torch.float32 else t
                for t in (weight, bias)
            )
    _check_inputs(x, residual, weight, bias, dropout_p, eps, rms_norm)
    if not training:
        dropout_p = 0.0
    n = x.shape[-1]
    name = backends.resolve(OP, backend, x.device, x.dtype, hidden=n)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    direct = backends.direct(OP, name)
    if direct is not None:
        with amp.disabled(x.device):
            return direct(
                x,
                residual,
                weight,
                bias,
                dropout_p,
                eps,
                prenorm=prenorm,
                rms_norm=rms_norm,
                keep_mask=keep_mask_for(seed, dropout_p, tuple(x.shape), x.device),
            )
    x2 = x.reshape(-1, n).contiguous()
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    # Without a residual and without dropout, s is x: nothing to store, the backward reads x.
    s_differs = residual is not None or dropout_p > 0.0
    store_s = s_differs and (prenorm or needs_grad)
    out, s, _, _ = _fwd(x2, r2, weight, bias, float(dropout_p), float(eps), seed, rms_norm, store_s, name)
    out = out.view(x.shape)
    if not prenorm:
        return out
    return out, (s.view(x.shape) if s_differs else x)
