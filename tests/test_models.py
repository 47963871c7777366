"""The paper's model: construction, loss, and incremental decoding (KV cache, greedy, beam search)."""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_backends

import transformer_kernels as tk
from transformer_kernels.models import (
    EncoderDecoder,
    beam_search,
    build_model,
    config_from_preset,
    greedy_decode,
    strip,
)
from transformer_kernels.models.transformer import sinusoidal_positions

PAD, BOS, EOS, VOCAB = 0, 1, 2, 13


def copy_batch(n: int, generator: torch.Generator):
    """A toy copy task: target = source, lengths 4..7, tokens 3..12."""
    lengths = torch.randint(4, 8, (n,), generator=generator)
    src = torch.full((n, 8), PAD)
    tgt_in, tgt_out = torch.full((n, 9), PAD), torch.full((n, 9), PAD)
    for i, length in enumerate(lengths.tolist()):
        src[i, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        tgt_in[i, 0], tgt_in[i, 1 : length + 1] = BOS, src[i, :length]
        tgt_out[i, :length], tgt_out[i, length] = src[i, :length], EOS
    return src, tgt_in, tgt_out


@pytest.fixture(scope="module")
def copy_model():
    """A tiny model trained for a few hundred steps on the copy task (seconds on a CPU)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model("tiny", VOCAB, VOCAB, d_model=32, nhead=4, dim_feedforward=64, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    for _ in range(250):
        src, tgt_in, tgt_out = copy_batch(32, g)
        loss = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_presets_have_the_papers_sizes():
    base = config_from_preset("base", 100, 100)
    big = config_from_preset("big", 100, 100)
    assert (base.d_model, base.nhead, base.dim_feedforward, base.num_encoder_layers, base.dropout) == (
        512,
        8,
        2048,
        6,
        0.1,
    )
    assert (big.d_model, big.nhead, big.dim_feedforward, big.num_decoder_layers, big.dropout) == (
        1024,
        16,
        4096,
        6,
        0.3,
    )
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        config_from_preset("huge", 100, 100)
    with pytest.raises(ValueError, match="share_all_embeddings needs one vocabulary"):
        config_from_preset("tiny", 10, 12, share_all_embeddings=True)


def test_sinusoidal_positions():
    pe = sinusoidal_positions(50, 16)
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.arange(50.0)))
    torch.testing.assert_close(pe[:, 1], torch.cos(torch.arange(50.0)))
    torch.testing.assert_close(pe[7, 14], torch.sin(torch.tensor(7.0) / 1e4 ** (14 / 16)))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("share_all", [False, True])
def test_model_structure_and_loss(norm_first, share_all):
    torch.manual_seed(0)
    model = build_model("tiny", VOCAB, VOCAB, norm_first=norm_first, share_all_embeddings=share_all, dropout=0.0)
    assert model.output_weight is model.tgt_embed.weight, "the output layer is tied to the target embedding"
    assert (model.src_embed is model.tgt_embed) == share_all
    assert (model.encoder.norm is not None) == norm_first and (model.decoder.norm is not None) == norm_first
    src, tgt_in, tgt_out = copy_batch(4, torch.Generator().manual_seed(1))
    loss = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
    # The fused loss equals the unfused composition over the decoder's hidden states.
    hidden = model(src, tgt_in)
    logits = model.logits(hidden).reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, tgt_out.reshape(-1), ignore_index=PAD, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_padding_does_not_change_the_translation_state(copy_model):
    """Extra source padding is masked out: the encoder output on real tokens is unchanged."""
    src, _, _ = copy_batch(2, torch.Generator().manual_seed(2))
    padded = torch.cat([src, torch.full((2, 5), PAD)], 1)
    copy_model.eval()
    with torch.no_grad():
        mem, _ = copy_model.encode(src)
        mem_padded, _ = copy_model.encode(padded)
    torch.testing.assert_close(mem_padded[:, : src.shape[1]], mem, rtol=1e-5, atol=1e-5)


def test_cached_greedy_equals_recomputed_prefix(copy_model):
    src, _, _ = copy_batch(8, torch.Generator().manual_seed(3))
    assert torch.equal(greedy_decode(copy_model, src), greedy_decode(copy_model, src, use_cache=False))


def test_beam_size_one_equals_greedy(copy_model):
    src, _, _ = copy_batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(beam_search(copy_model, src, beam_size=1), greedy_decode(copy_model, src))


def test_beam_search_recovers_the_copied_input(copy_model):
    src, _, tgt_out = copy_batch(16, torch.Generator().manual_seed(5))
    hyps = strip(beam_search(copy_model, src, beam_size=4, length_penalty=0.6), EOS, PAD)
    refs = strip(tgt_out, EOS, PAD)
    assert sum(h == r for h, r in zip(hyps, refs, strict=True)) >= 15, list(zip(hyps, refs, strict=True))


def test_decoding_restores_training_mode_and_bounds_length(copy_model):
    copy_model.train()
    src, _, _ = copy_batch(2, torch.Generator().manual_seed(6))
    out = greedy_decode(copy_model, src, max_len=3)
    assert out.shape == (2, 3) and copy_model.training
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        beam_search(copy_model, src, beam_size=0)


def test_model_is_an_nn_module_of_the_package_layers():
    model = EncoderDecoder(config_from_preset("tiny", VOCAB, VOCAB))
    from transformer_kernels import nn as tknn

    assert all(isinstance(layer, tknn.TransformerEncoderLayer) for layer in model.encoder.layers)
    assert all(isinstance(layer, tknn.TransformerDecoderLayer) for layer in model.decoder.layers)


@pytest.mark.skipif("triton" not in kernel_backends("attention"), reason="needs the triton backend")
def test_cached_decoding_runs_on_the_kernels(copy_model):
    """The KV-cached steps (Lq = 1 over strided cache views) on the Triton kernels give the same tokens."""
    src, _, _ = copy_batch(4, torch.Generator().manual_seed(7))
    with tk.use_backend("triton"):
        fused = beam_search(copy_model, src, beam_size=2)
    assert torch.equal(fused, beam_search(copy_model, src, beam_size=2))


@pytest.mark.parametrize("norm_first", [False, True])
def test_activation_checkpointing_changes_nothing_but_memory(norm_first):
    """Recomputed layers replay the RNG state, so they draw the same dropout seeds: with dropout on, the
    loss and every gradient equal those of the stored-activation run, and less is saved for backward."""
    model = build_model(
        "tiny", VOCAB, VOCAB, d_model=32, nhead=4, dim_feedforward=64, dropout=0.1, norm_first=norm_first
    )
    src, tgt_in, tgt_out = copy_batch(4, torch.Generator().manual_seed(8))

    def run(checkpointing: bool):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        saved = []
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            loss = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss, grads, stored = run(False)
    loss_ckpt, grads_ckpt, stored_ckpt = run(True)
    assert torch.equal(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    assert stored_ckpt < stored / 2, (stored_ckpt, stored)


# Static-shape decoding: the same tokens as cached decoding, however the batch finishes.


def _ragged_batch(n: int, seed: int):
    """Copy-task sources (sentences finishing at different steps) with extra padding columns."""
    src, _, _ = copy_batch(n, torch.Generator().manual_seed(seed))
    return torch.cat([src, torch.full((n, 2), PAD)], 1)


@pytest.mark.parametrize(
    "n, beam_size, sync_every",
    [(1, None, 8), (3, None, 1), (8, None, 3), (3, 1, 3), (8, 1, 8), (1, 4, 3), (3, 4, 8), (8, 4, 1)],
)
def test_static_decoding_gives_cached_decodings_tokens(copy_model, n, beam_size, sync_every):
    src = _ragged_batch(n, 20 + n)
    if beam_size is None:
        want = greedy_decode(copy_model, src)
        got = greedy_decode(copy_model, src, static=True, sync_every=sync_every)
    else:
        want = beam_search(copy_model, src, beam_size=beam_size)
        got = beam_search(copy_model, src, beam_size=beam_size, static=True, sync_every=sync_every)
    lengths = [row.index(EOS) if EOS in row else None for row in want.tolist()]
    assert None not in lengths and (n == 1 or len(set(lengths)) > 1), "sentences should finish at different steps"
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("beam_size", [None, 4])
@pytest.mark.parametrize("max_len", [0, 1, 2, 3])
def test_static_decoding_stopped_by_max_len(copy_model, beam_size, max_len):
    """Cut before any sentence ends (and the first steps, which a CUDA graph does not capture)."""
    src = _ragged_batch(5, 30)
    kw = dict(max_len=max_len) if beam_size is None else dict(max_len=max_len, beam_size=beam_size)
    decode = greedy_decode if beam_size is None else beam_search
    got, want = decode(copy_model, src, static=True, **kw), decode(copy_model, src, **kw)
    assert got.shape == (5, max_len) and torch.equal(got, want)


def test_static_decoding_of_a_random_model_in_every_layout():
    """Random weights (EOS never wins, every row runs to max_len), pre-LN, fp64."""
    torch.manual_seed(1)
    model = build_model("tiny", 37, 41, d_model=48, nhead=3, dim_feedforward=40, norm_first=True, dropout=0.0)
    model = model.double()
    src = torch.randint(3, 37, (3, 6))
    src[1, 4:] = PAD
    assert torch.equal(greedy_decode(model, src, max_len=9, static=True), greedy_decode(model, src, max_len=9))
    assert torch.equal(
        beam_search(model, src, beam_size=3, max_len=9, static=True), beam_search(model, src, beam_size=3, max_len=9)
    )


def test_static_decoding_rejects_what_it_cannot_do(copy_model):
    src = _ragged_batch(2, 31)
    with pytest.raises(ValueError, match="static=True decodes with the KV cache"):
        greedy_decode(copy_model, src, static=True, use_cache=False)
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        greedy_decode(copy_model, src, static=True, sync_every=0)


@pytest.mark.gpu
@pytest.mark.parametrize("beam_size", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decoding_replays_a_cuda_graph_with_eagers_tokens(copy_model, beam_size, dtype, monkeypatch):
    """Each step captured once and replayed gives the tokens of the same static step run eagerly (and,
    in fp32, of cached decoding); every step after the warm-up ones is a replay."""
    import copy

    model = copy.deepcopy(copy_model).to("cuda", dtype)
    src = _ragged_batch(8, 40).cuda()
    kw = {} if beam_size is None else dict(beam_size=beam_size)
    decode = greedy_decode if beam_size is None else beam_search
    eager = decode(model, src, static=True, cuda_graph=False, **kw)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: replays.append(g) or replay(g))
    graphed = decode(model, src, static=True, cuda_graph=True, sync_every=4, **kw)
    assert torch.equal(graphed, eager)
    if dtype == torch.float32:  # in bf16 the two paths' different attention kernels round differently
        assert torch.equal(eager, decode(model, src, **kw))
    warmup = 1 if beam_size is None else 2
    assert len(replays) >= eager.shape[1] - warmup > 0, (len(replays), eager.shape)
    assert len({id(g) for g in replays}) == warmup, "one graph per buffer set, captured once"


def test_length_batches_sort_and_fit_the_budget():
    from transformer_kernels.train.inference import length_batches

    lengths = [5, 1, 9, 3, 3, 0, 12, 4]
    batches = length_batches(lengths, batch_tokens=10)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths), "sorted by length"
    order = [i for b in batches for i in b]
    assert order.index(3) < order.index(4), "equal lengths keep their input order"
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 10, b
    assert length_batches(lengths, batch_tokens=8)[-1] == [6], "a sentence over the budget goes alone"
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        length_batches(lengths, 0)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_ids_returns_input_order_whatever_the_batches(copy_model, beam_size):
    """Batched by tokens and sorted by length, the outputs come back in input order: each equals the
    sentence decoded alone, for every decoding method."""
    from transformer_kernels.train.inference import translate_ids

    src, _, _ = copy_batch(7, torch.Generator().manual_seed(50))
    ids = [[t for t in row if t != PAD] for row in src.tolist()]
    alone = [strip(beam_search(copy_model, torch.tensor([s]), beam_size=beam_size), EOS, PAD)[0] for s in ids]
    for decoding in ("auto", "static", "cached", "recompute"):
        for batch_tokens in (16, 1000):
            out, throughput = translate_ids(copy_model, ids, beam_size, batch_tokens=batch_tokens, decoding=decoding)
            assert out == alone, (decoding, batch_tokens)
            assert throughput.sentences == 7 and throughput.tokens == sum(len(h) + 1 for h in alone)
            assert throughput.seconds > 0 and throughput.tokens_per_s > 0
    with pytest.raises(ValueError, match="decoding must be one of auto, static, cached, recompute"):
        translate_ids(copy_model, ids, decoding="fast")


def test_auto_decoding_is_static_on_a_cpu_and_cached_on_a_gpu():
    """``auto`` (translate's default) runs the static loop on a CPU; on a GPU the cached one, until
    the static loop's CUDA-graph replay has been measured there."""
    from transformer_kernels.train.inference import resolve_decoding

    assert resolve_decoding("auto", torch.device("cpu")) == "static"
    assert resolve_decoding("auto", torch.device("cuda", 0)) == "cached"
    for method in ("static", "cached", "recompute"):
        assert resolve_decoding(method, torch.device("cuda")) == method
