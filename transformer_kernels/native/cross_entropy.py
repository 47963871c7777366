"""``cross_entropy`` and ``linear_cross_entropy``: the loss and its gradient in one pass over
row chunks of the logits.

Per chunk ``z`` of logits (fp32, or fp64): the log-sum-exp and the loss, then, where a gradient is
wanted, ``z`` turned in place into ``g · (softmax - (1-ε)·onehot - ε/V)`` (``g``: the reduction's
factor per row, 0 on ignored rows) while it is still in the cache; the backward only scales the
stored gradient by the incoming one. Eager ``F.cross_entropy`` makes its passes over the whole
``[N, V]`` (log-softmax, NLL, the smoothing's sum; in the backward a one-hot, the smoothing's
term, the log-softmax's backward), each from memory. The loss of fp16/bf16 logits is the fp32
one and their gradient is rounded once, as the reference.

``cross_entropy``: the logits in chunks of :data:`CE_CHUNK_ELEMENTS`, the gradient written into
one ``[N, V]`` tensor (eager keeps the log-softmax, as large).

``linear_cross_entropy``: the rows in chunks, each chunk's logits ``h Wᵀ + b`` used and dropped:
per chunk the forward takes the log-sum-exp and the loss, turns the logits
in place into their gradient ``g · (softmax - (1-ε)·onehot - ε/V)`` and accumulates
``dh = G W``, ``dW += Gᵀ h``, ``db += Σ G`` (``g``: the reduction's factor per row, 0 on ignored
rows). The ``[N, V]`` logits never exist whole, and the backward only scales the stored
gradients by the incoming one (the same three GEMMs as eager, one pass less over the logits).
With ``reduction="none"`` the incoming gradient differs per row, so the backward redoes the
chunks. The gradient GEMMs run in fp32 for fp16/bf16 inputs (accumulated over chunks, rounded
once), the logits in the input dtype, as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Logits per chunk (64 MB of fp32): the chunks bound the memory, and must stay large for the GEMMs'
# sake. Measured on a 2-core CPU, N 2048, V 10000, against eager F.linear + F.cross_entropy: 2**20
# elements a chunk (cache-sized, 100 rows) ran 0.6x, 2**23 1.3x, one chunk 1.4x. The speed comes
# from the fused gradient (one pass less over the logits), not from the cache.
CHUNK_ELEMENTS = 1 << 24


# Logits per cross_entropy chunk (1 MB of fp32): each pass after the first finds the chunk in a
# core's L2. Measured on a 2-core x86 CPU (AVX-512), [4096, 10000] fp32 with smoothing, forward +
# backward against eager F.cross_entropy (1.00x): 2**16 elements a chunk 1.09x, 2**18 1.45x,
# 2**20 1.38x, 2**22 1.26x, the whole [N, V] at once 0.98x.
CE_CHUNK_ELEMENTS = 1 << 18


def _loss_and_grad_(z: Tensor, t: Tensor, valid: Tensor, label_smoothing: float, g: Tensor | None) -> Tensor:
    """The per-row loss of the logits ``z`` [n, V] (fp32 or wider) with targets ``t`` [n] (loss 0
    where not ``valid``); with ``g`` [n, 1] (0 on the rows not valid), ``z`` becomes in place the
    gradient of ``Σ g · loss`` w.r.t. itself."""
    v = z.shape[-1]
    tv = torch.where(valid, t, 0).unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    # -log p_t · (1-ε) + ε/V · Σ_j -log p_j  =  (1-ε)·(lse - z_t) + ε·(lse - Σ_j z_j / V): each
    # difference taken first, as a log-probability (exactly 0 where one class has it all)
    loss = (1.0 - label_smoothing) * (lse - z.gather(-1, tv).squeeze(-1))
    if label_smoothing:
        loss += label_smoothing * (lse - z.sum(-1) / v)
    if g is not None:
        # dloss/dz = g · (softmax(z) - (1-ε)·onehot(t) - ε/V)
        z.sub_(lse.unsqueeze(-1)).exp_()
        if label_smoothing:
            z.sub_(label_smoothing / v)
        z.scatter_add_(-1, tv, torch.full_like(g, -(1.0 - label_smoothing)))
        z.mul_(g)
    return torch.where(valid, loss, 0.0)


def _row_factor(valid: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """``g`` [N]: d(reduced loss)/d(row loss) before the incoming gradient: 1/#valid (mean) or 1,
    0 on the ignored rows."""
    one = torch.ones((), dtype=dtype, device=valid.device)
    return torch.where(valid, one / valid.sum() if reduction == "mean" else one, 0.0)


def _scaled(grad: Tensor, dloss: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A stored gradient [N, ...] times the incoming one (0-dim, or [N] for reduction="none"), in
    fp32 or wider (the wider of the two), rounded once to ``dtype`` (default: the gradient's)."""
    compute = torch.promote_types(grad.dtype, dloss.dtype)
    d = dloss.to(compute)
    d = d if d.dim() == 0 else d.view(-1, *([1] * (grad.dim() - 1)))
    return (grad.to(compute) * d).to(grad.dtype if dtype is None else dtype)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, ignore_index, reduction, wants_grad):
        n, v = logits.shape
        compute = torch.promote_types(logits.dtype, torch.float32)
        valid = target != ignore_index
        loss = logits.new_empty(n, dtype=compute)
        grad = logits.new_empty((n, v), dtype=compute) if wants_grad else None
        g = _row_factor(valid, reduction, compute).unsqueeze(-1) if grad is not None else None
        chunk = max(1, CE_CHUNK_ELEMENTS // max(v, 1))
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            z = logits[rows].to(compute) if grad is None else grad[rows].copy_(logits[rows])
            gr = None if g is None else g[rows]
            loss[rows] = _loss_and_grad_(z, target[rows], valid[rows], label_smoothing, gr)
        ctx.dtype = logits.dtype
        ctx.save_for_backward(grad)
        return _reduce(loss, valid, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, dloss, ctx.dtype), None, None, None, None, None


def cross_entropy(
    logits: Tensor, target: Tensor, *, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """As :func:`~transformer_kernels.reference.cross_entropy_ref`: the loss and the gradient in one
    pass over chunks of rows (the gradient only where autograd will ask for it: not under no_grad)."""
    wants_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropy.apply(logits, target, label_smoothing, ignore_index, reduction, wants_grad)


def _chunked(hidden, weight, bias, target, label_smoothing, ignore_index, row_grad, needs):
    """Per-row loss [N] (fp32 or wider), and with ``row_grad`` [N] the gradients of
    ``Σ row_grad · loss`` w.r.t. (hidden, weight, bias) where ``needs`` says (else None)."""
    n, v = hidden.shape[0], weight.shape[0]
    compute = torch.promote_types(hidden.dtype, torch.float32)
    loss = hidden.new_empty(n, dtype=compute)
    grads = row_grad is not None and any(needs)
    dh = hidden.new_empty(hidden.shape, dtype=compute) if grads and needs[0] else None
    dw = weight.new_zeros(weight.shape, dtype=compute) if grads and needs[1] else None
    db = weight.new_zeros(v, dtype=compute) if grads and needs[2] else None
    w_c = weight.to(compute)
    chunk = max(1, CHUNK_ELEMENTS // v)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        valid = target[rows] != ignore_index
        z = F.linear(hidden[rows], weight, bias).to(compute)  # the logits in the input dtype, as the reference
        g = torch.where(valid, row_grad[rows].to(compute), 0.0).unsqueeze(-1) if grads else None
        loss[rows] = _loss_and_grad_(z, target[rows], valid, label_smoothing, g)
        if not grads:
            continue
        if dh is not None:
            torch.mm(z, w_c, out=dh[rows])
        if dw is not None:
            dw.addmm_(z.T, hidden[rows].to(compute))
        if db is not None:
            db.add_(z.sum(0))
    cast = [None if t is None else t.to(like.dtype) for t, like in ((dh, hidden), (dw, weight), (db, weight))]
    return loss, *cast


def _reduce(loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, label_smoothing, ignore_index, reduction, grad_enabled):
        needs = tuple(n and grad_enabled for n in ctx.needs_input_grad[:3])  # none under no_grad
        valid = target != ignore_index
        ctx.reduction = reduction
        ctx.args = (label_smoothing, ignore_index, needs)
        if reduction == "none":  # the incoming gradient is per row: the backward redoes the chunks
            loss, *_ = _chunked(hidden, weight, bias, target, label_smoothing, ignore_index, None, needs)
            ctx.save_for_backward(hidden, weight, bias, target)
            return loss
        compute = torch.promote_types(hidden.dtype, torch.float32)
        row_grad = _row_factor(valid, reduction, compute) if any(needs) else None
        loss, dh, dw, db = _chunked(hidden, weight, bias, target, label_smoothing, ignore_index, row_grad, needs)
        ctx.save_for_backward(dh, dw, db)
        return _reduce(loss, valid, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        label_smoothing, ignore_index, needs = ctx.args
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            _, dh, dw, db = _chunked(hidden, weight, bias, target, label_smoothing, ignore_index, dloss, needs)
        else:
            dh, dw, db = (None if g is None else _scaled(g, dloss) for g in ctx.saved_tensors)
        return dh, dw, db, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """As :func:`~transformer_kernels.reference.linear_cross_entropy_ref`, chunked."""
    args = (label_smoothing, ignore_index, reduction, torch.is_grad_enabled())
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, *args)
