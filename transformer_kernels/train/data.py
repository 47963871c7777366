"""Parallel text for training: files, the Multi30k layout, the embedded synthetic task, and batching.

Sentences are read as text pairs, tokenised once into id lists, and batched by token count: each
epoch shuffles the pairs with a seed, sorts them by length (so a batch holds sentences of similar
length and little padding), cuts batches under the token budget and shuffles the batch order. An
epoch's batches are a pure function of (seed, epoch), so the batcher's state is just
(epoch, position) and resuming regenerates the epoch and skips what was already served.
"""

from __future__ import annotations

import functools
import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch


class DataError(ValueError):
    """Bad training or evaluation data: the message says which file and what is wrong."""


# --------------------------------------------------------------------------------------- reading

def read_lines(path) -> list[str]:
    """One sentence per line, plain text or gzip (by the ``.gz`` suffix); trailing newlines stripped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data file {path} is unreadable: {e}") from e


def read_parallel(src_path, tgt_path) -> list[tuple[str, str]]:
    """Aligned (source, target) pairs of two files; they must have the same, non-zero, line count."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"parallel files are misaligned: {src_path} has {len(src)} lines, "
                        f"{tgt_path} has {len(tgt)}")
    if not src:
        raise DataError(f"parallel files {src_path} and {tgt_path} are empty")
    return list(zip(src, tgt))


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

    @functools.lru_cache(maxsize=None)
    def _lexicon(self) -> tuple[list[str], list[str]]:
        rng = random.Random(self.seed)

        def words(onsets, vowels):
            pool = sorted({rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels)
                           for _ in range(self.vocab * 20)})
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

    def pairs(self, split: str, n: int) -> list[tuple[str, str]]:
        offsets = {"train": 1, "val": 2, "test": 3}
        if split not in offsets:
            raise DataError(f"unknown synthetic split {split!r}; expected one of {', '.join(offsets)}")
        src_words, _ = self._lexicon()
        rng = random.Random(self.seed * 10 + offsets[split])
        out = []
        for _ in range(n):
            sentence = " ".join(rng.choice(src_words) for _ in range(rng.randint(self.min_words, self.max_words)))
            out.append((sentence, self.translate(sentence)))
        return out


# ------------------------------------------------------------------------------- tokenised data

@dataclass
class TokenizedPairs:
    """Token id lists (no BOS/EOS) of the pairs kept, and how many were dropped as too long."""

    src: list[list[int]]
    tgt: list[list[int]]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.src)


def tokenize_pairs(pairs: Sequence[tuple[str, str]], tokenizer, max_len: Optional[int] = None) -> TokenizedPairs:
    """Encode pairs; drop (and count) those with a side longer than ``max_len`` tokens or empty."""
    src_ids = tokenizer.encode_batch([s for s, _ in pairs], side="src")
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs], side="tgt")
    out = TokenizedPairs([], [])
    for s, t in zip(src_ids, tgt_ids):
        if not s or not t or (max_len is not None and max(len(s), len(t)) > max_len):
            out.dropped += 1
        else:
            out.src.append(s)
            out.tgt.append(t)
    return out


@dataclass
class Batch:
    """Padded tensors: ``src [B, S]``; ``tgt_in [B, T]`` = BOS + target; ``tgt_out [B, T]`` = target + EOS."""

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    indices: list[int]

    def to(self, device) -> "Batch":
        return Batch(self.src.to(device, non_blocking=True), self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True), self.indices)


def collate(data: TokenizedPairs, indices: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    src_len = max(len(data.src[i]) for i in indices)
    tgt_len = max(len(data.tgt[i]) for i in indices) + 1
    src = torch.full((len(indices), src_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((len(indices), tgt_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((len(indices), tgt_len), pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        s, t = data.src[i], data.tgt[i]
        src[row, : len(s)] = torch.tensor(s)
        tgt_in[row, : len(t) + 1] = torch.tensor([bos_id] + t)
        tgt_out[row, : len(t) + 1] = torch.tensor(t + [eos_id])
    return Batch(src, tgt_in, tgt_out, list(indices))


class TokenBatcher:
    """Batches of pair indices whose padded size fits ``max_tokens`` on each side: with B sentences,
    ``B · max source length <= max_tokens`` and ``B · (max target length + 1) <= max_tokens``.

    ``epoch_batches(e)`` is deterministic in (seed, e); iteration continues from ``state()``
    (epoch, position), which ``load_state`` restores. With ``world_size > 1`` rank r serves every
    world_size-th batch of an epoch (a tail that does not fill every rank is left out).
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not src_lengths:
            raise DataError("no sentence pairs to batch (all dropped as too long, or none given)")
        longest = max(max(src_lengths), max(tgt_lengths) + 1)
        if longest > max_tokens:
            raise DataError(f"batch size of {max_tokens} tokens is smaller than the longest sentence "
                            f"({longest} tokens); raise --batch-tokens or lower --max-len")
        self.src_lengths, self.tgt_lengths = list(src_lengths), [t + 1 for t in tgt_lengths]
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.src_lengths)
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(n))
        if self.shuffle:
            rng.shuffle(order)
        # Stable sort by length: equal lengths stay in their shuffled order.
        order.sort(key=lambda i: (self.src_lengths[i], self.tgt_lengths[i]))
        batches, current, s_max, t_max = [], [], 0, 0
        for i in order:
            s, t = max(s_max, self.src_lengths[i]), max(t_max, self.tgt_lengths[i])
            if current and (len(current) + 1) * max(s, t) > self.max_tokens:
                batches.append(current)
                current, s, t = [], self.src_lengths[i], self.tgt_lengths[i]
            current.append(i)
            s_max, t_max = s, t
        batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:
            usable = len(batches) - len(batches) % self.world_size
            batches = batches[self.rank: usable: self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: batches of the current epoch from the current position, then the next epochs.
        The state always names the next batch: after an epoch's last batch it is (epoch + 1, 0)."""
        cached_epoch, batches = None, []
        while True:
            if cached_epoch != self.epoch:
                cached_epoch, batches = self.epoch, self.epoch_batches(self.epoch)
                if not batches:
                    raise DataError(f"too little data for {self.world_size} processes: an epoch has no batch")
            batch = batches[self.position]
            if self.position + 1 == len(batches):
                self.epoch, self.position = self.epoch + 1, 0
            else:
                self.position += 1
            yield batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"batcher state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
