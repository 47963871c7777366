# Fused residual + dropout + LayerNorm / RMSNorm, forward and backward, in Triton.
# Modelled on the Triton layer-norm tutorial and flash-attention's Triton layer norm: one program
# normalises one row, held in registers up to a width that does not spill (FWD/BWD_ONE_BLOCK_MAX);
# wider rows (up to 64k) take two passes over blocks of the row, the forward's statistics merged
# block by block, at the price of reading the row twice. The backward's weight/bias gradients are
# accumulated per program over a strip of rows and then reduced across programs by a second
# kernel, instead of atomics (deterministic, no contention); for wide rows its second pass walks
# column blocks outermost so that the block's sums stay in registers. The dropout mask is
# regenerated in the backward from the seed (Philox), never stored.
"""Triton kernels of ``dropout_add_layer_norm`` and their launchers.

Forward, per row of ``s = residual + dropout(x)`` (``s`` rounded to x's dtype):

    mean = Σ s / N,   rstd = 1 / sqrt(Σ (s - mean)² / N + eps),   x̂ = (s - mean) · rstd
    out  = x̂ · w + b                      (RMSNorm: rstd = 1 / sqrt(Σ s² / N + eps), x̂ = s · rstd)

Backward, with g = w · dout:

    ds = rstd · (g - x̂ · mean(x̂ · g) - mean(g))   (RMSNorm drops the last term) [+ ds_in]
    dx = ds · keep / (1 - p),   dw = Σ_rows dout · x̂,   db = Σ_rows dout

The launchers take and return exactly what the CUDA extension's ``tk_C`` ops do, so the op layer
treats the two backends alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.philox import dropout_scale, dropout_threshold
from .launch import check_grid, device_ctx
from .philox import dropout_keep_row, seed_arg

MAX_HIDDEN = 65536


@triton.jit
def _residual_dropout(
    X, RES, offs, mask, row, col_start, seed, drop_threshold, drop_scale, HAS_RES, HAS_DROPOUT, BLOCK_N: tl.constexpr
):
    """s = residual + dropout(x) over one block of a row, rounded to x's dtype (0 past the row's end)."""
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep_row(seed, row, col_start, drop_threshold, BLOCK_N)
        s = tl.where(keep, s * drop_scale, 0.0)
    if HAS_RES:
        s += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    # Round s to the input dtype: the stored s and the statistics must agree.
    return s.to(X.dtype.element_ty)


@triton.jit
def _dropout_add_layer_norm_fwd_kernel(
    X,  # [M, N] input of the dropout
    RES,  # [M, N] residual (if HAS_RES)
    W,  # [N] weight (if HAS_W)
    B,  # [N] bias (if HAS_B)
    OUT,  # [M, N] normalised output
    S,  # [M, N] s = residual + dropout(x), in X's dtype (if STORE_S)
    MEAN,  # [M] fp32 (LayerNorm only)
    RSTD,  # [M] fp32
    N,  # hidden size; rows are contiguous, row stride N
    eps,
    SEED,  # Philox key: 0-dim int64 in [0, 2**63), read on the device (if HAS_DROPOUT)
    drop_threshold,  # 24-bit threshold: keep iff (philox >> 8) >= drop_threshold
    drop_scale,  # 1 / (1 - p)
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_S: tl.constexpr,
    RMS_NORM: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK_N >= N: the row stays in registers
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        offs = row * N + cols
        s = _residual_dropout(
            X, RES, offs, mask, row, 0, seed, drop_threshold, drop_scale, HAS_RES, HAS_DROPOUT, BLOCK_N
        )
        if STORE_S:
            tl.store(S + offs, s, mask=mask)
        s = s.to(tl.float32)
        if RMS_NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / N + eps)
            xhat = s * rstd
        else:
            mean = tl.sum(s, axis=0) / N
            centered = tl.where(mask, s - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
            xhat = centered * rstd
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        # Wide rows, two passes over blocks of the row. Pass 1: s, stored, and the statistics,
        # merging each block's mean and M2 = Σ (s - mean_block)² into the running ones (Chan,
        # Golub & LeVeque): as exact as a second pass over the centred row, without one.
        mean = 0.0
        m2 = 0.0  # RMSNorm: Σ s²
        seen = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            offs = row * N + cols
            s = _residual_dropout(
                X, RES, offs, mask, row, start, seed, drop_threshold, drop_scale, HAS_RES, HAS_DROPOUT, BLOCK_N
            )
            if STORE_S:
                tl.store(S + offs, s, mask=mask)
            s = s.to(tl.float32)
            if RMS_NORM:
                m2 += tl.sum(s * s, axis=0)
            else:
                count = tl.sum(mask.to(tl.float32), axis=0)
                mean_b = tl.sum(s, axis=0) / count
                centered = tl.where(mask, s - mean_b, 0.0)
                total = seen + count
                delta = mean_b - mean
                mean += delta * (count / total)
                m2 += tl.sum(centered * centered, axis=0) + delta * delta * (seen * count / total)
                seen = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        if not RMS_NORM:
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        if STORE_S:
            tl.debug_barrier()  # pass 2 reads s back, possibly stored by another thread
        # Pass 2: normalise, from the stored s (one read) or from x and the residual again.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            offs = row * N + cols
            if STORE_S:
                s = tl.load(S + offs, mask=mask, other=0.0)
            else:
                s = _residual_dropout(
                    X, RES, offs, mask, row, start, seed, drop_threshold, drop_scale, HAS_RES, HAS_DROPOUT, BLOCK_N
                )
            s = s.to(tl.float32)
            if RMS_NORM:
                y = s * rstd
            else:
                y = (s - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_row_block(
    DOUT, DS_IN, S, W, DS, DX, offs, cols, mask, row, col_start, N, mean, rstd, c1, c2,
    seed, drop_threshold, drop_scale,
    HAS_DS_IN: tl.constexpr, HAS_W: tl.constexpr, HAS_DROPOUT: tl.constexpr, RMS_NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """ds (and dx) of one block of a row from its c1 = mean(x̂ · g), c2 = mean(g); returns (dout, x̂)."""
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS_NORM:
        xhat = s * rstd
    else:
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
    g = dout
    if HAS_W:
        g = dout * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS_NORM:
        ds = (g - xhat * c1) * rstd
    else:
        ds = (g - (xhat * c1 + c2)) * rstd
    if HAS_DS_IN:
        ds += tl.load(DS_IN + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        keep = dropout_keep_row(seed, row, col_start, drop_threshold, BLOCK_N)
        dx = tl.where(keep, ds * drop_scale, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    return dout, xhat


@triton.jit
def _dropout_add_layer_norm_bwd_kernel(
    DOUT,  # [M, N] gradient of the output
    DS_IN,  # [M, N] gradient flowing into s from a pre-LN block (if HAS_DS_IN)
    S,  # [M, N] the forward's s
    W,  # [N] weight (if HAS_W)
    MEAN,  # [M] fp32 (LayerNorm only)
    RSTD,  # [M] fp32
    DS,  # [M, N] gradient of s = gradient of the residual
    DX,  # [M, N] gradient of x (if HAS_DROPOUT; else it equals DS)
    DW_PARTIAL,  # [programs, N] fp32 per-program sums of dout * x̂ (if HAS_W)
    DB_PARTIAL,  # [programs, N] fp32 per-program sums of dout (if HAS_B)
    C12,  # [2, M] fp32 scratch: each row's c1 and c2 (if not ONE_BLOCK)
    M,
    N,
    rows_per_program,
    SEED,
    drop_threshold,
    drop_scale,
    HAS_DS_IN: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    RMS_NORM: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK_N >= N: a row and the dw/db sums stay in registers
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            offs = row64 * N + cols
            s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
            dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if RMS_NORM:
                xhat = s * rstd
            else:
                xhat = tl.where(mask, (s - tl.load(MEAN + row)) * rstd, 0.0)
            g = dout
            if HAS_W:
                g = dout * w
            c1 = tl.sum(xhat * g, axis=0) / N
            if RMS_NORM:
                ds = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / N
                ds = (g - (xhat * c1 + c2)) * rstd
            if HAS_DS_IN:
                ds += tl.load(DS_IN + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                keep = dropout_keep_row(seed, row64, 0, drop_threshold, BLOCK_N)
                dx = tl.where(keep, ds * drop_scale, 0.0)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw += dout * xhat
            if HAS_B:
                db += dout
        if HAS_W:
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)
    else:
        # Wide rows. Pass 1, row by row: c1 = mean(x̂ · g) and c2 = mean(g) over blocks of the row.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            mean = 0.0
            if not RMS_NORM:
                mean = tl.load(MEAN + row)
            acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                offs = tl.cast(row, tl.int64) * N + cols
                s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc1 += tl.where(mask, (s - mean) * rstd, 0.0) * g
                acc2 += g
            tl.store(C12 + row, tl.sum(acc1, axis=0) / N)
            tl.store(C12 + M + row, tl.sum(acc2, axis=0) / N)
        tl.debug_barrier()  # pass 2 reads every row's c1, c2, stored by one thread
        # Pass 2, block by block of columns, so that the block's dw and db sums stay in registers.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for row in range(row_start, row_end):
                row64 = tl.cast(row, tl.int64)
                offs = row64 * N + cols
                rstd = tl.load(RSTD + row)
                mean = 0.0
                if not RMS_NORM:
                    mean = tl.load(MEAN + row)
                c1 = tl.load(C12 + row)
                c2 = tl.load(C12 + M + row)
                dout, xhat = _ln_bwd_row_block(
                    DOUT, DS_IN, S, W, DS, DX, offs, cols, mask, row64, start, N, mean, rstd, c1, c2,
                    seed, drop_threshold, drop_scale, HAS_DS_IN, HAS_W, HAS_DROPOUT, RMS_NORM, BLOCK_N,
                )  # fmt: skip
                if HAS_W:
                    dw += dout * xhat
                if HAS_B:
                    db += dout
            if HAS_W:
                tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)
            if HAS_B:
                tl.store(DB_PARTIAL + pid * N + cols, db, mask=mask)


@triton.jit
def _column_sum_kernel(
    PARTIAL,  # [P, N] fp32
    OUT,  # [N] fp32, Σ over the P rows
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    acc = tl.zeros((BLOCK_P, BLOCK_COLS), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        m = (rows[:, None] < P) & (cols[None, :] < N)
        acc += tl.load(PARTIAL + rows[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=cols < N)


# Widest row a program keeps in registers (ONE_BLOCK_MAX), and the block that wider rows loop over
# (LOOP_BLOCK) with LOOP_WARPS. The backward holds more per element (w, the dw/db sums, s, dout, x̂)
# and runs a whole row on at most 8 warps, so that ptxas may use up to 255 registers a thread
# rather than 128. The loops run 16 warps over their block, four to eight columns a thread: with
# 8 columns a thread on 8 warps (backward, blocks of 2,048) or 16 on 16 warps (forward, 8,192)
# ptxas chose 40-64 registers and spilled a few words (4-8 B a thread: fp16/bf16 backward with
# dropout, fp32 RMSNorm forward, on sm_80), where 16 warps over 2,048 columns (backward, 47-50
# registers) and over 4,096 (forward, 30-32) spill nothing. An SM still holds 1,024 of the
# backward's threads (two of its four 512-thread programs, by registers, as four 256-thread ones
# before) and now 2,048 of the forward's (four programs, one a row, at <= 32 registers).
# Checked with ptxas -v (Triton 3.8, sm_80 and sm_90): no spills at any width up to MAX_HIDDEN,
# where a whole row in registers spilled from 8,192 columns (backward) and 16,384 (forward), up
# to ~12 KB a thread at 65,536.
FWD_ONE_BLOCK_MAX, FWD_MAX_WARPS, FWD_LOOP_BLOCK, FWD_LOOP_WARPS = 8192, 16, 4096, 16
BWD_ONE_BLOCK_MAX, BWD_MAX_WARPS, BWD_LOOP_BLOCK, BWD_LOOP_WARPS = 4096, 8, 2048, 16


def _launch_params(
    n: int, one_block_max: int, max_warps: int, loop_block: int, loop_warps: int
) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, ONE_BLOCK) for rows of n: a whole row, or blocks of ``loop_block``."""
    # >= 4: the dropout mask is drawn in groups of four columns.
    whole = max(triton.next_power_of_2(n), 4)
    if whole > one_block_max:
        return loop_block, loop_warps, False
    return whole, min(max(whole // 256, 1), max_warps), True


def dropout_add_layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dropout_p: float,
    eps: float,
    seed: torch.Tensor | None,
    rms_norm: bool,
    store_s: bool,
):
    """Forward on a contiguous [M, N] view.

    ``seed``: the dropout's Philox key, a 0-dim int64 tensor on x's device that the kernel reads
    there (None without dropout). Returns ``(out, s, mean, rstd)``: ``s`` is empty unless
    ``store_s``, ``mean`` is empty for RMSNorm; ``mean`` and ``rstd`` are fp32 [M].
    """
    m, n = x.shape
    out = torch.empty_like(x)
    s = torch.empty_like(x) if store_s else x.new_empty(0)
    mean = x.new_empty(0 if rms_norm else m, dtype=torch.float32)
    rstd = x.new_empty(m, dtype=torch.float32)
    if m == 0:
        return out, s, mean, rstd
    block_n, num_warps, one_block = _launch_params(n, FWD_ONE_BLOCK_MAX, FWD_MAX_WARPS, FWD_LOOP_BLOCK, FWD_LOOP_WARPS)
    check_grid((m,), "dropout_add_layer_norm")
    with device_ctx(x):
        _dropout_add_layer_norm_fwd_kernel[(m,)](
            x,
            residual,
            weight,
            bias,
            out,
            s,
            mean,
            rstd,
            n,
            eps,
            seed_arg(seed, dropout_p, x.device),
            dropout_threshold(dropout_p),
            dropout_scale(dropout_p),
            HAS_RES=residual is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_DROPOUT=dropout_p > 0.0,
            STORE_S=store_s,
            RMS_NORM=rms_norm,
            ONE_BLOCK=one_block,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out, s, mean, rstd


def _num_programs(x: torch.Tensor, m: int) -> int:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return min(m, 4 * sms)
    return min(m, 4)  # the interpreter: a few programs still exercise the cross-program reduction


def _column_sum(partial: torch.Tensor) -> torch.Tensor:
    p, n = partial.shape
    out = partial.new_empty(n)
    block_cols = 64
    with device_ctx(partial):
        _column_sum_kernel[(triton.cdiv(n, block_cols),)](
            partial, out, p, n, BLOCK_P=32, BLOCK_COLS=block_cols, num_warps=4
        )
    return out


def dropout_add_layer_norm_bwd(
    dout: torch.Tensor,
    ds_in: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
    rms_norm: bool,
    has_bias: bool,
):
    """Backward on a contiguous [M, N] view.

    Returns ``(ds, dx, dweight, dbias)``: ``dx`` is empty without dropout (it equals ``ds``);
    ``dweight``/``dbias`` are fp32 [N], empty when there is no weight/bias.
    """
    m, n = dout.shape
    has_w = weight is not None
    ds = torch.empty_like(dout)
    dx = torch.empty_like(dout) if dropout_p > 0.0 else dout.new_empty(0)
    programs = _num_programs(dout, m)
    partial_shape = (max(programs, 1), n)
    dw_partial = dout.new_zeros(partial_shape, dtype=torch.float32) if has_w else None
    db_partial = dout.new_zeros(partial_shape, dtype=torch.float32) if has_bias else None
    if m > 0:
        block_n, num_warps, one_block = _launch_params(
            n, BWD_ONE_BLOCK_MAX, BWD_MAX_WARPS, BWD_LOOP_BLOCK, BWD_LOOP_WARPS
        )
        c12 = dout.new_empty(0 if one_block else 2 * m, dtype=torch.float32)
        with device_ctx(dout):
            _dropout_add_layer_norm_bwd_kernel[(programs,)](
                dout,
                ds_in,
                s,
                weight,
                mean,
                rstd,
                ds,
                dx,
                dw_partial,
                db_partial,
                c12 if c12.numel() else dout,
                m,
                n,
                triton.cdiv(m, programs),
                seed_arg(seed, dropout_p, dout.device),
                dropout_threshold(dropout_p),
                dropout_scale(dropout_p),
                HAS_DS_IN=ds_in is not None,
                HAS_W=has_w,
                HAS_B=has_bias,
                HAS_DROPOUT=dropout_p > 0.0,
                RMS_NORM=rms_norm,
                ONE_BLOCK=one_block,
                BLOCK_N=block_n,
                num_warps=num_warps,
            )
    dweight = _column_sum(dw_partial) if has_w else dout.new_empty(0, dtype=torch.float32)
    dbias = _column_sum(db_partial) if has_bias else dout.new_empty(0, dtype=torch.float32)
    return ds, dx, dweight, dbias
