"""Benchmark of translation throughput on a test set, greedy and beam 4.

The whole test set is translated in the batches ``translate_ids`` makes (sorted by length, cut by
source tokens), by four methods:
  recompute  the whole target prefix through the decoder every step, no cache      (the baseline)
  cached     a KV cache; attention over the cache slice that grows each step; beams reordered by
             allocating new caches
  static     fixed shapes: preallocated caches, the step counter on the device, beams reordered into
             preallocated buffers; on a GPU every step after the first is a CUDA graph replay
  hf         Hugging Face ``generate()`` (SDPA attention, its own KV cache) on a ``MarianMTModel`` of
             the same size, on the same batches
The models have random weights: throughput needs no trained weights, but the length of a
translation does, so EOS is disabled and every method decodes exactly ``steps`` tokens per sentence
(the mean length of the reference translations, in tokens): tokens/s = sentences/s × steps.
The test set is Multi30k's test_2016_flickr, German to English (``--data-dir``, or the
``MULTI30K_DIR`` environment variable when run from the suite), with a joint BPE vocabulary learnt
on it; without it, the synthetic task's test split stands in. GPU: the paper's base model in bf16.
CPU: the ``small`` preset (the base shape scaled down) in fp32; with ``--quick``, the ``tiny`` one
on the first 32 sentences (a smoke run). The methods are timed in turn, round after round
(interleaved: a slow phase of a shared machine hits every method), and the median is reported.

    python -m transformer_kernels.bench.bench_translate [--data-dir DIR] [--quick] [--out DIR]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from transformer_kernels.models import build_model
from transformer_kernels.train.inference import decode_batch, length_batches
from transformer_kernels.train.sources import SyntheticTask, multi30k_paths, read_parallel
from transformer_kernels.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

from .common import Report, autotune, chosen_dtypes, default_device, label, standalone_parser

COUNTS = "target tokens produced: sentences x steps (every method decodes exactly `steps` tokens a sentence)"
METHODS = ("recompute", "cached", "static", "hf")
VOCAB = 8000  # the models' vocabulary (a Multi30k-sized joint BPE); the tokenizer's ids are below it


def test_set(data_dir: str | None, limit: int | None) -> tuple[str, list[list[int]], int]:
    """(corpus name, source token ids, steps): ``steps`` is the mean reference length in tokens + 1 (EOS)."""
    if data_dir:
        name = "multi30k test_2016 de-en"
        pairs = read_parallel(*multi30k_paths(data_dir, "test_2016_flickr", "de", "en"))
    else:
        name, pairs = "synthetic test", SyntheticTask().pairs("test", 1000)
    tokenizer = Tokenizer.train(pairs, VOCAB)
    pairs = pairs[:limit] if limit else pairs
    src = tokenizer.encode_batch([s for s, _ in pairs], side="src")
    tgt = tokenizer.encode_batch([t for _, t in pairs], side="tgt")
    return name, src, round(statistics.mean(len(t) for t in tgt)) + 1


def marian_like(model, device, dtype):
    """A random ``MarianMTModel`` with the shape of ``model``'s config (post-LN, ReLU, sinusoidal
    positions, embeddings scaled by √d and tied), EOS never produced within the forced length."""
    import transformers

    c = model.config
    config = transformers.MarianConfig(
        vocab_size=c.tgt_vocab_size,
        decoder_vocab_size=c.tgt_vocab_size,
        d_model=c.d_model,
        encoder_layers=c.num_encoder_layers,
        decoder_layers=c.num_decoder_layers,
        encoder_attention_heads=c.nhead,
        decoder_attention_heads=c.nhead,
        encoder_ffn_dim=c.dim_feedforward,
        decoder_ffn_dim=c.dim_feedforward,
        activation_function=c.activation,
        max_position_embeddings=c.max_positions,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.MarianMTModel._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def padded(ids: list[list[int]], chunk: list[int], device) -> torch.Tensor:
    src = torch.full((len(chunk), max(1, max(len(ids[i]) for i in chunk))), PAD_ID, dtype=torch.long)
    for row, i in enumerate(chunk):
        src[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
    return src.to(device)


def translate_all(method: str, models: dict, batches: list[torch.Tensor], beam: int, steps: int) -> None:
    """Every batch, by ``method``; returns when the device is done."""
    for src in batches:
        if method == "hf":
            with torch.inference_mode():
                out = models["hf"].generate(
                    input_ids=src,
                    attention_mask=src != PAD_ID,
                    num_beams=beam,
                    max_new_tokens=steps,
                    min_new_tokens=steps,
                    do_sample=False,
                    **({"length_penalty": 0.6} if beam > 1 else {}),
                )
            assert out.shape[1] == steps + 1, out.shape  # the decoder start token, then `steps` tokens
        else:
            out = decode_batch(models["ours"], src, beam, 0.6, method, max_len=steps)
            assert out.shape[1] == steps, out.shape
    if batches and batches[0].is_cuda:
        torch.cuda.synchronize()


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    data_dir: str | None = None,
    repeats: int | None = None,
    limit: int | None = None,
) -> list[Report]:
    device = device or default_device()
    data_dir = data_dir or os.environ.get("MULTI30K_DIR")
    gpu = device.type == "cuda"
    dtypes = dtypes or [torch.bfloat16 if gpu else torch.float32]
    preset, batch_tokens = ("base", 4096) if gpu else ("tiny" if quick else "small", 1024)
    limit = limit or (32 if quick and not gpu else None)
    repeats = repeats or (2 if quick else 3)
    corpus, ids, steps = test_set(data_dir, limit)
    batches_ix = length_batches([len(s) for s in ids], batch_tokens)
    batches = [padded(ids, chunk, device) for chunk in batches_ix]
    report = Report(
        "bench_translate",
        COUNTS,
        str(device),
        unit="tokens/s",
        baseline="recompute",
        panels=["search", "dtype"],
    )
    have_hf = True
    try:
        import transformers  # noqa: F401
    except ImportError:
        have_hf = False
    with autotune(not quick):
        for dt in dtypes:
            torch.manual_seed(0)
            model = build_model(preset, VOCAB, VOCAB, device=device, dtype=dt, eos_id=-1, dropout=0.0).eval()
            models = {"ours": model, "hf": marian_like(model, device, dt) if have_hf else None}
            for beam in (1, 4):
                methods = [m for m in METHODS if m != "hf" or have_hf]
                for m in methods:  # warm-up: kernels compiled and autotuned, first allocations
                    translate_all(m, models, batches[:1], beam, steps)
                times: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(repeats):  # interleaved: a slow phase of a shared machine hits every method
                    for m in methods:
                        t0 = time.perf_counter()
                        translate_all(m, models, batches, beam, steps)
                        times[m].append((time.perf_counter() - t0) * 1e3)
                medians: dict[str, float | None] = {m: statistics.median(t) for m, t in times.items()}
                notes = {} if have_hf else {"hf": "transformers is not installed"}
                if not have_hf:
                    medians["hf"] = None
                case = {
                    "search": "greedy" if beam == 1 else f"beam {beam}",
                    "model": preset,
                    "dtype": label(dt),
                    "corpus": corpus,
                    "sentences": len(ids),
                    "batches": len(batches),
                    "steps": steps,
                }
                report.add_case(case, medians, len(ids) * steps, baseline="recompute", notes=notes)
                report.notes.append(
                    f"{case['search']}, {label(dt)}: sentences/s "
                    + ", ".join(f"{m} {len(ids) / (ms * 1e-3):.1f}" for m, ms in medians.items() if ms)
                    + f" (median of {repeats} interleaved rounds)"
                )
    return [report]


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__, "on a CPU: a tiny model, 32 sentences; 2 rounds")
    parser.add_argument("--data-dir", type=Path, help="Multi30k directory (test_2016_flickr.de/.en[.gz])")
    parser.add_argument("--repeats", type=int, help="rounds of every method (default 3; 2 with --quick)")
    parser.add_argument("--limit", type=int, help="translate only the first N sentences")
    args = parser.parse_args(argv)
    reports = run(args.quick, chosen_dtypes(args), data_dir=args.data_dir, repeats=args.repeats, limit=args.limit)
    return publish(reports, args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
