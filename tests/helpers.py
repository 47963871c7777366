"""Shared test machinery: which backends run here, and the error-vs-reference tolerance rule."""

from __future__ import annotations

import zlib

import pytest
import torch

from transformer_kernels import backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The "tiny atol" of the tolerance rule, per dtype: below every rounding error that matters.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def seed_for(*case) -> int:
    """A torch seed derived from a test case, the same in every run (unlike ``hash()``)."""
    return zlib.crc32(repr(case).encode())


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rng_state() -> torch.Tensor:
    """The state of the generator that the ops draw dropout seeds from for the test device's tensors
    (the CUDA generator on a GPU, the CPU's otherwise)."""
    return torch.cuda.get_rng_state() if device().type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    """Restore a :func:`rng_state`: the next op draws the same seed again."""
    if device().type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def kernel_backends(op: str) -> list[str]:
    """The non-reference backends that can run ``op`` on this machine's test device."""
    dev = device()
    return [b for b in ("triton", "cuda") if backends.why_not(op, b, dev, torch.float32, hidden=1) is None]


def skip_without_kernels(op: str):
    """Skip marker for tests of ``op``'s kernel backends where none runs."""
    return pytest.mark.skipif(
        not kernel_backends(op),
        reason="no kernel backend runs here (needs a CUDA device, or TRITON_INTERPRET=1 for Triton)",
    )


def graph_node_names(t: torch.Tensor) -> set[str]:
    """The class names of every autograd node behind ``t`` (``"CopySlices"``, ``"SliceBackward0"``, ...)."""
    nodes, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in nodes:
            nodes.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in nodes}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(name: str, fast: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor) -> None:
    """FlashAttention's rule: the fast path's error against the float64 ``exact`` result must be
    at most twice the error of the same-dtype PyTorch path, plus a tiny atol."""
    assert fast.shape == exact.shape, f"{name}: shape {list(fast.shape)} != {list(exact.shape)}"
    assert fast.dtype == same_dtype.dtype, f"{name}: dtype {fast.dtype} != {same_dtype.dtype}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err, err_pt = max_err(fast, exact), max_err(same_dtype, exact)
    bound = 2 * err_pt + ATOL[fast.dtype]
    assert err <= bound, f"{name}: error {err:.3e} > 2 x PyTorch's {err_pt:.3e} + atol"
