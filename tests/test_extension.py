"""The compiled extension: it loads, its ops are registered, its fake implementations give the
right shapes and dtypes, and bad inputs raise clear errors. Its kernels run in the GPU tests of
test_dropout_add_layer_norm.py (backend 'cuda')."""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from transformer_kernels import _extension

REQUIRED = os.environ.get("TK_REQUIRE_EXTENSION") == "1"

pytestmark = pytest.mark.skipif(
    not (_extension.loaded() or REQUIRED), reason=f"extension not built: {_extension.load_error()}"
)


def test_extension_loads():
    assert _extension.loaded(), _extension.load_error()


def test_ops_registered_with_their_schemas():
    fwd = torch.ops.tk_C.dropout_add_layer_norm_fwd.default._schema
    bwd = torch.ops.tk_C.dropout_add_layer_norm_bwd.default._schema
    assert [a.name for a in fwd.arguments] == [
        "x",
        "residual",
        "weight",
        "bias",
        "dropout_p",
        "eps",
        "seed",
        "rms_norm",
        "store_s",
    ]
    assert [a.name for a in bwd.arguments] == [
        "dout",
        "ds_in",
        "s",
        "weight",
        "mean",
        "rstd",
        "dropout_p",
        "seed",
        "rms_norm",
        "has_bias",
    ]
    assert len(fwd.returns) == 4 and len(bwd.returns) == 4


def test_extension_archs_are_recorded():
    assert _extension.built_archs(), "the extension should say which archs it was built for"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rms_norm", [False, True])
def test_fake_implementations(dtype, rms_norm):
    with FakeTensorMode():
        x = torch.empty(6, 40, dtype=dtype, device="cuda")
        w = torch.empty(40, dtype=torch.float32, device="cuda")
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        out, s, mean, rstd = torch.ops.tk_C.dropout_add_layer_norm_fwd(x, x, w, None, 0.1, 1e-5, seed, rms_norm, True)
        assert out.shape == s.shape == (6, 40) and out.dtype == s.dtype == dtype
        assert mean.shape == ((0,) if rms_norm else (6,)) and mean.dtype == torch.float32
        assert rstd.shape == (6,) and rstd.dtype == torch.float32
        ds, dx, dw, db = torch.ops.tk_C.dropout_add_layer_norm_bwd(
            out, None, s, w, mean, rstd, 0.1, seed, rms_norm, not rms_norm
        )
        assert ds.shape == dx.shape == (6, 40) and ds.dtype == dx.dtype == dtype
        assert dw.shape == (40,) and dw.dtype == torch.float32
        assert db.shape == ((0,) if rms_norm else (40,))


def test_cpu_tensors_are_a_clear_error():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="dropout_add_layer_norm: x must be a CUDA tensor"):
        torch.ops.tk_C.dropout_add_layer_norm_fwd(x, None, None, None, 0.0, 1e-5, None, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residual=torch.randn(4, 9)), r"residual shape \[4, 9\] does not match x shape \[4, 8\]"),
        (dict(weight=torch.randn(8, dtype=torch.float64)), "weight dtype"),
        (dict(bias=torch.randn(8), rms_norm=True), "bias must be None when rms_norm=True"),
        (dict(x=torch.randn(2, 20000)), r"hidden size 20000 is not supported by the cuda backend \(max 16384\)"),
        (dict(dropout_p=0.1), "seed must be given when dropout_p > 0"),
        (dict(dropout_p=0.1, seed=torch.tensor([7])), r"seed must be a 0-dim int64 tensor \(got Long of shape \[1\]\)"),
    ],
    ids=["residual_shape", "weight_dtype", "rms_bias", "hidden", "no_seed", "seed_shape"],
)
def test_bad_inputs_to_the_op_are_clear_errors(kwargs, match):
    """The C++ op checks its own inputs too, for callers that reach it without the Python layer."""
    args = dict(
        x=torch.randn(4, 8),
        residual=None,
        weight=None,
        bias=None,
        dropout_p=0.0,
        eps=1e-5,
        seed=None,
        rms_norm=False,
        store_s=False,
    )
    args.update(kwargs)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tk_C.dropout_add_layer_norm_fwd(*args.values())


# ---- the CPU keep-mask (csrc/dropout_mask.cpp), which the reference backend uses on the CPU


def test_native_philox_matches_the_pytorch_specification():
    from transformer_kernels.reference.philox import philox4x32

    gen = torch.Generator().manual_seed(7)
    # Counters across all 32 bits of every word, and seeds across the whole int64 range (negative too).
    counters = torch.cat(
        [
            torch.arange(4096 * 4).view(4096, 4) % 7,
            torch.randint(0, 2**32, (4096, 4), generator=gen),
            torch.tensor([[2**32 - 1] * 4, [0, 2**32 - 1, 0, 2**32 - 1]]),
        ]
    )
    for seed in (0, 1, 2**32 - 1, 2**32, 2**62 + 12345, -1, -(2**63)):
        s = torch.tensor(seed, dtype=torch.int64)
        expected = torch.stack(philox4x32(s, *counters.unbind(-1)), dim=-1)
        assert torch.equal(torch.ops.tk_C.philox4x32(s, counters), expected), seed
    # Random123's known answers: counter 0, key 0; and the counter/key of pi's digits.
    zero = torch.ops.tk_C.philox4x32(torch.tensor(0), torch.zeros(1, 4, dtype=torch.int64))
    assert zero.tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]
    pi = torch.tensor([[0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    assert torch.ops.tk_C.philox4x32(torch.tensor(0x299F31D0A4093822), pi).tolist() == [
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    ]


@pytest.mark.parametrize("rows, cols", [(1, 1), (17, 113), (1023, 17), (3, 0), (2, 4), (5, 6)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_native_keep_mask_is_the_specified_mask(rows, cols, p):
    from transformer_kernels.ops.dropout_mask import dropout_keep_mask, native_mask_available
    from transformer_kernels.reference.philox import dropout_keep_mask as specified_mask

    assert native_mask_available()
    for seed in (3, 2**62 - 1, torch.tensor(2**40 + 9)):
        fast = dropout_keep_mask(seed, p, rows, cols)
        assert fast.dtype == torch.bool and fast.shape == (rows, cols)
        assert torch.equal(fast, specified_mask(seed, p, rows, cols))


def test_native_keep_mask_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="seed must be a 0-dim int64 CPU tensor"):
        torch.ops.tk_C.dropout_keep_mask(torch.tensor([1, 2]), 10, 2, 2)
    with pytest.raises(RuntimeError, match="threshold must be in"):
        torch.ops.tk_C.dropout_keep_mask(torch.tensor(1), 2**24 + 1, 2, 2)


def test_dropout_apply_rejects_bad_inputs():
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="keep must be a bool tensor"):
        torch.ops.tk_C.dropout_apply(x, torch.ones(2, 3), 2.0, None)
    with pytest.raises(RuntimeError, match="keep shape"):
        torch.ops.tk_C.dropout_apply(x, torch.ones(3, 2, dtype=torch.bool), 2.0, None)
    with pytest.raises(RuntimeError, match="residual must be a CPU tensor of x's shape and dtype"):
        torch.ops.tk_C.dropout_apply(x, torch.ones(2, 3, dtype=torch.bool), 2.0, x.double())
    with pytest.raises(RuntimeError, match="rows and cols must be >= 0"):
        torch.ops.tk_C.dropout_keep_mask(torch.tensor(1), 10, -1, 2)
    with pytest.raises(RuntimeError, match=r"counters must be an int64 CPU tensor \[\.\.\., 4\]"):
        torch.ops.tk_C.philox4x32(torch.tensor(1), torch.zeros(2, 3, dtype=torch.int64))
