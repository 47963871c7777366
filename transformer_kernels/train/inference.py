"""Inference with a trained model: loading a run's weights and tokenizer, translation (greedy or
beam search, batched by length), per-token loss, and sacreBLEU's corpus BLEU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import EncoderDecoder, TransformerConfig, beam_search, greedy_decode, strip
from . import checkpoint as ckpt
from .batching import TokenBatcher, collate
from .config import pick_device
from .progress import progress_bar
from .tokenized import TokenizedPairs
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@torch.inference_mode()
def translate(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    beam_size: int = 4,
    length_penalty: float = 0.6,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Translations of ``texts``: sorted by length into batches (little padding), returned in order."""
    device = next(model.parameters()).device
    limit = model.config.max_positions
    ids = [s[:limit] for s in tokenizer.encode_batch(list(texts), side="src")]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str | None] = [None] * len(ids)
    bar = progress_bar(total=len(ids), desc="translate", unit="sent", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src = torch.full((len(chunk), max(1, max(len(ids[i]) for i in chunk))), PAD_ID, dtype=torch.long)
        for row, i in enumerate(chunk):
            src[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        src = src.to(device)
        tokens = (
            greedy_decode(model, src)
            if beam_size == 1
            else beam_search(model, src, beam_size=beam_size, length_penalty=length_penalty)
        )
        for i, text in zip(chunk, tokenizer.decode_batch(strip(tokens.cpu(), EOS_ID, PAD_ID), side="tgt"), strict=True):
            out[i] = text
        bar.update(len(chunk))
    bar.close()
    return out


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
