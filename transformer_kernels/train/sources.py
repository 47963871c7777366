"""Parallel text for training: streamed from files, the Multi30k layout or the embedded synthetic
task; tokenised once into a cache on disk; batched by token count.

Nothing here holds a corpus in memory. Text is read as a stream of pairs (again for each pass: the
tokenizer's training, then the cache's build). The cache — modelled on fairseq's indexed datasets —
is a flat file of token ids read through ``numpy.memmap`` plus an index of per-pair lengths, so a
process keeps a few bytes per sentence and the operating system pages ids in as batches need them.

Batching: each epoch shuffles the pairs with a seed, sorts them by length (so a batch holds
sentences of similar length and little padding), cuts batches under the token budget and shuffles
the batch order. An epoch's batches are a pure function of (seed, epoch), so the batcher's state is
just (epoch, position) and resuming regenerates the epoch and skips what was already served.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice, zip_longest
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text


class DataError(ValueError):
    """Bad training or evaluation data: the message says which file and what is wrong."""


Pair = tuple[str, str]


# --------------------------------------------------------------------------------------- reading


def stream_lines(path) -> Iterator[str]:
    """The lines of a file, one at a time: plain text or gzip (by the ``.gz`` suffix), trailing
    newlines stripped. A missing file is an error now, not at the first line."""
    return _lines(_existing(path))


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return path


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # EOFError: a truncated .gz
        raise DataError(f"data file {path} is unreadable: {e}") from e


def read_lines(path) -> list[str]:
    """All lines of a file (for inputs that are small by nature: sentences to translate, test sets)."""
    return list(stream_lines(path))


def stream_parallel(src_path, tgt_path) -> Iterator[Pair]:
    """Aligned (source, target) pairs of two files, one at a time. The files must have the same,
    non-zero, line count; that is known only at the end, where a mismatch raises DataError."""
    return _aligned(stream_lines(src_path), stream_lines(tgt_path), src_path, tgt_path)


def _aligned(src: Iterator[str], tgt: Iterator[str], src_path, tgt_path) -> Iterator[Pair]:
    n = 0
    for s, t in zip_longest(src, tgt):  # lines are strings, so None means that file has ended
        if s is None or t is None:
            n_src = n + (s is not None) + sum(1 for _ in src)
            n_tgt = n + (t is not None) + sum(1 for _ in tgt)
            raise DataError(f"parallel files are misaligned: {src_path} has {n_src} lines, {tgt_path} has {n_tgt}")
        n += 1
        yield s, t
    if n == 0:
        raise DataError(f"parallel files {src_path} and {tgt_path} are empty")


def read_parallel(src_path, tgt_path) -> list[Pair]:
    """All pairs of two aligned files (for small sets; training streams them with :func:`parallel_files`)."""
    return list(stream_parallel(src_path, tgt_path))


class PairStream:
    """Text pairs that can be read again from the start, each pass holding one pair at a time.

    ``identity()`` names the content for the token cache: the files' paths, sizes and modification
    times, or the parameters of generated data. Equal identities are taken to mean equal pairs.
    """

    def __init__(self, read: Callable[[], Iterator[Pair]], identity: Callable[[], dict]):
        self._read, self._identity = read, identity

    def __iter__(self) -> Iterator[Pair]:
        return self._read()

    def identity(self) -> dict:
        return self._identity()

    def head(self, n: int) -> list[Pair]:
        """The first ``n`` pairs, without reading the rest."""
        return list(islice(self, n))


def parallel_files(src_path, tgt_path) -> PairStream:
    """Two aligned files (plain or .gz) as a :class:`PairStream`; missing files are an error now."""
    paths = [_existing(src_path), _existing(tgt_path)]

    def identity():
        stats = [(p.resolve(), p.stat()) for p in paths]
        return {"files": [{"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in stats]}

    return PairStream(lambda: stream_parallel(*paths), identity)


MULTI30K_SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr")


def multi30k_paths(data_dir, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """The Multi30k layout: ``DIR/{split}.{lang}.gz`` (or without ``.gz``)."""
    if split not in MULTI30K_SPLITS:
        raise DataError(f"unknown Multi30k split {split!r}; expected one of {', '.join(MULTI30K_SPLITS)}")
    paths = []
    for lang in (src_lang, tgt_lang):
        gz = Path(data_dir) / f"{split}.{lang}.gz"
        paths.append(gz if gz.exists() or not gz.with_suffix("").exists() else gz.with_suffix(""))
    return paths[0], paths[1]


# ------------------------------------------------------------------------- the synthetic task


@dataclass(frozen=True)
class SyntheticTask:
    """A made-up language pair generated in code: a fixed random word-for-word dictionary between
    two invented vocabularies, plus a reordering (each adjacent pair of words swaps places, as an
    adjective and its noun do between English and French). Deterministic given ``seed``; the
    train/val/test splits are disjoint streams of the same language pair."""

    seed: int = 1234
    vocab: int = 64
    min_words: int = 3
    max_words: int = 10

    SPLITS = {"train": 1, "val": 2, "test": 3}

    @functools.cache  # noqa: B019 (a frozen dataclass: the cache holds a few small task objects)
    def _lexicon(self) -> tuple[list[str], list[str]]:
        rng = random.Random(self.seed)

        def words(onsets, vowels):
            pool = sorted(
                {
                    rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels)
                    for _ in range(self.vocab * 20)
                }
            )
            rng.shuffle(pool)
            return pool[: self.vocab]

        src = words("bdgklmnprstvz", "aeiou")
        tgt = words("cfhjlmnqrwxy", "aeiouy")
        return src, tgt

    def translate(self, sentence: str) -> str:
        src, tgt = self._lexicon()
        mapped = [tgt[src.index(w)] for w in sentence.split()]
        for i in range(0, len(mapped) - 1, 2):
            mapped[i], mapped[i + 1] = mapped[i + 1], mapped[i]
        return " ".join(mapped)

    def stream(self, split: str, n: int) -> PairStream:
        """The first ``n`` pairs of ``split``, generated anew on each pass."""
        if split not in self.SPLITS:
            raise DataError(f"unknown synthetic split {split!r}; expected one of {', '.join(self.SPLITS)}")
        identity = {"synthetic": asdict(self), "split": split, "pairs": n}
        return PairStream(lambda: self._generate(split, n), lambda: identity)

    def pairs(self, split: str, n: int) -> list[Pair]:
        return list(self.stream(split, n))

    def _generate(self, split: str, n: int) -> Iterator[Pair]:
        src_words, _ = self._lexicon()
        rng = random.Random(self.seed * 10 + self.SPLITS[split])
        for _ in range(n):
            sentence = " ".join(rng.choice(src_words) for _ in range(rng.randint(self.min_words, self.max_words)))
            yield sentence, self.translate(sentence)


# ------------------------------------------------------------------------------- tokenised data


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


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


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


# ------------------------------------------------------------------------------------- batches


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


class TokenBatcher:
    """Batches of pair indices whose padded size fits ``max_tokens`` on each side: with B sentences,
    ``B · max source length <= max_tokens`` and ``B · (max target length + 1) <= max_tokens``.

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
        self.rank, self.world_size = rank, world_size
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
        starts, count, s_max, t_max = [0], 0, 0, 0
        for k, (s_k, t_k) in enumerate(zip(s[by_length].tolist(), t[by_length].tolist(), strict=True)):
            s_max, t_max = max(s_max, s_k), max(t_max, t_k)
            if count and (count + 1) * max(s_max, t_max) > self.max_tokens:
                starts.append(k)
                count, s_max, t_max = 0, s_k, t_k
            count += 1
        starts.append(len(order))
        batch_ids = list(range(len(starts) - 1))
        if self.shuffle:
            rng.shuffle(batch_ids)
        if self.world_size > 1:
            usable = len(batch_ids) - len(batch_ids) % self.world_size
            batch_ids = batch_ids[self.rank : usable : self.world_size]
        return order, [(starts[b], starts[b + 1]) for b in batch_ids]

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
