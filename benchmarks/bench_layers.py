"""Benchmark of the drop-in layers and of incremental decoding.

Layers: one encoder layer and one decoder layer, post-LN, dropout 0.1, a key padding mask (10% of
the keys padded, as in batches of real sentences), bf16:
  eager    torch.nn.TransformerEncoderLayer / DecoderLayer       (the baseline)
  compile  torch.compile of the torch.nn layer
  ours     transformer_kernels.nn's layer (backend auto)
for a training step (forward + backward, train mode) and an inference forward (eval mode), in
tokens/s and peak memory.

Decoding: greedy decoding with the KV cache against recomputing the whole prefix each step,
on the package's model (random weights; EOS disabled so every run makes the same number of steps).

    python benchmarks/bench_layers.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformer_kernels as tk  # noqa: E402
from common import Report, peak_mib, time_ms  # noqa: E402
from transformer_kernels.models import build_model, greedy_decode  # noqa: E402

COUNTS = "tokens per call: B*L for the layers (B*L target tokens for the decoder layer), B*steps for decoding"


def make_layers(kind: str, d: int, device, dtype):
    """(eager torch layer, ours) with the same weights."""
    cls = "TransformerEncoderLayer" if kind == "encoder" else "TransformerDecoderLayer"
    kw = dict(d_model=d, nhead=d // 64, dim_feedforward=4 * d, dropout=0.1, batch_first=True, device=device,
              dtype=dtype)
    theirs = getattr(torch.nn, cls)(**kw)
    ours = getattr(tk.nn, cls)(**kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def layer_case(kind, d, length, tokens, dtype, device, quick):
    b = max(tokens // length, 1)
    theirs, ours = make_layers(kind, d, device, dtype)
    impls = {"eager": theirs, "ours": ours}
    if device.type == "cuda":
        torch._dynamo.reset()
        impls["compile"] = torch.compile(theirs)
    x = torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True)
    kpm = torch.zeros(b, length, dtype=torch.bool, device=device)
    kpm[:, int(length * 0.9):] = True
    if kind == "encoder":
        def call(m):
            return m(x, src_key_padding_mask=kpm)
    else:
        memory = torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True)

        def call(m):
            return m(x, memory, tgt_is_causal=True, tgt_mask=causal, memory_key_padding_mask=kpm)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(length, device=device, dtype=dtype)
    g = torch.randn(b, length, d, device=device, dtype=dtype)
    timings = {"train": {}, "infer": {}}
    peaks = {"train": {}, "infer": {}}
    for name, m in impls.items():
        m.train()
        step = lambda m=m: call(m).backward(g)  # noqa: E731
        timings["train"][name] = time_ms(step, device, quick=quick)
        peaks["train"][name] = peak_mib(step, device)
        m.eval()
        with torch.no_grad():
            timings["infer"][name] = time_ms(lambda m=m: call(m), device, quick=quick)
            peaks["infer"][name] = peak_mib(lambda m=m: call(m), device)
    return b, timings, peaks


def decode_case(preset, batch, src_len, steps, device, dtype, quick):
    torch.manual_seed(0)
    model = build_model(preset, 1000, 1000, device=device, dtype=dtype, eos_id=-1, max_positions=src_len + steps + 1)
    src = torch.randint(3, 1000, (batch, src_len), device=device)
    timings = {
        "recompute": time_ms(lambda: greedy_decode(model, src, max_len=steps, use_cache=False), device, quick=quick),
        "kv_cache": time_ms(lambda: greedy_decode(model, src, max_len=steps), device, quick=quick),
    }
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if on_gpu:
        dtype, tokens = torch.bfloat16, (8192 if args.quick else 16384)
        shapes = [(512, 512), (1024, 2048)] if args.quick else [(d, L) for d in (512, 1024) for L in (512, 2048)]
        decode = ("base", 32, 64, 64)
    else:
        dtype, tokens, shapes, decode = torch.float32, 64, [(64, 16)], ("tiny", 4, 8, 8)

    layers = Report("bench_layers", COUNTS, unit="tokens/s", baseline="eager")
    for kind in ("encoder", "decoder"):
        for d, length in shapes:
            b, timings, peaks = layer_case(kind, d, length, tokens, dtype, device, args.quick)
            for p in ("train", "infer"):
                notes = {n: f"peak {v:.0f} MiB" for n, v in peaks[p].items() if v is not None}
                layers.add_case({"layer": kind, "d": d, "L": length, "B": b, "pass": p}, timings[p], b * length,
                                baseline="eager", notes=notes)
    preset, batch, src_len, steps = decode
    decoding = Report("bench_decoding", COUNTS, unit="tokens/s", baseline="recompute")
    decoding.add_case({"model": preset, "B": batch, "src_len": src_len, "steps": steps},
                      decode_case(preset, batch, src_len, steps, device, dtype, args.quick), batch * steps,
                      baseline="recompute")
    for report in (layers, decoding):
        report.write(args.out)
        print(report.markdown() + "\n")
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
