"""The drop-in modules against their torch.nn twins with the same weights, and convert()."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import device, graph_node_names, kernel_backends, seed_for

import transformer_kernels as tk
from transformer_kernels.ops.attention import OP as ATTENTION

BACKENDS = ["reference"] + (["triton"] if "triton" in kernel_backends(ATTENTION) else [])
D_MODEL, NHEAD, D_FF = 24, 3, 40  # head dim 8, d_ff not a power of two
TOL = dict(rtol=2e-4, atol=2e-4)  # fp32 both sides: only summation order differs


def _pair(cls_name, seed, **kwargs):
    """(ours, torch's) with the same weights, both in train mode."""
    torch.manual_seed(seed)
    theirs = getattr(torch.nn, cls_name)(**kwargs, device=device())
    with torch.no_grad():  # norms start as ones/zeros: make every parameter tell in the outputs
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = getattr(tk.nn, cls_name)(**kwargs, device=device())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _masks(kind, b, length):
    """(key_padding_mask, attn_mask, is_causal) for a mask kind."""
    if kind == "padding":
        kpm = torch.zeros(b, length, dtype=torch.bool, device=device())
        kpm[0, length // 2 :] = True  # never a fully padded row: torch gives NaN there
        return kpm, None, False
    if kind == "causal":
        return None, torch.nn.Transformer.generate_square_subsequent_mask(length, device=device()), True
    return None, None, False


def _check_same(ours, theirs, run, inputs):
    """Outputs in train and eval mode, and every gradient in train mode, agree."""
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        for t in inputs:
            t.grad = None
        out, ref = run(ours), run(theirs)
        torch.testing.assert_close(out, ref, **TOL)
        if not train:
            continue
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, [*inputs, *ours.parameters()], g)
        want = torch.autograd.grad(ref, [*inputs, *theirs.parameters()], g)
        names = [f"input{i}" for i in range(len(inputs))] + [n for n, _ in ours.named_parameters()]
        for name, a, b in zip(names, got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


# Every axis covered on every backend; the full product on the (cheap) reference backend.
FULL = list(itertools.product([False, True], [False, True], ["relu", "gelu"], ["none", "padding", "causal"]))
FEW = [
    (False, False, "relu", "padding"),
    (True, True, "gelu", "causal"),
    (True, False, "relu", "none"),
    (False, True, "gelu", "padding"),
]
CASES = [("reference", *c) for c in FULL] + [(b, *c) for b in BACKENDS[1:] for c in FEW]
IDS = ["-".join(map(str, c)) for c in CASES]


@pytest.mark.parametrize("backend, batch_first, norm_first, activation, mask", CASES, ids=IDS)
def test_encoder_layer_matches_torch(backend, batch_first, norm_first, activation, mask):
    ours, theirs = _pair(
        "TransformerEncoderLayer",
        seed_for(batch_first, norm_first, activation),
        d_model=D_MODEL,
        nhead=NHEAD,
        dim_feedforward=D_FF,
        dropout=0.0,
        activation=activation,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    b, length = 2, 13
    x = torch.randn((b, length, D_MODEL) if batch_first else (length, b, D_MODEL), device=device(), requires_grad=True)
    kpm, attn_mask, causal = _masks(mask, b, length)
    tk.nn.reset_fallback_counts()
    with tk.use_backend(backend):
        _check_same(ours, theirs, lambda m: m(x, src_mask=attn_mask, src_key_padding_mask=kpm, is_causal=causal), [x])
    assert tk.nn.fallback_counts() == {}, "these inputs must run fused"


@pytest.mark.parametrize("backend, batch_first, norm_first, activation, mask", CASES, ids=IDS)
def test_decoder_layer_matches_torch(backend, batch_first, norm_first, activation, mask):
    ours, theirs = _pair(
        "TransformerDecoderLayer",
        seed_for(batch_first, norm_first, activation),
        d_model=D_MODEL,
        nhead=NHEAD,
        dim_feedforward=D_FF,
        dropout=0.0,
        activation=activation,
        batch_first=batch_first,
        norm_first=norm_first,
    )
    b, lt, ls = 2, 11, 17
    shape = (lambda n: (b, n, D_MODEL)) if batch_first else (lambda n: (n, b, D_MODEL))
    tgt = torch.randn(shape(lt), device=device(), requires_grad=True)
    memory = torch.randn(shape(ls), device=device(), requires_grad=True)
    tgt_kpm, tgt_mask, causal = _masks(mask, b, lt)
    mem_kpm = _masks("padding", b, ls)[0] if mask == "padding" else None
    tk.nn.reset_fallback_counts()
    with tk.use_backend(backend):
        _check_same(
            ours,
            theirs,
            lambda m: m(
                tgt,
                memory,
                tgt_mask=tgt_mask,
                tgt_key_padding_mask=tgt_kpm,
                memory_key_padding_mask=mem_kpm,
                tgt_is_causal=causal,
            ),
            [tgt, memory],
        )
    assert tk.nn.fallback_counts() == {}, "these inputs must run fused"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["self", "cross", "separate"])
def test_multihead_attention_matches_torch(backend, kind):
    ours, theirs = _pair("MultiheadAttention", seed_for(kind), embed_dim=D_MODEL, num_heads=NHEAD, batch_first=True)
    q = torch.randn(2, 5, D_MODEL, device=device(), requires_grad=True)
    kv = q if kind == "self" else torch.randn(2, 9, D_MODEL, device=device(), requires_grad=True)
    v = kv if kind != "separate" else torch.randn(2, 9, D_MODEL, device=device(), requires_grad=True)
    inputs = list({id(t): t for t in (q, kv, v)}.values())
    with tk.use_backend(backend):
        _check_same(ours, theirs, lambda m: m(q, kv, v, need_weights=False)[0], inputs)


def test_self_attention_projects_with_the_whole_packed_weight():
    """Self-attention's q/k/v projection takes in_proj_weight/bias whole (a full-range slice's
    backward would zero-fill and copy the whole weight gradient); cross-attention slices the k/v
    rows, and the gradients of both match torch's."""
    mha = tk.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True, device=device())
    x = torch.randn(2, 5, D_MODEL, device=device())
    assert "SliceBackward0" not in graph_node_names(mha(x, x, x, need_weights=False)[0])
    memory = torch.randn(2, 7, D_MODEL, device=device())
    assert "SliceBackward0" in graph_node_names(mha(x, memory, memory, need_weights=False)[0])


def test_unsupported_inputs_fall_back_visibly_and_correctly():
    ours, theirs = _pair(
        "TransformerEncoderLayer", 0, d_model=D_MODEL, nhead=NHEAD, dim_feedforward=D_FF, dropout=0.0, batch_first=True
    )
    x = torch.randn(2, 6, D_MODEL, device=device())
    additive = torch.randn(6, 6, device=device())  # an arbitrary additive mask
    tk.nn.reset_fallback_counts()
    with pytest.warns(UserWarning, match="src_mask other than the causal mask"):
        out = ours(x, src_mask=additive)
    torch.testing.assert_close(out, theirs(x, src_mask=additive), **TOL)
    mha = tk.nn.MultiheadAttention(D_MODEL, NHEAD, device=device())
    with pytest.warns(UserWarning, match="need_weights=True"):
        _, weights = mha(x, x, x)  # torch's default need_weights=True
    assert weights.shape == (6, 2, 2)
    counts = tk.nn.fallback_counts()
    assert counts["TransformerEncoderLayer: a src_mask other than the causal mask"] == 1
    assert counts["MultiheadAttention: need_weights=True"] == 1


def test_unsupported_constructor_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="add_bias_kv=True is not supported"):
        tk.nn.MultiheadAttention(D_MODEL, NHEAD, add_bias_kv=True)


def test_transformer_matches_torch_and_convert():
    torch.manual_seed(0)
    kwargs = dict(
        d_model=D_MODEL,
        nhead=NHEAD,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=D_FF,
        dropout=0.0,
        batch_first=True,
        device=device(),
    )
    theirs = torch.nn.Transformer(**kwargs)
    ours = tk.nn.Transformer(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    src, tgt = torch.randn(2, 9, D_MODEL, device=device()), torch.randn(2, 7, D_MODEL, device=device())
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7, device=device())
    src_kpm = torch.zeros(2, 9, dtype=torch.bool, device=device())
    src_kpm[1, 6:] = True

    def run(m):
        return m(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm)

    tk.nn.reset_fallback_counts()
    for m in (ours, theirs):
        m.eval()
    torch.testing.assert_close(run(ours), run(theirs), **TOL)
    assert tk.nn.fallback_counts() == {}

    class Model(torch.nn.Module):  # a user's model holding torch.nn modules
        def __init__(self):
            super().__init__()
            self.transformer = theirs
            self.head = torch.nn.Linear(D_MODEL, 5, device=device())

        def forward(self, src, tgt):
            return self.head(run(self.transformer))

    model = Model().eval()
    converted = tk.nn.convert(model)
    assert type(model.transformer) is torch.nn.Transformer, "inplace=False must leave the model alone"
    assert isinstance(converted.transformer, tk.nn.Transformer)
    layer = converted.transformer.encoder.layers[0]
    assert isinstance(layer, tk.nn.TransformerEncoderLayer) and isinstance(layer.self_attn, tk.nn.MultiheadAttention)
    assert isinstance(layer.norm1, tk.nn.LayerNorm) and not converted.training
    torch.testing.assert_close(converted(src, tgt), model(src, tgt), **TOL)
    assert tk.convert(model, inplace=True) is model and isinstance(model.transformer, tk.nn.Transformer)


@pytest.mark.parametrize("cls", ["TransformerEncoderLayer", "TransformerDecoderLayer"])
def test_layers_compile_fullgraph(cls):
    torch._dynamo.reset()
    ours, _ = _pair(cls, 0, d_model=D_MODEL, nhead=NHEAD, dim_feedforward=D_FF, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, D_MODEL, device=device())
    args = (x,) if cls == "TransformerEncoderLayer" else (x, torch.randn(2, 8, D_MODEL, device=device()))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), ours(*args), **TOL)
