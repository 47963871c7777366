# Fused attention (FlashAttention-2), forward and backward, in Triton, with causal (bottom-right),
# key-padding masks, in-kernel dropout, GQA/MQA, any lengths and head dims up to 256.
# Modelled on Triton's 06-fused-attention tutorial and flash-attention's Triton kernel: the forward
# keeps one query tile in registers and streams the keys with an online softmax; the backward
# recomputes the probabilities from the saved log-sum-exp in two kernels (dk/dv per key tile, dq per
# query tile) instead of one kernel with dq atomics: deterministic, at the cost of computing QKᵀ and
# dO·Vᵀ twice. GQA's dk/dv are summed over the query heads of a group in registers, by as many
# programs per key tile as it takes to fill the GPU, each writing an fp32 partial that a fixed-order
# sum reduces (no atomics: still deterministic). Every grid lies on axis 0 (axis 1 holds 65,535),
# and every row offset is int64.
# The same three kernels serve attention_varlen (VARLEN): sequences packed back to back, as
# FlashAttention's varlen API; each program reads its sequence's bounds from cu_seqlens and the grid
# covers max_seqlen tiles per (sequence, head), the tiles past a shorter sequence's end exiting at once.
"""Triton kernels of ``attention`` and their launchers.

Forward, per query row i (``visible`` and ``keep`` as in ``reference/attention.py``; in base 2,
with s = softmax_scale · log2(e) · q·k):

    m_j = max(m_{j-1}, max_j s_ij),   l_j = l_{j-1} · 2^(m_{j-1} - m_j) + Σ_j 2^(s_ij - m_j)
    acc_j = acc_{j-1} · 2^(m_{j-1} - m_j) + Σ_j 2^(s_ij - m_j) · keep_ij / (1 - p) · v_j
    out = acc / l,   lse₂ = m + log2 l = lse / ln 2      (out = 0, lse₂ = -inf if i sees no key)

The log-sum-exp is kept in base 2 (``lse₂``) for the backward, which recomputes P = 2^(s - lse₂):
a round trip through the natural log would cost ~ulp(|s|) in the exponent, 1e-3 at huge logits.

Backward (the vector-Jacobian product), with P recomputed and Z = keep / (1 - p):

    dV = (P∘Z)ᵀ dO,   dP = (dO Vᵀ)∘Z,   dS = P∘(dP - Δ),   Δ_i = Σ_d dO_id · O_id
    dQ = scale · dS K,   dK = scale · dSᵀ Q

(Δ = rowsum(P∘dP) because O = (P∘Z) V.) No [Lq, Lk] tensor ever leaves the registers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..reference.philox import dropout_scale, dropout_threshold
from . import triton_interpret
from .launch import autotune, check_grid, device_ctx
from .philox import dropout_keep_tile, seed_arg
from .precision import attention_dot_precision

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Shared pieces of the three kernels.


@triton.jit
def _key_ok(KPM, b, offs_n, Lk, HAS_KPM: tl.constexpr):
    """[BLOCK_N] bool: key j of batch b exists and is not padding."""
    ok = offs_n < Lk
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b.to(tl.int64) * Lk + offs_n, mask=ok, other=1) == 0)
    return ok


@triton.jit
def _offsets(rows, stride_r, cols, stride_c):
    """[R, C] element offsets of a tile, in int64: a row offset alone passes 2^31 at 256k tokens in
    a fused-QKV layout (stride 3 · H · D), and a head-dim stride may be as large as a row's."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _tile_and_head(pid, n_tiles):
    """Grid axis 0 enumerates (head, tile) pairs, tile fastest (programs of one head, which read the
    same keys, run together); axis 1 would cap the heads at 65,535."""
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _sequence(CU_Q, CU_K, b, Lq, Lk, VARLEN: tl.constexpr):
    """(first query row, first key row, Lq, Lk) of batch entry b: with VARLEN, sequence b of the
    packed tensors, from cu_seqlens (int32 [B + 1]); else (0, 0, Lq, Lk) of the padded batch."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        return (
            q_start.to(tl.int64),
            k_start.to(tl.int64),
            tl.load(CU_Q + b + 1) - q_start,
            tl.load(CU_K + b + 1) - k_start,
        )
    else:
        return 0, 0, Lq, Lk


@triton.jit
def _lse_row0(bh, h, q_start, Lq, LSE_H, VARLEN: tl.constexpr):
    """Offset of the first lse₂ (and Δ) of (batch entry, head) bh: [B, Hq, Lq] padded; [Hq, total_q]
    packed (LSE_H = total_q), as FlashAttention's varlen lse."""
    if VARLEN:
        return h.to(tl.int64) * LSE_H + q_start
    else:
        return bh.to(tl.int64) * Lq


@triton.jit
def _visible(q_idx, k_idx, key_ok, Lq, Lk, CAUSAL: tl.constexpr):
    """Broadcast bool: query q_idx may attend to key k_idx (bottom-right causal alignment)."""
    vis = (q_idx < Lq) & key_ok
    if CAUSAL:
        vis = vis & (k_idx <= q_idx + (Lk - Lq))
    return vis


# ---------------------------------------------------------------------------------------------
# Tile sizes. On a GPU the kernels are autotuned over the candidates of their (operand size, head-dim
# bucket), keyed on the padded head dim, the masks and power-of-two length buckets (Triton adds the
# tensor dtypes to every key). TK_AUTOTUNE=0 takes each bucket's first candidate instead (for test
# runs, where tuning every shape costs minutes of compiles). Under TRITON_INTERPRET=1 one small
# config: tiles smaller than the test lengths, and unequal, so the partial- and multi-tile paths run.
#
# Every candidate was compiled offline (Triton 3.8) for sm_80 and sm_90 with causal + padding +
# dropout (the most registers) and, for fp16, without either (ptxas allots registers differently:
# plain fp16 dK/dV at d = 256 in 32 x 32 tiles on 8 warps took 128 registers and spilled 12 B
# on sm_80, 0 B with the masks): each fits both archs' shared memory per block (166,912 B on an
# A100, 232,448 B on an H100); each first candidate spills nothing on either, the others at most
# SPILL_BUDGET bytes per thread: 16 four-byte values, 16 KB of local memory per 256-thread block,
# which L1 holds; and the autotuner pays for them in its own timing (a config is picked only if it
# is the fastest as it is). The 16-bit dK/dV first candidates at d = 128 and 256 hold 16 queries
# a step on 8 warps: with 32, the masks and dropout spilled 48 B a thread on sm_80 (d = 128);
# 64 x 64 tiles on 4 warps at d = 64 spilled 1.4 KB there. On a GPU with less shared memory
# (sm_86/89: 101,376 B) Triton's autotuner skips the configs that do not fit (OutOfResources), and
# so does _launch without autotuning. fp32 runs its dots in IEEE fp32 on the CUDA cores (no mma),
# whose operand layouts take several times the registers of a 16-bit tile's: hence its own,
# smaller tiles. Their speed is unmeasured: tune them with
# `python -m transformer_kernels.bench.bench_attention`.

SPILL_BUDGET = 64  # bytes of spill stores per thread, any candidate but the first, any arch

_TUNE_KEY = ["BLOCK_D", "CAUSAL", "HAS_KPM", "HAS_DROPOUT", "VARLEN", "lq_bucket", "lk_bucket"]

# kernel -> (operand bytes, head-dim bucket) -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)]; BLOCK_M
# tiles queries, BLOCK_N keys.
_CONFIGS = {
    "fwd": {
        (2, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
        (2, 128): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
        (2, 256): [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        (4, 64): [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2)],
        (4, 128): [(16, 32, 8, 2), (32, 16, 8, 2)],
        (4, 256): [(32, 16, 8, 2)],
    },
    "dkdv": {
        (2, 64): [(16, 64, 4, 2), (32, 64, 8, 3), (32, 64, 4, 3), (32, 128, 8, 3)],
        (2, 128): [(16, 64, 8, 2), (32, 64, 8, 3), (16, 32, 8, 2)],
        (2, 256): [(16, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
        (4, 64): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
        (4, 128): [(16, 16, 4, 2), (16, 32, 8, 2), (32, 32, 8, 2)],
        (4, 256): [(16, 32, 8, 2), (16, 16, 8, 2)],
    },
    "dq": {
        (2, 64): [(128, 32, 8, 3), (64, 32, 4, 2), (64, 16, 4, 2)],
        (2, 128): [(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3)],
        (2, 256): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
        (4, 64): [(64, 16, 8, 2), (32, 32, 4, 2), (32, 32, 8, 3), (32, 32, 8, 2), (64, 32, 8, 2)],
        (4, 128): [(32, 16, 4, 2), (32, 32, 8, 2), (64, 16, 8, 2)],
        (4, 256): [(16, 16, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    },
}
# attention_varlen's first candidates where the padded one spills with VARLEN (ptxas allots the
# packed kernels fewer registers; Triton 3.8, causal + dropout, sm_80): 16-bit dK/dV at d = 128 in
# 16 x 64 tiles spilled 8 B a thread, 16-bit dQ at d = 256 in 32 x 32 tiles 32 B; 16 x 32 tiles on
# 8 warps spill nothing on sm_80 or sm_90 in either (as candidates of the padded kernels: 52 B for
# dK/dV with causal + padding + dropout on sm_80, 0 B for dQ). The fp32 forward at d = 64 in
# 64 x 32 tiles on 8 warps spilled 4 B of stores and 4 of loads a thread on sm_80 (ptxas held it
# to 128 registers); 32 x 32 tiles on 8 warps take 64-71 registers and spill nothing on either
# arch, padded or packed.
_VARLEN_FIRST = {
    "fwd": {(4, 64): (32, 32, 8, 2)},
    "dkdv": {(2, 128): (16, 32, 8, 2)},
    "dq": {(2, 256): (16, 32, 8, 2)},
}
_INTERPRET_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _bucket_of(block_d: int, fp32: bool) -> tuple[int, int]:
    return (4 if fp32 else 2, max(64, block_d))


def _autotune() -> bool:
    """Read at each launch, so a test or benchmark can switch it with the environment."""
    return not triton_interpret() and os.environ.get("TK_AUTOTUNE", "1") != "0"


def _heuristics(kind: str, block_d: int, fp32: bool, varlen: bool = False) -> list[dict]:
    """The launch parameters without autotuning: the bucket's candidates, the first first."""
    if triton_interpret():
        m, n = _INTERPRET_TILES[kind]
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=1)]
    key = _bucket_of(block_d, fp32)
    bucket = _CONFIGS[kind][key]
    first = _VARLEN_FIRST[kind].get(key) if varlen and kind in _VARLEN_FIRST else None
    if first is not None:
        bucket = [first, *(c for c in bucket if c != first)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in bucket]


def _tuned(kind: str, kernel):
    """``kernel`` autotuned over every bucket's candidates, pruned per call to its own bucket's."""
    candidates = dict.fromkeys(c for bucket in _CONFIGS[kind].values() for c in bucket)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = set(_CONFIGS[kind][_bucket_of(args["BLOCK_D"], args["DOT_PRECISION"] == "ieee")])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return autotune(configs, _TUNE_KEY, prune)(kernel)


def _launch(kind: str, kernel, tuned, grid, *args, **kwargs) -> None:
    if _autotune():
        tuned[grid](*args, **kwargs)
        return
    configs = _heuristics(kind, kwargs["BLOCK_D"], kwargs["DOT_PRECISION"] == "ieee", kwargs.get("VARLEN", False))
    for i, config in enumerate(configs):
        try:
            kernel[grid](*args, **kwargs, **config)
            return
        except OutOfResources:  # less shared memory than an A100's: the bucket's next candidate
            if i == len(configs) - 1:
                raise


@triton.jit
def _attention_fwd_kernel(
    Q,  # [B, Lq, Hq, D]
    K,  # [B, Lk, Hkv, D]
    V,  # [B, Lk, Hkv, D]
    KPM,  # [B, Lk] uint8, nonzero = padding (if HAS_KPM); contiguous
    OUT,  # [B, Lq, Hq, D]
    LSE,  # [B, Hq, Lq] fp32, base-2 log-sum-exp of the scores (lse₂); contiguous
    CU_Q,  # VARLEN: int32 [B + 1], the packed queries' cumulative lengths (q, out: [total_q, Hq, D])
    CU_K,  # VARLEN: int32 [B + 1], the same for the keys (k, v: [total_k, Hkv, D])
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Hq,
    GROUP,  # Hq // Hkv: query heads per key/value head
    Lq,  # VARLEN: max_seqlen_q (sizes the grid and the dropout rows), and so on for Lk
    Lk,
    LSE_H,  # VARLEN: total_q, the stride of LSE's head axis ([Hq, total_q])
    HEAD_DIM,
    scale_log2,  # softmax_scale · log2(e)
    SEED,  # Philox key: 0-dim int64, read on the device (if HAS_DROPOUT)
    drop_threshold,  # keep iff (philox >> 8) >= drop_threshold
    drop_scale,  # 1 / (1 - p)
    lq_bucket,  # autotune key only
    lk_bucket,  # autotune key only
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), None otherwise
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, bh = _tile_and_head(tl.program_id(0), tl.cdiv(Lq, BLOCK_M))
    b = bh // Hq
    h = bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Flat index of (b, h, i, 0) in the [B, Hq, Lq, Lk] probabilities: the dropout counter (packed,
    # the padded batch's: Lq is max_seqlen_q, so both layouts draw one mask).
    drop_rows = bh.to(tl.int64) * Lq + offs_m  # rows of the [B·Hq·Lq, Lk] dropout mask
    q_start, k_start, Lq, Lk = _sequence(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= Lq:  # a tile past this sequence's end
            return
    lse_row0 = _lse_row0(bh, h, q_start, Lq, LSE_H, VARLEN)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    Q += b.to(tl.int64) * stride_qb + q_start * stride_qm + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + k_start * stride_kn + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + k_start * stride_vn + kvh.to(tl.int64) * stride_vh

    q = tl.load(
        Q + _offsets(offs_m, stride_qm, offs_d, stride_qd),
        mask=(offs_m[:, None] < Lq) & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = Lk
    if CAUSAL:  # key tiles wholly above the (bottom-right) diagonal are skipped
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_ok = (offs_n[None, :] < Lk) & d_ok[:, None]
        kt = tl.load(K + _offsets(offs_d, stride_kd, offs_n, stride_kn), mask=kv_ok, other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        key_ok = _key_ok(KPM, b, offs_n, Lk, HAS_KPM)
        vis = _visible(offs_m[:, None], offs_n[None, :], key_ok[None, :], Lq, Lk, CAUSAL)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no visible key its max is -inf: subtract 0 instead (all p are 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, drop_rows, start_n, drop_threshold, BLOCK_N)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(
            V + _offsets(offs_n, stride_vn, offs_d, stride_vd),
            mask=(offs_n[:, None] < Lk) & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0  # l >= 1 once a row has seen one visible key
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
    OUT += b.to(tl.int64) * stride_ob + q_start * stride_om + h.to(tl.int64) * stride_oh
    tl.store(
        OUT + _offsets(offs_m, stride_om, offs_d, stride_od),
        out.to(OUT.dtype.element_ty),
        mask=(offs_m[:, None] < Lq) & d_ok[None, :],
    )
    tl.store(LSE + lse_row0 + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attention_bwd_delta_kernel(
    OUT,  # [B, Lq, Hq, D]
    DOUT,  # [B, Lq, Hq, D]
    DELTA,  # [B, Hq, Lq] fp32: Σ_d dO · O; contiguous
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    Hq,
    Lq,
    HEAD_DIM,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m, bh = _tile_and_head(tl.program_id(0), tl.cdiv(Lq, BLOCK_M))
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        OUT + b * stride_ob + h * stride_oh + _offsets(offs_m, stride_om, offs_d, stride_od),
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DOUT + b * stride_dob + h * stride_doh + _offsets(offs_m, stride_dom, offs_d, stride_dod),
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _load_lse_log2(LSE, offs_m, Lq):
    """lse₂ of the rows; +inf for a row that sees no key (and for padding rows), so that
    2^(s - lse₂) is 0 there rather than NaN."""
    lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # [B, Lq, Hq, D]
    K,  # [B, Lk, Hkv, D]
    V,  # [B, Lk, Hkv, D]
    KPM,  # [B, Lk] uint8 (if HAS_KPM)
    DOUT,  # [B, Lq, Hq, D]
    LSE,  # [B, Hq, Lq] fp32 lse₂
    DELTA,  # [B, Hq, Lq] fp32
    DK,  # [B, Lk, Hkv · SPLITS, D]: per key/value head and split, summed over the split's query heads
    DV,  # [B, Lk, Hkv · SPLITS, D]
    CU_Q,  # VARLEN: as in the forward
    CU_K,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_dvd,
    Hq,
    Hkv,
    GROUP,
    SPLITS,  # the GROUP query heads of a key/value head are shared among this many programs
    Lq,
    Lk,
    LSE_H,
    HEAD_DIM,
    softmax_scale,
    scale_log2,
    SEED,
    drop_threshold,
    drop_scale,
    lq_bucket,
    lk_bucket,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tile (inner loop)
    BLOCK_N: tl.constexpr,  # key tile (this program's)
):
    pid_n, task = _tile_and_head(tl.program_id(0), tl.cdiv(Lk, BLOCK_N))
    split = task % SPLITS
    bkv = task // SPLITS
    b = bkv // Hkv
    kvh = bkv % Hkv
    heads = GROUP // SPLITS
    drop_lq = Lq  # the dropout mask's rows per (b, h): max_seqlen_q when VARLEN
    q_start, k_start, Lq, Lk = _sequence(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if VARLEN:
        if pid_n * BLOCK_N >= Lk:  # a tile past this sequence's end
            return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
    K += b.to(tl.int64) * stride_kb + k_start * stride_kn + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + k_start * stride_vn + kvh.to(tl.int64) * stride_vh
    k = tl.load(K + _offsets(offs_n, stride_kn, offs_d, stride_kd), mask=n_mask, other=0.0)
    v = tl.load(V + _offsets(offs_n, stride_vn, offs_d, stride_vd), mask=n_mask, other=0.0)
    key_ok = _key_ok(KPM, b, offs_n, Lk, HAS_KPM)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if CAUSAL:  # query tiles wholly below the first query that sees this key tile are skipped
        lo = tl.maximum(pid_n * BLOCK_N - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
    for g in range(0, heads):
        h = kvh * GROUP + split * heads + g
        bh = b * Hq + h
        lse_row0 = _lse_row0(bh, h, q_start, Lq, LSE_H, VARLEN)
        q_base = Q + b.to(tl.int64) * stride_qb + q_start * stride_qm + h.to(tl.int64) * stride_qh
        do_base = DOUT + b.to(tl.int64) * stride_dob + q_start * stride_dom + h.to(tl.int64) * stride_doh
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            m_mask = (offs_m[:, None] < Lq) & d_ok[None, :]
            q = tl.load(q_base + _offsets(offs_m, stride_qm, offs_d, stride_qd), mask=m_mask, other=0.0)
            do = tl.load(do_base + _offsets(offs_m, stride_dom, offs_d, stride_dod), mask=m_mask, other=0.0)
            lse2 = _load_lse_log2(LSE + lse_row0, offs_m, Lq)
            delta = tl.load(DELTA + lse_row0 + offs_m, mask=offs_m < Lq, other=0.0)
            # Transposed tiles [BLOCK_N, BLOCK_M]: rows are this program's keys.
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
            vis = _visible(offs_m[None, :], offs_n[:, None], key_ok[:, None], Lq, Lk, CAUSAL)
            pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                drop_rows = bh.to(tl.int64) * drop_lq + offs_m
                keep = tl.trans(dropout_keep_tile(seed, drop_rows, pid_n * BLOCK_N, drop_threshold, BLOCK_N))
                dv += tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= softmax_scale
    out_h = (kvh * SPLITS + split).to(tl.int64)
    DK += b.to(tl.int64) * stride_dkb + k_start * stride_dkn + out_h * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + k_start * stride_dvn + out_h * stride_dvh
    tl.store(DK + _offsets(offs_n, stride_dkn, offs_d, stride_dkd), dk.to(DK.dtype.element_ty), mask=n_mask)
    tl.store(DV + _offsets(offs_n, stride_dvn, offs_d, stride_dvd), dv.to(DV.dtype.element_ty), mask=n_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # [B, Lq, Hq, D]
    K,  # [B, Lk, Hkv, D]
    V,  # [B, Lk, Hkv, D]
    KPM,  # [B, Lk] uint8 (if HAS_KPM)
    DOUT,  # [B, Lq, Hq, D]
    LSE,  # [B, Hq, Lq] fp32 lse₂
    DELTA,  # [B, Hq, Lq] fp32
    DQ,  # [B, Lq, Hq, D]
    CU_Q,  # VARLEN: as in the forward
    CU_K,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqm,
    stride_dqh,
    stride_dqd,
    Hq,
    GROUP,
    Lq,
    Lk,
    LSE_H,
    HEAD_DIM,
    softmax_scale,
    scale_log2,
    SEED,
    drop_threshold,
    drop_scale,
    lq_bucket,
    lk_bucket,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, bh = _tile_and_head(tl.program_id(0), tl.cdiv(Lq, BLOCK_M))
    b = bh // Hq
    h = bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    drop_rows = bh.to(tl.int64) * Lq + offs_m  # rows of the [B·Hq·Lq, Lk] dropout mask
    q_start, k_start, Lq, Lk = _sequence(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= Lq:  # a tile past this sequence's end
            return
    lse_row0 = _lse_row0(bh, h, q_start, Lq, LSE_H, VARLEN)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_mask = (offs_m[:, None] < Lq) & d_ok[None, :]
    q_row0 = b.to(tl.int64) * stride_qb + q_start * stride_qm + h.to(tl.int64) * stride_qh
    q = tl.load(Q + q_row0 + _offsets(offs_m, stride_qm, offs_d, stride_qd), mask=m_mask, other=0.0)
    do = tl.load(
        DOUT
        + b.to(tl.int64) * stride_dob
        + q_start * stride_dom
        + h.to(tl.int64) * stride_doh
        + _offsets(offs_m, stride_dom, offs_d, stride_dod),
        mask=m_mask,
        other=0.0,
    )
    lse2 = _load_lse_log2(LSE + lse_row0, offs_m, Lq)
    delta = tl.load(DELTA + lse_row0 + offs_m, mask=offs_m < Lq, other=0.0)
    K += b.to(tl.int64) * stride_kb + k_start * stride_kn + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + k_start * stride_vn + kvh.to(tl.int64) * stride_vh
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M + Lk - Lq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        t_mask = (offs_n[None, :] < Lk) & d_ok[:, None]
        kt = tl.load(K + _offsets(offs_d, stride_kd, offs_n, stride_kn), mask=t_mask, other=0.0)
        vt = tl.load(V + _offsets(offs_d, stride_vd, offs_n, stride_vn), mask=t_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        key_ok = _key_ok(KPM, b, offs_n, Lk, HAS_KPM)
        vis = _visible(offs_m[:, None], offs_n[None, :], key_ok[None, :], Lq, Lk, CAUSAL)
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed, drop_rows, start_n, drop_threshold, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq *= softmax_scale
    tl.store(
        DQ
        + b.to(tl.int64) * stride_dqb
        + q_start * stride_dqm
        + h.to(tl.int64) * stride_dqh
        + _offsets(offs_m, stride_dqm, offs_d, stride_dqd),
        dq.to(DQ.dtype.element_ty),
        mask=m_mask,
    )


_attention_fwd_tuned = _tuned("fwd", _attention_fwd_kernel)
_attention_bwd_dkdv_tuned = _tuned("dkdv", _attention_bwd_dkdv_kernel)
_attention_bwd_dq_tuned = _tuned("dq", _attention_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers: take and return what the op layer's custom ops do.


def _grid(tiles: int, heads: int) -> tuple[int]:
    """The launch grid of ``tiles`` tiles for each of ``heads`` (batch, head) pairs, all on axis 0:
    CUDA caps grid axes 1 and 2 at 65,535 (4,096 sentences x 16 heads already pass that), axis 0
    at 2^31 - 1, beyond every input that fits in memory (each program owns >= 16 rows)."""
    programs = tiles * heads
    check_grid((programs,), "attention")
    return (programs,)


def _dkdv_splits(group: int, kv_programs: int, min_programs: int) -> int:
    """How many programs share the ``group`` query heads of one key/value tile: the smallest divisor
    of ``group`` that gives ``min_programs`` programs (``kv_programs`` without a split), else
    ``group``. Each split sums its heads' dK/dV in registers and writes an fp32 partial; a torch
    sum over the splits follows. One program per group, as in FlashAttention-2, leaves an A100/H100
    mostly idle with MQA (B=1, Hq=32, Lk=4k: 32 programs); splitting every group in full would cost
    an fp32 [B, Lk, Hq, D] pair of partials even where the GPU is already full."""
    for splits in range(1, group + 1):
        if group % splits == 0 and kv_programs * splits >= min_programs:
            return splits
    return group


def _min_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU twice over; under the interpreter, as many as exist (so the
    tests run the split path; they set it lower to run the others)."""
    if device.type != "cuda":
        return _INTERPRET_MIN_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


_INTERPRET_MIN_PROGRAMS = 2**31 - 1
_SPLIT_TILE = 64  # the key tile assumed when choosing the splits (the autotuner picks 32 to 128)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), 16384)


def _args(q, causal, dropout_p, seed, lq, lk, varlen):
    """Kernel keyword arguments shared by the forward and the backward."""
    return dict(
        SEED=seed_arg(seed, dropout_p, q.device),
        drop_threshold=dropout_threshold(dropout_p),
        drop_scale=dropout_scale(dropout_p),
        lq_bucket=_bucket(lq),
        lk_bucket=_bucket(lk),
        CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0,
        VARLEN=varlen,
        DOT_PRECISION=attention_dot_precision(q.dtype),
        BLOCK_D=_block_d(q.shape[-1]),
    )


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, row, head, dim) strides; a packed [total, H, D] tensor has no batch axis (stride 0:
    the kernels offset its rows by cu_seqlens instead)."""
    return t.stride() if t.dim() == 4 else (0, *t.stride())


def _kpm(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    return key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None


def _forward(q, k, v, kpm, cu, out, lse2, bsz, lq, lk, lse_h, softmax_scale, args) -> None:
    """Launch the forward over ``bsz`` (batch entry or sequence) x Hq x ``lq``-row tiles."""
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    grid = lambda meta: _grid(triton.cdiv(lq, meta["BLOCK_M"]), bsz * hq)  # noqa: E731
    with device_ctx(q):
        _launch(
            "fwd",
            _attention_fwd_kernel,
            _attention_fwd_tuned,
            grid,
            q,
            k,
            v,
            kpm,
            out,
            lse2,
            *cu,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(out),
            hq,
            hq // hkv,
            lq,
            lk,
            lse_h,
            d,
            softmax_scale * LOG2E,
            HAS_KPM=kpm is not None,
            **args,
        )


def _backward(dout, q, k, v, out, lse2, kpm, cu, dq, dk, dv, bsz, lq, lk, total_q, softmax_scale, args) -> None:
    """Launch Δ, dK/dV and dQ (``dq``, ``dk``, ``dv`` preallocated in the inputs' layout); ``total_q``:
    the packed query count (0 padded)."""
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    varlen = total_q > 0
    delta = torch.empty(lse2.shape, dtype=torch.float32, device=q.device)  # lse2's layout
    group = hq // hkv
    splits = _dkdv_splits(group, triton.cdiv(lk, _SPLIT_TILE) * bsz * hkv, _min_programs(q.device))
    if splits > 1:  # fp32 partials [..., Hkv, splits, D], summed below
        dk_out = torch.empty((*k.shape[:-2], hkv * splits, d), dtype=torch.float32, device=k.device)
        dv_out = torch.empty_like(dk_out)
    else:
        dk_out, dv_out = dk, dv
    scales = (softmax_scale, softmax_scale * LOG2E)
    # Δ over [B, Lq] rows, or over the packed rows as one sequence of total_q: either way its
    # [B, Hq, Lq] / [Hq, total_q] layout is lse2's.
    delta_b, delta_l = (1, total_q) if varlen else (bsz, lq)
    with device_ctx(q):
        _attention_bwd_delta_kernel[_grid(triton.cdiv(delta_l, 64), delta_b * hq)](
            out,
            dout,
            delta,
            *_strides(out),
            *_strides(dout),
            hq,
            delta_l,
            d,
            BLOCK_D=args["BLOCK_D"],
            BLOCK_M=64,
        )
        _launch(
            "dkdv",
            _attention_bwd_dkdv_kernel,
            _attention_bwd_dkdv_tuned,
            lambda meta: _grid(triton.cdiv(lk, meta["BLOCK_N"]), bsz * hkv * splits),
            q,
            k,
            v,
            kpm,
            dout,
            lse2,
            delta,
            dk_out,
            dv_out,
            *cu,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(dout),
            *_strides(dk_out),
            *_strides(dv_out),
            hq,
            hkv,
            group,
            splits,
            lq,
            lk,
            total_q,
            d,
            *scales,
            HAS_KPM=kpm is not None,
            **args,
        )
        _launch(
            "dq",
            _attention_bwd_dq_kernel,
            _attention_bwd_dq_tuned,
            lambda meta: _grid(triton.cdiv(lq, meta["BLOCK_M"]), bsz * hq),
            q,
            k,
            v,
            kpm,
            dout,
            lse2,
            delta,
            dq,
            *cu,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(dout),
            *_strides(dq),
            hq,
            group,
            lq,
            lk,
            total_q,
            d,
            *scales,
            HAS_KPM=kpm is not None,
            **args,
        )
    if splits > 1:  # a fixed-order sum: deterministic, unlike atomics
        dk.copy_(dk_out.unflatten(-2, (hkv, splits)).sum(-2))
        dv.copy_(dv_out.unflatten(-2, (hkv, splits)).sum(-2))


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor | None,
):
    """Forward.

    Args:
        q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] (any strides), fp16/bf16/fp32, D <= 256.
        key_padding_mask: bool [B, Lk], True = padding; or None.
        seed: the Philox key of the dropout mask, a 0-dim int64 tensor on q's device that the
            kernels read there (no host sync: CUDA-graph capturable); None when ``dropout_p == 0``.

    Returns:
        ``(out, lse2)``: out [B, Lq, Hq, D] contiguous in q's dtype; lse2 fp32 [B, Hq, Lq], the
        log-sum-exp of the scores in base 2 (natural lse = lse2 · ln 2), -inf on rows without keys.
    """
    bsz, lq, hq, _ = q.shape
    lk = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse2 = torch.empty((bsz, hq, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse2.fill_(float("-inf"))
    args = _args(q, causal, dropout_p, seed, lq, lk, varlen=False)
    _forward(q, k, v, _kpm(key_padding_mask), (None, None), out, lse2, bsz, lq, lk, 0, softmax_scale, args)
    return out, lse2


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor | None,
):
    """Backward: the gradients of q, k, v, given the forward's ``out`` and ``lse2``.

    Returns:
        ``(dq, dk, dv)``, contiguous, in the dtypes and shapes of ``q``, ``k``, ``v``.
    """
    bsz, lq = q.shape[:2]
    lk = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    args = _args(q, causal, dropout_p, seed, lq, lk, varlen=False)
    kpm = _kpm(key_padding_mask)
    _backward(dout, q, k, v, out, lse2, kpm, (None, None), dq, dk, dv, bsz, lq, lk, 0, softmax_scale, args)
    return dq, dk, dv


def attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor | None,
):
    """Forward over packed sequences.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (any strides), fp16/bf16/fp32, D <= 256.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] cumulative lengths, on q's device (not checked
            here: the op layer does).
        max_seqlen_q, max_seqlen_k: at least the longest sequence of each.

    Returns:
        ``(out, lse2)``: out [total_q, Hq, D] contiguous in q's dtype; lse2 fp32 [Hq, total_q].
    """
    total_q, hq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse2 = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[0] == 0 or k.shape[-1] == 0:
        return out.zero_(), lse2.fill_(float("-inf"))
    bsz = cu_seqlens_q.numel() - 1
    args = _args(q, causal, dropout_p, seed, max_seqlen_q, max_seqlen_k, varlen=True)
    cu = (cu_seqlens_q, cu_seqlens_k)
    _forward(q, k, v, None, cu, out, lse2, bsz, max_seqlen_q, max_seqlen_k, total_q, softmax_scale, args)
    return out, lse2


def attention_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    seed: torch.Tensor | None,
):
    """Backward over packed sequences: ``(dq, dk, dv)``, contiguous, shaped as ``q``, ``k``, ``v``."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bsz = cu_seqlens_q.numel() - 1
    args = _args(q, causal, dropout_p, seed, max_seqlen_q, max_seqlen_k, varlen=True)
    cu = (cu_seqlens_q, cu_seqlens_k)
    lq, lk, total_q = max_seqlen_q, max_seqlen_k, q.shape[0]
    _backward(dout, q, k, v, out, lse2, None, cu, dq, dk, dv, bsz, lq, lk, total_q, softmax_scale, args)
    return dq, dk, dv
