"""On a CPU: the package (``auto``, which is the ``native`` backend there) against eager torch, in turn.

Three tables, fp32, forward + backward at the sizes CPU users train at (~4096 tokens a batch):

- ``ops``: each fused op against the eager torch code it replaces (``dropout_add_layer_norm`` also
  against the ``reference`` backend, the specification): residual + dropout + LayerNorm [4096, 512];
  the FFN 512 -> 2048 -> 512 with ReLU; attention B 32, L 128, 8 heads of 64 against SDPA (causal,
  key padding, both with dropout); cross-entropy [4096, 10000] with label smoothing; the output
  layer + cross-entropy [4096, 512] x [10000, 512]. With dropout 0 and 0.1 where the op has it.
- ``layers``: ``tk.nn``'s encoder / decoder layers against ``torch.nn``'s (post-LN, ReLU, d_ff 4·d,
  64-dim heads, batch-first, 10% of the keys padded, the decoder causal; same weights), d_model
  256-1024, lengths 16-512, train mode, dropout 0.1 and 0.
- ``training``: the paper's model's training step (forward, backward, AdamW; d_model 256, 3+3 layers,
  a shared 8000-word vocabulary, 96 pairs of 16-32 tokens) against the same computation on
  ``torch.nn.Transformer`` (``bench_training``'s ``nn_eager``), dropout 0.1 and 0.

Timing: :func:`~transformer_kernels.bench.common.interleaved_times` (every repeat runs each side
once, in a shuffled order), because a CPU benchmark often shares its cores. A cell's figure is the median of
the per-repeat ratios (baseline time / this side's time, both from the same repeat) and an interval
of at least 95% coverage for it (:func:`~transformer_kernels.bench.common.paired_ratio`; with
fewer than 9 repeats it is the ratios' range, 98.4% at 7 repeats): an interval that
holds 1.00 means this run cannot tell the side from the baseline. Each row ends with a control
column, the baseline timed twice ("eager again"), whose interval shows the run's noise. The rows
are markdown; the first column's time is the baseline.

    python -m transformer_kernels.bench.bench_cpu [ops layers training] [--quick] [--case decoder-256-128]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels.bench.common import git_commit, interleaved_times, paired_ratio

TABLES = ("ops", "layers", "training")
LAYER_CASES = [
    ("encoder", 256, 16),
    ("encoder", 256, 128),
    ("encoder", 256, 512),
    ("decoder", 256, 128),
    ("encoder", 512, 128),
    ("decoder", 512, 128),
    ("encoder", 1024, 128),
]


# Set from the command line: only the rows whose name contains ROW_FILTER run (None: all), each with
# REPEATS repeats where set (else the table's own).
ROW_FILTER: str | None = None
REPEATS: int | None = None


def row(name: str, fns: dict[str, Callable[[], object]], repeats: int, control: bool = False) -> dict[str, float]:
    """Time ``fns`` in turn and print one markdown row: ``name``, then each side's median ms and
    its speed against the first side, the median of the per-repeat ratios with its (>= 95%) interval
    (:func:`~transformer_kernels.bench.common.paired_ratio`). ``control``: the first side once
    more, as the last column ("again"): its ratio, which is 1.00x but for the machine's noise, says
    how far from 1.00x a ratio must be to mean anything in this run. Returns the median ms."""
    if ROW_FILTER is not None and ROW_FILTER not in name:
        return {}
    repeats = REPEATS or repeats
    if control:
        first = next(iter(fns))
        fns = {**fns, f"{first} again": fns[first]}
    times = interleaved_times(fns, repeats)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    base = next(iter(times))
    cells = [f"{base} {med[base]:.1f} ms (1.00x)"]
    for k, ts in list(times.items())[1:]:
        ratio, lo, hi = paired_ratio(times[base], ts)
        cells.append(f"{k} {med[k]:.1f} ms ({ratio:.3f}x, {lo:.3f}-{hi:.3f})")
    print(f"| {name} | {' | '.join(cells)} |", flush=True)
    return med


def cpu_name() -> str:
    """The processor's model name as ``/proc/cpuinfo`` gives it (Linux), else ``platform``'s guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ops(quick: bool) -> None:
    """The op table (see the module's docstring)."""
    reps = 5 if quick else 15
    torch.manual_seed(0)
    m, n = 4096, 512
    x, r = (torch.randn(m, n, requires_grad=True) for _ in range(2))
    w, b = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    g = torch.randn(m, n)

    def ln(fn):
        return lambda: torch.autograd.grad(fn(), (x, r, w, b), g)

    for p in (0.0, 0.1):
        row(
            f"dropout_add_layer_norm [4096, 512] p={p}",
            {
                "eager": ln(lambda p=p: F.layer_norm(F.dropout(x, p) + r, (n,), w, b)),
                "auto": ln(lambda p=p: tk.dropout_add_layer_norm(x, r, w, b, p)),
                "reference": ln(lambda p=p: tk.dropout_add_layer_norm(x, r, w, b, p, backend="reference")),
            },
            4 * reps,  # a call of a few ms: its noise is larger, and more repeats are cheap
            control=True,
        )
    d = 512
    xx = torch.randn(4096, d, requires_grad=True)
    w1, b1 = torch.randn(4 * d, d, requires_grad=True), torch.randn(4 * d, requires_grad=True)
    w2, b2 = torch.randn(d, 4 * d, requires_grad=True), torch.randn(d, requires_grad=True)
    gy = torch.randn(4096, d)

    def fw(fn):
        return lambda: torch.autograd.grad(fn(), (xx, w1, b1, w2, b2), gy)

    for p in (0.0, 0.1):
        row(
            f"ffn [4096, 512] d_ff 2048 relu p={p}",
            {
                "eager": fw(lambda p=p: F.linear(F.dropout(F.relu(F.linear(xx, w1, b1)), p), w2, b2)),
                "auto": fw(lambda p=p: tk.ffn(xx, w1, b1, w2, b2, "relu", p)),
            },
            reps,
            control=True,
        )
    bb, length, h, hd = 32, 128, 8, 64
    q, k, v = (torch.randn(bb, length, h, hd, requires_grad=True) for _ in range(3))
    go = torch.randn(bb, length, h, hd)
    kpm = torch.zeros(bb, length, dtype=torch.bool)
    kpm[:, int(0.9 * length) :] = True

    def at(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), go)

    def sdpa(causal, pad, p=0.0):
        mask = None
        if pad:
            mask = ~kpm[:, None, None, :]
            if causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool).tril()
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal and not pad, dropout_p=p)
        return out.transpose(1, 2)

    for causal, pad, p in ((True, False, 0.0), (False, True, 0.0), (True, True, 0.1)):
        row(
            f"attention B 32 L 128 H 8 D 64 causal={causal} padding={pad} p={p}",
            {
                "sdpa": at(lambda c=causal, pd=pad, p=p: sdpa(c, pd, p)),
                "auto": at(
                    lambda c=causal, pd=pad, p=p: tk.attention(
                        q, k, v, causal=c, key_padding_mask=kpm if pd else None, dropout_p=p
                    )
                ),
            },
            4 * reps,  # the same kernel on both sides without dropout: a ratio near 1.00x needs many repeats
            control=True,
        )
    vocab = 10000
    hid = torch.randn(4096, 512, requires_grad=True)
    emb = (torch.randn(vocab, 512) / 22).requires_grad_()
    t = torch.randint(0, vocab, (4096,))
    logits = torch.randn(4096, vocab, requires_grad=True)
    row(
        "cross_entropy [4096, 10000] smoothing 0.1",
        {
            "eager": lambda: torch.autograd.grad(F.cross_entropy(logits, t, label_smoothing=0.1), logits),
            "auto": lambda: torch.autograd.grad(tk.cross_entropy(logits, t, label_smoothing=0.1), logits),
        },
        reps,
        control=True,
    )
    row(
        "linear_cross_entropy [4096, 512] x [10000, 512] smoothing 0.1",
        {
            "eager": lambda: torch.autograd.grad(
                F.cross_entropy(F.linear(hid, emb), t, label_smoothing=0.1), (hid, emb)
            ),
            "auto": lambda: torch.autograd.grad(tk.linear_cross_entropy(hid, emb, t, label_smoothing=0.1), (hid, emb)),
        },
        reps,
        control=True,
    )


def layers(cases: list[tuple[str, int, int]], quick: bool) -> None:
    """The layer table (see the module's docstring)."""
    from transformer_kernels.bench.bench_layers import call_layer, layer_masks, make_inputs, make_layers

    reps = 3 if quick else 7
    for kind, d, length in cases:
        b = max(4096 // length, 1)
        for p in (0.1, 0.0):
            torch.manual_seed(0)
            theirs, ours = make_layers(kind, d, "cpu", torch.float32, dropout=p)
            x, memory, dout = make_inputs(b, length, d, torch.float32, "cpu", seed=0)
            kpm, causal = layer_masks(b, length, "cpu", torch.float32)
            theirs.train(), ours.train()

            def step(module, kind=kind, x=x, memory=memory, dout=dout, kpm=kpm, causal=causal):
                call_layer(kind, module, x, memory, kpm, causal).backward(dout)

            row(
                f"{kind} layer d {d} L {length} B {b} dropout {p}",
                {"torch.nn": lambda m=theirs: step(m), "tk.nn": lambda m=ours: step(m)},
                reps,
                control=True,
            )


def training(quick: bool, vocab: int = 8000, batch: int = 96, length: int = 32) -> None:
    """The training-step table (see the module's docstring): ``bench_training``'s ``nn_eager`` and
    ``auto`` rows, fp32, without its checks."""
    from transformer_kernels.bench.bench_training import _row, make_batch
    from transformer_kernels.models import EncoderDecoder, TransformerConfig

    reps = 3 if quick else 7
    cpu = torch.device("cpu")
    sizes = dict(d_model=256, nhead=4, dim_feedforward=1024, num_encoder_layers=3, num_decoder_layers=3)
    for p in (0.1, 0.0):
        config = TransformerConfig(
            vocab, vocab, **sizes, dropout=p, share_all_embeddings=True, max_positions=length + 1
        )
        data = make_batch(batch, length, vocab, config, cpu)
        torch.manual_seed(0)
        init = EncoderDecoder(config, cpu)
        fns = {}
        for name, impl in (("torch.nn", "nn_eager"), ("tk", "auto")):
            module, loss_fn, scope = _row(impl, init, torch.float32, cpu)
            module.train()
            opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)

            def step(opt=opt, loss_fn=loss_fn, scope=scope, args=(data.src, data.tgt_in, data.tgt_out)):
                opt.zero_grad(set_to_none=True)
                with scope():
                    loss_fn(*args).backward()
                opt.step()

            fns[name] = step
        row(
            f"training step d 256 3+3 layers vocab {vocab} batch {batch}x<={length} ({data.tokens} tokens) dropout {p}",
            fns,
            reps,
            control=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", metavar="TABLE", help=f"of {', '.join(TABLES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, two layer cases")
    parser.add_argument("--case", action="append", help="a layer case KIND-D-L, e.g. decoder-256-128 (repeatable)")
    parser.add_argument(
        "--rows", metavar="TEXT", help="only the rows whose name contains TEXT, e.g. 'causal=True padding=False'"
    )
    parser.add_argument("--repeats", type=int, metavar="N", help="N repeats for every row (default: each table's own)")
    args = parser.parse_args(argv)
    if unknown := [t for t in args.tables if t not in TABLES]:
        parser.error(f"no table {unknown[0]!r}; the tables are {', '.join(TABLES)}")
    tables = args.tables or list(TABLES)
    cases = LAYER_CASES[:2] if args.quick else LAYER_CASES
    if args.case:
        try:
            cases = [(kind, int(d), int(n)) for kind, d, n in (c.split("-") for c in args.case)]
        except ValueError:
            parser.error(f"--case takes KIND-D-L such as decoder-256-128 (got {args.case})")
        if bad := [c for c in cases if c[0] not in ("encoder", "decoder")]:
            parser.error(f"--case: the kind is encoder or decoder (got {bad[0][0]!r})")
    print(
        f"{_dt.date.today()}, commit {git_commit()}: {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; fwd + bwd, median ms (speed vs the first column: "
        "the median of the per-repeat ratios, its >= 95% interval)",
        flush=True,
    )
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1 (got {args.repeats})")
    global ROW_FILTER, REPEATS
    ROW_FILTER, REPEATS = args.rows, args.repeats
    if "ops" in tables:
        ops(args.quick)
    if "layers" in tables:
        layers(cases, args.quick)
    if "training" in tables:
        training(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
