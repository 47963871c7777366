"""The backend registry: global choice, scoped choice, per-call choice, and auto."""

from __future__ import annotations

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import backends


def test_available_backends_always_has_reference():
    assert "reference" in tk.available_backends()
    assert "reference" in tk.available_backends("dropout_add_layer_norm")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        tk.available_backends("nope")


def test_set_and_use_backend_nest_and_restore():
    assert tk.get_backend() == "auto"
    tk.set_backend("reference")
    try:
        assert tk.get_backend() == "reference"
        with tk.use_backend("triton"):
            assert tk.get_backend() == "triton"
            with tk.use_backend("auto"):
                assert tk.get_backend() == "auto"
            assert tk.get_backend() == "triton"
        assert tk.get_backend() == "reference"
    finally:
        tk.set_backend("auto")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        tk.set_backend("fastest")


def test_call_keyword_wins_over_scope():
    x = torch.randn(2, 8)
    with tk.use_backend("cuda"):  # cannot run here, or not on CPU tensors
        out = tk.dropout_add_layer_norm(x, None, None, None, backend="reference")
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))


@pytest.mark.parametrize("op", backends.ops())
def test_auto_on_cpu_is_native_then_reference(op, monkeypatch):
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert backends.resolve(op, "auto", cpu, dtype, hidden=8, head_dim=8, vocab=8) == "native"
    # Where the native backend cannot serve the inputs, auto falls back to the specification.
    native = backends._OPS[op].backends["native"]
    monkeypatch.setitem(backends._OPS[op].backends, "native", backends.OpBackend(native.devices, (torch.float16,)))
    assert backends.resolve(op, "auto", cpu, torch.float32, hidden=8, head_dim=8, vocab=8) == "reference"


def test_native_is_cpu_only_and_auto_on_cuda_never_picks_it():
    assert backends.why_not("attention", "native", torch.device("cuda"), torch.float32, head_dim=8) == (
        "cuda tensors are not supported (supported: cpu)"
    )
    for op in backends.ops():
        assert "native" not in backends.auto_order(op, "cuda")


def test_every_op_declares_both_direct_backends():
    for op in backends.ops():
        for name in ("reference", "native"):
            assert backends.spec(op, name).direct and callable(backends.direct(op, name))
        for name in ("triton", "cuda"):
            if name in backends._OPS[op].backends:
                assert backends.direct(op, name) is None


def test_native_is_the_default_on_a_cpu_and_matches_the_reference():
    torch.manual_seed(0)
    x, r = torch.randn(3, 40), torch.randn(3, 40)
    w, b = torch.randn(40), torch.randn(40)
    out = tk.dropout_add_layer_norm(x, r, w, b)  # auto
    torch.testing.assert_close(out, tk.dropout_add_layer_norm(x, r, w, b, backend="native"), rtol=0, atol=0)
    torch.testing.assert_close(out, tk.dropout_add_layer_norm(x, r, w, b, backend="reference"))


def test_auto_on_cuda_follows_the_preference_order(monkeypatch):
    # Pretend every backend is available: auto must take the first that supports the inputs.
    ops = backends._OPS["dropout_add_layer_norm"].backends
    for name, spec in list(ops.items()):
        monkeypatch.setitem(ops, name, backends.OpBackend(spec.devices, spec.dtypes, spec.check))
    monkeypatch.setitem(backends.AUTO_ORDER, "dropout_add_layer_norm", ("cuda", "triton", "reference"))
    cuda = torch.device("cuda")
    assert backends.resolve("dropout_add_layer_norm", None, cuda, torch.float16, hidden=1024) == "cuda"
    # Past the cuda backend's hidden-size limit, auto moves on to triton, then to the reference.
    assert backends.resolve("dropout_add_layer_norm", None, cuda, torch.float16, hidden=20000) == "triton"
    assert backends.resolve("dropout_add_layer_norm", None, cuda, torch.float16, hidden=100000) == "reference"
    assert backends.resolve("dropout_add_layer_norm", None, cuda, torch.float64, hidden=1024) == "reference"
    with pytest.raises(
        backends.BackendError,
        match=r"the cuda backend cannot run these inputs: hidden size 20000 "
        r"is not supported \(max 16384\)",
    ):
        backends.resolve("dropout_add_layer_norm", "cuda", cuda, torch.float16, hidden=20000)
