"""Training data: reading (plain, .gz, Multi30k layout), the synthetic task, BPE tokenizer, batching."""

from __future__ import annotations

import gzip
from collections import Counter

import pytest

from transformer_kernels.train.data import (DataError, SyntheticTask, TokenBatcher, collate, multi30k_paths,
                                            read_lines, read_parallel, tokenize_pairs)
from transformer_kernels.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer
from transformer_kernels.models import TransformerConfig

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
    assert read_parallel(plain, gz) == list(zip(SRC, TGT))


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_lines(tmp_path / "missing.de")
    with pytest.raises(DataError, match="misaligned: .* has 3 lines, .* has 2"):
        read_parallel(write(tmp_path / "a", SRC), write(tmp_path / "b", TGT[:2]))
    with pytest.raises(DataError, match="empty"):
        read_parallel(write(tmp_path / "c", []), write(tmp_path / "d", []))


def test_multi30k_layout(tmp_path):
    write(tmp_path / "train.de.gz", SRC, gz=True)
    write(tmp_path / "train.en.gz", TGT, gz=True)
    write(tmp_path / "val.de", SRC[:1])  # uncompressed files are found too
    write(tmp_path / "val.en", TGT[:1])
    assert read_parallel(*multi30k_paths(tmp_path, "train", "de", "en")) == list(zip(SRC, TGT))
    assert read_parallel(*multi30k_paths(tmp_path, "val", "en", "de")) == [(TGT[0], SRC[0])]
    with pytest.raises(DataError, match="unknown Multi30k split"):
        multi30k_paths(tmp_path, "dev", "de", "en")


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
    tok = Tokenizer.train(list(zip(SRC, TGT)) * 3, vocab_size=120, joint=joint)
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


def test_long_sentences_are_dropped_and_counted():
    tok = Tokenizer.train(list(zip(SRC, TGT)), vocab_size=60)
    pairs = list(zip(SRC, TGT)) + [("ein " * 50, "a " * 50), ("", "empty source")]
    data = tokenize_pairs(pairs, tok, max_len=20)
    assert len(data) == 3 and data.dropped == 2


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
    assert ranks[0] == whole[0: 2 * len(ranks[0]): 2] and ranks[1] == whole[1: 2 * len(ranks[1]): 2]


def test_collate_adds_bos_eos_and_padding():
    tok = Tokenizer.train(list(zip(SRC, TGT)), vocab_size=80)
    data = tokenize_pairs(list(zip(SRC, TGT)), tok)
    b = collate(data, [0, 1], PAD_ID, BOS_ID, EOS_ID)
    t0 = data.tgt[0]
    assert b.tgt_in[0, 0] == BOS_ID and b.tgt_in[0, 1: len(t0) + 1].tolist() == t0
    assert b.tgt_out[0, : len(t0)].tolist() == t0 and b.tgt_out[0, len(t0)] == EOS_ID
    assert b.src.shape[1] == max(len(data.src[0]), len(data.src[1]))
    assert (b.tgt_in != PAD_ID).sum() == (b.tgt_out != PAD_ID).sum()
