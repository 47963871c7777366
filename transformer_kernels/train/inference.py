"""Inference with a trained model: loading a run's weights and tokenizer, translation (greedy or
beam search, batched by length), per-token loss, and sacreBLEU's corpus BLEU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import EncoderDecoder, TransformerConfig, beam_search, greedy_decode, strip
from . import checkpoint as ckpt
from .batching import TokenBatcher, collate
from .config import pick_device
from .progress import progress_bar
from .tokenized import TokenizedPairs
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

DECODINGS = ("auto", "static", "cached", "recompute")


def resolve_decoding(decoding: str, device: torch.device) -> str:
    """``auto``: ``static`` on a CPU (measured as fast as ``cached`` there, with the same tokens);
    ``cached`` on a GPU until the CUDA-graph replay of the static loop has been measured there."""
    if decoding not in DECODINGS:
        raise ValueError(f"translate: decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding == "auto":
        return "static" if device.type == "cpu" else "cached"
    return decoding


@dataclass(frozen=True)
class Throughput:
    """What a translation run did: sentences, target tokens produced (EOS included), wall-clock seconds."""

    sentences: int
    tokens: int
    seconds: float

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"{self.sentences} sentences, {self.tokens} tokens in {self.seconds:.2f} s: "
            f"{self.sentences_per_s:.1f} sentences/s, {self.tokens_per_s:.0f} tokens/s"
        )


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (stable) and cut into batches of at most ``batch_tokens``
    padded tokens (B · longest length); a sentence longer than that is a batch on its own."""
    if batch_tokens < 1:
        raise ValueError(f"translate: batch_tokens must be >= 1, got {batch_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * max(lengths[i], 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def decode_batch(
    model: EncoderDecoder,
    src: torch.Tensor,
    beam_size: int,
    length_penalty: float,
    decoding: str,
    max_len: int | None = None,
) -> torch.Tensor:
    """Tokens [B, <= max_len] of ``src`` [B, S] by greedy decoding (``beam_size`` 1) or beam search,
    with the ``decoding`` method: ``static`` (fixed shapes; CUDA graphs on a GPU), ``cached`` (KV cache),
    ``recompute`` (the whole prefix every step, no cache) or ``auto`` (see :func:`resolve_decoding`)."""
    decoding = resolve_decoding(decoding, src.device)
    kw = dict(max_len=max_len, use_cache=decoding != "recompute", static=decoding == "static")
    if beam_size == 1:
        return greedy_decode(model, src, **kw)
    return beam_search(model, src, beam_size=beam_size, length_penalty=length_penalty, **kw)


@torch.inference_mode()
def translate_ids(
    model: EncoderDecoder,
    ids: Sequence[Sequence[int]],
    beam_size: int = 4,
    length_penalty: float = 0.6,
    batch_tokens: int = 2048,
    decoding: str = "auto",
    max_len: int | None = None,
    progress: bool = False,
) -> tuple[list[list[int]], Throughput]:
    """Target token ids (no BOS/EOS) of the source ids ``ids``, in input order, and the run's throughput.
    Sentences are sorted by length and batched by ``batch_tokens`` source tokens (padding included),
    so a batch holds sentences of similar length; ``max_len`` bounds every output (default: source + 50)."""
    device = next(model.parameters()).device
    limit = model.config.max_positions
    ids = [list(s[:limit]) for s in ids]
    out: list[list[int]] = [[] for _ in ids]
    tokens = 0
    bar = progress_bar(total=len(ids), desc="translate", unit="sent", disable=not progress)
    t0 = time.perf_counter()
    for chunk in length_batches([len(s) for s in ids], batch_tokens):
        src = torch.full((len(chunk), max(1, max(len(ids[i]) for i in chunk))), PAD_ID, dtype=torch.long)
        for row, i in enumerate(chunk):
            src[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        hyps = decode_batch(model, src.to(device), beam_size, length_penalty, decoding, max_len).cpu()
        for row in hyps.tolist():
            tokens += row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        for i, row in zip(chunk, strip(hyps, EOS_ID, PAD_ID), strict=True):
            out[i] = row
        bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    bar.close()
    return out, Throughput(len(ids), tokens, seconds)


def translate(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    beam_size: int = 4,
    length_penalty: float = 0.6,
    batch_tokens: int = 2048,
    decoding: str = "auto",
    progress: bool = False,
    return_throughput: bool = False,
):
    """Translations of ``texts``, in order (see :func:`translate_ids`); with ``return_throughput``,
    ``(translations, Throughput)``."""
    ids, throughput = translate_ids(
        model,
        tokenizer.encode_batch(list(texts), side="src"),
        beam_size,
        length_penalty,
        batch_tokens,
        decoding,
        progress=progress,
    )
    texts_out = tokenizer.decode_batch(ids, side="tgt") if ids else []
    return (texts_out, throughput) if return_throughput else texts_out


def bleu(hypotheses: Sequence[str], references: Sequence[str]):
    """sacreBLEU's corpus BLEU (default 13a tokenisation) and its signature."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    return metric.corpus_score(list(hypotheses), [list(references)]), metric.get_signature()


@torch.inference_mode()
def evaluate_loss(model: EncoderDecoder, data: TokenizedPairs, batch_tokens: int) -> float:
    """Per-token negative log-likelihood (no label smoothing) over ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batcher = TokenBatcher([len(s) for s in data.src], [len(t) for t in data.tgt], batch_tokens, shuffle=False)
    total, count = 0.0, 0
    for indices in batcher.epoch_batches(0):
        b = collate(data, indices, PAD_ID, BOS_ID, EOS_ID).to(device)
        total += float(model.loss(b.src, b.tgt_in, b.tgt_out, reduction="sum"))
        count += int((b.tgt_out != PAD_ID).sum())
    model.train(was_training)
    return total / max(count, 1)


def load_for_inference(out_dir, which: str = "best", average: int = 1, device: str = "auto"):
    """(model in eval mode, tokenizer, run record) of a training output directory; ``average`` > 1
    averages the last that many checkpoints' weights."""
    run = ckpt.read_run(out_dir)
    model = EncoderDecoder(TransformerConfig(**run["model"]))
    if average > 1:
        paths = ckpt.last_checkpoints(out_dir, average)
        if not paths:
            raise ckpt.CheckpointError(f"{out_dir} has no checkpoint yet")
        ckpt.apply_weights(model, ckpt.average_weights(paths), f"average of {len(paths)} checkpoints")
    else:
        ckpt.load_weights(model, ckpt.resolve_checkpoint(out_dir, which))
    tokenizer = Tokenizer.load(out_dir, joint=run["joint_vocab"])
    return model.to(pick_device(device)).eval(), tokenizer, run
