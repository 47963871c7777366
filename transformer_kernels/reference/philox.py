"""The dropout keep-mask, specified in PyTorch: counter-based Philox4x32-10, one call per 4 elements.

Every backend draws the same mask from the same seed, so a run is reproducible across backends
and the backward regenerates the forward's mask instead of storing it. Element ``(i, j)`` of a
mask over ``[rows, cols]`` (layer norm's rows, the GEMM output, attention's ``[B·H·Lq, Lk]``
probabilities) is decided by

    (r0, r1, r2, r3) = Philox4x32-10(counter=(j // 4, i_lo, i_hi, 0), key=(seed_lo, seed_hi))
    keep[i, j]       = (r[j % 4] >> 8) >= round(p * 2**24)

so one Philox call (ten rounds of two 32x32->64-bit multiplies) serves four neighbouring
elements of a row, a quarter of the integer work of a call per element. Keying the counter by
(row, column group) rather than by the flat index keeps every group of four inside one row, so
any tile whose columns start at a multiple of 4 (every power-of-two tile of 4 or more, every
vector of 4 or 8) covers whole groups, whatever the row length. The generator is the one of
Random123 (Salmon et al., SC'11), as in curand and Triton's ``tl.philox``; the 24-bit integer
comparison keeps the decision exact in every language. The Triton kernels compute it with
``triton/philox.py``, the CUDA kernels and the CPU loop of the extension with
``csrc/cuda/philox.cuh``; tests hold them all to this file, bit for bit.

This module is the specification and depends on PyTorch alone; the op layer
(``ops/dropout_mask.py``) swaps in the extension's C++ loop on the CPU when it is built.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85

# Elements served by one Philox call: its four 32-bit output words.
WORDS_PER_CALL = 4


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


def philox4x32(
    seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words of Philox4x32-10 for counters ``(c0, c1, c2, c3)`` (int64 tensors of
    one shape, values in [0, 2**32)) and key ``(seed_lo, seed_hi)``, as int64 in [0, 2**32).

    ``seed`` is a Python int or a 0-dim int64 tensor (which keeps ``torch.compile`` graphs whole).
    Each round: (c0, c1, c2, c3) <- (hi(B·c2) ^ c1 ^ k0, lo(B·c2), hi(A·c0) ^ c3 ^ k1, lo(A·c0)),
    then the key takes a Weyl step.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_words(seed: int | torch.Tensor, rows: int, cols: int, device=None, *, first_row: int = 0) -> torch.Tensor:
    """The 32-bit random word of every element of a [rows, cols] mask, as int64 [rows, cols]
    (of rows ``first_row`` to ``first_row + rows - 1`` of a taller mask, when given)."""
    groups = -(-cols // WORDS_PER_CALL)
    row = torch.arange(first_row, first_row + rows, dtype=torch.int64, device=device).view(rows, 1).expand(rows, groups)
    c0 = torch.arange(groups, dtype=torch.int64, device=device).view(1, groups).expand(rows, groups)
    words = philox4x32(seed, c0, row & _MASK32, row >> 32, torch.zeros_like(row))
    # [rows, groups, 4] -> [rows, 4 · groups]: word w of group g is column 4g + w.
    return torch.stack(words, dim=-1).view(rows, groups * WORDS_PER_CALL)[:, :cols]


def dropout_threshold(p: float) -> int:
    """The 24-bit integer threshold below which an element is dropped."""
    return round(p * (1 << 24))


def dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep_mask(seed: int | torch.Tensor, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """The bool keep-mask [rows, cols] that every backend uses for ``seed`` and rate ``p``."""
    return (dropout_words(seed, rows, cols, device) >> 8) >= dropout_threshold(p)
