"""Parallel text as streams of (source, target) pairs: from files (plain or gzip), the Multi30k
layout, or the embedded synthetic task; and the choice among them that a run's options make.

Nothing here holds a corpus in memory. Text is read as a stream of pairs, again for each pass (the
tokenizer's training, then the token cache's build in ``tokenized.py``).
"""

from __future__ import annotations

import functools
import gzip
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice, zip_longest
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


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


# Multi30k task 1's splits as the multi30k/dataset repository names them (data/task1/raw/)
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2018_flickr", "test_2017_mscoco")


def multi30k_paths(data_dir, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """The Multi30k layout: ``DIR/{split}.{lang}.gz`` (or without ``.gz``). A missing file is an error
    that says where the release is."""
    if split not in MULTI30K_SPLITS:
        raise DataError(f"unknown Multi30k split {split!r}; expected one of {', '.join(MULTI30K_SPLITS)}")
    paths = []
    for lang in (src_lang, tgt_lang):
        gz = Path(data_dir) / f"{split}.{lang}.gz"
        if not gz.exists() and not gz.with_suffix("").exists():
            raise DataError(
                f"Multi30k file {gz} (or {gz.name.removesuffix('.gz')}) does not exist; the files are "
                "those of data/task1/raw/ in https://github.com/multi30k/dataset"
            )
        paths.append(gz if gz.exists() else gz.with_suffix(""))
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


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


# ------------------------------------------------------------------------------ a run's data


def load_pairs(cfg: TrainConfig, split: str) -> PairStream | None:
    """Text pairs of ``split`` ('train' or 'val'; Multi30k also has its test splits) as a stream that
    reads the data again on each pass; None for 'val' when no validation files are given."""
    if cfg.data is None and cfg.train_src is None:
        task = SyntheticTask(seed=cfg.seed)
        return task.stream(split, cfg.synthetic_train if split == "train" else cfg.synthetic_val)
    if cfg.data == "multi30k":
        if cfg.data_dir is None:
            raise DataError("--data multi30k needs --data-dir DIR (with train.de.gz, val.en.gz, ...)")
        return parallel_files(*multi30k_paths(cfg.data_dir, split, cfg.src_lang, cfg.tgt_lang))
    if cfg.data is not None:
        raise DataError(f"unknown --data {cfg.data!r}; expected 'multi30k', or give --train-src/--train-tgt")
    if cfg.train_src is None or cfg.train_tgt is None:
        raise DataError("give both --train-src and --train-tgt")
    if split == "train":
        return parallel_files(cfg.train_src, cfg.train_tgt)
    if cfg.val_src is None or cfg.val_tgt is None:
        return None
    return parallel_files(cfg.val_src, cfg.val_tgt)
