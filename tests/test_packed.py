"""Packed (padding-free) sequences through the layers and the paper's model: the same outputs, losses
and gradients as the padded path on the same sentences."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_reference, device, kernel_backends, seed_for

import transformer_kernels as tk
from transformer_kernels.models import build_model
from transformer_kernels.nn import Packed
from transformer_kernels.ops.attention_varlen import OP as ATTENTION_VARLEN

PAD, BOS, EOS, VOCAB = 0, 1, 2, 29
D_MODEL, NHEAD, D_FF = 24, 3, 40  # head dim 8, d_ff not a power of two

# (source lengths, target lengths) of one batch: all one token, all 17, and mixed (with a 1 and a 17)
LENGTHS = {
    "ones": ([1, 1, 1], [1, 1, 1]),
    "seventeen": ([17, 17], [17, 17]),
    "mixed": ([5, 1, 17, 9, 2], [3, 17, 1, 12, 6]),
}


def test_layout_offsets_positions_and_padding_round_trip():
    data = torch.arange(12.0)[:, None].expand(12, 2)
    p = Packed.from_lengths(data, [3, 0, 1, 8])
    assert p.cu_seqlens.tolist() == [0, 3, 3, 4, 12] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 8 and p.batch_size == 4 and p.lengths.tolist() == [3, 0, 1, 8]
    assert p.positions().tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert p.sequence_ids().tolist() == [0, 0, 0, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    padded = p.to_padded(-1.0)
    assert padded.shape == (4, 8, 2) and padded[1].eq(-1).all() and padded[0, :3, 0].tolist() == [0, 1, 2]
    again = Packed.from_padded(padded, [3, 0, 1, 8])
    assert torch.equal(again.data, data) and torch.equal(again.cu_seqlens, p.cu_seqlens)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="int32"):
        Packed(torch.zeros(3), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="sum to data's 4 rows"):
        Packed.from_lengths(torch.zeros(4), [1, 2])
    with pytest.raises(ValueError, match="each must be in"):
        Packed.from_padded(torch.zeros(2, 3), [1, 4])


def sentences(src_lengths, tgt_lengths, seed):
    """Padded (src, tgt_in, tgt_out) [B, L] of random sentences of these lengths (targets before EOS)."""
    g = torch.Generator().manual_seed(seed)
    b, s_len, t_len = len(src_lengths), max(src_lengths), max(tgt_lengths) + 1
    src = torch.full((b, s_len), PAD)
    tgt_in, tgt_out = torch.full((b, t_len), PAD), torch.full((b, t_len), PAD)
    for i, (ns, nt) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
        src[i, :ns] = torch.randint(3, VOCAB, (ns,), generator=g)
        words = torch.randint(3, VOCAB, (nt,), generator=g)
        tgt_in[i, 0], tgt_in[i, 1 : nt + 1] = BOS, words
        tgt_out[i, :nt], tgt_out[i, nt] = words, EOS
    return src, tgt_in, tgt_out


def packed_sentences(src, tgt_in, tgt_out, src_lengths, tgt_lengths):
    """The same sentences packed: no padding token left."""
    t = [n + 1 for n in tgt_lengths]
    return Packed.from_padded(src, src_lengths), Packed.from_padded(tgt_in, t), Packed.from_padded(tgt_out, t)


def model_pair(norm_first: bool, dtype, seed: int, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = build_model(
        "tiny",
        VOCAB,
        VOCAB,
        d_model=D_MODEL,
        nhead=NHEAD,
        dim_feedforward=D_FF,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=dropout,
        norm_first=norm_first,
        dtype=dtype,
    )
    with torch.no_grad():  # norms start as ones/zeros: make every parameter tell in the result
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def loss_and_grads(model, src, tgt_in, tgt_out):
    model.zero_grad(set_to_none=True)
    loss = model.loss(src, tgt_in, tgt_out, label_smoothing=0.1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("case", LENGTHS)
def test_packed_model_has_the_padded_loss_and_gradients(case, norm_first):
    """fp32 packed against the float64 padded model, by the error rule (fp32 padded sets the bound);
    in float64 the two layouts agree to rounding."""
    src_lengths, tgt_lengths = LENGTHS[case]
    padded = sentences(src_lengths, tgt_lengths, seed_for(case))
    packed = packed_sentences(*padded, src_lengths, tgt_lengths)
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = model_pair(norm_first, dtype, seed_for(case, norm_first))
        results[dtype] = loss_and_grads(model, *padded), loss_and_grads(model, *packed)
    (pad64, grads_pad64), (packed64, grads_packed64) = results[torch.float64]
    (pad32, grads_pad32), (packed32, grads_packed32) = results[torch.float32]
    assert_close_to_reference("loss", packed32, pad32, pad64.float())
    torch.testing.assert_close(packed64, pad64, rtol=1e-12, atol=1e-12)
    for name in grads_pad64:
        assert_close_to_reference(f"grad {name}", grads_packed32[name], grads_pad32[name], grads_pad64[name].float())
        torch.testing.assert_close(grads_packed64[name], grads_pad64[name], rtol=1e-10, atol=1e-12)


def test_packed_hidden_states_are_the_padded_ones_without_the_padding():
    src_lengths, tgt_lengths = LENGTHS["mixed"]
    src, tgt_in, tgt_out = sentences(src_lengths, tgt_lengths, 5)
    p_src, p_tgt_in, _ = packed_sentences(src, tgt_in, tgt_out, src_lengths, tgt_lengths)
    model = model_pair(False, torch.float64, 5).eval()
    hidden = model(p_src, p_tgt_in)
    assert isinstance(hidden, Packed) and hidden.data.shape == (sum(tgt_lengths) + len(tgt_lengths), D_MODEL)
    expected = Packed.from_padded(model(src, tgt_in), [n + 1 for n in tgt_lengths]).data
    torch.testing.assert_close(hidden.data, expected, rtol=1e-12, atol=1e-12)
    memory, _ = model.encode(p_src)
    torch.testing.assert_close(memory.data, Packed.from_padded(model.encode(src)[0], src_lengths).data)


def test_positions_restart_in_every_sentence():
    model = model_pair(False, torch.float64, 1).eval()
    tokens = Packed.from_lengths(torch.full((7,), 5), [3, 4])
    x = model.embed(tokens, model.src_embed).data
    torch.testing.assert_close(x[3:6], x[0:3])  # the same token at positions 0, 1, 2 in both sentences
    with pytest.raises(ValueError, match="exceeds max_positions"):
        model.embed(Packed.from_lengths(torch.full((1025,), 5), [1025]), model.src_embed)


BACKENDS = ["reference", *kernel_backends(ATTENTION_VARLEN)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_layers_take_packed_sequences(layer, backend):
    """A layer on Packed rows equals the layer on the padded batch with its padding masks, rows for rows
    (forward and the input gradients), on each backend that runs here."""
    torch.manual_seed(seed_for(layer))
    lengths, mem_lengths = [4, 1, 9], [2, 7, 3]
    dev = device()
    kw = dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=D_FF, dropout=0.0, batch_first=True, device=dev)
    x, mem = torch.randn(3, max(lengths), D_MODEL, device=dev), torch.randn(3, max(mem_lengths), D_MODEL, device=dev)
    kpm = (torch.arange(max(lengths))[None] >= torch.tensor(lengths)[:, None]).to(dev)
    mem_kpm = (torch.arange(max(mem_lengths))[None] >= torch.tensor(mem_lengths)[:, None]).to(dev)
    px, pmem = Packed.from_padded(x, lengths), Packed.from_padded(mem, mem_lengths)
    for t in (x, mem, px.data, pmem.data):
        t.requires_grad_(True)
    with tk.use_backend(backend):
        if layer == "encoder":
            module = tk.nn.TransformerEncoderLayer(**kw)
            got, want = module(px).data, module(x, src_key_padding_mask=kpm)
        else:
            module = tk.nn.TransformerDecoderLayer(**kw)
            got = module(px, pmem, tgt_is_causal=True).data
            want = module(x, mem, tgt_is_causal=True, tgt_key_padding_mask=kpm, memory_key_padding_mask=mem_kpm)
        want = Packed.from_padded(want, lengths).data
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        g = torch.randn_like(got)
        grads = torch.autograd.grad(got, [px.data, pmem.data], g, allow_unused=True)
        padded_grads = torch.autograd.grad(want, [x, mem], g, allow_unused=True)
    torch.testing.assert_close(grads[0], Packed.from_padded(padded_grads[0], lengths).data, rtol=2e-5, atol=2e-5)
    if layer == "decoder":
        expected = Packed.from_padded(padded_grads[1], mem_lengths).data
        torch.testing.assert_close(grads[1], expected, rtol=2e-5, atol=2e-5)


def test_packed_input_with_masks_or_mixed_layouts_is_a_clear_error():
    kw = dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=D_FF, batch_first=True)
    px = Packed.from_lengths(torch.randn(5, D_MODEL), [2, 3])
    with pytest.raises(ValueError, match="packed input takes no src_key_padding_mask"):
        tk.nn.TransformerEncoderLayer(**kw)(px, src_key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    decoder = tk.nn.TransformerDecoderLayer(**kw)
    with pytest.raises(ValueError, match="both be Packed"):
        decoder(px, torch.randn(2, 3, D_MODEL))
    with pytest.raises(ValueError, match="sequence i attends to memory sequence i"):
        decoder(px, Packed.from_lengths(torch.randn(5, D_MODEL), [1, 1, 3]))
    model = model_pair(False, torch.float32, 0)
    with pytest.raises(ValueError, match="both be Packed"):
        model(Packed.from_lengths(torch.full((3,), 4), [3]), torch.full((1, 3), 4))


def test_packed_activation_checkpointing_changes_nothing():
    src_lengths, tgt_lengths = LENGTHS["mixed"]
    packed = packed_sentences(*sentences(src_lengths, tgt_lengths, 3), src_lengths, tgt_lengths)
    model = model_pair(True, torch.float32, 3, dropout=0.1)
    runs = []
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        torch.manual_seed(11)
        runs.append(loss_and_grads(model, *packed))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, rtol=0, atol=0, msg=name)


def test_packed_dropout_is_seeded_and_on_in_training_only():
    """With dropout > 0 the packed and padded paths draw different masks (the row-wise dropouts index
    elements by their place in a tensor of another shape), so their losses agree in distribution, not
    draw for draw. What holds: a packed step is a function of the torch seed, and dropout is off in eval."""
    src_lengths, tgt_lengths = LENGTHS["mixed"]
    padded = sentences(src_lengths, tgt_lengths, 4)
    packed = packed_sentences(*padded, src_lengths, tgt_lengths)
    model = model_pair(False, torch.float32, 4, dropout=0.3)
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(loss_and_grads(model, *packed)[0])
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.loss(*packed), model.loss(*padded))


def test_packed_dropout_equals_padded_when_no_row_is_padding():
    """Sentences of one length on each side: the packed rows are the padded tensor's, flattened, so with the
    same torch seed every dropout draws the same mask and the losses and gradients are the same."""
    src_lengths, tgt_lengths = LENGTHS["seventeen"]
    padded = sentences(src_lengths, tgt_lengths, 6)
    packed = packed_sentences(*padded, src_lengths, tgt_lengths)
    model = model_pair(True, torch.float32, 6, dropout=0.3)
    results = []
    for batch in (padded, packed):
        torch.manual_seed(5)
        results.append(loss_and_grads(model, *batch))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_packed_layers_compile_fullgraph(layer):
    torch._dynamo.reset()
    torch.manual_seed(2)
    kw = dict(d_model=D_MODEL, nhead=NHEAD, dim_feedforward=D_FF, dropout=0.0, batch_first=True)
    px = Packed.from_lengths(torch.randn(9, D_MODEL), [4, 0, 5])
    if layer == "encoder":
        module, args = tk.nn.TransformerEncoderLayer(**kw), (px,)
    else:
        module, args = (
            tk.nn.TransformerDecoderLayer(**kw),
            (px, Packed.from_lengths(torch.randn(6, D_MODEL), [2, 3, 1])),
        )
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args).data, module(*args).data, rtol=2e-5, atol=2e-5)
