"""Interleaved A/B timings of the drop-in layers and of the paper's model's training step, on a CPU:
transformer_kernels (backend auto, which is the native backend on a CPU) against torch.nn eager.

For a CPU shared with other work: every repeat runs each implementation once, in turn, so a change
in the machine's load hits all of them alike; the figure is the median over repeats, and only the
ratio means much. Sizes: CPU user sizes, ~4096 tokens a batch, d_model 256 and 512, lengths 16-512.

    python benchmarks/results/native-cpu-2026-11-29b/layers.py [--quick] [--case decoder-256-128 ...] > layers.txt

Layers: torch.nn.TransformerEncoderLayer / DecoderLayer (post-LN, relu, d_ff 4·d, nhead d/64,
batch_first, 10% of the keys padded, the decoder causal) against tk.nn's, same weights, a
training step's forward + backward in train mode, with dropout 0.1 and 0.
Training step: the package model (EncoderDecoder, tied embeddings, label smoothing 0.1) against the
same computation on torch.nn.Transformer (bench_training's nn_eager), forward + backward + AdamW,
with dropout 0.1 and 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from transformer_kernels.bench.bench_layers import make_layers
from transformer_kernels.bench.bench_training import LABEL_SMOOTHING, TorchTransformer, make_batch
from transformer_kernels.models import EncoderDecoder, TransformerConfig


def ab(name, fns, reps):
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med[next(iter(med))]
    cells = " | ".join(f"{k} {v:.0f} ms ({base / v:.2f}x)" for k, v in med.items())
    print(f"| {name} | {cells} |", flush=True)


def layer_step(kind, module, x, memory, dout, kpm, causal):
    def step():
        if kind == "encoder":
            y = module(x, src_key_padding_mask=kpm)
        else:
            y = module(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm)
        y.backward(dout)

    return step


def layers(cases, reps):
    for kind, d, length in cases:
        b = max(4096 // length, 1)
        for p in (0.1, 0.0):
            torch.manual_seed(0)
            theirs, ours = make_layers(kind, d, "cpu", torch.float32)
            for m in (theirs, ours):
                m.train()
                for mod in m.modules():
                    if isinstance(mod, torch.nn.Dropout):
                        mod.p = p
                    if hasattr(mod, "dropout") and isinstance(mod.dropout, float):
                        mod.dropout = p
            x, memory = (torch.randn(b, length, d, requires_grad=True) for _ in range(2))
            dout = torch.randn(b, length, d)
            kpm = torch.zeros(b, length, dtype=torch.bool)
            kpm[:, int(length * 0.9) :] = True
            causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float32)
            ab(
                f"{kind} layer d {d} L {length} B {b} dropout {p}",
                {
                    "torch.nn": layer_step(kind, theirs, x, memory, dout, kpm, causal),
                    "tk.nn": layer_step(kind, ours, x, memory, dout, kpm, causal),
                },
                reps,
            )


def training(reps, sizes, vocab, b, length):
    for p in (0.1, 0.0):
        config = TransformerConfig(
            vocab, vocab, **sizes, dropout=p, share_all_embeddings=True, max_positions=length + 1
        )
        batch = make_batch(b, length, vocab, config, "cpu")
        torch.manual_seed(0)
        init = EncoderDecoder(config, "cpu")
        theirs = TorchTransformer(init)
        ours = init
        args = (batch.src, batch.tgt_in, batch.tgt_out)
        fns = {}
        for name, module, loss_fn in (
            ("torch.nn", theirs, theirs),
            ("tk", ours, lambda *a, m=ours: m.loss(*a, label_smoothing=LABEL_SMOOTHING)),
        ):
            module.train()
            opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)

            def step(opt=opt, loss_fn=loss_fn, args=args):
                opt.zero_grad(set_to_none=True)
                loss_fn(*args).backward()
                opt.step()

            fns[name] = step
        d = sizes["d_model"]
        ab(
            f"training step d {d} {sizes['num_encoder_layers']}+{sizes['num_decoder_layers']} layers vocab {vocab} "
            f"batch {b}x<={length} ({batch.tokens} tokens) dropout {p}",
            fns,
            reps,
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", action="append", help="KIND-D-L, e.g. decoder-256-128 (default: all)")
    parser.add_argument("--no-training", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; median ms (speed vs the first)")
    reps = 3 if args.quick else 5
    cases = [("encoder", 256, 16), ("encoder", 256, 128), ("encoder", 256, 512), ("decoder", 256, 128)]
    cases += [("encoder", 512, 128), ("decoder", 512, 128)]
    if args.case:
        cases = [(k, int(d), int(n)) for k, d, n in (c.split("-") for c in args.case)]
    layers(cases[:2] if args.quick else cases, reps)
    if not args.no_training:
        small = dict(d_model=256, nhead=4, dim_feedforward=1024, num_encoder_layers=3, num_decoder_layers=3)
        training(reps, small, 8000, 96, 32)


if __name__ == "__main__":
    main()
