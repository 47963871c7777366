"""Benchmark of Hugging Face transformers models: a training step and generate(), per architecture.

Each architecture is built from a random config (no download) in three ways, same weights:
  sdpa     transformers as it comes, attn_implementation="sdpa"                   (the baseline)
  ours     transformer_kernels.hf.apply_transformer_kernels(model): fused attention, norms,
           residual adds, MLPs and (training) the LM head + loss as linear_cross_entropy
  liger    Liger-Kernel's apply_liger_kernel_to_<model> where it supports the model (Llama, Qwen2)
           and a CUDA device is there; it patches transformers' classes process-wide, so it runs
           last, once per architecture
Training step: forward + backward + AdamW step, with labels, train mode (dropout on where the
config has it), tokens/s of target tokens. generate(): greedy, a fixed number of new tokens
(EOS off), tokens/s of generated tokens. GPU: base-size configs in bf16; CPU: tiny configs in fp32
(a smoke run: the CPU runs the reference ops).

    python -m transformer_kernels.bench.bench_hf [--quick] [--dtype bf16 ...] [--out DIR]
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

import torch

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

COUNTS = "tokens per call: B*L target tokens for a training step, B*new tokens for generate()"
LIGER = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2"}


def configs(device: torch.device) -> dict:
    """model_type -> (model class name, config class name, config kwargs): base sizes on a GPU, tiny on a CPU."""
    gpu = device.type == "cuda"
    d, layers, heads, ffn, vocab = (768, 6, 12, 3072, 32000) if gpu else (32, 2, 2, 48, 101)
    seq2seq = dict(
        vocab_size=vocab,
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        max_position_embeddings=1024,
    )
    whisper = {k: v for k, v in seq2seq.items() if k != "max_position_embeddings"}
    whisper.update(num_mel_bins=80 if gpu else 8, max_source_positions=1500 if gpu else 16, max_target_positions=448)
    decoder = dict(
        vocab_size=vocab,
        hidden_size=2048 if gpu else 32,
        intermediate_size=5632 if gpu else 48,
        num_hidden_layers=16 if gpu else 2,
        num_attention_heads=32 if gpu else 4,
        num_key_value_heads=8 if gpu else 2,
        max_position_embeddings=4096,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return {
        "marian": ("MarianMTModel", "MarianConfig", seq2seq),
        "bart": ("BartForConditionalGeneration", "BartConfig", seq2seq),
        "whisper": ("WhisperForConditionalGeneration", "WhisperConfig", whisper),
        "bert": (
            "BertForMaskedLM",
            "BertConfig",
            dict(
                vocab_size=vocab,
                hidden_size=d,
                num_hidden_layers=layers * 2,
                num_attention_heads=heads,
                intermediate_size=ffn,
            ),
        ),
        "llama": ("LlamaForCausalLM", "LlamaConfig", decoder),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", decoder),
    }


def build(arch: str, impl: str, device, dtype, state=None):
    import transformers

    from transformer_kernels.hf import apply_transformer_kernels

    model_cls, config_cls, kw = configs(device)[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(
        getattr(transformers, config_cls)(**kw), attn_implementation="sdpa", dtype=dtype
    )
    model.to(device)
    if state is not None:
        model.load_state_dict(state)
    if impl == "ours":
        apply_transformer_kernels(model)
    elif impl == "liger":
        import liger_kernel.transformers as liger

        getattr(liger, LIGER[arch])(model=model)
    return model


def make_batch(arch: str, b: int, length: int, device, dtype) -> dict:
    """Inputs with labels for a training step (source and target of length L; Whisper: its audio frames)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (b, length), generator=g).to(device)
    if arch == "whisper":
        cfg = configs(device)["whisper"][2]
        feats = torch.randn(b, cfg["num_mel_bins"], 2 * cfg["max_source_positions"], generator=g)
        return dict(input_features=feats.to(device, dtype), labels=ids[:, : min(length, 256)])  # its max is 448
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def train_ms(model, batch, device, quick) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return time_steps_ms(step, device, warmup=1 if quick else 3, repeats=3 if quick else 10)


def generate_ms(model, batch, new_tokens, device, quick) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()

    def gen():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    return time_steps_ms(gen, device, warmup=1, repeats=2 if quick else 5)


def run(
    quick: bool = False, dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None
) -> list[Report]:
    import transformer_kernels.hf  # noqa: F401  (registers the attention backend)

    device = device or default_device()
    if device.type == "cuda":
        dtypes = dtypes or [torch.bfloat16]
        b, length, new_tokens = (4, 256, 32) if quick else (8, 512, 64)
    else:
        dtypes, (b, length, new_tokens) = dtypes or [torch.float32], (2, 16, 4)
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    reports = {
        p: Report(f"bench_hf_{p}", COUNTS, str(device), unit="tokens/s", baseline="sdpa", panels=["pass", "dtype"])
        for p in ("train", "generate")
    }
    with autotune(not quick):
        for dt in dtypes:
            for arch in configs(device):
                batch = make_batch(arch, b, length, device, dt)
                timings = {"train": {}, "generate": {}}
                peaks, notes = {}, {}
                state = None
                for impl in ("sdpa", "ours", "liger"):
                    if impl == "liger":
                        reason = (
                            "liger-kernel is not installed"
                            if not has_liger
                            else f"Liger-Kernel has no patch for {arch}"
                            if arch not in LIGER
                            else "Liger-Kernel's Triton kernels need a CUDA device"
                            if device.type != "cuda"
                            else None
                        )
                        if reason:
                            notes[impl] = reason
                            for per_pass in timings.values():
                                per_pass[impl] = None
                            continue
                    model = build(arch, impl, device, dt, state)
                    state = state or {k: v.detach().clone() for k, v in model.state_dict().items()}
                    timings["train"][impl] = train_ms(model, batch, device, quick)
                    peaks[impl] = peak_mib(lambda m=model, batch=batch: m(**batch).loss.backward(), device)
                    if arch == "bert":  # an encoder: nothing to generate
                        timings["generate"][impl] = None
                        notes[impl] = notes.get(impl, "") or "encoder-only: no generate()"
                    else:
                        timings["generate"][impl] = generate_ms(model, batch, new_tokens, device, quick)
                    del model
                for p, work in (("train", batch["labels"].numel()), ("generate", b * new_tokens)):
                    case = {"model": arch, "pass": p, "dtype": label(dt), "B": b, "L": length}
                    if p == "generate":
                        case["new"] = new_tokens
                    reports[p].add_case(
                        case, timings[p], work, baseline="sdpa", notes=notes, peaks=peaks if p == "train" else None
                    )
    return list(reports.values())


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__, None)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args)), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
