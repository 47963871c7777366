"""The ``train``, ``translate`` and ``evaluate`` subcommands of ``python -m transformer_kernels``.

Each ``add_*`` function declares a subcommand's options on an argparse parser; each ``run_*``
function runs it and returns the exit status. User errors (bad data, a run directory that already
exists, a checkpoint that does not fit) print one line and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .checkpoint import CheckpointError
from .config import TrainConfig
from .sources import DataError, multi30k_paths, read_lines, read_parallel
from .tokenized import tokenize_pairs

USER_ERRORS = (DataError, CheckpointError, FileExistsError, FileNotFoundError, ValueError)


def add_train(parser: argparse.ArgumentParser) -> None:
    """The options of TrainConfig's fields default to absent (TrainConfig's defaults then apply), so a
    resumed run can tell which were given and warn of those the saved run fixes."""
    groups = {
        title: parser.add_argument_group(title, argument_default=argparse.SUPPRESS)
        for title in (
            "data (none given: the embedded synthetic task)",
            "model",
            "optimisation (defaults: the paper's recipe)",
            "memory and parallelism (launch several processes with torchrun)",
            "output",
        )
    }
    g = groups["data (none given: the embedded synthetic task)"]
    g.add_argument("--data", choices=["multi30k"], help="a known corpus layout in --data-dir")
    g.add_argument("--data-dir", help="directory of the corpus (Multi30k: train.de.gz, val.en.gz, ...)")
    g.add_argument("--src-lang")
    g.add_argument("--tgt-lang")
    g.add_argument("--train-src", help="source side of the training data (plain or .gz, one sentence a line)")
    g.add_argument("--train-tgt")
    g.add_argument("--val-src")
    g.add_argument("--val-tgt")
    g.add_argument("--synthetic-train", type=int, help="synthetic training pairs")
    g.add_argument("--synthetic-val", type=int, help="synthetic validation pairs")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size (per side if separate)")
    g.add_argument(
        "--separate-vocab",
        dest="joint_vocab",
        action="store_false",
        help="one BPE vocabulary per language (default: joint)",
    )
    g.add_argument("--max-len", type=int, help="drop pairs with a side longer than this (tokens)")
    g = groups["model"]
    g.add_argument("--preset", help="big, base, small or tiny (default); the options below override it")
    g.add_argument("--d-model", type=int)
    g.add_argument("--nhead", type=int)
    g.add_argument("--dim-feedforward", type=int)
    g.add_argument("--layers", type=int, help="encoder and decoder layers")
    g.add_argument("--dropout", type=float)
    g.add_argument("--share-embeddings", action="store_true", help="one table for source, target and output")
    g.add_argument("--norm-first", action="store_true", help="pre-LN layers (default: post-LN, as the paper)")
    g = groups["optimisation (defaults: the paper's recipe)"]
    g.add_argument("--batch-tokens", type=int, help="tokens per batch and side (padded ones too, unless packed)")
    g.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        help="packed batches: sentences concatenated without padding, the budget filled with real tokens "
        "(default: off; see the README for when it pays)",
    )
    g.add_argument("--accum-steps", type=int, help="batches per optimizer step")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--epochs", type=int, help="stop after this many epochs")
    g.add_argument("--time-limit", type=float, help="stop after this many minutes of training")
    g.add_argument("--lr-scale", type=float, help="lr = scale · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)")
    g.add_argument("--warmup", type=int)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--clip-norm", type=float, help="gradient clipping (0: off)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 autocast on a GPU that has it, fp32 on the CPU",
    )
    g.add_argument("--device", help="auto (default), cpu, cuda, ...")
    g.add_argument(
        "--backend", default=None, help="force the kernels' backend (reference, native, triton, cuda); default auto"
    )
    g.add_argument("--seed", type=int)
    g = groups["memory and parallelism (launch several processes with torchrun)"]
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each layer's activations in the backward pass instead of storing them",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state over the processes (FSDP2) instead of "
        "replicating them (DDP); checkpoints stay whole",
    )
    g = groups["output"]
    g.add_argument("--out-dir")
    g.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out-dir from its latest checkpoint (its data, model and recipe)",
    )
    g.add_argument("--log-interval", type=int)
    g.add_argument(
        "--eval-interval",
        type=int,
        help="steps between validations (loss, greedy BLEU) and checkpoints kept as best; 0: at the end of each epoch",
    )
    g.add_argument("--val-bleu-sentences", type=int, help="validation sentences translated for BLEU (0: loss only)")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int)
    g.add_argument(
        "--no-tensorboard",
        dest="tensorboard",
        action="store_false",
        help="no TensorBoard logs (default: in OUT_DIR/tensorboard when tensorboard is installed)",
    )


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a training output directory (train --out-dir)")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--average", type=int, default=1, help="average the last K checkpoints' weights")
    parser.add_argument("--beam-size", type=int, default=4, help="1: greedy")
    parser.add_argument("--length-penalty", type=float, default=0.6)
    parser.add_argument(
        "--batch-tokens", type=int, default=2048, help="source tokens per decoding batch (padding included)"
    )
    parser.add_argument(
        "--decoding",
        choices=("auto", "static", "cached", "recompute"),
        default="auto",
        help="static: fixed shapes, CUDA graphs on a GPU; cached: KV cache; recompute: no cache; "
        "auto (default): static on a CPU, cached on a GPU (the CUDA-graph path is not yet measured there)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", help="force the kernels' backend; default auto")


def add_translate(parser: argparse.ArgumentParser) -> None:
    _add_model_source(parser)
    parser.add_argument("--input", help="source sentences, one a line (plain or .gz); default stdin")
    parser.add_argument("--output", help="write translations here; default stdout")


def add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_model_source(parser)
    parser.add_argument("--src", help="source side of the test set")
    parser.add_argument("--ref", help="reference translations")
    parser.add_argument("--data-dir", help="Multi30k directory (with --split); default: the run's own data")
    parser.add_argument(
        "--split",
        default=None,
        help="Multi30k: test_2016_flickr (default), test_2017_flickr, test_2018_flickr, test_2017_mscoco, val; "
        "synthetic: test (default), val",
    )
    parser.add_argument("--synthetic-test", type=int, default=1000, help="synthetic test pairs")


def _set_backend(name):
    if name:
        from ..backends import set_backend

        set_backend(name)


def run_train(args) -> int:
    from .trainer import Trainer

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        _set_backend(args.backend)
        Trainer(TrainConfig(**given), resume=args.resume, given=given).train()
    except USER_ERRORS as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_translate(args) -> int:
    from .inference import load_for_inference, translate

    try:
        _set_backend(args.backend)
        model, tokenizer, _ = load_for_inference(args.model, args.checkpoint, args.average, args.device)
        texts = read_lines(args.input) if args.input else [line.rstrip("\r\n") for line in sys.stdin]
    except USER_ERRORS as e:
        print(f"translate: error: {e}", file=sys.stderr)
        return 2
    out, throughput = translate(
        model,
        tokenizer,
        texts,
        args.beam_size,
        args.length_penalty,
        args.batch_tokens,
        args.decoding,
        progress=sys.stderr.isatty(),
        return_throughput=True,
    )
    print(f"translate: {throughput}", file=sys.stderr)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in out)
    else:
        sys.stdout.writelines(line + "\n" for line in out)
    return 0


def _test_pairs(args, run: dict):
    from .sources import SyntheticTask

    train = run["train"]
    if args.src or args.ref:
        if not (args.src and args.ref):
            raise DataError("give both --src and --ref")
        return read_parallel(args.src, args.ref), f"{args.src}"
    data_dir = args.data_dir or train.get("data_dir")
    if data_dir and (args.data_dir or train.get("data") == "multi30k"):
        split = args.split or "test_2016_flickr"
        return read_parallel(*multi30k_paths(data_dir, split, train["src_lang"], train["tgt_lang"])), split
    if train.get("data") is None and train.get("train_src") is None:
        split = args.split or "test"
        return SyntheticTask(seed=train["seed"]).pairs(split, args.synthetic_test), f"synthetic {split}"
    raise DataError("give the test set: --src FILE --ref FILE, or --data-dir DIR --split NAME for Multi30k")


def run_evaluate(args) -> int:
    from .inference import bleu, evaluate_loss, load_for_inference, resolve_decoding, translate

    try:
        _set_backend(args.backend)
        model, tokenizer, run = load_for_inference(args.model, args.checkpoint, args.average, args.device)
        pairs, name = _test_pairs(args, run)
    except USER_ERRORS as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    data = tokenize_pairs(pairs, tokenizer, max_len=model.config.max_positions - 1)
    loss = evaluate_loss(model, data, batch_tokens=max(4096, model.config.max_positions))
    hyps, throughput = translate(
        model,
        tokenizer,
        [s for s, _ in pairs],
        args.beam_size,
        args.length_penalty,
        args.batch_tokens,
        args.decoding,
        progress=sys.stderr.isatty(),
        return_throughput=True,
    )
    score, signature = bleu(hyps, [t for _, t in pairs])
    print(f"{name}: {len(pairs)} sentences ({data.dropped} too long for the loss)")
    print(f"loss {loss:.4f} (per target token, no label smoothing)")
    print(f"BLEU {score.score:.2f} (beam {args.beam_size}, length penalty {args.length_penalty})")
    print(f"{score}")
    print(f"signature: {signature}")
    decoding = resolve_decoding(args.decoding, next(model.parameters()).device)
    print(f"decoding ({decoding}): {throughput}")
    return 0
