# Label-smoothed cross-entropy, loss and gradient in one kernel; and linear + cross-entropy over
# chunks of rows, so the [N, V] logits never exist at once. Modelled on Liger-Kernel's
# cross_entropy / fused_linear_cross_entropy. Trade-off: linear_cross_entropy computes its gradients
# in the forward (the backward only scales them: exact for an incoming gradient of 1, one more
# rounding otherwise), so each chunk's logits are dropped at once; the GEMMs are left to cuBLAS.
"""Triton kernel of ``cross_entropy`` and the chunked launcher of ``linear_cross_entropy``.

Per row ``x`` (fp32 math) with target ``t``, smoothing ``ε`` over ``V`` classes, first sweep
(online max ``m`` and ``d = Σ exp(x - m)``, so ``lse = m + log d``):

    loss = (1 - ε) · (lse - x[t]) + ε · (lse - Σ_j x[j] / V)

second sweep, the gradient of ``scale · loss`` (``scale``: 1/#valid rows for "mean", or the
upstream gradient per row), written in the input dtype, optionally over the logits themselves:

    dx[j] = scale · (exp(x[j] - lse) - ε / V - (1 - ε) · [j == t])

Rows whose target is ``ignore_index`` get loss 0 and gradient 0. Targets must be in range: the
op layer checks that on the host (out-of-range targets only lose their ``x[t]`` term here, they
never read out of bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_grid, device_ctx


@triton.jit
def _cross_entropy_kernel(
    LOGITS,  # [N, V] logits, unit column stride
    stride_logits,  # row stride of LOGITS
    TARGET,  # [N] class indices (int32/int64)
    LOSS,  # [N] fp32 per-row loss
    GRAD,  # [N, V] gradient in LOGITS' dtype (may be LOGITS itself) (if COMPUTE_GRAD)
    stride_grad,  # row stride of GRAD
    SCALE,  # fp32 factor of the gradient: [] (stride 0) or [N] (stride 1)
    stride_scale,
    V,  # number of classes
    ignore_index,
    label_smoothing,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_logits
    g_row = GRAD + row * stride_grad
    t = tl.load(TARGET + row).to(tl.int64)
    if t != ignore_index:
        # Sums of x are taken relative to the row's first logit, which keeps them exact enough
        # when all logits share a large offset.
        shift = tl.load(x_row).to(tl.float32)
        m = float("-inf")
        d = 0.0
        x_t = 0.0
        sum_x = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            x_t += tl.sum(tl.where(cols == t, x - shift, 0.0), axis=0)
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(mask, x - shift, 0.0), axis=0)
        log_d = tl.log(d)
        lse_rel = (m - shift) + log_d  # lse - shift
        loss = (1.0 - label_smoothing) * (lse_rel - x_t)
        if HAS_SMOOTHING:
            loss += label_smoothing * (lse_rel - sum_x / V)
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            scale = tl.load(SCALE + row * stride_scale)
            eps_v = label_smoothing / V
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - m - log_d)
                dx = p - eps_v - tl.where(cols == t, 1.0 - label_smoothing, 0.0)
                tl.store(g_row + cols, (dx * scale).to(GRAD.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                zero = tl.zeros((BLOCK_V,), dtype=tl.float32)
                tl.store(g_row + cols, zero.to(GRAD.dtype.element_ty), mask=cols < V)


def _launch_params(v: int, on_gpu: bool) -> tuple[int, int]:
    # Untuned (no GPU measurements yet). On the CPU, 8192 makes V = 32003 take several blocks.
    block_v = min(max(triton.next_power_of_2(v), 16), 16384 if on_gpu else 8192)
    return block_v, min(max(block_v // 512, 1), 16)


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    compute_grad: bool,
    grad_into_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and (optionally) the gradient of ``scale · loss`` w.r.t. the logits.

    Args:
        logits: ``[N, V]`` with unit column stride; fp32/fp16/bf16.
        target: ``[N]`` int class indices, each in ``[0, V)`` or ``ignore_index``.
        scale: fp32 gradient factor, ``[]`` or ``[N]``.
        grad_into_logits: write the gradient over ``logits`` (it must be a temporary).
    Returns:
        ``(loss [N] fp32, grad [N, V] in logits' dtype)``; ``grad`` is empty unless ``compute_grad``
        and is ``logits`` itself with ``grad_into_logits``.
    """
    n, v = logits.shape
    loss = logits.new_empty(n, dtype=torch.float32)
    if not compute_grad:
        grad = logits.new_empty(0)
    else:
        grad = logits if grad_into_logits else logits.new_empty(logits.shape)
    if n == 0:
        return loss, grad
    block_v, num_warps = _launch_params(v, logits.is_cuda)
    check_grid((n,), "cross_entropy")
    with device_ctx(logits):
        _cross_entropy_kernel[(n,)](
            logits,
            logits.stride(0),
            target,
            loss,
            grad if compute_grad else logits,
            grad.stride(0) if compute_grad else 0,
            scale,
            1 if scale.dim() == 1 else 0,
            v,
            ignore_index,
            label_smoothing,
            HAS_SMOOTHING=label_smoothing > 0.0,
            COMPUTE_GRAD=compute_grad,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return loss, grad


# Budget of one chunk's logits: a slice of the GPU's memory (its size is cached by torch: no call to
# the driver, unlike free memory, which would cost one per call), capped (bigger chunks no longer
# make the GEMMs faster); on the CPU (the interpreter, smoke runs) a fixed size. The fp32 products
# of a low-precision dweight GEMM are staged in a buffer of at most this size too.
_GPU_CHUNK_FRACTION = 1 / 64
_MAX_CHUNK_BYTES = 256 * 2**20
_CPU_CHUNK_BYTES = 16 * 2**20


def _chunk_budget(device: torch.device) -> int:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(int(total * _GPU_CHUNK_FRACTION), _MAX_CHUNK_BYTES)
    return _CPU_CHUNK_BYTES


def default_chunk_size(n: int, v: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: a power of two whose ``[rows, V]`` logits fit the budget; at most ``N``."""
    rows = max(_chunk_budget(device) // (v * torch.tensor([], dtype=dtype).element_size()), 1)
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` in fp32 for fp16/bf16 ``a``, ``b``: the products are exact in fp32."""
    if a.is_cuda:
        torch.mm(a, b, out_dtype=torch.float32, out=out)  # cuBLAS, fp32 output (torch >= 2.8)
    else:
        torch.mm(a.float(), b.float(), out=out)  # CPU / interpreter: the same sums, upcast


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, staging: torch.Tensor | None) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype (fp32 for fp16/bf16 inputs), so a
    gradient accumulated over chunks is rounded once, as eager's single GEMM rounds it. Same-dtype
    inputs accumulate in place; low-precision ones through ``staging`` (fp32 ``[r, acc.shape[1]]``),
    ``r`` rows of ``acc`` at a time: no temporary as large as ``acc`` (cuBLAS cannot add fp16
    products into an fp32 matrix in place)."""
    if staging is None:
        acc.addmm_(a, b)
        return
    step = staging.shape[0]
    for start in range(0, acc.shape[0], step):
        rows = slice(start, min(start + step, acc.shape[0]))
        part = staging[: rows.stop - start]
        _mm_fp32(a[rows], b, part)
        acc[rows] += part


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    compute_grad: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss of ``hidden @ weight.T + bias`` and the gradients of ``Σ scale · loss``.

    Works on ``chunk_size`` rows at a time (0: :func:`default_chunk_size`): the chunk's logits are
    computed by torch's matmul in the input dtype, turned into their gradient in place by the
    kernel, then multiplied into ``dhidden`` and accumulated into ``dweight`` / ``dbias`` (in fp32).

    Args:
        hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None, all of one dtype.
        target: ``[N]`` class indices; scale: fp32 ``[]`` or ``[N]`` gradient factor.
    Returns:
        ``(loss [N] fp32, dhidden [N, d], dweight [V, d], dbias [V])`` in the input dtype; the
        gradients are empty unless ``compute_grad`` (``dbias`` also without a bias).
    """
    n, _ = hidden.shape
    v = weight.shape[0]
    chunk = chunk_size or default_chunk_size(n, v, hidden.dtype, hidden.device)
    loss = hidden.new_empty(n, dtype=torch.float32)
    if compute_grad:
        dhidden = hidden.new_empty(hidden.shape)
        # fp32 accumulators across chunks: each chunk's product is rounded once, like eager's.
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        dbias = torch.zeros(v, dtype=acc_dtype, device=weight.device) if bias is not None else None
        staging = None
        if acc_dtype != hidden.dtype:
            d = weight.shape[1]
            staging_rows = min(v, max(1, _chunk_budget(hidden.device) // (d * dweight.element_size())))
            staging = dweight.new_empty(staging_rows, d)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        h = hidden[rows]  # [c, d]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())  # [c, V]
        row_scale = scale[rows] if scale.dim() == 1 else scale
        loss[rows], grad = cross_entropy_fwd(
            logits, target[rows], row_scale, label_smoothing, ignore_index, compute_grad, grad_into_logits=True
        )
        if not compute_grad:
            continue
        torch.mm(grad, weight, out=dhidden[rows])  # each row in one chunk: rounded once
        _add_product(dweight, grad.t(), h, staging)
        if dbias is not None:
            dbias += grad.sum(0, dtype=dbias.dtype)
        del logits, grad
    if not compute_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, dhidden, dweight.to(weight.dtype), hidden.new_empty(0) if dbias is None else dbias.to(bias.dtype))
