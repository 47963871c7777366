"""``cross_entropy`` and ``linear_cross_entropy``: the functional ops, custom ops and autograd.

The ``triton`` backend is reached through ``torch.library`` custom ops with fake implementations
and registered autograd, so ``torch.compile(fullgraph=True)`` sees each call whole:

- ``transformer_kernels::cross_entropy_fwd`` returns the loss; ``cross_entropy_bwd`` runs the same
  kernel again over the saved logits, with the incoming gradient folded in, so the gradient is
  rounded once to the input dtype (precomputing it in the forward and scaling it in the backward
  rounds it twice, up to 1.5 ulp instead of 0.5, whenever the incoming gradient is not 1).
- ``transformer_kernels::linear_cross_entropy_fwd`` returns the loss and the gradients w.r.t.
  hidden, weight and bias, computed chunk by chunk in the forward ("mean"/"sum"). With
  ``reduction="none"`` the upstream gradient differs per row and is known only in the backward,
  so the forward computes the loss alone and ``linear_cross_entropy_bwd`` recomputes the chunks.

Target range check: the kernels cannot raise, so both ops check on the host, before launching,
that every target is a class index or ``ignore_index``: one min/max reduction and one device sync
per call. It runs inside the custom ops (opaque to the compiler, so compiled graphs do not break)
and, on the reference backend, in eager mode only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.cross_entropy import REDUCTIONS
from . import autocast as amp
from .custom_ops import kernel_op

CE_OP = "cross_entropy"
LCE_OP = "linear_cross_entropy"

# linear_cross_entropy's kernels live in cross_entropy's kernel file, so both ops declare the same backends.
for _op in (CE_OP, LCE_OP):
    backends.register_op(
        _op,
        reference=backends.reference("cross_entropy"),
        native=backends.native("cross_entropy"),
        triton=backends.triton_kernels("cross_entropy"),
    )


def _check_targets(op: str, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise unless every target is in ``[0, num_classes)`` or ``ignore_index`` (syncs once)."""
    if target.numel() == 0:
        return
    t = torch.where(target != ignore_index, target, 0)
    lo, hi = torch.stack(t.aminmax()).tolist()
    if hi >= num_classes:
        raise ValueError(f"{op}: target contains {hi}, out of range for {num_classes} classes")
    if lo < 0:
        raise ValueError(
            f"{op}: target contains {lo}, which is neither a class index in [0, {num_classes}) "
            f"nor ignore_index ({ignore_index})"
        )


def _grad_scale(target: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """(number of rows not ignored, the per-row gradient factor of the reduction), on the device."""
    n_valid = (target != ignore_index).sum()
    if reduction == "mean":
        return n_valid, 1.0 / n_valid.to(torch.float32)  # inf when all are ignored: then unused
    return n_valid, torch.ones((), dtype=torch.float32, device=target.device)


def _reduce(loss: Tensor, n_valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    # Summed in fp64 (N numbers: free) and rounded once; the mean over no rows is nan, as torch's.
    total = loss.sum(dtype=torch.float64)
    return (total / n_valid if reduction == "mean" else total).to(loss.dtype)


def _loss_fake(x: Tensor, n: int, reduction: str) -> Tensor:
    return x.new_empty(n if reduction == "none" else (), dtype=torch.float32)


def _scale_by(grad: Tensor, dloss: Tensor) -> Tensor:
    """``grad`` (of the summed or per-row loss) times the incoming gradient of the loss."""
    g = dloss if dloss.dim() == 0 else dloss.unsqueeze(-1)
    return (grad * g).to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# cross_entropy


def _ce_fwd_fake(logits, target, label_smoothing, ignore_index, reduction, backend):
    return _loss_fake(logits, logits.shape[0], reduction)


@kernel_op("cross_entropy_fwd", _ce_fwd_fake)
def _ce_fwd(
    logits: Tensor, target: Tensor, label_smoothing: float, ignore_index: int, reduction: str, backend: str
) -> Tensor:
    _check_targets(CE_OP, target, logits.shape[1], ignore_index)
    n_valid, scale = _grad_scale(target, ignore_index, reduction)
    with amp.disabled(logits.device):
        kernel = backends.kernel(CE_OP, backend, "cross_entropy_fwd")
        loss, _ = kernel(logits, target, scale, label_smoothing, ignore_index, False)
        return _reduce(loss, n_valid, reduction)


def _ce_bwd_fake(dloss, logits, target, label_smoothing, ignore_index, reduction, backend):
    return logits.new_empty(logits.shape)


@kernel_op("cross_entropy_bwd", _ce_bwd_fake)
def _ce_bwd(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    backend: str,
) -> Tensor:
    """The gradient of ``<dloss, loss>`` w.r.t. the logits, rounded once to their dtype."""
    _, scale = _grad_scale(target, ignore_index, reduction)
    with amp.disabled(logits.device):
        _, grad = backends.kernel(CE_OP, backend, "cross_entropy_fwd")(
            logits, target, (dloss.float() * scale).contiguous(), label_smoothing, ignore_index, True
        )
    return grad


def _ce_setup_context(ctx, inputs, output):
    logits, target, *args = inputs  # label_smoothing, ignore_index, reduction, backend
    ctx.save_for_backward(logits, target)
    ctx.args = args


def _ce_backward(ctx, dloss):
    logits, target = ctx.saved_tensors
    return _ce_bwd(dloss, logits, target, *ctx.args), None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy. `chunk_size` 0 means: chosen by the launcher.


def _lce_fwd_fake(
    hidden, weight, target, bias, label_smoothing, ignore_index, reduction, chunk_size, compute_grad, backend
):
    loss = _loss_fake(hidden, hidden.shape[0], reduction)
    if not compute_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


@kernel_op("linear_cross_entropy_fwd", _lce_fwd_fake)
def _lce_fwd(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_targets(LCE_OP, target, weight.shape[0], ignore_index)
    n_valid, scale = _grad_scale(target, ignore_index, reduction)
    with amp.disabled(hidden.device):
        loss, dh, dw, db = backends.kernel(LCE_OP, backend, "linear_cross_entropy_fwd")(
            hidden, weight, target, bias, scale, label_smoothing, ignore_index, compute_grad, chunk_size
        )
        return _reduce(loss, n_valid, reduction), dh, dw, db


def _lce_bwd_fake(dloss, hidden, weight, target, bias, label_smoothing, ignore_index, chunk_size, backend):
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


@kernel_op("linear_cross_entropy_bwd", _lce_bwd_fake)
def _lce_bwd(
    dloss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    label_smoothing: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``Σ dloss · loss`` for ``reduction="none"``: the chunks recomputed."""
    with amp.disabled(hidden.device):
        _, dh, dw, db = backends.kernel(LCE_OP, backend, "linear_cross_entropy_fwd")(
            hidden, weight, target, bias, dloss.float().contiguous(), label_smoothing, ignore_index, True, chunk_size
        )
    return dh, dw, db


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, target, bias, label_smoothing, ignore_index, reduction, chunk_size, _, backend = inputs
    ctx.has_bias = bias is not None
    ctx.recompute = reduction == "none"
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, target, bias)
        ctx.args = (label_smoothing, ignore_index, chunk_size, backend)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, dloss, _dh, _dw, _db):
    if ctx.recompute:
        hidden, weight, target, bias = ctx.saved_tensors
        dh, dw, db = _lce_bwd(dloss, hidden, weight, target, bias, *ctx.args)
    else:
        dh, dw, db = (_scale_by(g, dloss) for g in ctx.saved_tensors)
    return dh, dw, None, db if ctx.has_bias else None, None, None, None, None, None, None


_lce_fwd.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_options(op: str, label_smoothing: float, ignore_index: int, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_target(op: str, target: Tensor, n: int, device: torch.device) -> None:
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(
            f"{op}: target must be an int64 tensor of class indices, got {got} (class probabilities are not supported)"
        )
    if target.shape != (n,):
        raise ValueError(f"{op}: target shape {list(target.shape)} does not match the {n} rows (expected [{n}])")
    if target.device != device:
        raise ValueError(f"{op}: target is on {target.device}, the inputs on {device}")


def _check_matrix(op: str, name: str, x, shape_hint: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        desc = f"shape {list(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a 2-D floating-point tensor {shape_hint}, got {desc}")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` for class indices, loss and gradient fused.

    Args:
        logits: ``[N, V]``; fp16, bf16 or fp32 (fp64 on the reference and native backends).
        target: ``[N]`` int64 class indices in ``[0, V)``, or ``ignore_index`` (no loss, no gradient).
        label_smoothing: ``ε``: the target distribution is ``(1 - ε)·onehot + ε/V``.
        reduction: ``"mean"`` (over rows not ignored; nan if none), ``"sum"`` or ``"none"``.
        backend: ``reference``, ``native``, ``triton`` or ``auto``; wins over the global choice.

    Returns:
        The loss in fp32 (fp64 for fp64 logits): ``[]``, or ``[N]`` with ``reduction="none"``.
        The gradient w.r.t. the logits comes in their dtype. A target out of range raises
        ``ValueError`` (checked on the host: one device sync per call).
    """
    _check_matrix(CE_OP, "logits", logits, "[N, V] (flatten any leading dims)")
    n, v = logits.shape
    if v == 0:
        raise ValueError(f"{CE_OP}: logits must have at least one class, got shape {list(logits.shape)}")
    _check_target(CE_OP, target, n, logits.device)
    _check_options(CE_OP, label_smoothing, ignore_index, reduction)
    name = backends.resolve(CE_OP, backend, logits.device, logits.dtype, vocab=v)
    kw: dict[str, Any] = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    direct = backends.direct(CE_OP, name)
    if direct is not None:  # no cast under autocast: computed in fp32 from any dtype, as torch's upcast
        if not torch.compiler.is_compiling():
            _check_targets(CE_OP, target, v, ignore_index)
        with amp.disabled(logits.device):
            return direct(logits, target, **kw)
    return _ce_fwd(logits.contiguous(), target.contiguous(), float(label_smoothing), ignore_index, reduction, name)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target, ...)`` without holding the ``[N, V]`` logits.

    Args:
        hidden: ``[N, d]``; weight: ``[V, d]`` (may be tied to an embedding); bias: ``[V]`` or None;
            one dtype: fp16, bf16 or fp32 (fp64 on the reference and native backends).
        target, label_smoothing, ignore_index, reduction: as in :func:`cross_entropy`.
        chunk_size: rows per chunk on the triton backend; None chooses from N, V and free memory
            (the native backend sizes its chunks itself, to stay in the CPU's cache).
        backend: ``reference`` (materialises the logits), ``native``, ``triton`` or ``auto``.

    Returns:
        The loss, as :func:`cross_entropy`; gradients come in the input dtype.
    """
    if isinstance(hidden, Tensor):  # under autocast: the projection follows F.linear's policy
        hidden, weight, bias = amp.cast(amp.lower_dtype(hidden.device), hidden, weight, bias)
    _check_matrix(LCE_OP, "hidden", hidden, "[N, d]")
    _check_matrix(LCE_OP, "weight", weight, "[V, d]")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d or v == 0:
        raise ValueError(
            f"{LCE_OP}: weight shape {list(weight.shape)} does not match hidden size {d} (expected [V, {d}], V >= 1)"
        )
    for name_, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{LCE_OP}: {name_} dtype {t.dtype} does not match hidden dtype {hidden.dtype}")
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{LCE_OP}: {name_} is on {t.device}, hidden on {hidden.device}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"{LCE_OP}: bias shape {list(bias.shape)} does not match the {v} classes (expected [{v}])")
    _check_target(LCE_OP, target, n, hidden.device)
    _check_options(LCE_OP, label_smoothing, ignore_index, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{LCE_OP}: chunk_size must be a positive int or None, got {chunk_size!r}")
    name = backends.resolve(LCE_OP, backend, hidden.device, hidden.dtype, vocab=v)
    kw: dict[str, Any] = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    direct = backends.direct(LCE_OP, name)
    if direct is not None:
        if not torch.compiler.is_compiling():
            _check_targets(LCE_OP, target, v, ignore_index)
        with amp.disabled(hidden.device):
            return direct(hidden, weight, target, bias, **kw)
    compute_grad = (
        reduction != "none"
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    )
    loss, _, _, _ = _lce_fwd(
        hidden.contiguous(),
        weight.contiguous(),
        target.contiguous(),
        None if bias is None else bias.contiguous(),
        float(label_smoothing),
        ignore_index,
        reduction,
        chunk_size or 0,
        compute_grad,
        name,
    )
    return loss
