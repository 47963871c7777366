"""End-to-end training throughput: the paper's base model, one full training step (forward, backward,
Adam step) after warm-up, in tokens/s and peak memory.

Rows, all on the same batch and from the same initial weights:
  nn_eager    torch.nn.Transformer (custom encoder and decoder stacks without final norms: the
              paper's post-LN model) with the package model's embeddings, sinusoidal positions,
              tied output projection and label-smoothed cross-entropy: the same work   (the baseline)
  auto        transformer_kernels' EncoderDecoder, backend 'auto' (the fused kernels on a GPU;
              Triton tiles autotuned, except with --quick)
  reference   the same model, backend 'reference' (the pure-PyTorch ops)
  auto_packed       the same model and sentences, packed (no padding rows; ``attention_varlen``),
  reference_packed  backend 'auto' / 'reference': what packing saves over the padded row above
  nn_compile  the nn_eager module under torch.compile (the loss included; AdamW stays eager)
Tokens/s counts the non-padding source and target tokens of the batch per second of a step, so
padded and packed rows of the same batch compare directly.

Precision, per case: "autocast <dtype>" keeps fp32 weights and runs the step under torch.autocast
(the Trainer's mixed precision); "<dtype> weights" holds the model itself in that dtype (not with
--quick, which measures autocast only); fp32: neither. Each row notes the dtypes its matrix
products wrote in one forward (a dispatch-mode probe), since a custom op that autocast does not
reach runs in its inputs' dtype; the report notes rows that computed in another dtype than nn_eager.

Before timing, each eager row's eval-mode loss (no dropout) must match nn_eager's (same weights),
and every row's first training step must give a finite loss within 10% of nn_eager's.

On a CPU a smaller model stands in for the base model (d_model 256 and a ~4k-token batch, or a
tiny one with --quick); auto is the native backend there, and the torch.compile row needs a GPU.

    python -m transformer_kernels.bench.bench_training [--quick] [--dtype bf16 ...] [--batch B]
                                                       [--max-len L] [--out DIR]
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import transformer_kernels as tk
from transformer_kernels.models import EncoderDecoder, TransformerConfig
from transformer_kernels.nn import Packed

from .common import (
    Report,
    autotune,
    chosen_dtypes,
    default_device,
    label,
    peak_mib,
    standalone_parser,
    time_steps_ms,
)

LABEL_SMOOTHING = 0.1
IMPLS = (  # the slowest to start (compiling) last
    "nn_eager",
    "auto",
    "auto_packed",
    "reference",
    "reference_packed",
    "nn_compile",
)
PACKED = "_packed"  # an impl name's suffix: the package model on the batch packed

# (device type, quick) -> (model name, sizes, shared vocabulary, batch size, max length, warm-up steps,
# timed steps). The GPU batch is the paper's (about 25000 source + 25000 target tokens); lengths are uniform in
# [L/2, L], each batch padded to its longest sentence.
BASE = dict(d_model=512, nhead=8, dim_feedforward=2048, num_encoder_layers=6, num_decoder_layers=6)
SETTINGS = {
    ("cuda", False): ("base", BASE, 37000, 512, 64, 5, 20),
    ("cuda", True): ("base", BASE, 37000, 256, 64, 3, 10),
    ("cpu", False): (
        "cpu-small",
        dict(d_model=256, nhead=4, dim_feedforward=1024, num_encoder_layers=3, num_decoder_layers=3),
        8000,
        96,
        32,
        2,
        7,
    ),
    ("cpu", True): (
        "cpu-tiny",
        dict(d_model=64, nhead=4, dim_feedforward=256, num_encoder_layers=1, num_decoder_layers=1),
        500,
        8,
        16,
        1,
        3,
    ),
}


@dataclass
class Batch:
    src: torch.Tensor  # [B, S], pad_id after each sentence
    tgt_in: torch.Tensor  # [B, T]: bos, y_1 .. y_{n-1}
    tgt_out: torch.Tensor  # [B, T]: y_1 .. y_{n-1}, eos
    tokens: int  # non-padding source + target tokens

    def packed(self, pad_id: int) -> tuple[Packed, Packed, Packed]:
        """(src, tgt_in, tgt_out) of the same sentences, packed: no padding token."""
        src_lengths = (self.src != pad_id).sum(1).tolist()
        tgt_lengths = (self.tgt_out != pad_id).sum(1).tolist()
        tgt_in = Packed.from_padded(self.tgt_in, tgt_lengths)
        return (
            Packed.from_padded(self.src, src_lengths),
            tgt_in,
            tgt_in.replace(Packed.from_padded(self.tgt_out, tgt_lengths).data),
        )


def make_batch(b: int, max_len: int, vocab: int, c: TransformerConfig, device, seed: int = 0) -> Batch:
    """Random sentences (token ids above the specials) of lengths uniform in [max_len/2, max_len]."""
    g = torch.Generator().manual_seed(seed)
    first = max(c.pad_id, c.bos_id, c.eos_id) + 1
    src_len, tgt_len = (torch.randint(max_len // 2, max_len + 1, (b,), generator=g) for _ in range(2))
    pos_s, pos_t = torch.arange(int(src_len.max()))[None], torch.arange(int(tgt_len.max()))[None]
    src = torch.randint(first, vocab, (b, pos_s.shape[1]), generator=g).masked_fill(pos_s >= src_len[:, None], c.pad_id)
    words = torch.randint(first, vocab, (b, pos_t.shape[1]), generator=g)
    tgt_pad = pos_t >= tgt_len[:, None]
    tgt_out = torch.where(pos_t == tgt_len[:, None] - 1, c.eos_id, words).masked_fill(tgt_pad, c.pad_id)
    tgt_in = torch.cat([torch.full((b, 1), c.bos_id), words[:, :-1]], 1).masked_fill(tgt_pad, c.pad_id)
    tokens = int(src_len.sum() + tgt_len.sum())
    return Batch(src.to(device), tgt_in.to(device), tgt_out.to(device), tokens)


class TorchTransformer(torch.nn.Module):
    """The package model's computation on ``torch.nn.Transformer``, with the same parameters
    (copied from ``ours``); ``forward`` returns the label-smoothed loss."""

    def __init__(self, ours: EncoderDecoder):
        super().__init__()
        c = self.config = ours.config
        p = next(ours.parameters())
        kw = dict(
            d_model=c.d_model,
            nhead=c.nhead,
            dim_feedforward=c.dim_feedforward,
            dropout=c.dropout,
            activation=c.activation,
            batch_first=True,
            norm_first=c.norm_first,
            device=p.device,
            dtype=p.dtype,
        )
        encoder = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(**kw), c.num_encoder_layers, enable_nested_tensor=False
        )
        decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(**kw), c.num_decoder_layers)
        self.transformer = torch.nn.Transformer(
            c.d_model,
            c.nhead,
            custom_encoder=encoder,
            custom_decoder=decoder,
            batch_first=True,
            device=p.device,
            dtype=p.dtype,
        )
        encoder.load_state_dict(ours.encoder.state_dict())
        decoder.load_state_dict(ours.decoder.state_dict())
        self.src_embed, self.tgt_embed = copy.deepcopy((ours.src_embed, ours.tgt_embed))  # keeps a shared table shared
        self.dropout = torch.nn.Dropout(c.dropout)
        self.register_buffer("positions", ours.positions.clone(), persistent=False)

    def embed(self, tokens, table):
        x = table(tokens) * math.sqrt(self.config.d_model) + self.positions[: tokens.shape[1]].to(table.weight.dtype)
        return self.dropout(x)

    def forward(self, src, tgt_in, tgt_out):
        c = self.config
        length = tgt_in.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)
        hidden = self.transformer(
            self.embed(src, self.src_embed),
            self.embed(tgt_in, self.tgt_embed),
            tgt_mask=causal,
            src_key_padding_mask=src == c.pad_id,
            tgt_key_padding_mask=tgt_in == c.pad_id,
            memory_key_padding_mask=src == c.pad_id,
            tgt_is_causal=True,
        )
        logits = F.linear(hidden, self.tgt_embed.weight)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt_out.reshape(-1),
            ignore_index=c.pad_id,
            label_smoothing=LABEL_SMOOTHING,
        )


class _MatmulDtypes(TorchDispatchMode):
    """Counts the dtypes of the outputs of matrix products and attention one call writes (aten's
    and the package's custom ops alike): the precision a row really computes in."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name().split("::")[-1]
        if "mm" in name or "linear" in name or "ffn" in name or "attention" in name:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                self.counts[label(first.dtype)] += 1
        return out

    def summary(self) -> str:
        return "matmuls in " + ", ".join(f"{n} {dt}" for dt, n in self.counts.most_common())

    def dominant(self) -> str | None:
        return self.counts.most_common(1)[0][0] if self.counts else None


@dataclass
class Measured:
    ms: float  # median per step
    peak: float | None  # MiB, GPU only
    note: str
    eval_loss: float | None  # eval mode, no dropout (None for nn_compile)
    first_loss: float  # of the first training step
    compute_dtype: str | None  # the dtype most matmuls wrote (None for nn_compile)


def _precisions(dtype: torch.dtype, quick: bool) -> list[tuple[str, torch.dtype | None, torch.dtype]]:
    """(case label, autocast dtype or None, parameter dtype) for each precision of the sweep."""
    if dtype == torch.float32:
        return [("fp32", None, torch.float32)]
    autocast = (f"autocast {label(dtype)}", dtype, torch.float32)
    return [autocast] if quick else [autocast, (f"{label(dtype)} weights", None, dtype)]


def _row(impl: str, init: EncoderDecoder, param_dtype: torch.dtype, device: torch.device):
    """(module, loss function of (src, tgt_in, tgt_out), backend scope) of one row, from ``init``'s weights."""
    if impl.startswith("nn_"):
        module = TorchTransformer(init).to(param_dtype)
        return module, torch.compile(module) if impl == "nn_compile" else module, contextlib.nullcontext
    module = copy.deepcopy(init).to(param_dtype)

    def loss(src, tgt_in, tgt_out):
        return module.loss(src, tgt_in, tgt_out, label_smoothing=LABEL_SMOOTHING)

    return module, loss, lambda: tk.use_backend(impl.removesuffix(PACKED))


def measure_row(impl, init, batch, param_dtype, amp_dtype, device, warmup, repeats, base: Measured | None) -> Measured:
    """One row: the checks against ``base`` (nn_eager's row, if measured), then the timing."""
    module, loss_fn, scope = _row(impl, init, param_dtype, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    args = batch.packed(init.config.pad_id) if impl.endswith(PACKED) else (batch.src, batch.tgt_in, batch.tgt_out)
    notes = []
    tol = 1e-3 if (amp_dtype or param_dtype) == torch.float32 else 5e-2

    eval_loss, compute_dtype = None, None
    if impl != "nn_compile":  # compiling eval mode too would double the compile time
        module.eval()
        probe = _MatmulDtypes()
        with torch.no_grad(), scope(), amp(), probe:
            eval_loss = float(loss_fn(*args))
        module.train()
        notes.append(probe.summary())
        compute_dtype = probe.dominant()
        if base and abs(eval_loss - base.eval_loss) > tol * abs(base.eval_loss):
            raise AssertionError(
                f"eval loss {eval_loss:.4f} differs from nn_eager's {base.eval_loss:.4f} by more than {tol:.0%}"
            )

    def step():
        opt.zero_grad(set_to_none=True)
        with scope(), amp():
            loss = loss_fn(*args)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    t0 = time.perf_counter()
    first = float(step().detach())
    if impl == "nn_compile":
        notes.append(f"first step (compiling) {time.perf_counter() - t0:.0f} s")
    if not math.isfinite(first):
        raise AssertionError(f"first training step gave loss {first}")
    if base and abs(first - base.first_loss) > 0.1 * abs(base.first_loss):
        raise AssertionError(
            f"first training step loss {first:.4f} is not within 10% of nn_eager's {base.first_loss:.4f}"
        )
    ms = time_steps_ms(step, device, warmup=warmup, repeats=repeats)
    opt.zero_grad(set_to_none=True)
    peak = peak_mib(step, device)
    return Measured(ms, peak, "; ".join(notes), eval_loss, first, compute_dtype)


def _precision_notes(precision: str, rows: dict[str, Measured]) -> list[str]:
    """A note for each row whose matmuls ran in another dtype than nn_eager's: not the same work."""
    base = rows.get("nn_eager")
    if base is None:
        return [f"{precision}: nn_eager failed, so the other rows were not checked against it"]
    return [
        f"{precision}: {impl} computed its matmuls mostly in {m.compute_dtype}, nn_eager in {base.compute_dtype} "
        "(see each row's note)"
        for impl, m in rows.items()
        if m.compute_dtype and base.compute_dtype and m.compute_dtype != base.compute_dtype
    ]


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    batch_size: int | None = None,
    max_len: int | None = None,
) -> list[Report]:
    device = device or default_device()
    on_gpu = device.type == "cuda"
    dtypes = dtypes or [torch.bfloat16 if on_gpu else torch.float32]
    model_name, sizes, vocab, b, length, warmup, repeats = SETTINGS[(device.type, quick)]
    b, length = batch_size or b, max_len or length
    config = TransformerConfig(vocab, vocab, **sizes, share_all_embeddings=True, max_positions=length + 1)
    batch = make_batch(b, length, vocab, config, device)

    counts = (
        f"tokens/s = non-padding source + target tokens ({batch.tokens}) per training step (forward, backward, "
        f"AdamW step); model {model_name}: d_model {config.d_model}, {config.num_encoder_layers}+"
        f"{config.num_decoder_layers} layers, {config.nhead} heads, d_ff {config.dim_feedforward}, shared "
        f"vocabulary {vocab}, dropout {config.dropout}, label smoothing {LABEL_SMOOTHING}; batch {b} "
        f"sentence pairs of lengths uniform in [{length // 2}, {length}]; median of {repeats} steps after "
        f"{warmup} warm-up steps; peak memory above the parameters and optimizer state"
    )
    report = Report("bench_training", counts, str(device), unit="tokens/s", baseline="nn_eager", panels=["precision"])
    if not on_gpu:
        report.notes.append(
            "CPU: a smaller model stands in for the paper's base model, which needs a GPU; "
            "auto runs the native backend; nn_compile needs a GPU (compiling takes minutes on a CPU)"
        )
    for dt in dtypes:
        for precision, amp_dtype, param_dtype in _precisions(dt, quick):
            torch.manual_seed(0)
            init = EncoderDecoder(config, device)
            timings, peaks, notes = {}, {}, {}
            rows: dict[str, Measured] = {}
            for impl in IMPLS:
                timings[impl] = peaks[impl] = None
                if not on_gpu and impl == "nn_compile":
                    notes[impl] = "needs a CUDA device (on a CPU, compiling takes minutes)"
                    continue
                try:
                    with autotune(not quick):
                        rows[impl] = measure_row(
                            impl, init, batch, param_dtype, amp_dtype, device, warmup, repeats, rows.get("nn_eager")
                        )
                except Exception as e:  # noqa: BLE001 -- a failing row is reported, the others still run
                    notes[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    report.errors.append(f"{precision} {impl}: {notes[impl]}")
                else:
                    timings[impl], peaks[impl], notes[impl] = rows[impl].ms, rows[impl].peak, rows[impl].note
                if on_gpu:  # the row's model, optimizer state and compiled graphs are gone: free them
                    torch._dynamo.reset()
                    torch.cuda.empty_cache()
            report.notes += _precision_notes(precision, rows)
            report.add_case(
                {"model": model_name, "precision": precision, "B": b, "tokens": batch.tokens},
                timings,
                batch.tokens,
                baseline="nn_eager",
                notes=notes,
                peaks=peaks,
            )
            del init
    return [report]


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(
        __doc__,
        "a smaller batch, fewer steps",
        dtype_help="bf16/fp16: autocast and weights in that dtype; fp32: neither (default bf16 on a GPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help="sentence pairs per batch")
    parser.add_argument("--max-len", type=int, default=None, help="longest sentence, in tokens")
    args = parser.parse_args(argv)
    reports = run(args.quick, chosen_dtypes(args), batch_size=args.batch, max_len=args.max_len)
    return publish(reports, args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
