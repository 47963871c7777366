"""The argument checks the attention ops share (``attention``, ``attention_varlen``,
``attention_with_kvcache``): each raises at the API boundary with the op's name, the argument's name
and what is supported, before any backend sees the inputs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_qkv(op: str, q, k, v, *, shapes: tuple[str, str, str], names: tuple[str, str] = ("k", "v")) -> None:
    """``q``, ``k``, ``v``: floating-point tensors of one dtype and device, as many dims as the
    layouts in ``shapes`` have (``[B, L, H, D]`` or the packed ``[total, H, D]``); ``k`` and ``v`` of
    one shape, the batch (4-D) and head dim of ``q``, and a number of heads that divides ``q``'s."""
    kn, vn = names
    check_kind(op, "q", q, shapes[0])
    for name, t, shape in ((kn, k, shapes[1]), (vn, v, shapes[2])):
        check_kind(op, name, t, shape, like=q)
    if k.shape != v.shape:
        raise ValueError(f"{op}: {kn} shape {list(k.shape)} and {vn} shape {list(v.shape)} must match")
    (hq, d), (hkv, dk) = q.shape[-2:], k.shape[-2:]
    if q.dim() == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: batch size of {kn}/{vn} ({k.shape[0]}) does not match q's ({q.shape[0]})")
    if dk != d:
        raise ValueError(f"{op}: head dim of {kn}/{vn} ({dk}) does not match q's ({d})")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})"
        )


def check_kind(op: str, name: str, t, shape: str, like: Optional[Tensor] = None) -> None:
    """``t``: a floating-point tensor with as many dims as the layout ``shape`` (``"[B, L, H, D]"``)
    names, and the dtype and device of ``like`` where given."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor {shape}")
    ndim = shape.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {shape}, got shape {list(t.shape)}")
    if like is not None:
        check_like(op, name, t, like)


def check_like(op: str, name: str, t: Tensor, q: Tensor) -> None:
    """``t`` has ``q``'s dtype and device."""
    if t.dtype != q.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} does not match q dtype {q.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")


def check_key_padding_mask(op: str, mask, q: Tensor, shape: tuple[int, int], layout: str = "[B, Lk]") -> None:
    """``mask`` (unless None): a bool tensor of ``shape`` on ``q``'s device, True where a key is padding."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{op}: key_padding_mask must be a bool tensor {layout} (True = padding), got {got}")
    if mask.shape != shape:
        raise ValueError(f"{op}: key_padding_mask shape {list(mask.shape)} does not match {layout} = {list(shape)}")
    if mask.device != q.device:
        raise ValueError(f"{op}: key_padding_mask is on {mask.device}, q on {q.device}")


def check_dropout_p(op: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")


def check_softmax_scale(op: str, softmax_scale: Optional[float]) -> None:
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
