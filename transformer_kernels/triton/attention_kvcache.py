# Attention of a decoding step over a preallocated KV cache (flash-decoding), in Triton: a few new
# queries, the cache's keys up to a per-sequence length read on the device, the new keys and values
# appended in the same kernel, key padding, GQA/MQA, causal bottom-right, head dims up to 256.
# Modelled on flash-attention's split-KV forward (flash_attn_with_kvcache) and the flash-decoding
# write-up: with one query row per head a program per (batch, head) leaves most of a GPU idle on
# long caches, so the keys of each (batch, KV head) are cut into `num_splits` slices processed in
# parallel, each writing an fp32 partial output and its log-sum-exp, which a second kernel merges.
# Trade-off: the partials cost an extra fp32 round trip ([B, Hkv, splits, Lq·group, D]), small
# beside the cache itself; with one split the first kernel writes the output directly. All query
# heads of a GQA group (× the Lq queries) are the rows of one program's tile, so each key and value
# is read once per group; the tile is padded to 16 rows for tl.dot, idle work on a memory-bound
# kernel.
"""Triton kernels of ``attention_with_kvcache`` and their launcher.

Per program: batch ``b``, KV head ``kvh``, a tile of rows ``r = i · G + g`` (query ``i`` of
``Lq``, query head ``kvh · G + g`` of the group of ``G = Hq / Hkv``), a slice of the keys
``[start, end)`` of the ``n = cache_seqlens[b] + Lnew`` visible ones. Key ``j`` is the cache's
row ``j`` below ``cache_seqlens[b]``, the new row ``j - cache_seqlens[b]`` above; of the programs
whose slice holds a new row, the one of the last row tile writes it into the cache (one writer
per row; no program reads a cache row at or above ``cache_seqlens[b]``, so the write races with
no read). In base 2, with
s = softmax_scale · log2(e) · q·k over the visible keys of the slice:

    m = max s,  l = Σ 2^(s - m),  o = Σ 2^(s - m) v / l,  lse₂ = m + log2 l   (o = 0, lse₂ = -inf: none)

(accumulated tile by tile with the online softmax), and the merge of the slices ``t``:

    out = Σ_t 2^(lse₂_t - M) o_t / Σ_t 2^(lse₂_t - M),   M = max_t lse₂_t   (0 when every lse₂_t = -inf)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpret
from .attention import LOG2E, _offsets
from .launch import check_grid, device_ctx
from .precision import attention_dot_precision

# Rows per program: the group × Lq rows padded to a power of two >= 16 (tl.dot's minimum), up to
# MAX_BLOCK_M; more rows take several row tiles (each reading the keys again).
MAX_BLOCK_M = 64


@triton.jit
def _attend(
    q, kt, v, offs_n, ok, m_i, l_i, acc, row_ok, qi, n, Lq, KPM, kpm_row, Lmax, scale_log2,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: q [BLOCK_M, BLOCK_D], kt [BLOCK_D, BLOCK_N], v
    [BLOCK_N, BLOCK_D] at key positions offs_n (``ok``: inside the slice); returns (m, l, acc)."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    key_ok = ok
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + kpm_row + offs_n, mask=ok & (offs_n < Lmax), other=0) == 0)
    vis = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= (n - Lq + qi)[:, None])
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen no visible key its max is -inf: subtract 0 instead (all p are 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_kvcache_fwd_kernel(
    Q,  # [B, Lq, Hq, D]
    K_CACHE,  # [B, Lmax, Hkv, D], rows [seqlen, seqlen + Lnew) written (if HAS_NEW)
    V_CACHE,  # [B, Lmax, Hkv, D], likewise
    SEQLENS,  # [B] int32: keys already in each cache
    K_NEW,  # [B, Lnew, Hkv, D] (if HAS_NEW)
    V_NEW,  # [B, Lnew, Hkv, D] (if HAS_NEW)
    KPM,  # [B, Lmax] uint8, nonzero = padding (if HAS_KPM); contiguous
    OUT,  # [B, Lq, Hq, D], written when not SPLIT
    O_PART,  # [B·Hkv, splits, R, D] fp32 contiguous, written when SPLIT
    LSE_PART,  # [B·Hkv, splits, R] fp32 contiguous (base-2 lse), written when SPLIT
    stride_qb,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kcb,
    stride_kcn,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcn,
    stride_vch,
    stride_vcd,
    stride_knb,
    stride_knn,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnn,
    stride_vnh,
    stride_vnd,
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Hkv,
    GROUP,  # Hq // Hkv
    Lq,
    Lnew,  # new keys per sequence (0 if not HAS_NEW)
    Lmax,
    HEAD_DIM,
    scale_log2,  # softmax_scale · log2(e)
    n_splits,
    n_row_tiles,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_NEW: tl.constexpr,
    SPLIT: tl.constexpr,  # n_splits > 1: write partials, else the output
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), None otherwise
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Axis 0 enumerates (batch · KV head, row tile, split), split fastest: axis 1 caps at 65,535.
    pid = tl.program_id(0)
    split = pid % n_splits
    row_tile = (pid // n_splits) % n_row_tiles
    bkv = pid // (n_splits * n_row_tiles)
    b = bkv // Hkv
    kvh = bkv % Hkv
    R = Lq * GROUP
    offs_r = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < R
    qi = offs_r // GROUP  # query index of each row
    qh = kvh * GROUP + offs_r % GROUP  # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_rows = qi.to(tl.int64) * stride_qm + qh.to(tl.int64) * stride_qh  # [BLOCK_M]
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + q_rows[:, None] + offs_d.to(tl.int64)[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # min() keeps a length past the caller's contract (seqlen + Lnew <= Lmax) inside the buffers.
    seqlen = tl.minimum(tl.load(SEQLENS + b), Lmax)
    n = seqlen + Lnew  # visible keys after the append
    chunk = tl.cdiv(tl.cdiv(n, BLOCK_N), n_splits) * BLOCK_N
    start = split * chunk
    end = tl.minimum(n, start + chunk)
    if CAUSAL:  # no row of the tile sees a key past its last query's diagonal
        last_q = tl.minimum((row_tile * BLOCK_M + BLOCK_M - 1) // GROUP, Lq - 1)
        end = tl.minimum(end, n - Lq + last_q + 1)

    KC = K_CACHE + b.to(tl.int64) * stride_kcb + kvh.to(tl.int64) * stride_kch
    VC = V_CACHE + b.to(tl.int64) * stride_vcb + kvh.to(tl.int64) * stride_vch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The slice's keys that are in the cache, then those being appended: two loops, so that each
    # key tile is one load (no select between two sources).
    cache_end = tl.minimum(end, seqlen)
    for start_n in range(start, cache_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = offs_n < cache_end
        kt = tl.load(KC + _offsets(offs_d, stride_kcd, offs_n, stride_kcn), mask=d_ok[:, None] & ok[None, :], other=0.0)
        v = tl.load(VC + _offsets(offs_n, stride_vcn, offs_d, stride_vcd), mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _attend(
            q, kt, v, offs_n, ok, m_i, l_i, acc, row_ok, qi, n, Lq, KPM, b.to(tl.int64) * Lmax, Lmax, scale_log2,
            CAUSAL, HAS_KPM, DOT_PRECISION,
        )  # fmt: skip
    if HAS_NEW:
        KN = K_NEW + b.to(tl.int64) * stride_knb + kvh.to(tl.int64) * stride_knh
        VN = V_NEW + b.to(tl.int64) * stride_vnb + kvh.to(tl.int64) * stride_vnh
        for start_n in range(tl.maximum(start, seqlen), end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            ok = offs_n < end
            new_n = offs_n - seqlen  # the row of k / v
            kt = tl.load(
                KN + _offsets(offs_d, stride_knd, new_n, stride_knn), mask=d_ok[:, None] & ok[None, :], other=0.0
            )
            v = tl.load(
                VN + _offsets(new_n, stride_vnn, offs_d, stride_vnd), mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            # The append: the slice's last row tile writes the row (kept below Lmax). Not the first:
            # causal, an earlier tile's last query stops short of the last new keys.
            store = ok & (offs_n < Lmax) & (row_tile == n_row_tiles - 1)
            tl.store(KC + _offsets(offs_d, stride_kcd, offs_n, stride_kcn), kt, mask=d_ok[:, None] & store[None, :])
            tl.store(VC + _offsets(offs_n, stride_vcn, offs_d, stride_vcd), v, mask=store[:, None] & d_ok[None, :])
            m_i, l_i, acc = _attend(
                q, kt, v, offs_n, ok, m_i, l_i, acc, row_ok, qi, n, Lq, KPM, b.to(tl.int64) * Lmax, Lmax, scale_log2,
                CAUSAL, HAS_KPM, DOT_PRECISION,
            )  # fmt: skip

    has_key = l_i > 0.0  # l >= 1 once a row has seen one visible key
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        part = (bkv.to(tl.int64) * n_splits + split) * R + offs_r  # [BLOCK_M] rows of the partials
        lse = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=row_ok)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    else:
        o_rows = qi.to(tl.int64) * stride_om + qh.to(tl.int64) * stride_oh
        tl.store(
            OUT + b.to(tl.int64) * stride_ob + o_rows[:, None] + offs_d.to(tl.int64)[None, :] * stride_od,
            o.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _attention_kvcache_combine_kernel(
    O_PART,  # [B·Hkv, splits, R, D] fp32 contiguous
    LSE_PART,  # [B·Hkv, splits, R] fp32 contiguous
    OUT,  # [B, Lq, Hq, D]
    stride_ob,
    stride_om,
    stride_oh,
    stride_od,
    Hkv,
    GROUP,
    Lq,
    HEAD_DIM,
    n_splits,
    BLOCK_S: tl.constexpr,  # >= n_splits, a power of two
    BLOCK_D: tl.constexpr,
):
    # One program per output row (b, i, h); axis 0 enumerates (b · Hkv, r).
    pid = tl.program_id(0)
    R = Lq * GROUP
    r = pid % R
    bkv = pid // R
    b = bkv // Hkv
    qi = r // GROUP
    qh = (bkv % Hkv) * GROUP + r % GROUP
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    part = (bkv.to(tl.int64) * n_splits + offs_s) * R + r  # [BLOCK_S]
    lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty slices
    o = tl.load(
        O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        OUT
        + b.to(tl.int64) * stride_ob
        + qi.to(tl.int64) * stride_om
        + qh.to(tl.int64) * stride_oh
        + offs_d * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


# ---------------------------------------------------------------------------------------------
# The launcher: takes and returns what the op layer's custom op does.


def config(rows: int, head_dim: int, fp32: bool) -> dict:
    """Tile sizes and launch options of the forward kernel. Untuned: the key tile keeps a
    [BLOCK_D, BLOCK_N] K tile and a [BLOCK_N, BLOCK_D] V tile in registers beside the
    [BLOCK_M, BLOCK_D] accumulator; under the interpreter a small key tile, so the tests run the
    multi-tile and multi-split paths at small lengths."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(max(rows, 1))))
    if triton_interpret() or fp32 or block_d > 128:
        # fp32: IEEE dots run on the CUDA cores, whose operand layouts take several times the
        # registers; D = 256: a 32-key tile spilled on an H100 (fp16, 168 registers).
        block_n = 16
    else:
        block_n = 64
    cfg = dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1 if fp32 else 2)
    if fp32 and not triton_interpret():
        # ptxas capped the fp32 kernel at 80 registers on sm_90 and spilled: allow it the most a
        # thread may have (it then takes 95 to 210 by head dim and arch, no spills).
        cfg["maxnreg"] = 255
    return cfg


def attention_with_kvcache_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Forward, appending ``k``/``v`` into the caches in place.

    Args:
        q: [B, Lq, Hq, D]; k_cache, v_cache: [B, Lmax, Hkv, D]; k, v: [B, Lnew, Hkv, D] or None
            (any strides), fp16/bf16/fp32, D <= 256.
        cache_seqlens: int32 [B] on q's device.
        key_padding_mask: bool [B, Lmax], True = padding; or None.
        num_splits: slices of the keys per (batch, KV head), >= 1 (capped at the key tiles of Lmax).

    Returns:
        out [B, Lq, Hq, D] contiguous in q's dtype.
    """
    bsz, lq, hq, d = q.shape
    lmax, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    rows = lq * group
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    lnew = 0 if k is None else k.shape[1]
    if lmax == 0:
        return out.zero_()
    cfg = config(rows, d, q.dtype == torch.float32)
    n_splits = max(1, min(num_splits, triton.cdiv(lmax, cfg["BLOCK_N"])))
    row_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
    grid = (bsz * hkv * row_tiles * n_splits,)
    check_grid(grid, "attention_with_kvcache")
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None
    split = n_splits > 1
    o_part = lse_part = None
    if split:
        o_part = torch.empty((bsz * hkv, n_splits, rows, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((bsz * hkv, n_splits, rows), dtype=torch.float32, device=q.device)
    new_strides = (*k.stride(), *v.stride()) if k is not None else (0,) * 8
    with device_ctx(q):
        _attention_kvcache_fwd_kernel[grid](
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            k,
            v,
            kpm,
            out,
            o_part,
            lse_part,
            *q.stride(),
            *k_cache.stride(),
            *v_cache.stride(),
            *new_strides,
            *out.stride(),
            hkv,
            group,
            lq,
            lnew,
            lmax,
            d,
            softmax_scale * LOG2E,
            n_splits,
            row_tiles,
            CAUSAL=causal,
            HAS_KPM=kpm is not None,
            HAS_NEW=k is not None,
            SPLIT=split,
            DOT_PRECISION=attention_dot_precision(q.dtype),
            **cfg,
        )
        if split:
            combine_grid = (bsz * hkv * rows,)
            check_grid(combine_grid, "attention_with_kvcache")
            _attention_kvcache_combine_kernel[combine_grid](
                o_part,
                lse_part,
                out,
                *out.stride(),
                hkv,
                group,
                lq,
                d,
                n_splits,
                BLOCK_S=triton.next_power_of_2(n_splits),
                BLOCK_D=cfg["BLOCK_D"],
                num_warps=4,
            )
    return out
