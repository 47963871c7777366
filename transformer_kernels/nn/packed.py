"""``Packed``: variable-length sequences concatenated along dim 0, with no padding.

The layout of FlashAttention's ``*_varlen_*`` functions and of ``attention_varlen``: B sequences of
lengths n_0 .. n_{B-1} are one tensor ``data [n_0 + ... + n_{B-1}, ...]`` (tokens ``[T]``, hidden
states ``[T, E]``) and ``cu_seqlens = [0, n_0, n_0 + n_1, ..., T]`` (int32, ``[B + 1]``): sequence i
is ``data[cu_seqlens[i] : cu_seqlens[i + 1]]``. ``max_seqlen`` (a Python int, so reading it never
synchronises with the device) sizes the attention kernels' grids and bounds the positions.

Every row-wise operation (embedding, LayerNorm, FFN, the loss) runs on ``data`` unchanged; only
attention and positions need the boundaries. A padded batch of the same sentences spends
``B · max(n_i) - T`` rows on padding that all of those operations compute and then discard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packed:
    """Sequences concatenated along dim 0: ``data[cu_seqlens[i] : cu_seqlens[i + 1]]`` is sequence i."""

    data: Tensor  # [T, ...]
    cu_seqlens: Tensor  # int32 [B + 1], on data's device: 0, then the running total of the lengths
    max_seqlen: int  # the longest sequence (0 for a batch of empty sequences)

    def __post_init__(self):
        cu = self.cu_seqlens
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(
                "Packed: cu_seqlens must be a 1-D int32 tensor of B + 1 offsets, "
                f"got {cu.dtype} of shape {tuple(cu.shape)}"
            )
        if self.data.dim() < 1:
            raise ValueError("Packed: data must have a token dimension first ([T, ...]), got a 0-dim tensor")
        if not isinstance(self.max_seqlen, int) or self.max_seqlen < 0:
            raise ValueError(f"Packed: max_seqlen must be an int >= 0, got {self.max_seqlen!r}")

    @classmethod
    def from_lengths(cls, data: Tensor, lengths: Sequence[int]) -> Packed:
        """``data [sum(lengths), ...]`` cut into sequences of ``lengths`` (host integers)."""
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) != data.shape[0]:
            raise ValueError(
                f"Packed.from_lengths: lengths {lengths} must be >= 0 and sum to data's {data.shape[0]} rows"
            )
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        if lengths:
            cu[1:] = torch.tensor(lengths).cumsum(0)
        return cls(data, cu.to(data.device), max(lengths, default=0))

    @classmethod
    def from_sequences(cls, sequences: Sequence[Tensor]) -> Packed:
        """The given tensors (``[n_i, ...]``, same trailing shape) concatenated."""
        if not sequences:
            raise ValueError("Packed.from_sequences: needs at least one sequence")
        return cls.from_lengths(torch.cat(list(sequences)), [s.shape[0] for s in sequences])

    @classmethod
    def from_padded(cls, padded: Tensor, lengths: Sequence[int]) -> Packed:
        """The first ``lengths[i]`` rows of each ``padded[i]`` (``[B, L, ...]``, sequences left-aligned)."""
        if len(lengths) != padded.shape[0] or any(not 0 <= int(n) <= padded.shape[1] for n in lengths):
            raise ValueError(
                f"Packed.from_padded: {len(lengths)} lengths for a [{padded.shape[0]}, {padded.shape[1]}, ...] "
                "batch; each must be in [0, L]"
            )
        return cls.from_sequences([padded[i, : int(n)] for i, n in enumerate(lengths)])

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> Tensor:
        """int32 [B], on the device."""
        return self.cu_seqlens.diff()

    def replace(self, data: Tensor) -> Packed:
        """The same sequences' boundaries around new ``data`` (a row-wise function of this one's)."""
        return Packed(data, self.cu_seqlens, self.max_seqlen)

    def to(self, device, non_blocking: bool = False) -> Packed:
        return Packed(
            self.data.to(device, non_blocking=non_blocking),
            self.cu_seqlens.to(device, non_blocking=non_blocking),
            self.max_seqlen,
        )

    def sequence_ids(self) -> Tensor:
        """int64 [T]: which sequence each row belongs to."""
        b = torch.arange(self.batch_size, device=self.data.device)
        return torch.repeat_interleave(b, self.lengths.long(), output_size=self.data.shape[0])

    def positions(self) -> Tensor:
        """int64 [T]: each row's position in its own sequence (0 at every sequence's start)."""
        rows = torch.arange(self.data.shape[0], device=self.data.device)
        return rows - self.cu_seqlens.long()[self.sequence_ids()]

    def to_padded(self, value: float = 0) -> Tensor:
        """``[B, max_seqlen, ...]``: sequence i in row i, then ``value``."""
        out = self.data.new_full((self.batch_size, self.max_seqlen, *self.data.shape[1:]), value)
        out[self.sequence_ids(), self.positions()] = self.data
        return out


__all__ = ["Packed"]
