"""The dropout keep-decision in Triton: the Philox mask of ``reference/philox.py``, one call per 4 elements.

Element ``(row, col)`` takes word ``col % 4`` of ``Philox4x32-10((col // 4, row_lo, row_hi, 0), seed)``.
The helpers run ``tl.philox`` on a tile a quarter as wide as the mask tile (one counter per
group of four columns) and interleave its four output words along the last axis with two levels
of ``tl.join`` and a ``tl.reshape``: ``join(join(k0, k2), join(k1, k3))`` (``k`` the words' keep
decisions) has shape ``[..., G, 2, 2]`` with element ``[g, a, b] = k[2a + b]``, so the row-major
reshape to ``[..., 4G]`` puts word ``w`` of group ``g`` at column ``4g + w``. The tile's columns must start
at a multiple of 4 and number a multiple of 4 (a power of two >= 4).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _keep_interleaved(r0, r1, r2, r3, threshold):
    """Keep decisions of words [..., G] x 4 -> bool [..., 4G], word w of group g at position 4g + w.

    The decisions are interleaved as int8, not the words as int32: where the consumer's layout
    differs from the join's, the compiler converts the tile through shared memory, a byte per
    element instead of four.
    """
    k0 = ((r0 >> 8).to(tl.int32) >= threshold).to(tl.int8)
    k1 = ((r1 >> 8).to(tl.int32) >= threshold).to(tl.int8)
    k2 = ((r2 >> 8).to(tl.int32) >= threshold).to(tl.int8)
    k3 = ((r3 >> 8).to(tl.int32) >= threshold).to(tl.int8)
    keep = tl.join(tl.join(k0, k2), tl.join(k1, k3))
    return tl.reshape(keep, keep.shape[:-3] + [4 * keep.shape[-3]]) != 0


@triton.jit
def dropout_keep_tile(seed, rows, col_start, threshold, BLOCK_N: tl.constexpr):
    """True where element ``(rows[i], col_start + j)`` is kept: bool ``[len(rows), BLOCK_N]``.

    ``rows``: int64 [BLOCK_M] row indices of the [rows, cols] mask (attention: ``(b·Hq + h)·Lq +
    i``); ``col_start``: a multiple of 4; ``seed``: int in [0, 2**63); ``threshold``:
    ``reference.philox.dropout_threshold(p)``.
    """
    tl.static_assert(BLOCK_N % 4 == 0, "the tile must hold whole groups of four columns")
    group = (col_start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    c1 = (rows & 0xFFFFFFFF).to(tl.uint32)
    c2 = (rows >> 32).to(tl.uint32)
    zero = tl.zeros_like(c1)[:, None] + tl.zeros_like(group)[None, :]
    r0, r1, r2, r3 = tl.philox(seed, group[None, :] + zero, c1[:, None] + zero, c2[:, None] + zero, zero)
    return _keep_interleaved(r0, r1, r2, r3, threshold)


@triton.jit
def dropout_keep_row(seed, row, col_start, threshold, BLOCK_N: tl.constexpr):
    """True where element ``(row, col_start + j)`` is kept: bool ``[BLOCK_N]``, for one row (int64 scalar)."""
    tl.static_assert(BLOCK_N % 4 == 0, "the block must hold whole groups of four columns")
    c0 = (col_start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c1 = zero + (row & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + (row >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    return _keep_interleaved(r0, r1, r2, r3, threshold)


def seed_arg(seed, dropout_p: float, device):
    """The launchers' seed argument: the 0-dim int64 tensor on ``device`` that the kernels load
    (``tl.load(SEED)``) when ``dropout_p > 0``, else None (the kernels then take no seed).

    The seed is read on the device, never on the host, so a launch inside a CUDA graph reads
    whatever seed the graph drew before it on each replay.
    """
    if dropout_p <= 0.0:
        return None
    if not isinstance(seed, torch.Tensor) or seed.dim() != 0 or seed.dtype != torch.int64:
        got = f"{seed.dtype} of shape {list(seed.shape)}" if isinstance(seed, torch.Tensor) else repr(seed)
        raise TypeError(f"seed must be a 0-dim torch.int64 tensor when dropout_p > 0, got {got}")
    if seed.device != torch.device(device):
        raise ValueError(f"seed is on {seed.device}, the inputs on {device}: the kernels read it on the inputs' device")
    return seed
