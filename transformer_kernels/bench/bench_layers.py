"""Benchmark of the drop-in layers and of incremental decoding.

Layers: one encoder layer and one decoder layer, post-LN, dropout 0.1, a key padding mask (10% of
the keys padded, as in batches of real sentences), bf16 (fp32 on a CPU, at 4096 tokens without --quick):
  eager    torch.nn.TransformerEncoderLayer / DecoderLayer       (the baseline)
  compile  torch.compile of the torch.nn layer
  ours     transformer_kernels.nn's layer (backend auto; Triton tiles autotuned, except with --quick)
for a training step (forward + backward, train mode) and an inference forward (eval mode), in
tokens/s and peak memory.

Decoding: greedy decoding with the KV cache against recomputing the whole prefix each step,
on the package's model (random weights; EOS disabled so every run makes the same number of steps).

    python -m transformer_kernels.bench.bench_layers [--quick] [--dtype bf16 ...] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

import transformer_kernels as tk
from transformer_kernels.models import build_model, greedy_decode

from .common import (
    Report,
    autotune,
    chosen_dtypes,
    default_device,
    input_sets,
    label,
    peak_mib,
    standalone_parser,
    time_ms,
)

COUNTS = "tokens per call: B*L for the layers (B*L target tokens for the decoder layer), B*steps for decoding"


def make_layers(kind: str, d: int, device, dtype, dropout: float = 0.1):
    """(eager torch layer, ours) with the same weights."""
    cls = "TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer"
    kw = dict(
        d_model=d, nhead=d // 64, dim_feedforward=4 * d, dropout=dropout, batch_first=True, device=device, dtype=dtype
    )
    theirs = getattr(torch.nn, cls)(**kw)
    ours = getattr(tk.nn, cls)(**kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_inputs(b, length, d, dtype, device, seed):
    """(x, memory, dout), random; memory is the decoder layer's encoder output."""
    torch.manual_seed(seed)
    x, memory = (torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    return x, memory, torch.randn(b, length, d, device=device, dtype=dtype)


def layer_masks(b, length, device, dtype):
    """(key padding mask with 10% of the keys padded, the decoder's causal mask) of a layer case."""
    kpm = torch.zeros(b, length, dtype=torch.bool, device=device)
    kpm[:, int(length * 0.9) :] = True
    return kpm, torch.nn.Transformer.generate_square_subsequent_mask(length, device=device, dtype=dtype)


def call_layer(kind, m, x, memory, kpm, causal):
    """One forward of an encoder layer (self-attention over padded keys) or a decoder layer (causal
    self-attention, cross-attention to ``memory`` over padded keys)."""
    if kind == "encoder":
        return m(x, src_key_padding_mask=kpm)
    return m(x, memory, tgt_is_causal=True, tgt_mask=causal, memory_key_padding_mask=kpm)


def layer_case(kind, d, length, tokens, dtype, device, quick):
    b = max(tokens // length, 1)
    theirs, ours = make_layers(kind, d, device, dtype)
    impls = {"eager": theirs, "ours": ours}
    if device.type == "cuda":
        torch._dynamo.reset()
        impls["compile"] = torch.compile(theirs)
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(lambda seed: make_inputs(b, length, d, dtype, device, seed), device, 3 * b * length * d * elt)
    kpm, causal = layer_masks(b, length, device, dtype)

    def call(m, x, memory):
        return call_layer(kind, m, x, memory, kpm, causal)

    timings = {"train": {}, "infer": {}}
    peaks = {"train": {}, "infer": {}}
    for name, m in impls.items():
        m.train()

        def step(x, memory, g, m=m):
            call(m, x, memory).backward(g)

        timings["train"][name] = time_ms(step, device, quick=quick, inputs=sets)
        peaks["train"][name] = peak_mib(lambda: step(*sets[0]), device)
        m.eval()
        with torch.no_grad():
            timings["infer"][name] = time_ms(
                lambda x, memory, g, m=m: call(m, x, memory), device, quick=quick, inputs=sets
            )
            peaks["infer"][name] = peak_mib(lambda m=m: call(m, *sets[0][:2]), device)
    return b, timings, peaks


def decode_case(preset, batch, src_len, steps, device, dtype, quick):
    torch.manual_seed(0)
    model = build_model(preset, 1000, 1000, device=device, dtype=dtype, eos_id=-1, max_positions=src_len + steps + 1)
    sets = input_sets(
        lambda seed: (torch.randint(3, 1000, (batch, src_len), device=device),), device, batch * src_len * 8
    )
    timings = {
        "recompute": time_ms(
            lambda src: greedy_decode(model, src, max_len=steps, use_cache=False), device, quick=quick, inputs=sets
        ),
        "kv_cache": time_ms(lambda src: greedy_decode(model, src, max_len=steps), device, quick=quick, inputs=sets),
    }
    return timings


def run(
    quick: bool = False, dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None
) -> list[Report]:
    device = device or default_device()
    if device.type == "cuda":
        dtypes, tokens = dtypes or [torch.bfloat16], (8192 if quick else 16384)
        shapes = [(512, 1024)] if quick else [(d, L) for d in (512, 1024) for L in (512, 2048)]
        decode = ("base", 32, 64, 64)
    else:
        dtypes = dtypes or [torch.float32]
        tokens, shapes = (64, [(64, 16)]) if quick else (4096, [(256, 32), (512, 128)])
        decode = ("tiny", 2, 8, 4) if quick else ("tiny", 4, 8, 8)

    layers = Report(
        "bench_layers",
        COUNTS,
        str(device),
        unit="tokens/s",
        baseline="eager",
        x="L",
        panels=["layer", "dtype", "d", "pass"],
    )
    decoding = Report(
        "bench_decoding",
        COUNTS,
        str(device),
        unit="tokens/s",
        baseline="recompute",
        panels=["model", "dtype", "B", "steps"],
    )
    with autotune(not quick):
        for dt in dtypes:
            for kind in ("encoder", "decoder"):
                for d, length in shapes:
                    b, timings, peaks = layer_case(kind, d, length, tokens, dt, device, quick)
                    for p in ("train", "infer"):
                        case = {"layer": kind, "dtype": label(dt), "d": d, "L": length, "B": b, "pass": p}
                        layers.add_case(case, timings[p], b * length, baseline="eager", peaks=peaks[p])
            preset, batch, src_len, steps = decode
            decoding.add_case(
                {"model": preset, "dtype": label(dt), "B": batch, "src_len": src_len, "steps": steps},
                decode_case(preset, batch, src_len, steps, device, dt, quick),
                batch * steps,
                baseline="recompute",
            )
    return [layers, decoding]


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__, None)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args)), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
