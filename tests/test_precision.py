"""fp32 precision: every op computes fp32 as the torch op it replaces does, whichever of torch's
APIs set it. GEMMs (fused_linear, ffn) follow torch's fp32 matmul setting (TF32 or IEEE), in the
Triton launchers and in the extension's cuBLASLt GEMMs alike; attention stays IEEE fp32, as SDPA's
fp32 CUDA kernel does."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, device, kernel_backends, seed_for

import transformer_kernels as tk
from transformer_kernels import _extension
from transformer_kernels.reference import attention_ref, fused_linear_ref
from transformer_kernels.triton.precision import attention_dot_precision, matmul_allows_tf32, matmul_dot_precision

NEW_API = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9
needs_new_api = pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision setting")


def _new_api_settings():
    """The fp32_precision objects the tests (and torch.set_float32_matmul_precision) write."""
    return [torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul] if NEW_API else []


@pytest.fixture
def restore_precision():
    """Puts torch's fp32 precision settings, legacy and new, back as they were after the test."""
    legacy = torch.get_float32_matmul_precision()
    saved = [(s, s.fp32_precision) for s in _new_api_settings()]
    yield
    torch.set_float32_matmul_precision(legacy)
    for setting, value in saved:
        setting.fp32_precision = value


def _set_new(value):
    torch.backends.cuda.matmul.fp32_precision = value


def _set_generic(value):
    # "none" on the matmul setting inherits torch.backends.cuda's, then the generic one.
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = value


def _set_legacy(value):
    torch.backends.cuda.matmul.allow_tf32 = value == "tf32"


def _set_legacy_matmul_precision(value):
    torch.set_float32_matmul_precision("high" if value == "tf32" else "highest")


SETTERS = [
    pytest.param(_set_new, id="new_api", marks=needs_new_api),
    pytest.param(_set_generic, id="new_api_generic", marks=needs_new_api),
    pytest.param(_set_legacy, id="legacy_allow_tf32"),
    pytest.param(_set_legacy_matmul_precision, id="legacy_set_float32_matmul_precision"),
]


@pytest.mark.parametrize("setter", SETTERS)
@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_gemms_follow_the_matmul_setting_and_attention_stays_ieee(restore_precision, setter, value):
    setter(value)
    assert matmul_allows_tf32() is (value == "tf32")
    assert matmul_dot_precision(torch.float32) == value
    assert attention_dot_precision(torch.float32) == "ieee"
    for dtype in (torch.float16, torch.bfloat16):
        assert matmul_dot_precision(dtype) is None and attention_dot_precision(dtype) is None


@pytest.mark.skipif(
    not (_extension.loaded() or os.environ.get("TK_REQUIRE_EXTENSION") == "1"),
    reason=f"extension not built: {_extension.load_error()}",
)
@pytest.mark.parametrize("setter", SETTERS)
@pytest.mark.parametrize("value", ["tf32", "ieee"])
def test_extension_reads_the_matmul_setting(restore_precision, setter, value):
    setter(value)
    assert torch.ops.tk_C._matmul_allows_tf32() is (value == "tf32")


@pytest.mark.skipif("triton" not in kernel_backends("fused_linear"), reason="the triton backend does not run here")
@needs_new_api
@pytest.mark.parametrize("op", ["fused_linear", "ffn"])
def test_fp32_gemms_run_with_the_new_api_set(restore_precision, op):
    # The Triton launchers read the setting at each launch: with the new API set to tf32 (here the
    # interpreter computes fp32 whatever the precision), they must run, forward and backward.
    _set_new("tf32")
    torch.manual_seed(seed_for(op))
    x = torch.randn(5, 24, device=device(), requires_grad=True)
    w1 = torch.randn(40, 24, device=device(), requires_grad=True)
    w2 = torch.randn(24, 40, device=device(), requires_grad=True)
    if op == "fused_linear":
        out = tk.fused_linear(x, w1, activation="gelu", backend="triton")
        expected = fused_linear_ref(x.double(), w1.double(), None, "gelu", 0.0)
    else:
        out = tk.ffn(x, w1, None, w2, None, activation="relu", backend="triton")
        expected = fused_linear_ref(fused_linear_ref(x.double(), w1.double(), None, "relu", 0.0), w2.double(), None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.isfinite(w1.grad).all()


# --- what only a GPU shows: the precision the dots really run at -------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends("fused_linear"))
@pytest.mark.parametrize("setter", SETTERS)
def test_fp32_gemm_under_tf32_is_as_accurate_as_torch(restore_precision, backend, setter):
    # With TF32 on, F.linear runs TF32: fused_linear must too, so its error is within the rule's
    # bound of F.linear's under the same setting (and with IEEE, test_ffn's fp32 cases hold).
    setter("tf32")
    torch.manual_seed(seed_for("tf32", backend))
    x, w, b = (torch.randn(*s, device="cuda") for s in ((257, 1024), (384, 1024), (384,)))
    out = tk.fused_linear(x, w, b, backend=backend)
    exact = F.linear(x.double(), w.double(), b.double())
    assert_close_to_reference("fused_linear fp32, tf32 on", out, F.linear(x, w, b), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", kernel_backends("attention"))
@pytest.mark.parametrize("setter", SETTERS)
def test_fp32_attention_under_tf32_stays_ieee(restore_precision, backend, setter):
    # SDPA's fp32 kernel is fp32-accurate whatever the setting: attention's error must stay within
    # the rule's bound of SDPA's, not grow to TF32's (~1e-3 at D = 128).
    setter("tf32")
    torch.manual_seed(seed_for("tf32 attention", backend))
    q, k, v = (torch.randn(2, 257, 2, 128, device="cuda") for _ in range(3))
    out = tk.attention(q, k, v, backend=backend)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    exact = attention_ref(q.double(), k.double(), v.double())
    assert_close_to_reference("attention fp32, tf32 on", out, sdpa, exact)
