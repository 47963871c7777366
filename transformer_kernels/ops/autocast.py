"""Autocast for the package's ops: each follows the policy torch gives the op it replaces.

``torch.autocast`` knows torch's own ops; a custom op is opaque to it, so without this module the
ops would see whatever dtypes their callers happen to hold (fp32 weights beside bf16 activations)
and their launchers would run with autocast still on, which recasts the launchers' own torch
calls (``torch.mm(..., out=fp32)`` then fails). So each functional op, on entry:

- casts its floating inputs as torch's autocast casts the op it replaces:
  to the autocast dtype as ``F.linear`` and SDPA (fused_linear, ffn, attention, the projection
  of linear_cross_entropy); dropout_add_layer_norm as ``residual + x`` then ``F.layer_norm``
  (:func:`norm_dtype`); fp64 is left alone, as autocast leaves it; cross_entropy needs no cast
  (it computes in fp32 from any input dtype, as torch's upcast would);
- runs its kernels (and its reference) with autocast off (:func:`disabled`), forward and backward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor

from ..backends import device_type

_DEVICE_TYPES = ("cuda", "cpu")
# One C call that says whether autocast is on for any device type (torch >= 2.1; traced by
# torch.compile): every op asks on every call, and autocast is usually off. Asking per device type
# parses the type's name each time, which costs more when the CPU's caches are cold (as right
# after a long kernel).
_ANY_ENABLED = getattr(torch._C, "_is_any_autocast_enabled", None)


def _enabled(device: torch.device) -> bool:
    if _ANY_ENABLED is not None and not _ANY_ENABLED():
        return False
    kind = device_type(device)
    return kind in _DEVICE_TYPES and torch.is_autocast_enabled(kind)


def lower_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast gives ``F.linear`` on ``device`` (its autocast dtype), or None when off."""
    return torch.get_autocast_dtype(device_type(device)) if _enabled(device) else None


def norm_dtype(x: Tensor, residual: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype torch's ``F.layer_norm(residual + x)`` computes in under autocast, or None when
    there is nothing to cast: fp32 on CUDA (layer_norm is on its fp32 list); on the CPU autocast
    leaves layer_norm alone, so the add before it decides (type promotion)."""
    if not _enabled(x.device):
        return None
    if x.device.type == "cuda":
        return torch.float32
    return None if residual is None else torch.promote_types(x.dtype, residual.dtype)


def cast(dtype: Optional[torch.dtype], *tensors: Any) -> tuple[Any, ...]:
    """``tensors`` with their fp16/bf16/fp32 ones cast to ``dtype`` (all unchanged when it is None)."""
    if dtype is None:
        return tensors
    eligible = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype in eligible and t.dtype != dtype else t for t in tensors
    )


def disabled(device: torch.device):
    """A context with autocast off on ``device``'s type (traceable by torch.compile): a
    ``torch.autocast(enabled=False)`` where autocast is on, else nothing (entering and leaving
    ``torch.autocast`` costs a few µs of Python a call, twice an op's forward and backward)."""
    if _enabled(device):
        return torch.autocast(device_type(device), enabled=False)
    return contextlib.nullcontext()
