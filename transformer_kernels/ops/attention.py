"""``attention``: the functional op, its custom-op registration and autograd.

The kernel backend (``triton``) is reached through two ``torch.library`` custom ops,
``transformer_kernels::attention_fwd`` / ``_bwd``, with fake implementations and registered
autograd, so ``torch.compile(fullgraph=True)`` sees each call whole. The direct backends
(``reference``, ``native``) are plain differentiable PyTorch and need neither.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from . import _checks
from . import autocast as amp
from .custom_ops import kernel_op
from .dropout_mask import keep_mask_for
from .seed import draw_seed, seed_on

OP = "attention"
TRITON_MAX_HEAD_DIM = 256


def _triton_check(head_dim: Optional[int] = None, **_) -> Optional[str]:
    if head_dim is not None and head_dim > TRITON_MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported (max {TRITON_MAX_HEAD_DIM})"
    return None


backends.register_op(
    OP,
    reference=backends.reference("attention"),
    native=backends.native("attention"),
    triton=backends.triton_kernels("attention", check=_triton_check),
)


# ---------------------------------------------------------------------------------------------
# Custom ops. `seed` is a 0-dim int64 tensor on the inputs' device (or None without dropout; see
# ops/seed.py), so drawing it stays inside a compiled graph. The forward returns (out, lse2):
# lse2 is the log-sum-exp in base 2, what the backward needs (see triton/attention.py).


def _fwd_fake(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale, seed, backend):
    b, lq, hq, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty((b, hq, lq), dtype=torch.float32)


@kernel_op("attention_fwd", _fwd_fake)
def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd = backends.kernel(OP, backend, "attention_fwd")
    with amp.disabled(q.device):
        return fwd(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale, seed_on(seed, q.device))


def _bwd_fake(dout, q, k, v, out, lse2, key_padding_mask, causal, dropout_p, softmax_scale, seed, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


@kernel_op("attention_bwd", _bwd_fake)
def _bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse2: Tensor,
    key_padding_mask: Optional[Tensor],
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    bwd = backends.kernel(OP, backend, "attention_bwd")
    with amp.disabled(q.device):
        return bwd(
            dout, q, k, v, out, lse2, key_padding_mask, causal, dropout_p, softmax_scale, seed_on(seed, q.device)
        )


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, dropout_p, softmax_scale, seed, backend = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, key_padding_mask, seed)
    ctx.args = (causal, dropout_p, softmax_scale, backend)
    ctx.mark_non_differentiable(lse2)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse2, key_padding_mask, seed = ctx.saved_tensors
    causal, dropout_p, softmax_scale, backend = ctx.args
    dq, dk, dv = _bwd(dout, q, k, v, out, lse2, key_padding_mask, causal, dropout_p, softmax_scale, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale) -> None:
    _checks.check_qkv(OP, q, k, v, shapes=("[B, Lq, Hq, D]", "[B, Lk, Hkv, D]", "[B, Lk, Hkv, D]"))
    _checks.check_key_padding_mask(OP, key_padding_mask, q, (q.shape[0], k.shape[1]))
    _checks.check_dropout_p(OP, dropout_p)
    _checks.check_softmax_scale(OP, softmax_scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Scaled dot-product attention, fused: ``softmax(scale · q kᵀ + mask) v`` with dropout.

    Args:
        q: ``[B, Lq, Hq, D]``; fp16, bf16 or fp32 (fp64 on the reference and native backends).
        k, v: ``[B, Lk, Hkv, D]``, q's dtype; ``Hq % Hkv == 0`` (multi-head, grouped-query,
            multi-query). Any strides: the layout a fused QKV projection produces needs no copy.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (aligned bottom-right).
        key_padding_mask: bool ``[B, Lk]``, True = padding (ignored key), or None.
        dropout_p: dropout on the attention probabilities; pass 0 in eval.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scores, fp32 ``[B, Hq, Lq]``, -inf on
            rows that see no key (not differentiable).
        backend: ``reference``, ``native``, ``triton`` or ``auto``; wins over the global choice.

    Returns:
        ``out`` ``[B, Lq, Hq, D]`` in q's dtype (zeros on rows that see no key), or
        ``(out, lse)`` with ``return_lse=True``.
    """
    if isinstance(q, Tensor):  # under autocast: SDPA's policy, q, k, v in the autocast dtype
        q, k, v = amp.cast(amp.lower_dtype(q.device), q, k, v)
    _check_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    d = q.shape[-1]
    scale = float(d**-0.5 if softmax_scale is None else softmax_scale)
    name = backends.resolve(OP, backend, q.device, q.dtype, head_dim=d)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    direct = backends.direct(OP, name)
    if direct is not None:
        with amp.disabled(q.device):
            return direct(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=key_padding_mask,
                dropout_p=dropout_p,
                softmax_scale=scale,
                return_lse=return_lse,
                keep_mask=keep_mask_for(seed, dropout_p, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]), q.device),
            )
    out, lse2 = _fwd(q, k, v, key_padding_mask, bool(causal), float(dropout_p), scale, seed, name)
    return (out, lse2 * math.log(2.0)) if return_lse else out
