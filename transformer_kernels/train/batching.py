"""Batches by token count: which pairs go together (:class:`TokenBatcher`) and their tensors, padded
(:func:`collate`) or packed without padding (:func:`collate_packed`).

Each epoch shuffles the pairs with a seed, sorts them by length (so a batch holds sentences of
similar length: little padding, or with packing, even attention tiles), cuts batches under the
token budget and shuffles the batch order. An epoch's batches are a pure function of (seed, epoch),
so the batcher's state is just (epoch, position) and resuming regenerates the epoch and skips what
was already served.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..nn import Packed
from .sources import DataError


@dataclass
class Batch:
    """Padded tensors: ``src [B, S]``; ``tgt_in [B, T]`` = BOS + target; ``tgt_out [B, T]`` = target + EOS."""

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    indices: list[int]

    def to(self, device) -> Batch:
        return Batch(
            self.src.to(device, non_blocking=True),
            self.tgt_in.to(device, non_blocking=True),
            self.tgt_out.to(device, non_blocking=True),
            self.indices,
        )

    def target_tokens(self, pad_id: int) -> Tensor:
        """The real (non-padding) target tokens: the loss's denominator (a 0-dim tensor on the batch's device)."""
        return (self.tgt_out != pad_id).sum()

    def tokens(self, pad_id: int) -> Tensor:
        """The real source and target tokens."""
        return (self.src != pad_id).sum() + self.target_tokens(pad_id)


@dataclass
class PackedBatch:
    """Packed sentences, no padding: ``src`` [S] tokens; ``tgt_in`` [T] = BOS + target of each sentence;
    ``tgt_out`` [T] = target + EOS, in ``tgt_in``'s layout (its own ``cu_seqlens``)."""

    src: Packed
    tgt_in: Packed
    tgt_out: Packed
    indices: list[int]

    def to(self, device) -> PackedBatch:
        src, tgt_in = self.src.to(device, non_blocking=True), self.tgt_in.to(device, non_blocking=True)
        return PackedBatch(src, tgt_in, tgt_in.replace(self.tgt_out.data.to(device, non_blocking=True)), self.indices)

    def target_tokens(self, pad_id: int) -> Tensor:
        return torch.tensor(self.tgt_out.data.shape[0])  # every row is real: no device sync to count them

    def tokens(self, pad_id: int) -> Tensor:
        return torch.tensor(self.src.data.shape[0] + self.tgt_out.data.shape[0])


def collate(data, indices: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """The pairs ``indices`` of ``data`` (a :class:`TokenCache` or :class:`TokenizedPairs`: anything
    whose ``src[i]`` and ``tgt[i]`` are id sequences) as one padded batch."""
    src_rows = [np.asarray(data.src[i], dtype=np.int64) for i in indices]
    tgt_rows = [np.asarray(data.tgt[i], dtype=np.int64) for i in indices]
    src = np.full((len(indices), max(len(s) for s in src_rows)), pad_id, dtype=np.int64)
    tgt_in = np.full((len(indices), max(len(t) for t in tgt_rows) + 1), pad_id, dtype=np.int64)
    tgt_out = np.full_like(tgt_in, pad_id)
    for row, (s, t) in enumerate(zip(src_rows, tgt_rows, strict=True)):
        src[row, : len(s)] = s
        tgt_in[row, 0], tgt_in[row, 1 : len(t) + 1] = bos_id, t
        tgt_out[row, : len(t)], tgt_out[row, len(t)] = t, eos_id
    return Batch(torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), [int(i) for i in indices])


def collate_packed(data, indices: Sequence[int], bos_id: int, eos_id: int) -> PackedBatch:
    """The pairs ``indices`` of ``data`` (as :func:`collate`'s) as one packed batch: sentence after
    sentence, each target with its BOS (``tgt_in``) or EOS (``tgt_out``), no padding."""
    src_rows = [np.asarray(data.src[i], dtype=np.int64) for i in indices]
    tgt_rows = [np.asarray(data.tgt[i], dtype=np.int64) for i in indices]
    bos, eos = np.array([bos_id], dtype=np.int64), np.array([eos_id], dtype=np.int64)
    tgt_in = np.concatenate([x for t in tgt_rows for x in (bos, t)])
    tgt_out = np.concatenate([x for t in tgt_rows for x in (t, eos)])
    src = Packed.from_lengths(torch.from_numpy(np.concatenate(src_rows)), [len(s) for s in src_rows])
    tgt = Packed.from_lengths(torch.from_numpy(tgt_in), [len(t) + 1 for t in tgt_rows])
    return PackedBatch(src, tgt, tgt.replace(torch.from_numpy(tgt_out)), [int(i) for i in indices])


class TokenBatcher:
    """Batches of pair indices that fit ``max_tokens`` on each side. Padded (the default): with B
    sentences, ``B · max source length <= max_tokens`` and ``B · (max target length + 1) <= max_tokens``.
    ``packed=True``: the real tokens, ``sum of source lengths <= max_tokens`` and ``sum of (target
    lengths + 1) <= max_tokens`` — the same budget holds more sentences, since none is padded.

    ``epoch_batches(e)`` is deterministic in (seed, e); iteration continues from ``state()``
    (epoch, position), which ``load_state`` restores. With ``world_size > 1`` rank r serves every
    world_size-th batch of an epoch (a tail that does not fill every rank is left out). The lengths
    may be lists or numpy arrays; an epoch is held as one index array, 8 bytes a pair.
    """

    def __init__(
        self,
        src_lengths: Sequence[int],
        tgt_lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        packed: bool = False,
    ):
        self.src_lengths = np.asarray(src_lengths, dtype=np.int32)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int32) + 1  # with BOS (tgt_in) or EOS (tgt_out)
        if len(self.src_lengths) == 0:
            raise DataError("no sentence pairs to batch (all dropped as too long, or none given)")
        longest = int(max(self.src_lengths.max(), self.tgt_lengths.max()))
        if longest > max_tokens:
            raise DataError(
                f"batch size of {max_tokens} tokens is smaller than the longest sentence "
                f"({longest} tokens); raise --batch-tokens or lower --max-len"
            )
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size, self.packed = rank, world_size, packed
        self.epoch, self.position = 0, 0

    def _epoch(self, epoch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """This rank's batches of ``epoch``: pair indices in batch-cutting order, and each batch's span in it."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        shuffled = list(range(len(self.src_lengths)))
        if self.shuffle:
            rng.shuffle(shuffled)
        order = np.asarray(shuffled, dtype=np.int64)
        del shuffled
        # Stable sort by (source, target) length: equal lengths stay in their shuffled order.
        s, t = self.src_lengths[order], self.tgt_lengths[order]
        by_length = np.argsort(s.astype(np.int64) * (int(t.max()) + 1) + t, kind="stable")
        order = order[by_length]
        starts = [0] + self._cuts(s[by_length].tolist(), t[by_length].tolist()) + [len(order)]
        batch_ids = list(range(len(starts) - 1))
        if self.shuffle:
            rng.shuffle(batch_ids)
        if self.world_size > 1:
            usable = len(batch_ids) - len(batch_ids) % self.world_size
            batch_ids = batch_ids[self.rank : usable : self.world_size]
        return order, [(starts[b], starts[b + 1]) for b in batch_ids]

    def _cuts(self, src: list[int], tgt: list[int]) -> list[int]:
        """Where batches start (after the first) in pairs of these lengths, in order, under the budget."""
        starts, count, s_acc, t_acc = [], 0, 0, 0
        for k, (s_k, t_k) in enumerate(zip(src, tgt, strict=True)):
            if self.packed:  # accumulated: the batch's real tokens
                s_acc, t_acc = s_acc + s_k, t_acc + t_k
                over = s_acc > self.max_tokens or t_acc > self.max_tokens
            else:  # the longest sentences, times the batch size after this one
                s_acc, t_acc = max(s_acc, s_k), max(t_acc, t_k)
                over = (count + 1) * max(s_acc, t_acc) > self.max_tokens
            if count and over:
                starts.append(k)
                count, s_acc, t_acc = 0, s_k, t_k
            count += 1
        return starts

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order, spans = self._epoch(epoch)
        return [order[a:b].tolist() for a, b in spans]

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: batches of the current epoch from the current position, then the next epochs.
        The state always names the next batch: after an epoch's last batch it is (epoch + 1, 0)."""
        cached_epoch, order, spans = None, None, []
        while True:
            if cached_epoch != self.epoch:
                cached_epoch, (order, spans) = self.epoch, self._epoch(self.epoch)
                if not spans:
                    raise DataError(f"too little data for {self.world_size} processes: an epoch has no batch")
            a, b = spans[self.position]
            if self.position + 1 == len(spans):
                self.epoch, self.position = self.epoch + 1, 0
            else:
                self.position += 1
            yield order[a:b].tolist()

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"batcher state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
