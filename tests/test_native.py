"""The native backend (torch's fast CPU paths) against the reference, op by op.

The same comparisons as each op's kernel backends, through the per-op test modules' helpers:
forward and every gradient against the float64 reference by the error rule, with and without
dropout (the reference applying the Philox mask of the seed the op drew, so a differing mask
fails), odd lengths (0, 1, 17, 113), padding, bottom-right causal with Lq != Lk, rows that see
no key, GQA. Then the masks themselves, bit for bit against the reference backend's.
"""

from __future__ import annotations

import os

import pytest
import test_attention as attn
import test_autocast as amp_tests
import test_cross_entropy as ce
import test_dropout_add_layer_norm as daln
import test_ffn as ffn_tests
import torch
from helpers import DTYPES, graph_node_names

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.native import cross_entropy as native_ce
from transformer_kernels.native import dropout as native_dropout
from transformer_kernels.reference.philox import dropout_scale

pytestmark = pytest.mark.skipif(
    backends.why_not("attention", "native", attn.device(), torch.float32) is not None,
    reason="the native backend serves CPU tensors only",
)
NATIVE = "native"


# --- dropout_add_layer_norm --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 64), (1, 1), (4, 17), (3, 113), (2, 1000), (2, 3, 512)], ids=str)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layer", "rms"])
def test_dropout_add_layer_norm(dtype, shape, rms_norm):
    daln._compare(NATIVE, shape, dtype, rms_norm=rms_norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms_norm", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["postnorm", "prenorm"])
def test_dropout_add_layer_norm_dropout(dtype, rms_norm, prenorm):
    daln._compare(NATIVE, (5, 333), dtype, dropout_p=0.3, prenorm=prenorm, rms_norm=rms_norm)


@pytest.mark.parametrize(
    "variant",
    [
        dict(residual=False),
        dict(weight=False, bias=False),
        dict(bias=False),
        dict(residual=False, dropout_p=0.2, prenorm=True),
        dict(weight_dtype=torch.float32),
        dict(weight_dtype=torch.float32, rms_norm=True, dropout_p=0.1),
    ],
    ids=["no_residual", "no_affine", "no_bias", "no_residual_dropout", "fp32_weight", "fp32_weight_rms"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dropout_add_layer_norm_optional_arguments(variant, dtype):
    daln._compare(NATIVE, (6, 96), dtype, **variant)


def test_dropout_add_layer_norm_zero_rows_and_non_contiguous():
    daln.test_zero_rows(NATIVE)
    daln.test_non_contiguous_input(NATIVE)
    daln.test_dropout_reproducible_and_matches_philox_spec(NATIVE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_add_layer_norm_backward_uses_forward_mask(dtype):
    daln.test_dropout_backward_uses_forward_mask(NATIVE, dtype)


# --- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(attn.CASES))
def test_attention(case):
    dtype, b, lq, lk, hq, hkv, d, options = attn.CASES[case]
    attn._compare(NATIVE, dtype, b, lq, lk, hq, hkv, d, **options)


@pytest.mark.parametrize(
    "dtype, lq, lk, hq, hkv, options",
    [
        (torch.float32, 17, 113, 4, 2, dict(causal=True, padding="full_row")),
        (torch.bfloat16, 113, 17, 4, 1, dict(causal=True, padding="random")),
        (torch.float32, 113, 17, 2, 2, dict(causal=True, dropout_p=0.2)),  # Lq > Lk: empty rows, dropout
        (torch.float16, 17, 17, 4, 2, dict(padding="full_row", dropout_p=0.4)),
        (torch.float32, 1, 1, 2, 1, dict(causal=True)),
    ],
    ids=["fp32_gqa_17x113_full_row", "bf16_mqa_113x17_padding", "fp32_113x17_dropout", "fp16_gqa_dropout", "1x1"],
)
def test_attention_more_masks(dtype, lq, lk, hq, hkv, options):
    attn._compare(NATIVE, dtype, 2, lq, lk, hq, hkv, 32, **options)


@pytest.mark.parametrize("lq, lk", [(0, 5), (5, 0), (0, 0)])
def test_attention_zero_lengths(lq, lk):
    q, k, v = attn._qkv(2, lq, lk, 2, 1, 8, torch.float32)
    for backend in ("reference", NATIVE):
        out, lse = tk.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert out.shape == (2, lq, 2, 8) and lse.shape == (2, 2, lq)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_attention_rows_without_keys_and_layouts():
    attn.test_rows_without_keys_are_zero_with_zero_gradient(NATIVE)
    attn.test_fused_qkv_layout_needs_no_copy(NATIVE)
    attn.test_dropout_reproducible(NATIVE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_huge_logits_and_backward_mask(dtype):
    attn.test_huge_logits_stay_finite(NATIVE, dtype)
    attn.test_dropout_backward_uses_forward_mask(NATIVE, dtype)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_mask_is_the_references(p):
    """The mask read off the op's output, bit for bit the reference backend's."""
    native = attn._recover_keep_mask(NATIVE, 2, 2, 48, 64, p, rng_seed=7)
    reference = attn._recover_keep_mask("reference", 2, 2, 48, 64, p, rng_seed=7)
    assert torch.equal(native, reference)
    attn.test_dropout_statistics_and_philox_spec(NATIVE, p)


# --- fused_linear and ffn ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ffn_tests.ACTIVATIONS, ids=ffn_tests.ACT_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_fused_linear_and_ffn(dtype, activation, dropout_p):
    ffn_tests._compare("fused_linear", NATIVE, (3, 37), (48, 80), dtype, activation, dropout_p)
    ffn_tests._compare("ffn", NATIVE, (2, 21), (32, 96, 40), dtype, activation, dropout_p)


@pytest.mark.parametrize("lead", [(0,), (1,), (17,), (2, 113)], ids=str)
@pytest.mark.parametrize("dims", [(1, 1), (17, 113), (113, 17)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_odd_shapes(lead, dims, dtype):
    ffn_tests._compare("fused_linear", NATIVE, lead, dims, dtype, "gelu", 0.2)
    ffn_tests._compare("ffn", NATIVE, lead, (*dims, 5), dtype, "relu", 0.2, bias=False)


def test_fused_linear_edge_cases():
    ffn_tests.test_zero_rows(NATIVE)
    ffn_tests.test_non_contiguous_input(NATIVE)
    ffn_tests.test_eval_mode_skips_dropout(NATIVE)
    ffn_tests.test_dropout_reproducible_and_matches_philox_spec(NATIVE)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_ffn_relu_in_place_is_not_on_a_view(dropout_p):
    """The in-place ReLU acts on the GEMM's own 2-D output: on [B, L, d] input, ReLU in place on
    ``F.linear``'s 3-D view would put CopySlices and AsStridedBackward (copies of the whole
    [N, d_ff] gradient) into the graph (with a bias: ``F.linear`` then returns a view of its
    2-D addmm result)."""
    x = torch.randn(2, 17, 24, requires_grad=True)
    w1, b1 = torch.randn(40, 24, requires_grad=True), torch.randn(40, requires_grad=True)
    w2, b2 = torch.randn(24, 40, requires_grad=True), torch.randn(24, requires_grad=True)
    y = tk.ffn(x, w1, b1, w2, b2, "relu", dropout_p, backend=NATIVE)
    assert y.shape == (2, 17, 24)
    names = graph_node_names(y)
    assert "ReluBackward0" in names or "ThresholdBackward1" in names, names
    assert not names & {"CopySlices", "AsStridedBackward0"}, names


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_backward_uses_forward_mask(dtype):
    ffn_tests.test_dropout_backward_uses_forward_mask(NATIVE, dtype, "gelu")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_masks_are_the_references(p):
    """dropout_add_layer_norm and fused_linear: the zeros of the native output (inputs that are
    never zero) are exactly the reference backend's, for the same generator state."""
    x = torch.rand(37, 113) + 1.0
    w = torch.eye(113)
    for op in (
        lambda be: tk.dropout_add_layer_norm(x, None, None, None, p, prenorm=True, backend=be)[1],
        lambda be: tk.fused_linear(x, w, None, None, p, backend=be),
        lambda be: tk.ffn(x, w, None, w, None, None, p, backend=be),
    ):
        torch.manual_seed(11)
        native = op(NATIVE) == 0
        torch.manual_seed(11)
        reference = op("reference") == 0
        assert native.any() and not native.all()
        assert torch.equal(native, reference)


@pytest.mark.skipif(
    not (native_dropout._fused_available() or os.environ.get("TK_REQUIRE_EXTENSION") == "1"),
    reason="the extension (with tk_C::dropout_apply) is not built",
)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_dropout_apply_is_the_formula_bit_for_bit(dtype, residual):
    """The one-pass C++ dropout against the spelled-out formula it replaces (residual + x · keep ·
    scale in fp32, or fp64, rounded once), forward and both gradients, bit for bit; a dropped inf
    or NaN gives NaN, as in the reference; non-contiguous inputs; an odd length (4 · 7 · 113)."""
    assert native_dropout._fused_available()
    torch.manual_seed(3)
    x = torch.randn(4, 7, 113, dtype=dtype).transpose(0, 1)
    x[0, 0, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=dtype)
    keep = torch.rand(x.shape) > 0.3
    keep[0, 0, :3] = torch.tensor([False, False, True])
    r = torch.randn(x.shape, dtype=dtype) if residual else None
    dout = torch.randn(x.shape, dtype=dtype)
    compute = torch.promote_types(dtype, torch.float32)
    outs, grads = [], []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        ri = None if r is None else r.clone().requires_grad_()
        if fused:
            out = native_dropout.dropout_apply(xi, keep, 0.3, ri)
        else:
            base = ri.to(compute) if ri is not None else torch.zeros((), dtype=compute)
            out = (base + xi.to(compute) * keep.to(compute) * dropout_scale(0.3)).to(dtype)
        out.backward(dout)
        outs.append(out)
        grads.append([xi.grad] + ([] if ri is None else [ri.grad]))
    assert torch.equal(outs[0].isnan(), outs[1].isnan()) and outs[0].isnan().any()
    assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# --- cross_entropy and linear_cross_entropy ---------------------------------------------------


@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, v", [(0, 5), (9, 1), (13, 7), (6, 300), (3, 32003)], ids=str)
def test_cross_entropy(small_chunks, n, v, dtype, label_smoothing, reduction):
    ce._compare_ce(NATIVE, n, v, dtype, reduction, label_smoothing)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries (37 classes: 3 rows a chunk of
    linear_cross_entropy; 7 classes: 2 rows a chunk of cross_entropy, 300 or more: one)."""
    monkeypatch.setattr(native_ce, "CHUNK_ELEMENTS", 111)
    monkeypatch.setattr(native_ce, "CE_CHUNK_ELEMENTS", 20)


@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["eps0", "eps0.1"])
def test_linear_cross_entropy(small_chunks, dtype, reduction, bias, label_smoothing):
    ce._compare_lce(NATIVE, 11, 16, 37, dtype, reduction, bias=bias, label_smoothing=label_smoothing)


@pytest.mark.parametrize("n", [0, 1, 17, 113])
def test_linear_cross_entropy_lengths(small_chunks, n):
    ce._compare_lce(NATIVE, n, 8, 37, torch.bfloat16, "mean")
    ce._compare_lce(NATIVE, n, 8, 37, torch.float32, "none")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_scaled_upstream(small_chunks, dtype):
    ce.test_linear_cross_entropy_scaled_upstream(NATIVE, dtype)


def test_linear_cross_entropy_big_vocab():
    ce._compare_lce(NATIVE, 4, 8, 32003, torch.float16, "sum", label_smoothing=0.0)


@pytest.mark.parametrize("reduction", ce.REDUCTIONS)
def test_cross_entropy_edge_cases(small_chunks, reduction):
    ce.test_all_rows_ignored(NATIVE, reduction)
    if reduction != "sum":
        ce.test_linear_cross_entropy_tied_weights(NATIVE, reduction)
    ce.test_linear_cross_entropy_partial_requires_grad(NATIVE)
    ce.test_non_contiguous_logits(NATIVE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cross_entropy_huge_logits(dtype):
    scale = {torch.float32: 1e4, torch.float16: 6e4, torch.bfloat16: 1e5}[dtype]
    ce.test_huge_logits_stay_finite(NATIVE, dtype, scale)


def test_no_gradient_is_computed_under_no_grad(monkeypatch):
    """The fused losses compute their gradient in the forward: not when autograd will not ask for it."""
    wanted = []
    real = native_ce._loss_and_grad_
    monkeypatch.setattr(
        native_ce, "_loss_and_grad_", lambda z, t, ok, eps, g: wanted.append(g is not None) or real(z, t, ok, eps, g)
    )
    x, h, w = (torch.randn(*s, requires_grad=True) for s in ((6, 11), (6, 4), (11, 4)))
    t = torch.randint(0, 11, (6,))
    with torch.no_grad():
        tk.cross_entropy(x, t, backend="native")
        tk.linear_cross_entropy(h, w, t, backend="native")
    assert wanted == [False, False]
    tk.cross_entropy(x, t, backend="native")
    tk.linear_cross_entropy(h, w, t, backend="native")
    assert wanted == [False, False, True, True]


def test_target_out_of_range_is_a_clear_error():
    ce.test_target_out_of_range_is_a_clear_error(NATIVE, 40000, "target contains 40000, out of range")


# --- float64: the native backend serves it too, to the reference's digits ---------------------


def test_float64_matches_the_reference():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x, r, w, b = (torch.randn(5, 33, **f64), torch.randn(5, 33, **f64), torch.randn(33, **f64), torch.randn(33, **f64))
    q, k, v = torch.randn(2, 17, 4, 8, **f64), torch.randn(2, 9, 2, 8, **f64), torch.randn(2, 9, 2, 8, **f64)
    kpm = torch.rand(2, 9) < 0.3
    w1, w2 = torch.randn(24, 33, **f64), torch.randn(33, 24, **f64)
    t = torch.randint(0, 24, (5,))
    cases = [
        lambda be: tk.dropout_add_layer_norm(x, r, w, b, 0.2, backend=be),
        lambda be: tk.attention(q, k, v, causal=True, key_padding_mask=kpm, dropout_p=0.1, backend=be),
        lambda be: tk.attention(q, k, v, causal=True, key_padding_mask=kpm, backend=be),
        lambda be: tk.ffn(x, w1, None, w2, None, "gelu", 0.3, backend=be),
        lambda be: tk.cross_entropy(x, t, label_smoothing=0.1, backend=be),
        lambda be: tk.linear_cross_entropy(x, w1, t, label_smoothing=0.1, backend=be),
    ]
    for fn in cases:
        torch.manual_seed(1)
        native = fn(NATIVE)
        torch.manual_seed(1)
        reference = fn("reference")
        assert native.dtype == reference.dtype == torch.float64
        torch.testing.assert_close(native, reference, rtol=1e-12, atol=1e-12)


# --- autocast: the policy of the torch op each replaces, as on every backend -------------------


@pytest.mark.parametrize("amp_dtype", amp_tests.AMP_DTYPES, ids=str)
@pytest.mark.parametrize(
    "test",
    [
        amp_tests.test_ffn_casts_like_linear,
        amp_tests.test_fused_linear_casts_like_linear,
        amp_tests.test_attention_casts_like_sdpa,
        amp_tests.test_layer_norm_follows_torch_add_then_layer_norm,
        amp_tests.test_linear_cross_entropy_casts_the_projection,
        amp_tests.test_cross_entropy_keeps_the_logits,
    ],
    ids=lambda t: t.__name__,
)
def test_autocast(test, amp_dtype):
    test(NATIVE, amp_dtype)
