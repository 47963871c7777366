"""Subword tokenisation: byte-pair encoding trained with HF ``tokenizers`` on the training data.

Text is NFKC-normalised, split at spaces (kept as a ``▁`` prefix, so decoding restores them
exactly) and at punctuation, then BPE-encoded. The special tokens take the first ids, matching
:class:`~transformer_kernels.models.TransformerConfig`: pad 0, BOS 1, EOS 2, then unknown 3.
A joint vocabulary is one tokenizer for both languages (needed to share all embeddings);
separate ones are trained on each side's text. Training reads its text as a stream (in batches of
lines, handed to ``train_from_iterator``), so the corpus is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from .sources import chunked

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A BPE tokenizer with at most ``vocab_size`` entries (special tokens included) learnt from ``texts``
    (any iterable, read once; only the word counts are kept)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    # lists of lines: one call into the Rust trainer per list rather than per line (same result)
    tok.train_from_iterator(chunked(texts, 1000), trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, "special tokens come first"
    return tok


class Tokenizer:
    """Source and target tokenizers (the same object for a joint vocabulary)."""

    def __init__(self, src: HFTokenizer, tgt: HFTokenizer):
        self.src, self.tgt = src, tgt

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    @classmethod
    def train(cls, pairs: Iterable[tuple[str, str]], vocab_size: int, joint: bool = True) -> Tokenizer:
        """Learnt from text pairs: a list, or a stream that reads again on each pass (a
        :class:`~transformer_kernels.train.sources.PairStream`): separate vocabularies take two passes."""
        if joint:
            tok = train_bpe((text for pair in pairs for text in pair), vocab_size)
            return cls(tok, tok)
        return cls(train_bpe((s for s, _ in pairs), vocab_size), train_bpe((t for _, t in pairs), vocab_size))

    def side(self, side: str) -> HFTokenizer:
        if side not in ("src", "tgt"):
            raise ValueError(f"tokenizer side must be 'src' or 'tgt', got {side!r}")
        return self.src if side == "src" else self.tgt

    def vocab_size(self, side: str) -> int:
        return self.side(side).get_vocab_size()

    def encode_batch(self, texts: Sequence[str], side: str) -> list[list[int]]:
        """Token ids without BOS/EOS."""
        return [e.ids for e in self.side(side).encode_batch(list(texts), add_special_tokens=False)]

    def decode_batch(self, ids: Sequence[Sequence[int]], side: str = "tgt") -> list[str]:
        return self.side(side).decode_batch([list(i) for i in ids], skip_special_tokens=True)

    def save(self, directory) -> None:
        directory = Path(directory)
        self.src.save(str(directory / "tokenizer-src.json"))
        self.tgt.save(str(directory / "tokenizer-tgt.json"))

    @classmethod
    def load(cls, directory, joint: bool) -> Tokenizer:
        directory = Path(directory)
        paths = [directory / "tokenizer-src.json", directory / "tokenizer-tgt.json"]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"tokenizer file {p} is missing: is {directory} a training output directory?")
        src = HFTokenizer.from_file(str(paths[0]))
        return cls(src, src if joint else HFTokenizer.from_file(str(paths[1])))
