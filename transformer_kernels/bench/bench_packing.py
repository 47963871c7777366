"""Packed (padding-free) against padded training batches on a corpus: how much of the trainer's
token-budget batches is padding, and training throughput in real tokens per second.

Padding: one epoch of the trainer's batches (:class:`~transformer_kernels.train.TokenBatcher`:
shuffled, sorted by length, cut under ``--batch-tokens`` a side), padded and packed. Padded, a batch
of B pairs is ``B × longest source`` and ``B × (longest target + 1)`` token slots; packed, a batch is
its real tokens, and the same budget holds more sentences.

Throughput: full training steps (forward, backward, AdamW step; the paper's recipe: dropout 0.1,
label smoothing 0.1) of the package's model, in three modes over the same sentences (those of
``--steps`` padded batches drawn from the epoch):
  padded          the padded batches (``train --no-packing``)                      (the baseline)
  packed          the same sentences cut into packed batches (``train --packing``)
  packed_layout   the padded batches' sentence groups, packed: the layout alone, not the fuller batches
Each round runs every mode once, in an order that rotates from round to round (interleaved, so a
machine shared with other work slows every mode alike); tokens/s = real source + target tokens /
wall time of the mode's steps. Reported: per-mode median over the rounds, and the median of the
per-round ratios to padded. The first round is a warm-up and not counted.

    python -m transformer_kernels.bench.bench_packing [--data multi30k --data-dir DIR]
        [--batch-tokens 4096] [--preset small] [--steps 4] [--rounds 5] [--device cpu] [--out DIR]

Without ``--data`` it runs on the embedded synthetic task.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import transformer_kernels as tk
from transformer_kernels.models import build_model
from transformer_kernels.train import TokenBatcher, Tokenizer, TrainConfig
from transformer_kernels.train.batching import collate, collate_packed
from transformer_kernels.train.config import pick_device
from transformer_kernels.train.sources import load_pairs
from transformer_kernels.train.tokenized import tokenize_pairs
from transformer_kernels.train.tokenizer import BOS_ID, EOS_ID, PAD_ID

MODES = ("padded", "packed", "packed_layout")
LABEL_SMOOTHING = 0.1


def load_corpus(args) -> tuple[list[np.ndarray], list[np.ndarray], Tokenizer, str]:
    """(source ids, target ids, tokenizer, description) of the training split, tokenised as the trainer does."""
    cfg = TrainConfig(data=args.data, data_dir=args.data_dir, vocab_size=args.vocab_size, max_len=args.max_len)
    pairs = list(load_pairs(cfg, "train"))[: args.pairs]
    tokenizer = Tokenizer.train(pairs, args.vocab_size, joint=True)
    data = tokenize_pairs(pairs, tokenizer, args.max_len)
    name = f"Multi30k {cfg.src_lang}-{cfg.tgt_lang} train" if args.data == "multi30k" else "synthetic task train"
    desc = (
        f"{name}: {len(data)} pairs ({data.dropped} dropped), joint BPE vocabulary {tokenizer.vocab_size('src')}, "
        f"max_len {args.max_len}"
    )
    return data.src, data.tgt, tokenizer, desc


def padding_stats(src_lengths: np.ndarray, tgt_lengths: np.ndarray, budget: int, seed: int) -> dict:
    """One epoch of padded and of packed batches: slots, real tokens, padding fraction, batch sizes."""
    real_src, real_tgt = int(src_lengths.sum()), int(tgt_lengths.sum() + len(tgt_lengths))  # target + BOS/EOS
    out = {}
    for mode in ("padded", "packed"):
        batcher = TokenBatcher(src_lengths, tgt_lengths, budget, seed=seed, packed=mode == "packed")
        batches = batcher.epoch_batches(0)
        if mode == "padded":
            slots_src = sum(len(b) * int(src_lengths[b].max()) for b in batches)
            slots_tgt = sum(len(b) * (int(tgt_lengths[b].max()) + 1) for b in batches)
        else:
            slots_src, slots_tgt = real_src, real_tgt
        out[mode] = {
            "batches": len(batches),
            "pairs_per_batch": len(src_lengths) / len(batches),
            "real_tokens_per_batch": (real_src + real_tgt) / len(batches),
            "padding_src": 1 - real_src / slots_src,
            "padding_tgt": 1 - real_tgt / slots_tgt,
            "padding": 1 - (real_src + real_tgt) / (slots_src + slots_tgt),
        }
    return out


class _Ids:
    """The corpus as ``collate``/``collate_packed`` read it (``src[i]``, ``tgt[i]``)."""

    def __init__(self, src, tgt):
        self.src, self.tgt = src, tgt


def step_batches(data: _Ids, src_lengths, tgt_lengths, budget: int, seed: int, steps: int) -> dict[str, list]:
    """Each mode's collated batches over the same sentences: those of the first ``steps`` padded batches."""
    groups = TokenBatcher(src_lengths, tgt_lengths, budget, seed=seed).epoch_batches(0)[:steps]
    chosen = [i for g in groups for i in g]
    packed_groups = TokenBatcher(
        src_lengths[chosen], tgt_lengths[chosen], budget, shuffle=False, packed=True
    ).epoch_batches(0)
    return {
        "padded": [collate(data, g, PAD_ID, BOS_ID, EOS_ID) for g in groups],
        "packed": [collate_packed(data, [chosen[i] for i in g], BOS_ID, EOS_ID) for g in packed_groups],
        "packed_layout": [collate_packed(data, g, BOS_ID, EOS_ID) for g in groups],
    }


def train_steps(model, opt, batches, device) -> float:
    """Seconds for one training step on each batch (the trainer's loss: summed, over the target tokens)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(b.src, b.tgt_in, b.tgt_out, label_smoothing=LABEL_SMOOTHING, reduction="sum")
        (loss / b.target_tokens(PAD_ID).to(loss.device)).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def throughput(args, tokenizer, data, src_lengths, tgt_lengths, device) -> dict:
    batches = step_batches(data, src_lengths, tgt_lengths, args.batch_tokens, args.seed, args.steps)
    batches = {m: [b.to(device) for b in bs] for m, bs in batches.items()}
    tokens = {m: sum(int(b.tokens(PAD_ID)) for b in bs) for m, bs in batches.items()}
    assert len(set(tokens.values())) == 1, f"modes see different sentences: {tokens}"
    torch.manual_seed(args.seed)
    init = build_model(
        args.preset, tokenizer.vocab_size("src"), tokenizer.vocab_size("tgt"), dropout=0.1, device=device
    )
    runs = {}
    for m in MODES:
        model = copy.deepcopy(init).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
        runs[m] = (model, opt)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds + 1):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for m in order:
            seconds = train_steps(*runs[m], batches[m], device)
            if r > 0:  # round 0 warms up
                rates[m].append(tokens[m] / seconds)
    ratios = {m: statistics.median(a / b for a, b in zip(rates[m], rates["padded"], strict=True)) for m in MODES}
    return {
        "tokens_per_round": tokens["padded"],
        "steps": {m: len(batches[m]) for m in MODES},
        "tokens_per_s_median": {m: statistics.median(v) for m, v in rates.items()},
        "tokens_per_s_rounds": rates,
        "ratio_to_padded_median": ratios,
    }


def markdown(result: dict) -> str:
    lines = [f"# Packed vs padded batches: {result['corpus']}", ""]
    lines += [f"Token budget {result['batch_tokens']} a side; {result['environment']}", ""]
    lines += [
        "| batches | per epoch | pairs/batch | real tokens/batch | padding src | padding tgt | padding |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in result["padding"].items():
        lines.append(
            f"| {m} | {s['batches']} | {s['pairs_per_batch']:.1f} | {s['real_tokens_per_batch']:.0f} | "
            f"{s['padding_src']:.1%} | {s['padding_tgt']:.1%} | {s['padding']:.1%} |"
        )
    t = result.get("throughput")
    if t:
        lines += ["", f"Training steps ({result['model']}), {t['tokens_per_round']} real tokens a round:", ""]
        lines += ["| mode | steps | real tokens/s (median) | vs padded (median of rounds) |", "|---|---|---|---|"]
        for m in MODES:
            rate, ratio = t["tokens_per_s_median"][m], t["ratio_to_padded_median"][m]
            lines.append(f"| {m} | {t['steps'][m]} | {rate:,.0f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["multi30k"], default=None, help="default: the synthetic task")
    parser.add_argument("--data-dir", help="the corpus directory (Multi30k: train.de.gz, ...)")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N training pairs")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--preset", default="small", help="the model for the throughput runs")
    parser.add_argument("--steps", type=int, default=4, help="padded batches' worth of sentences a round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default=None, help="force the kernels' backend; default auto")
    parser.add_argument("--padding-only", action="store_true", help="skip the training steps")
    parser.add_argument("--out", type=Path, default=None, help="write bench_packing.md and .json here")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    src, tgt, tokenizer, corpus = load_corpus(args)
    src_lengths = np.array([len(s) for s in src], dtype=np.int32)
    tgt_lengths = np.array([len(t) for t in tgt], dtype=np.int32)
    result = {
        "corpus": corpus,
        "batch_tokens": args.batch_tokens,
        "environment": f"torch {torch.__version__}, {device}"
        + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else f", {torch.cuda.get_device_name()}"),
        "padding": padding_stats(src_lengths, tgt_lengths, args.batch_tokens, args.seed),
    }
    if not args.padding_only:
        result["model"] = (
            f"preset {args.preset}, dropout 0.1, label smoothing 0.1, fp32, backend {args.backend or 'auto'}"
        )
        with tk.use_backend(args.backend) if args.backend else contextlib.nullcontext():
            result["throughput"] = throughput(args, tokenizer, _Ids(src, tgt), src_lengths, tgt_lengths, device)
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_packing.md").write_text(text)
        (args.out / "bench_packing.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
