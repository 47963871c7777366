"""The keep-mask that the ``reference`` backend applies: the specification, computed fast on the CPU.

:func:`reference.philox.dropout_keep_mask` is the specification in PyTorch (~60 whole-tensor int64
operations per four elements); on the CPU it made dropout most of a training step. When the
extension is built, the same bits come from its parallel C++ loop (``csrc/dropout_mask.cpp``,
which shares the CUDA kernels' Philox header); tests hold it to the specification bit for bit.
The choice lives here, in the op layer, so that ``reference/`` stays plain PyTorch. Under
``torch.compile`` the specification is traced (the C++ op has no meta kernel).
"""

from __future__ import annotations

import functools
import math

import torch

from .. import _extension
from ..reference import philox


@functools.cache
def native_mask_available() -> bool:
    """Whether the extension's C++ keep-mask is there (an extension built before it was added is not)."""
    return _extension.loaded() and hasattr(torch.ops.tk_C, "dropout_keep_mask")


def _native_seed(seed: int | torch.Tensor) -> torch.Tensor | None:
    """``seed`` as the C++ loop takes it (a 0-dim int64 CPU tensor), or None when it cannot."""
    if isinstance(seed, torch.Tensor):
        ok = seed.device.type == "cpu" and seed.dim() == 0 and seed.dtype == torch.int64
        return seed if ok else None
    return torch.tensor(seed, dtype=torch.int64) if -(2**63) <= seed < 2**63 else None


def dropout_keep_mask(seed: int | torch.Tensor, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """The bool keep-mask [rows, cols] of :func:`reference.philox.dropout_keep_mask`, by the fastest
    implementation at hand."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and not torch.compiler.is_compiling() and native_mask_available():
        native = _native_seed(seed)
        if native is not None:
            return torch.ops.tk_C.dropout_keep_mask(native, philox.dropout_threshold(p), rows, cols)
    return philox.dropout_keep_mask(seed, p, rows, cols, device)


def keep_mask_for(seed: torch.Tensor | None, p: float, shape: tuple[int, ...], device) -> torch.Tensor | None:
    """The keep-mask the direct backends (reference, native) apply to a tensor of ``shape``: its
    last dim the mask's columns, the rest flattened into rows; None without dropout (no seed)."""
    if seed is None:
        return None
    cols = shape[-1]
    rows = math.prod(shape[:-1]) if cols else 0
    return dropout_keep_mask(seed, p, rows, cols, device).view(shape)
