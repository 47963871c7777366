"""``attention_varlen``: attention over packed variable-length sequences (no padding).

The layout is FlashAttention's ``*_varlen_*``: the B sequences of a batch back to back in one
``[total_tokens, H, D]`` tensor, sequence ``b`` at rows ``cu_seqlens[b]`` to ``cu_seqlens[b + 1] - 1``.
The kernel backend (``triton``) is reached through two ``torch.library`` custom ops,
``transformer_kernels::attention_varlen_fwd`` / ``_bwd``, with fake implementations and registered
autograd (the same design as ``attention``'s); the direct backends are plain differentiable PyTorch.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from . import _checks
from . import autocast as amp
from .attention import _triton_check
from .custom_ops import kernel_op
from .dropout_mask import keep_mask_for
from .seed import draw_seed, seed_on

OP = "attention_varlen"

backends.register_op(
    OP,
    reference=backends.reference("attention"),
    native=backends.native("attention"),
    triton=backends.triton_kernels("attention", check=_triton_check),
)


# ---------------------------------------------------------------------------------------------
# Custom ops. As for ``attention``: ``seed`` is a 0-dim int64 tensor on the inputs' device (or None), the forward
# returns (out, lse2) with lse2 the base-2 log-sum-exp, here fp32 [Hq, total_q].


def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, dropout_p, scale, seed, backend):
    total_q, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((hq, total_q), dtype=torch.float32)


@kernel_op("attention_varlen_fwd", _fwd_fake)
def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd = backends.kernel(OP, backend, "attention_varlen_fwd")
    with amp.disabled(q.device):
        return fwd(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal,
            dropout_p,
            softmax_scale,
            seed_on(seed, q.device),
        )


def _bwd_fake(
    dout, q, k, v, out, lse2, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, p, scale, seed, backend
):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


@kernel_op("attention_varlen_bwd", _bwd_fake)
def _bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse2: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    bwd = backends.kernel(OP, backend, "attention_varlen_bwd")
    with amp.disabled(q.device):
        return bwd(
            dout,
            q,
            k,
            v,
            out,
            lse2,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal,
            dropout_p,
            softmax_scale,
            seed_on(seed, q.device),
        )


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p, softmax_scale, seed, backend = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, causal, dropout_p, softmax_scale, backend)
    ctx.mark_non_differentiable(lse2)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse2, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, dropout_p, softmax_scale, backend = ctx.args
    dq, dk, dv = _bwd(
        dout, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, dropout_p, softmax_scale, seed, backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_cu_seqlens_values(name: str, cu: Tensor, total: int, max_name: str, max_seqlen: int) -> None:
    """The checks that read ``cu``'s values: starts at 0, never decreases, ends at ``total``, no
    sequence longer than ``max_seqlen``."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{OP}: {name}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(n < 0 for n in lengths):
        at = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{OP}: {name} must be non-decreasing, but {name}[{at + 1}] < {name}[{at}]")
    if values[-1] != total:
        raise ValueError(f"{OP}: {name}[-1] ({values[-1]}) must equal the number of tokens ({total})")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{OP}: {max_name} ({max_seqlen}) is less than the longest sequence ({longest})")


def _check_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, check_values
) -> None:
    _checks.check_qkv(OP, q, k, v, shapes=("[total_q, Hq, D]", "[total_k, Hkv, D]", "[total_k, Hkv, D]"))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
            got = cu.dtype if isinstance(cu, Tensor) else type(cu).__name__
            raise TypeError(f"{OP}: {name} must be an int32 tensor [B + 1], got {got}")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"{OP}: {name} must be 1-D [B + 1] (B >= 0), got shape {list(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{OP}: {name} is on {cu.device}, q on {q.device}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"{OP}: cu_seqlens_k has {cu_seqlens_k.numel()} entries, cu_seqlens_q {cu_seqlens_q.numel()}: "
            "sequence i of q attends to sequence i of k, so both must be [B + 1]"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, (bool, Tensor)) or not hasattr(type(m), "__index__"):
            raise TypeError(f"{OP}: {name} must be an int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{OP}: {name} must be >= 0, got {m}")
    _checks.check_dropout_p(OP, dropout_p)
    _checks.check_softmax_scale(OP, softmax_scale)
    if check_values:
        _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
        _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
    check_seqlens: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences: ``attention`` on each sequence, no padding.

    Args:
        q: ``[total_q, Hq, D]``, the B query sequences back to back; fp16, bf16 or fp32 (fp64 on
            the reference and native backends). Any strides.
        k, v: ``[total_k, Hkv, D]``, q's dtype, ``Hq % Hkv == 0``; sequence ``b`` of q attends to
            sequence ``b`` of k/v alone (self-attention: the same ``cu_seqlens`` twice).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on q's device, the cumulative lengths:
            ``0 = cu[0] <= cu[1] <= ... <= cu[B] = total``; empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence of each (they size the
            kernels' grids and the dropout mask's layout; FlashAttention's arguments).
        causal: query ``i`` of a sequence sees keys ``j <= i + Lk - Lq`` of its pair (aligned
            bottom-right, per sequence, as ``attention``).
        dropout_p: dropout on the attention probabilities; pass 0 in eval. The mask is the one
            ``attention`` draws from the same seed for the sequences padded to ``max_seqlen_q`` x
            ``max_seqlen_k``: both calls give the same result.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores, fp32 ``[Hq, total_q]``, -inf on
            rows that see no key (not differentiable).
        backend: ``reference``, ``native``, ``triton`` or ``auto``; wins over the global choice.
        check_seqlens: check the values of ``cu_seqlens`` (start at 0, non-decreasing, end at
            the token counts, no sequence longer than ``max_seqlen``). Default (None): when they
            are on the CPU, where it is free; on a GPU it reads them back (a device sync per
            call), so only with ``True``. Out-of-range values are not caught by the kernels.

    Returns:
        ``out`` ``[total_q, Hq, D]`` in q's dtype (zeros on rows that see no key), or
        ``(out, lse)`` with ``return_lse=True``.
    """
    if isinstance(q, Tensor):  # under autocast: SDPA's policy, q, k, v in the autocast dtype
        q, k, v = amp.cast(amp.lower_dtype(q.device), q, k, v)
    if check_seqlens is None:
        check_seqlens = isinstance(cu_seqlens_q, Tensor) and cu_seqlens_q.device.type == "cpu"
    check_values = bool(check_seqlens) and not torch.compiler.is_compiling()
    _check_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, check_values
    )
    d = q.shape[-1]
    scale = float(d**-0.5 if softmax_scale is None else softmax_scale)
    name = backends.resolve(OP, backend, q.device, q.dtype, head_dim=d)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    direct = backends.direct(OP, name)
    if direct is not None:
        bsz, hq = cu_seqlens_q.numel() - 1, q.shape[1]
        with amp.disabled(q.device):
            return direct(
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                max_seqlen_k,
                causal=causal,
                dropout_p=dropout_p,
                softmax_scale=scale,
                return_lse=return_lse,
                keep_mask=keep_mask_for(seed, dropout_p, (bsz, hq, max_seqlen_q, max_seqlen_k), q.device),
            )
    out, lse2 = _fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        bool(causal),
        float(dropout_p),
        scale,
        seed,
        name,
    )
    return (out, lse2 * math.log(2.0)) if return_lse else out
