"""Hugging Face transformers models through this package: the attention backend and model patching,
against transformers' own eager path with the same weights (tiny random configs, nothing downloaded)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close_to_reference, device, kernel_backends, seed_for

transformers = pytest.importorskip("transformers")

import transformer_kernels as tk  # noqa: E402
import transformer_kernels.hf as tkhf  # noqa: E402
from transformer_kernels.hf import apply_transformer_kernels  # noqa: E402
from transformer_kernels.hf import attention as hf_attention  # noqa: E402
from transformer_kernels.ops.attention import OP as ATTENTION  # noqa: E402

# The kernels where they run (the Triton interpreter on a CPU), else the reference backend.
BACKEND = "triton" if "triton" in kernel_backends(ATTENTION) else "reference"
VOCAB = 101
ARCHS = ["marian", "bart", "whisper", "bert", "llama"]
SEQ2SEQ = ["marian", "bart", "mbart", "whisper"]
PATCHED = ARCHS + ["mbart", "qwen2"]


def _config(arch: str):
    """A tiny random config: 2 layers, hidden 32, FFN 48, no dropout (so runs compare). Few heads: the
    Triton interpreter's time grows with the number of programs, batch x heads."""
    t = transformers
    seq2seq = dict(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    if arch == "marian":
        return t.MarianMTModel, t.MarianConfig(max_position_embeddings=64, **seq2seq)
    if arch == "bart":
        return t.BartForConditionalGeneration, t.BartConfig(max_position_embeddings=64, **seq2seq)
    if arch == "mbart":  # pre-LN
        return t.MBartForConditionalGeneration, t.MBartConfig(max_position_embeddings=64, **seq2seq)
    if arch == "whisper":
        cfg = t.WhisperConfig(num_mel_bins=8, max_source_positions=16, max_target_positions=32, **seq2seq)
        return t.WhisperForConditionalGeneration, cfg
    if arch == "bert":
        cfg = t.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=64,
        )
        return t.BertModel, cfg
    if arch in ("llama", "qwen2"):  # GQA: 4 query heads over 2 key/value heads
        cls, config = (t.LlamaForCausalLM, t.LlamaConfig) if arch == "llama" else (t.Qwen2ForCausalLM, t.Qwen2Config)
        cfg = config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        return cls, cfg
    raise ValueError(arch)


def _model(arch: str, attn: str, dtype=torch.float32, seed: int = 0):
    """The architecture with ``attn`` as attention implementation; the same weights for the same seed
    (norms and biases perturbed away from ones/zeros so every parameter tells in the outputs)."""
    cls, cfg = _config(arch)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device=device(), dtype=dtype)


def _inputs(arch: str, seed: int, batch: int = 2, length: int = 9) -> dict:
    """Inputs with right padding (no query row sees no key), decoder inputs shorter than the source."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0
    dec = torch.randint(3, VOCAB, (batch, length - 2), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, -2:] = 0
    if arch == "whisper":
        feats = torch.randn(batch, 8, 32, generator=g)
        kw = dict(input_features=feats, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    elif arch in SEQ2SEQ:
        kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    else:
        kw = dict(input_ids=ids, attention_mask=mask)
    return {k: v.to(device()) for k, v in kw.items()}


def _output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records (causal, has key padding, dropout_p, Lq) of every call that reaches the kernel."""
    calls = []
    real = hf_attention.attention

    def spy(q, k, v, **kw):
        calls.append((kw["causal"], kw["key_padding_mask"] is not None, kw["dropout_p"], q.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf_attention, "attention", spy)
    tk.nn.reset_fallback_counts()
    return calls


def test_import_is_lazy():
    code = "import sys, transformer_kernels; assert 'transformers' not in sys.modules, 'imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_is_idempotent_and_named():
    assert tkhf.register() == tkhf.NAME == tkhf.register()
    assert tkhf.NAME in transformers.AttentionInterface._global_mapping


# ---------------------------------------------------------------------------------------------
# The mask, read by value.


def _sdpa_mask(b, lq, lk, padding=None, causal=True, **kw):
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    fn = causal_mask_function if causal else bidirectional_mask_function
    return sdpa_mask(
        b, lq, lk, q_offset=lk - lq, mask_function=fn, attention_mask=padding, allow_is_causal_skip=False, **kw
    )


@pytest.mark.parametrize("lq, lk", [(5, 5), (1, 6), (3, 7), (17, 17)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_mask_kind_reads_causal_and_padding(lq, lk, causal, padded):
    padding = None
    if padded:
        padding = torch.ones(2, lk, dtype=torch.bool)
        padding[0, -2:] = False  # right padding
        padding[1, :2] = False  # left padding
    mask = _sdpa_mask(2, lq, lk, padding, causal)
    got_causal, kpm = hf_attention.mask_kind(mask, 2, lq, lk)
    assert got_causal == (causal and lq > 1)  # one query row: causal and not are the same mask
    if padded:
        assert torch.equal(kpm, ~padding)
    else:
        assert kpm is None
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert hf_attention.mask_kind(additive, 2, lq, lk)[0] == got_causal


def test_mask_kind_rejects_what_the_kernel_cannot_express():
    from transformers.masking_utils import sliding_window_causal_mask_function

    window = transformers.masking_utils.sdpa_mask(
        1, 8, 8, mask_function=sliding_window_causal_mask_function(3), allow_is_causal_skip=False
    )
    assert hf_attention.mask_kind(window, 1, 8, 8) is None
    bias = torch.randn(1, 1, 8, 8)  # an arbitrary additive bias
    assert hf_attention.mask_kind(bias, 1, 8, 8) is None
    top_left = torch.ones(1, 1, 3, 6, dtype=torch.bool).tril()  # causal aligned top-left, Lq != Lk
    assert hf_attention.mask_kind(top_left, 1, 3, 6) is None
    per_head = _sdpa_mask(1, 8, 8).expand(1, 4, 8, 8)  # a mask per head, even a causal one
    assert hf_attention.mask_kind(per_head, 1, 8, 8) is None


def _sdpa_call(q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


@pytest.mark.parametrize("lq, lk, hq, hkv", [(3, 7, 4, 2), (1, 17, 4, 1), (6, 6, 2, 2)])
def test_attention_forward_matches_sdpa_with_cache_and_gqa(lq, lk, hq, hkv, kernel_calls):
    """A decoding step over a KV cache (Lq < Lk, bottom-right causal), GQA, left padding."""
    torch.manual_seed(seed_for(lq, lk, hq, hkv))
    q = torch.randn(2, hq, lq, 8, device=device())
    k, v = (torch.randn(2, hkv, lk, 8, device=device()) for _ in range(2))
    padding = torch.ones(2, lk, dtype=torch.bool)
    padding[1, :2] = False
    mask = _sdpa_mask(2, lq, lk, padding).to(device())
    module = torch.nn.Module()
    module.is_causal = True
    with tk.use_backend(BACKEND):
        got = tkhf.attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    want = _sdpa_call(q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert kernel_calls == [(lq > 1, True, 0.0, lq)]


def test_unsupported_mask_and_position_bias_fall_back_to_sdpa_counted(kernel_calls):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 8, device=device()) for _ in range(3))
    module = torch.nn.Module()
    bias = torch.randn(1, 2, 8, 8, device=device())
    with pytest.warns(UserWarning, match="T5-style"):
        got = tkhf.attention_forward(module, q, k, v, None, position_bias=bias, is_causal=False)[0]
    torch.testing.assert_close(got, _sdpa_call(q, k, v, None, position_bias=bias, is_causal=False))
    additive = torch.randn(1, 1, 8, 8, device=device())
    with pytest.warns(UserWarning, match="other than causal"):
        got = tkhf.attention_forward(module, q, k, v, additive)[0]
    torch.testing.assert_close(got, _sdpa_call(q, k, v, additive))
    tkhf.attention_forward(module, q, k, v, additive)  # warned once, counted twice
    counts = tk.nn.fallback_counts()
    assert counts["attention: an additive position bias (T5-style)"] == 1
    assert counts["attention: an attention mask other than causal and/or key padding"] == 2
    assert kernel_calls == []


# ---------------------------------------------------------------------------------------------
# Whole models: the kernel's attention against transformers' eager attention.


def _generate(model, arch, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    if arch == "whisper":
        inputs = dict(input_features=torch.randn(2, 8, 32, generator=g))
    else:
        ids = torch.randint(3, VOCAB, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        # decoder-only models are padded on the left for generation, encoders on the right
        if arch == "llama":
            mask[1, :2] = 0
        else:
            mask[1, -2:] = 0
        inputs = dict(input_ids=ids, attention_mask=mask)
    inputs = {k: v.to(device()) for k, v in inputs.items()}
    return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kw)


GENERATE = [("marian", 1), ("whisper", 1), ("llama", 1), ("marian", 3), ("llama", 3)]


@pytest.mark.parametrize("arch, num_beams", GENERATE)
def test_generate_matches_eager(arch, num_beams, kernel_calls):
    """Greedy and beam search on the patched model give eager's tokens (fp32), through a KV cache."""
    seed = seed_for("generate", arch, num_beams)
    want = _generate(_model(arch, "eager").eval(), arch, seed, num_beams=num_beams)
    with tk.use_backend(BACKEND):
        got = _generate(_patched(arch, tkhf.NAME, torch.float32).eval(), arch, seed, num_beams=num_beams)
    assert torch.equal(got, want), f"{arch}: {got.tolist()} != {want.tolist()}"
    assert tk.nn.fallback_counts() == {}
    assert any(lq == 1 for *_, lq in kernel_calls), "no cached decoding step reached the kernel"


def _labels(kw):
    labels = kw.get("decoder_input_ids", kw.get("input_ids")).clone()
    labels[0, -1] = -100
    return labels


def _cast(model, kw):
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}


def _loss(model, arch, kw):
    if arch == "bert":
        out = model(**kw).last_hidden_state
        return (out * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)).pow(2).mean()
    return model(**kw, labels=_labels(kw)).loss


def _train(model, arch, kw, steps: int):
    """Every parameter gradient of the first step and the losses of ``steps`` AdamW steps."""
    kw = _cast(model, kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = _loss(model, arch, kw)
        loss.backward()
        if step == 0:
            grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return grads, torch.stack(losses)


def _check_runs(arch, make, kw, steps):
    """``make(attn, dtype)`` builds the model; the fp32 fast one is held to the rule against fp64 and fp32 eager:
    eval outputs, the first step's gradients, the training losses."""
    runs = []
    for attn, dtype in (("eager", torch.float64), ("eager", torch.float32), (tkhf.NAME, torch.float32)):
        with tk.use_backend(BACKEND if attn == tkhf.NAME else "auto"):
            model = make(attn, dtype)
            with torch.no_grad():
                out = _output(model.eval()(**_cast(model, kw)))
            runs.append((out, *_train(model.train(), arch, kw, steps)))
    (out64, grads64, losses64), (out32, grads32, losses32), (out, grads, losses) = runs
    assert_close_to_reference(f"{arch} output", out, out32, out64)
    for name, want in grads64.items():
        assert (grads[name] is None) == (want is None), f"{arch}: gradient of {name}"
        if want is not None:
            assert_close_to_reference(f"{arch} grad {name}", grads[name], grads32[name], want)
    assert_close_to_reference(f"{arch} losses", losses, losses32, losses64)


# The attention backend alone, on the encoder-only and the decoder-only model: the encoder-decoders'
# self- and cross-attention run through it in the patched-model and generate() tests below.
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_attention_backend_matches_eager(arch, kernel_calls):
    """attn_implementation="transformer_kernels": outputs, every gradient, a training step, by the error rule."""
    _check_runs(arch, lambda attn, dtype: _model(arch, attn, dtype), _inputs(arch, seed_for("attention", arch)), 1)
    assert tk.nn.fallback_counts() == {}
    assert any(causal for causal, *_ in kernel_calls) == (arch != "bert")
    assert any(padded for _, padded, *_ in kernel_calls)


def _patched(arch, attn, dtype):
    """The eager model, patched (attention included) for ``attn == "transformer_kernels"``."""
    model = _model(arch, "eager", dtype)
    if attn == tkhf.NAME:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = apply_transformer_kernels(model)
        # everything is fused but BertModel's loss: it has no LM head
        assert list(report.left) == (["loss (BertModel)"] if arch == "bert" else [])
        assert len(caught) == len(report.left)
        assert "attention" in report.fused
    return model


@pytest.mark.parametrize("arch", PATCHED)
def test_patched_model_matches_eager(arch):
    """apply_transformer_kernels: fused norms, residual adds, MLPs, attention and (in training) the LM-head
    loss; eval outputs, every gradient and two training steps' losses by the error rule."""
    _check_runs(arch, lambda attn, dtype: _patched(arch, attn, dtype), _inputs(arch, seed_for("patched", arch)), 2)
    assert tk.nn.fallback_counts() == {}


def test_attention_dropout_reaches_the_kernel_in_training(kernel_calls):
    cls, cfg = _config("bert")
    cfg.attention_probs_dropout_prob = 0.25
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=tkhf.NAME).to(device())
    kw = _inputs("bert", 0)
    with tk.use_backend(BACKEND):
        model.train()(**kw)
        assert kernel_calls and all(p == 0.25 for _, _, p, _ in kernel_calls)
        kernel_calls.clear()
        model.eval()(**kw)
        assert kernel_calls and all(p == 0.0 for _, _, p, _ in kernel_calls)


def test_patching_keeps_weights_and_keys_and_twice_is_harmless():
    model = _model("bart", "eager")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = apply_transformer_kernels(model)
    second = apply_transformer_kernels(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(map(len, first.fused.values())) > 0
    assert second.fused == {} and second.left == {}, f"the second call patched again: {second}"
    assert isinstance(model, transformers.BartForConditionalGeneration)
    reloaded = _model("bart", "eager")
    reloaded.load_state_dict(after)  # a patched model's checkpoint loads into an unpatched one


def test_unsupported_architecture_is_named():
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match=r"model type 't5' is not supported \(supported: bart, marian"):
        apply_transformer_kernels(model)


def test_unfused_activation_is_reported_and_still_correct(kernel_calls):
    """Marian's released checkpoints use SiLU ("swish") in the FFN: no fused_linear kernel, so the FFN is left
    (named in the report and a warning); the layers' norms, residual adds and attention are still fused."""
    cls, cfg = _config("marian")
    cfg.activation_function = "swish"
    torch.manual_seed(0)
    ref = cls._from_config(cfg, attn_implementation="eager").to(device()).eval()
    model = cls._from_config(cfg, attn_implementation="eager").to(device()).eval()
    model.load_state_dict(ref.state_dict())
    with pytest.warns(
        UserWarning, match="not fused: model.encoder.layers.0 .*FFN: activation SiLU has no fused kernel"
    ):
        report = apply_transformer_kernels(model)
    assert len(report.left) == 4 and len(report.fused["FusedPostLNEncoderLayer"]) == 2
    kw = _inputs("marian", 0)
    with tk.use_backend(BACKEND):
        got = _output(model(**kw))
    torch.testing.assert_close(got, _output(ref(**kw)), rtol=1e-5, atol=1e-5)
    assert kernel_calls


def test_torch_compile_after_patching():
    cls, cfg = _config("bert")
    cfg.num_hidden_layers = 1  # tracing is what this test checks, and it costs per layer
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").to(device()).eval()
    apply_transformer_kernels(model, loss=False)
    # Without padding transformers passes no mask: the graph is whole. (A padding mask is read by
    # value, a graph break, see transformer_kernels.hf.attention.)
    kw = {"input_ids": _inputs("bert", 0)["input_ids"]}
    torch._dynamo.reset()
    with tk.use_backend(BACKEND):
        want = _output(model(**kw))
        got = _output(torch.compile(model, backend="aot_eager", fullgraph=True)(**kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
