"""Tokenised pairs: in memory for small sets (evaluation), and for training a token cache on disk.

The cache — modelled on fairseq's indexed datasets — is a flat file of token ids read through
``numpy.memmap`` plus an index of per-pair lengths, so a process keeps a few bytes per sentence and
the operating system pages ids in as batches need them.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text
from .sources import DataError, Pair, PairStream, chunked


def _dropped(src_ids: Sequence[int], tgt_ids: Sequence[int], max_len: int | None) -> bool:
    """Pairs left out of training: a side empty, or longer than ``max_len`` tokens."""
    return not src_ids or not tgt_ids or (max_len is not None and max(len(src_ids), len(tgt_ids)) > max_len)


@dataclass
class TokenizedPairs:
    """Token id lists (no BOS/EOS) of the pairs kept, in memory, and how many were dropped (see
    :func:`_dropped`). For small sets (evaluation); training data goes through :class:`TokenCache`."""

    src: list[list[int]]
    tgt: list[list[int]]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.src)


def tokenize_pairs(pairs: Sequence[Pair], tokenizer, max_len: int | None = None) -> TokenizedPairs:
    """Encode pairs; drop (and count) those with a side longer than ``max_len`` tokens or empty."""
    src_ids = tokenizer.encode_batch([s for s, _ in pairs], side="src")
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs], side="tgt")
    out = TokenizedPairs([], [])
    for s, t in zip(src_ids, tgt_ids, strict=True):
        if _dropped(s, t, max_len):
            out.dropped += 1
        else:
            out.src.append(s)
            out.tgt.append(t)
    return out


class _Side(Sequence):
    """One side of a :class:`TokenCache`: row ``i`` is pair i's source (``column`` 0) or target (1)
    ids, a slice of the memory-mapped file."""

    def __init__(self, cache: TokenCache, column: int):
        self.cache, self.column = cache, column

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> np.ndarray:
        lengths = self.cache.lengths[i]  # IndexError past the end, which ends iteration
        start = self.cache.offsets[i] + (lengths[0] if self.column else 0)
        return self.cache.ids[start : start + lengths[self.column]]


class TokenCache:
    """Token ids of a corpus on disk, built once in a streaming pass and read through ``numpy.memmap``.

    Files ``STEM.bin``: each kept pair's source ids then its target ids, no BOS/EOS (uint16 when both
    vocabularies fit, else int32); ``STEM.idx``: the ``[pairs, 2]`` int32 (source, target) lengths
    (``.npy`` format); ``STEM.json``: the counts, the id type and the fingerprint of what the cache was
    built from (pairs, tokenizer, ``max_len``). The JSON is written last, after the others are in place,
    so its presence means a complete cache; a build removes it first.

    In memory: lengths and start offsets, 16 bytes a pair. ``src[i]`` and ``tgt[i]`` are views of the file.
    """

    FORMAT = 1

    def __init__(self, stem):
        stem = Path(stem)
        meta_path, idx_path, bin_path = (_with(stem, s) for s in (".json", ".idx", ".bin"))
        try:
            meta = json.loads(meta_path.read_text())
            self.lengths = np.load(idx_path)
            dtype = np.dtype(meta["dtype"])
            size = bin_path.stat().st_size
            consistent = self.lengths.shape == (meta["pairs"], 2) and size == meta["ids"] * dtype.itemsize
            self.meta, self.dropped = meta, meta["dropped"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"token cache {stem} is missing or unreadable ({e}); delete {stem.parent} to rebuild it"
            ) from e
        if not consistent:
            raise DataError(f"token cache {stem} is inconsistent with {meta_path}; delete {stem.parent} to rebuild it")
        sizes = self.lengths.sum(axis=1, dtype=np.int64)
        self.offsets = np.cumsum(sizes) - sizes  # [pairs]: where each pair starts in the flat file
        # memmap cannot map an empty file (every pair dropped)
        self.ids = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.src, self.tgt = _Side(self, 0), _Side(self, 1)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def src_lengths(self) -> np.ndarray:
        return self.lengths[:, 0]

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.lengths[:, 1]

    @property
    def read(self) -> int:
        """Pairs read from the source: kept and dropped."""
        return len(self) + self.dropped

    @classmethod
    def fingerprint(cls, pairs: PairStream, tokenizer, max_len: int | None) -> dict:
        digest = hashlib.sha256()
        for side in ("src", "tgt"):
            digest.update(tokenizer.side(side).to_str().encode())
        fp = {"format": cls.FORMAT, "pairs": pairs.identity(), "tokenizer": digest.hexdigest(), "max_len": max_len}
        return json.loads(json.dumps(fp))  # as it reads back from the JSON file (tuples become lists)

    @classmethod
    def load_or_build(
        cls, stem, pairs: PairStream, tokenizer, max_len: int | None, chunk_pairs: int = 10_000
    ) -> TokenCache:
        """The cache at ``stem`` if it was built from the same pairs, tokenizer and ``max_len``; else a new build."""
        fingerprint = cls.fingerprint(pairs, tokenizer, max_len)
        try:
            cache = cls(stem)
            if cache.meta["fingerprint"] == fingerprint:
                return cache
        except DataError:
            pass
        return cls.build(stem, pairs, tokenizer, max_len, chunk_pairs)

    @classmethod
    def build(cls, stem, pairs: PairStream, tokenizer, max_len: int | None, chunk_pairs: int = 10_000) -> TokenCache:
        """Tokenise ``pairs`` in chunks (batch encoding) straight into the files at ``stem``; pairs that
        :func:`_dropped` rejects are counted, not stored. Memory: one chunk plus 8 bytes a pair."""
        stem = Path(stem)
        fingerprint = cls.fingerprint(pairs, tokenizer, max_len)
        stem.parent.mkdir(parents=True, exist_ok=True)
        meta_path = _with(stem, ".json")
        meta_path.unlink(missing_ok=True)  # from here on the old files are no cache
        vocab = max(tokenizer.vocab_size("src"), tokenizer.vocab_size("tgt"))
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.int32)
        lengths, dropped, n_ids = array("i"), 0, 0
        tmp_bin, tmp_idx = (_with(stem.with_name(f".{stem.name}"), s + ".tmp") for s in (".bin", ".idx"))
        try:
            with open(tmp_bin, "wb") as f:
                for chunk in chunked(pairs, chunk_pairs):
                    src_ids = tokenizer.encode_batch([s for s, _ in chunk], side="src")
                    tgt_ids = tokenizer.encode_batch([t for _, t in chunk], side="tgt")
                    flat: list[int] = []
                    for s, t in zip(src_ids, tgt_ids, strict=True):
                        if _dropped(s, t, max_len):
                            dropped += 1
                        else:
                            flat += s
                            flat += t
                            lengths.extend((len(s), len(t)))
                    np.asarray(flat, dtype=dtype).tofile(f)
                    n_ids += len(flat)
                f.flush()
                os.fsync(f.fileno())
            index = np.frombuffer(lengths, dtype=np.int32).reshape(-1, 2)
            with open(tmp_idx, "wb") as f:
                np.save(f, index)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp_bin.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
            raise
        os.replace(tmp_bin, _with(stem, ".bin"))
        os.replace(tmp_idx, _with(stem, ".idx"))
        meta = {"pairs": len(index), "dropped": dropped, "ids": n_ids, "dtype": dtype.name, "fingerprint": fingerprint}
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
        return cls(stem)


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)
