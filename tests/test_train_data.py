"""Training data: streamed reading (plain, .gz, Multi30k layout), the synthetic task, BPE tokenizer,
the on-disk token cache, batching."""

from __future__ import annotations

import gzip
import random
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch

from transformer_kernels.models import TransformerConfig
from transformer_kernels.nn import Packed
from transformer_kernels.train.batching import TokenBatcher, collate, collate_packed
from transformer_kernels.train.sources import (
    DataError,
    PairStream,
    SyntheticTask,
    multi30k_paths,
    parallel_files,
    read_lines,
    read_parallel,
    stream_parallel,
)
from transformer_kernels.train.tokenized import TokenCache, tokenize_pairs
from transformer_kernels.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer

SRC = ["Ein Hund läuft.", "Zwei Männer, im Freien!", "Eine Frau liest ein Buch."]
TGT = ["A dog runs.", "Two men, outside!", "A woman reads a book."]


def write(path, lines, gz=False):
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_plain_and_gz(tmp_path):
    plain = write(tmp_path / "a.de", SRC)
    gz = write(tmp_path / "a.en.gz", TGT, gz=True)
    assert read_lines(plain) == SRC and read_lines(gz) == TGT
    assert read_parallel(plain, gz) == list(zip(SRC, TGT, strict=True))


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_lines(tmp_path / "missing.de")
    with pytest.raises(DataError, match="misaligned: .* has 3 lines, .* has 2"):
        read_parallel(write(tmp_path / "a", SRC), write(tmp_path / "b", TGT[:2]))
    with pytest.raises(DataError, match="empty"):
        read_parallel(write(tmp_path / "c", []), write(tmp_path / "d", []))


def test_streamed_reading_checks_alignment_at_the_end(tmp_path):
    src, tgt = write(tmp_path / "a.de", SRC * 40), write(tmp_path / "a.en.gz", TGT * 40 + ["extra"], gz=True)
    stream = stream_parallel(src, tgt)
    assert next(stream) == (SRC[0], TGT[0]), "pairs come one at a time"
    with pytest.raises(DataError, match=f"misaligned: {src} has 120 lines, {tgt} has 121"):
        list(stream)
    short = write(tmp_path / "b.en", TGT)
    with pytest.raises(DataError, match=f"misaligned: {src} has 120 lines, {short} has 3"):
        list(stream_parallel(src, short))
    with pytest.raises(DataError, match=f"{tmp_path / 'c'} and {tmp_path / 'd'} are empty"):
        list(parallel_files(write(tmp_path / "c", []), write(tmp_path / "d", [])))
    # a missing file is an error when the stream is set up, before anything is read
    with pytest.raises(DataError, match=f"data file {tmp_path / 'nope.en'} does not exist"):
        parallel_files(src, tmp_path / "nope.en")
    truncated = tmp_path / "t.en.gz"
    truncated.write_bytes((tmp_path / "a.en.gz").read_bytes()[:-12])
    with pytest.raises(DataError, match=f"data file {truncated} is unreadable"):
        list(stream_parallel(src, truncated))
    # a stream reads its files again on each pass
    pairs = parallel_files(src, write(tmp_path / "e.en", TGT * 40))
    assert (
        list(pairs) == list(pairs) == list(zip(SRC * 40, TGT * 40, strict=True))
        and pairs.head(2) == list(zip(SRC, TGT, strict=True))[:2]
    )


def test_multi30k_layout(tmp_path):
    write(tmp_path / "train.de.gz", SRC, gz=True)
    write(tmp_path / "train.en.gz", TGT, gz=True)
    write(tmp_path / "val.de", SRC[:1])  # uncompressed files are found too
    write(tmp_path / "val.en", TGT[:1])
    assert read_parallel(*multi30k_paths(tmp_path, "train", "de", "en")) == list(zip(SRC, TGT, strict=True))
    assert read_parallel(*multi30k_paths(tmp_path, "val", "en", "de")) == [(TGT[0], SRC[0])]
    with pytest.raises(DataError, match="unknown Multi30k split"):
        multi30k_paths(tmp_path, "dev", "de", "en")


def test_multi30k_has_every_test_split(tmp_path):
    for split in ("test_2016_flickr", "test_2017_flickr", "test_2018_flickr", "test_2017_mscoco"):
        with pytest.raises(DataError, match=rf"{split}.de.gz .* does not exist; .*github.com/multi30k/dataset"):
            multi30k_paths(tmp_path, split, "de", "en")
        write(tmp_path / f"{split}.de.gz", SRC, gz=True)
        write(tmp_path / f"{split}.en.gz", TGT, gz=True)
        assert read_parallel(*multi30k_paths(tmp_path, split, "de", "en")) == list(zip(SRC, TGT, strict=True))


def test_synthetic_task_is_deterministic_and_consistent():
    task = SyntheticTask(seed=3)
    pairs = task.pairs("train", 50)
    assert pairs == SyntheticTask(seed=3).pairs("train", 50)
    assert pairs != SyntheticTask(seed=4).pairs("train", 50)
    assert pairs[:10] != task.pairs("test", 10)
    for src, tgt in pairs:
        assert len(src.split()) == len(tgt.split()) and task.translate(src) == tgt
    # word-for-word with adjacent pairs swapped
    a, b, c = (w for w in pairs[0][0].split()[:3])
    t = task.translate(f"{a} {b} {c}").split()
    assert t[0] == task.translate(b) and t[1] == task.translate(a) and t[2] == task.translate(c)


@pytest.mark.parametrize("joint", [True, False])
def test_tokenizer_round_trip_special_ids_and_save(tmp_path, joint):
    tok = Tokenizer.train(list(zip(SRC, TGT, strict=True)) * 3, vocab_size=120, joint=joint)
    assert tok.joint == joint
    config = TransformerConfig(10, 10)
    assert (PAD_ID, BOS_ID, EOS_ID) == (config.pad_id, config.bos_id, config.eos_id)
    for side in ("src", "tgt"):
        for i, name in enumerate(SPECIAL_TOKENS):
            assert tok.side(side).token_to_id(name) == i
        assert tok.vocab_size(side) <= 120
    ids = tok.encode_batch(TGT, side="tgt")
    assert all(min(row) > UNK_ID for row in ids), "no special tokens inside a sentence"
    assert tok.decode_batch(ids, side="tgt") == TGT
    assert tok.decode_batch(tok.encode_batch(SRC, side="src"), side="src") == SRC
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path, joint=joint)
    assert loaded.encode_batch(TGT, side="tgt") == ids and loaded.joint == joint


@pytest.mark.parametrize("joint", [True, False])
def test_tokenizer_trains_from_a_stream(tmp_path, joint):
    pairs = parallel_files(write(tmp_path / "a.de", SRC * 5), write(tmp_path / "a.en.gz", TGT * 5, gz=True))
    streamed, listed = Tokenizer.train(pairs, 90, joint=joint), Tokenizer.train(list(pairs), 90, joint=joint)
    for side in ("src", "tgt"):
        assert streamed.side(side).to_str() == listed.side(side).to_str()
    bad = parallel_files(tmp_path / "a.de", write(tmp_path / "b.en", TGT))
    with pytest.raises(DataError, match="misaligned"):  # raised inside the Rust trainer's loop, kept as it is
        Tokenizer.train(bad, 90, joint=joint)


def test_long_sentences_are_dropped_and_counted(tmp_path):
    tok = Tokenizer.train(list(zip(SRC, TGT, strict=True)), vocab_size=60)
    pairs = list(zip(SRC, TGT, strict=True)) + [("ein " * 50, "a " * 50), ("", "empty source"), ("Ein Hund.", "")]
    data = tokenize_pairs(pairs, tok, max_len=20)
    assert len(data) == 3 and data.dropped == 3
    cache = TokenCache.load_or_build(tmp_path / "c", list_stream(pairs), tok, max_len=20)
    assert len(cache) == 3 and cache.dropped == 3 and cache.read == 6
    assert [list(cache.src[i]) for i in range(3)] == data.src and [list(t) for t in cache.tgt] == data.tgt


# ----------------------------------------------------------------------------------- token cache


def list_stream(pairs, name="test") -> PairStream:
    return PairStream(lambda: iter(pairs), lambda: {"list": name, "pairs": len(pairs)})


def corpus(tmp_path, n=300, seed=0):
    """``n`` sentence pairs of made-up but varied text (punctuation, capitals, umlauts) in two files, one gzipped."""
    rng = random.Random(seed)
    words = ["Hund", "läuft", "Mann", "Straße", "Frau", "liest", "Buch", "zwei", "rot", "grünen", "Äpfel"]
    src = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice([".", "!", "?", ""])
        for _ in range(n)
    ]
    tgt = [s.lower().replace("ä", "a") for s in src]
    return parallel_files(write(tmp_path / "c.de", src), write(tmp_path / "c.en.gz", tgt, gz=True))


def assert_same_ids(cache: TokenCache, pairs, tok, max_len):
    direct = tokenize_pairs(list(pairs), tok, max_len)
    assert len(cache) == len(direct) and cache.dropped == direct.dropped
    assert [cache.src[i].tolist() for i in range(len(cache))] == direct.src
    assert [t.tolist() for t in cache.tgt] == direct.tgt
    assert cache.src_lengths.tolist() == [len(s) for s in direct.src]
    assert cache.tgt_lengths.tolist() == [len(t) for t in direct.tgt]


@pytest.mark.parametrize("joint", [True, False])
def test_cache_holds_exactly_the_tokenised_ids(tmp_path, joint):
    files = corpus(tmp_path)
    tok = Tokenizer.train(files, 90, joint=joint)
    cache = TokenCache.load_or_build(tmp_path / "data" / "train", files, tok, max_len=12, chunk_pairs=64)
    assert cache.ids.dtype == np.uint16 and 0 < cache.dropped < 300, "some pairs longer than 12 tokens"
    assert_same_ids(cache, files, tok, 12)
    synthetic = SyntheticTask(seed=5).stream("train", 400)
    tok = Tokenizer.train(synthetic, 120, joint=joint)
    assert_same_ids(
        TokenCache.load_or_build(tmp_path / "syn", synthetic, tok, max_len=128, chunk_pairs=100), synthetic, tok, 128
    )
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")], "no temporary files left"


def test_cache_with_a_large_vocabulary_stores_int32(tmp_path):
    class WideVocab(Tokenizer):
        def vocab_size(self, side):
            return 70_000

    files = corpus(tmp_path, n=50)
    base = Tokenizer.train(files, 90)
    tok = WideVocab(base.src, base.tgt)
    cache = TokenCache.load_or_build(tmp_path / "c", files, tok, max_len=64)
    assert cache.ids.dtype == np.int32
    assert_same_ids(cache, files, tok, 64)


def test_a_cache_of_no_pairs(tmp_path):
    tok = Tokenizer.train(list(zip(SRC, TGT, strict=True)), vocab_size=60)
    cache = TokenCache.load_or_build(tmp_path / "c", list_stream([("ein " * 50, "a")]), tok, max_len=20)
    assert len(cache) == 0 and cache.dropped == 1 and list(cache.src) == []
    with pytest.raises(DataError, match="no sentence pairs"):
        TokenBatcher(cache.src_lengths, cache.tgt_lengths, 100)


def test_collate_reads_the_cache(tmp_path):
    pairs = list(zip(SRC, TGT, strict=True))
    tok = Tokenizer.train(pairs, vocab_size=80)
    cache = TokenCache.load_or_build(tmp_path / "c", list_stream(pairs), tok, max_len=None)
    a, b = (
        collate(cache, [2, 0], PAD_ID, BOS_ID, EOS_ID),
        collate(tokenize_pairs(pairs, tok), [2, 0], PAD_ID, BOS_ID, EOS_ID),
    )
    for name in ("src", "tgt_in", "tgt_out"):
        assert torch.equal(getattr(a, name), getattr(b, name)) and getattr(a, name).dtype == torch.long
    assert a.indices == [2, 0]


def test_cache_is_reused_or_rebuilt_by_fingerprint(tmp_path, monkeypatch):
    files = corpus(tmp_path, n=120)
    tok = Tokenizer.train(files, 90)
    stem = tmp_path / "data" / "train"
    built = []
    real_build = TokenCache.build.__func__
    monkeypatch.setattr(
        TokenCache, "build", classmethod(lambda cls, *a, **k: built.append(1) or real_build(cls, *a, **k))
    )

    def load(pairs=files, tokenizer=tok, max_len=20):
        TokenCache.load_or_build(stem, pairs, tokenizer, max_len)
        return len(built)

    assert load() == 1 and load() == 1, "same data, tokenizer and max_len: reused"
    assert load(max_len=30) == 2 and load(max_len=30) == 2
    assert load(tokenizer=Tokenizer.train(files, 80)) == 3
    assert load() == 4
    src_file = tmp_path / "c.de"
    src_file.write_text(src_file.read_text().replace("Hund", "Katze"))  # same line count, new content
    assert load() == 5
    assert_same_ids(TokenCache(stem), files, tok, 20)
    (tmp_path / "data" / "train.idx").unlink()  # a damaged cache is rebuilt
    assert load() == 6 and load() == 6

    # A build that fails part-way leaves no cache that could be taken for a good one.
    def broken():
        yield from files.head(50)
        raise DataError("read error")

    with pytest.raises(DataError, match="read error"):
        TokenCache.build(stem, PairStream(broken, files.identity), tok, 20)
    with pytest.raises(DataError, match="missing or unreadable"):
        TokenCache(stem)
    assert sorted(p.name for p in stem.parent.iterdir()) == ["train.bin", "train.idx"], "temporary files removed"
    assert load() == 8


def test_cache_memory_does_not_grow_with_the_text(tmp_path):
    """In memory a cache holds 16 bytes a pair (two int32 lengths, an int64 offset), however long the
    sentences; the ids stay in the file behind a numpy.memmap. Building it holds one chunk of pairs and
    the lengths, so its peak memory grows by a few bytes a pair, far less than the ids themselves."""
    short, long = SyntheticTask(seed=1, min_words=3, max_words=5), SyntheticTask(seed=1, min_words=30, max_words=40)
    tok = Tokenizer.train(long.stream("train", 200), 100)
    sizes = {}
    for name, task in (("short", short), ("long", long)):
        cache = TokenCache.load_or_build(tmp_path / name, task.stream("train", 500), tok, max_len=None)
        assert isinstance(cache.ids, np.memmap) and len(cache) == 500
        in_memory = [v for v in vars(cache).values() if isinstance(v, (np.ndarray, list, dict))]
        assert not [v for v in in_memory if isinstance(v, list)], "no Python lists of ids"
        sizes[name] = sum(v.nbytes for v in in_memory if isinstance(v, np.ndarray) and not isinstance(v, np.memmap))
        assert sizes[name] == 16 * 500
    assert (tmp_path / "long.bin").stat().st_size > 5 * (tmp_path / "short.bin").stat().st_size

    def build_peak(n):
        tracemalloc.start()
        TokenCache.build(tmp_path / f"peak{n}", long.stream("train", n), tok, max_len=None, chunk_pairs=200)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, (tmp_path / f"peak{n}.bin").stat().st_size

    (small_peak, small_ids), (big_peak, big_ids) = build_peak(1000), build_peak(5000)
    growth = (big_peak - small_peak) / 4000
    assert growth < 64 and growth < (big_ids - small_ids) / 4000 / 4, f"build memory grows {growth:.0f} bytes a pair"


def lengths_fixture(n=300, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.randint(1, 30) for _ in range(n)], [rng.randint(1, 30) for _ in range(n)]


def test_batcher_respects_budget_and_serves_every_pair_once():
    src, tgt = lengths_fixture()
    batcher = TokenBatcher(src, tgt, max_tokens=200, seed=5)
    for epoch in range(2):
        batches = batcher.epoch_batches(epoch)
        seen = Counter(i for b in batches for i in b)
        assert sorted(seen) == list(range(len(src))) and set(seen.values()) == {1}
        for b in batches:
            assert len(b) * max(max(src[i] for i in b), max(tgt[i] + 1 for i in b)) <= 200
        # length bucketing: little padding
        padded = sum(len(b) * max(src[i] for i in b) for b in batches)
        assert padded < 1.2 * sum(src)
    assert batcher.epoch_batches(0) != batcher.epoch_batches(1), "shuffled per epoch"
    assert batcher.epoch_batches(0) == TokenBatcher(src, tgt, 200, seed=5).epoch_batches(0), "seeded"
    assert batcher.epoch_batches(0) != TokenBatcher(src, tgt, 200, seed=6).epoch_batches(0)
    with pytest.raises(DataError, match="smaller than the longest sentence"):
        TokenBatcher(src, tgt, max_tokens=20)


def reference_epoch_batches(src, tgt, max_tokens, seed, epoch, shuffle=True, rank=0, world_size=1, packed=False):
    """The batcher's specification in plain Python lists: shuffle, stable sort by length, cut under the
    budget (padded: B times the longest; packed: the sum), shuffle the batches, take this rank's share."""
    tgt = [t + 1 for t in tgt]
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(src)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: (src[i], tgt[i]))
    batches, current, s_max, t_max = [], [], 0, 0
    for i in order:
        if packed:
            s, t = s_max + src[i], t_max + tgt[i]
            over = max(s, t) > max_tokens
        else:
            s, t = max(s_max, src[i]), max(t_max, tgt[i])
            over = (len(current) + 1) * max(s, t) > max_tokens
        if current and over:
            batches.append(current)
            current, s, t = [], src[i], tgt[i]
        current.append(i)
        s_max, t_max = s, t
    batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    usable = len(batches) - len(batches) % world_size
    return batches[rank:usable:world_size]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shuffle, world_size", [(True, 1), (False, 1), (True, 3)])
def test_batcher_matches_its_specification_on_lists_and_arrays(shuffle, world_size, packed):
    src, tgt = lengths_fixture(n=1000, seed=4)
    for lengths in ((src, tgt), (np.array(src, dtype=np.int32), np.array(tgt, dtype=np.uint16))):
        for rank in range(world_size):
            batcher = TokenBatcher(
                *lengths, 120, seed=9, shuffle=shuffle, rank=rank, world_size=world_size, packed=packed
            )
            for epoch in range(2):
                assert batcher.epoch_batches(epoch) == reference_epoch_batches(
                    src, tgt, 120, 9, epoch, shuffle, rank, world_size, packed
                )


def test_packed_batches_fill_the_budget_with_real_tokens():
    src, tgt = lengths_fixture()
    batches = TokenBatcher(src, tgt, max_tokens=200, seed=5, packed=True).epoch_batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(src)))
    for b in batches:
        assert sum(src[i] for i in b) <= 200 and sum(tgt[i] + 1 for i in b) <= 200
    padded = TokenBatcher(src, tgt, max_tokens=200, seed=5).epoch_batches(0)
    assert len(batches) < len(padded), "the same budget holds more sentences when none is padded"


def test_batcher_resumes_from_its_state():
    src, tgt = lengths_fixture()
    straight = TokenBatcher(src, tgt, 150, seed=1)
    it = iter(straight)
    first = [next(it) for _ in range(len(straight.epoch_batches(0)) + 3)]  # crosses an epoch boundary
    interrupted = TokenBatcher(src, tgt, 150, seed=1)
    it2 = iter(interrupted)
    head = [next(it2) for _ in range(7)]
    resumed = TokenBatcher(src, tgt, 150, seed=1)
    resumed.load_state(interrupted.state())
    it3 = iter(resumed)
    assert head + [next(it3) for _ in range(len(first) - 7)] == first
    assert resumed.state()["epoch"] == 1
    whole_epoch = TokenBatcher(src, tgt, 150, seed=1)
    it4 = iter(whole_epoch)
    for _ in whole_epoch.epoch_batches(0):
        next(it4)
    assert whole_epoch.state() == {"epoch": 1, "position": 0, "seed": 1}, "an epoch ends with its last batch"
    with pytest.raises(DataError, match="seed"):
        TokenBatcher(src, tgt, 150, seed=2).load_state(interrupted.state())


def test_batcher_shards_across_ranks():
    src, tgt = lengths_fixture()
    whole = TokenBatcher(src, tgt, 150, seed=1).epoch_batches(0)
    ranks = [TokenBatcher(src, tgt, 150, seed=1, rank=r, world_size=2).epoch_batches(0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert ranks[0] == whole[0 : 2 * len(ranks[0]) : 2] and ranks[1] == whole[1 : 2 * len(ranks[1]) : 2]


def test_collate_adds_bos_eos_and_padding():
    tok = Tokenizer.train(list(zip(SRC, TGT, strict=True)), vocab_size=80)
    data = tokenize_pairs(list(zip(SRC, TGT, strict=True)), tok)
    b = collate(data, [0, 1], PAD_ID, BOS_ID, EOS_ID)
    t0 = data.tgt[0]
    assert b.tgt_in[0, 0] == BOS_ID and b.tgt_in[0, 1 : len(t0) + 1].tolist() == t0
    assert b.tgt_out[0, : len(t0)].tolist() == t0 and b.tgt_out[0, len(t0)] == EOS_ID
    assert b.src.shape[1] == max(len(data.src[0]), len(data.src[1]))
    assert (b.tgt_in != PAD_ID).sum() == (b.tgt_out != PAD_ID).sum()


def test_collate_packed_is_the_padded_batch_without_its_padding():
    tok = Tokenizer.train(list(zip(SRC, TGT, strict=True)), vocab_size=80)
    data = tokenize_pairs(list(zip(SRC, TGT, strict=True)), tok)
    indices = [1, 0, 2]
    padded, packed = collate(data, indices, PAD_ID, BOS_ID, EOS_ID), collate_packed(data, indices, BOS_ID, EOS_ID)
    assert packed.indices == padded.indices
    src_lengths = [len(data.src[i]) for i in indices]
    tgt_lengths = [len(data.tgt[i]) + 1 for i in indices]
    for got, want, lengths in (
        (packed.src, padded.src, src_lengths),
        (packed.tgt_in, padded.tgt_in, tgt_lengths),
        (packed.tgt_out, padded.tgt_out, tgt_lengths),
    ):
        expected = Packed.from_padded(want, lengths)
        assert torch.equal(got.data, expected.data) and torch.equal(got.cu_seqlens, expected.cu_seqlens)
        assert got.max_seqlen == max(lengths) and PAD_ID not in got.data.tolist()
    assert packed.tgt_out.cu_seqlens is packed.tgt_in.cu_seqlens
    assert int(packed.tokens(PAD_ID)) == int(padded.tokens(PAD_ID))
    assert int(packed.target_tokens(PAD_ID)) == int(padded.target_tokens(PAD_ID))


def test_a_run_builds_its_cache_once_and_resumes_from_it(tmp_path, monkeypatch):
    from transformer_kernels.train import TrainConfig, Trainer

    cfg = dict(
        out_dir=str(tmp_path / "run"),
        synthetic_train=120,
        synthetic_val=10,
        vocab_size=100,
        max_len=12,
        d_model=32,
        dim_feedforward=64,
        layers=1,
        dropout=0.0,
        batch_tokens=160,
        max_steps=2,
        save_interval=2,
        eval_interval=1000,
        log_interval=1000,
        val_bleu_sentences=3,
        seed=2,
    )
    logged = []
    first = Trainer(TrainConfig(**cfg), log=logged.append)
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == [
        "train.bin",
        "train.idx",
        "train.json",
        "val.bin",
        "val.idx",
        "val.json",
    ]
    kept, dropped = len(first.train_data), first.train_data.dropped
    assert kept + dropped == 120 and dropped > 0
    assert logged[0].startswith(
        f"data: {kept} training pairs ({dropped} dropped: longer than 12 tokens or empty), 10 validation pairs"
    )
    assert first.val_pairs == SyntheticTask(seed=2).pairs("val", 3), "text for BLEU"
    first.train()

    def no_build(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(TokenCache, "build", no_build)
    resumed = Trainer(TrainConfig(**{**cfg, "max_steps": 4}), resume=True, log=logged.append)
    assert resumed.batcher.state() == first.batcher.state()
    assert resumed.train_data.src_lengths.tolist() == first.train_data.src_lengths.tolist()
