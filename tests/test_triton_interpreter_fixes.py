"""The two bf16 operations that ``triton_interpreter_fixes`` repairs in Triton's CPU interpreter
(``conftest.py`` applies it under ``TRITON_INTERPRET=1``): ``tl.dot`` of bf16 operands, and fp32 ->
bf16 conversion, explicit or by ``tl.store``. On a GPU the same tests hold the compiler to the same
answers, so the fixes cannot drift from what the hardware does."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close_to_reference, device

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)


@triton.jit
def _dot(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(C + m[:, None] * N + n[None, :], tl.dot(a, b))  # fp32 accumulation


@triton.jit
def _to_bf16(X, Y_CAST, Y_STORE, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i)
    tl.store(Y_CAST + i, x.to(tl.bfloat16))
    tl.store(Y_STORE + i, x)  # Y_STORE is bf16: the store converts


def test_bf16_dot_multiplies_values_not_bit_patterns():
    torch.manual_seed(0)
    M, N, K = 16, 32, 16  # tl.dot's smallest tiles
    a = torch.randn(M, K, device=device()).bfloat16()
    b = torch.randn(K, N, device=device()).bfloat16()
    c = torch.empty(M, N, device=device())
    _dot[(1,)](a, b, c, M, N, K)
    # bf16 products are exact in fp32, so the rule's same-dtype path is PyTorch's fp32 matmul
    assert_close_to_reference("bf16 tl.dot", c, a.float() @ b.float(), a.double() @ b.double())


def test_fp32_to_bf16_rounds_to_nearest_even():
    torch.manual_seed(0)
    n = 1024
    # random mantissas: about half of them round up, which truncation would get wrong
    x = torch.randn(n, device=device())
    y_cast, y_store = (torch.empty(n, device=device(), dtype=torch.bfloat16) for _ in range(2))
    _to_bf16[(1,)](x, y_cast, y_store, n)
    expected = x.to(torch.bfloat16)
    assert torch.equal(y_cast, expected), f"{int((y_cast != expected).sum())} of {n} differ (x.to(tl.bfloat16))"
    assert torch.equal(y_store, expected), f"{int((y_store != expected).sum())} of {n} differ (tl.store)"
