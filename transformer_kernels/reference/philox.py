"""The dropout keep-mask, specified in PyTorch: counter-based Philox4x32-10.

Every backend draws the same mask from the same seed, so a run is reproducible across backends
and the backward regenerates the forward's mask instead of storing it:

    r    = Philox4x32-10(counter=(idx_lo, idx_hi, 0, 0), key=(seed_lo, seed_hi))[0]
    keep = (r >> 8) >= round(p * 2**24)

with ``idx`` the element's index in the row-major [M, N] view. The generator is the one of
Random123 (Salmon et al., SC'11), as in curand and Triton's ``tl.philox``; the 24-bit integer
comparison keeps the decision exact in every language. The Triton kernels compute it with
``tl.philox`` and the CUDA kernels in ``csrc/cuda/philox.cuh``; tests hold both to this file.

On the CPU, when the extension is built, ``dropout_keep_mask`` computes the same bits with a
parallel C++ loop (``csrc/dropout_mask.cpp``, the CUDA kernels' header): the specification below
takes ~250 whole-tensor int64 operations per mask, which made dropout most of a CPU training
step. ``philox_keep_mask`` is the specification itself, always in PyTorch; tests hold the C++
loop to it bit for bit.
"""

from __future__ import annotations

import functools

import torch

from .. import _extension

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32s ``b`` (int64).

    int64 cannot hold a 64-bit product, so multiply in 16-bit halves of ``a``.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2**48
    p_hi = b * a_hi  # < 2**48; contributes p_hi << 16
    lo_sum = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = lo_sum & _MASK32
    hi = ((p_hi >> 16) + (lo_sum >> 32)) & _MASK32
    return hi, lo


def philox(seed: int | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for counters ``idx`` (int64 tensor), as int64 in [0, 2**32).

    ``seed`` is a Python int or a 0-dim int64 tensor (which keeps ``torch.compile`` graphs whole).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = idx & _MASK32
    c1 = (idx >> 32) & _MASK32
    c2 = torch.zeros_like(idx)
    c3 = torch.zeros_like(idx)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def dropout_threshold(p: float) -> int:
    """The 24-bit integer threshold below which an element is dropped."""
    return round(p * (1 << 24))


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def philox_keep_mask(seed: int | torch.Tensor, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """The specification of the keep-mask, in PyTorch: bool [rows, cols] for ``seed`` and rate ``p``."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return (philox(seed, idx) >> 8) >= dropout_threshold(p)


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
    """The bool keep-mask [rows, cols] that every backend uses for ``seed`` and rate ``p``."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and not torch.compiler.is_compiling() and native_mask_available():
        native = _native_seed(seed)
        if native is not None:
            return torch.ops.tk_C.dropout_keep_mask(native, dropout_threshold(p), rows, cols)
    return philox_keep_mask(seed, p, rows, cols, device)
