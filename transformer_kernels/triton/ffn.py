# dropout(act(x Wᵀ + b)) as one GEMM with bias, activation and dropout in its epilogue; its backward.
# Modelled on Triton's matmul tutorial (grouped tile order) and Apex FusedDense (z kept for GELU').
# Trade-off: backward writes dz once (Philox once per element, not per GEMM tile), then 2 plain GEMMs.
"""Triton kernels of ``fused_linear`` and their launchers.

Forward, per output element (keep, p as in ``reference/philox.py``):

    z_ij = Σ_k x_ik W_jk + b_j,    out_ij = keep_ij / (1 - p) · act(z_ij)

z is stored (rounded to x's dtype) only for GELU, whose derivative needs it; ReLU's backward reads
``out != 0``, which is ``keep ∧ z > 0`` exactly, and no activation needs nothing.

Backward (the vector-Jacobian product):

    dz = dout ∘ keep / (1 - p) ∘ act'(z),   dx = dz W,   dW = dzᵀ x,   db = Σ_i dz_i

    gelu'(z)      = Φ(z) + z φ(z)
    gelu_tanh'(z) = σ(2u) + 2 z u' σ(2u) (1 - σ(2u)),   u = √(2/π) (z + 0.044715 z³)

dz is written once, in x's dtype, by one elementwise pass; dx and dW are then two plain GEMMs over
strided views (no transposes). A GEMM prologue computing dz instead would redraw the Philox mask in
every tile that reads it (N/BLOCK_N or K/BLOCK_K times); the pass costs one write and two reads of
[M, N]. db is summed from the fp32 dz in that pass (per row tile, then the few partial rows), or,
when dz is dout itself (no activation, no dropout: ffn's second layer), in the dW GEMM from the
tiles it loads anyway.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference.philox import dropout_scale, dropout_threshold
from . import triton_interpret
from .launch import autotune, device_ctx
from .philox import dropout_keep_tile, seed_arg
from .precision import matmul_dot_precision

ACTIVATION_IDS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}


@triton.jit
def _sigmoid(v):
    # exp(80) is finite in fp32, and σ(-80) ≈ 2e-35 is what 1 / (1 + exp(80)) gives anyway.
    return 1.0 / (1.0 + tl.exp(-tl.maximum(v, -80.0)))


@triton.jit
def _gelu_tanh_arg(z):
    """v = 2u = 2 √(2/π) (z + 0.044715 z³): gelu_tanh(z) = z σ(v), as 0.5 (1 + tanh u) = σ(2u)
    (no tanh needed, and no cancellation near u = 0)."""
    return (z + 0.044715 * z * z * z) * 1.5957691216057308


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) on an fp32 block; ACTIVATION is an ``ACTIVATION_IDS`` value."""
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # z Φ(z), 0.707 = 1/√2
    elif ACTIVATION == 3:
        z = z * _sigmoid(_gelu_tanh_arg(z))
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) for the GELUs on an fp32 block."""
    if ACTIVATION == 2:
        # Φ(z) + z φ(z); 0.399 = 1/√(2π)
        g = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        v = _gelu_tanh_arg(z)
        s = _sigmoid(v)
        # σ(v) + z v' σ'(v), σ'(v) = σ(v) σ(-v): 1 - σ(v) would cancel where σ(v) ≈ 1.
        g = s + z * (1.0 + 3 * 0.044715 * z * z) * 1.5957691216057308 * s * _sigmoid(-v)
    return g


# ---------------------------------------------------------------------------------------------
# Tile sizes. On a GPU the GEMM is autotuned, keyed on power-of-two buckets of M, N and K (in the
# weight-gradient GEMM K is the token count, which changes with every token-budget batch: exact
# sizes would retune each step), the operand layout, the epilogue and the dot precision (Triton
# adds the dtypes); TK_AUTOTUNE=0 takes the first candidate that may run. Under TRITON_INTERPRET=1
# one small config whose tiles are smaller than the test sizes, and unequal, so partial tiles,
# several K steps and the grouped order all run. The candidates are those of the matmul tutorial
# plus the large-tile ones that serve Hopper well; their speed here is unmeasured: tune them with
# `python -m transformer_kernels.bench.bench_ffn`. Configs whose tiles overflow shared memory for
# the operand dtype (most of the big ones, for fp32) are pruned before compiling.
#
# What may run is judged per epilogue and operand type, from ptxas's figures (Triton 3.8, sm_80 and
# sm_90): the accumulator elements a thread holds (BLOCK_M · BLOCK_N / (32 · num_warps)) bound
# what else fits beside them in the 255 registers a thread may have.
#
# - Dropout draws a Philox4x32-10 per four elements, whose state (4 words, 10 rounds) is live for
#   every accumulator element a thread holds: with more than 32 of them ptxas spills, 0.8-6 KB
#   per thread on sm_90 for fp16, and splitting the epilogue into sub-tiles does not stop it on
#   sm_90 (the scheduler interleaves them).
# - GELU (erf's polynomial beside the stored z) and the backward's bias row sum (the A tile
#   converted to fp32 in every K step) spill from 128 elements a thread: the big tiles, 128 x 256
#   and 256 x 128 on 8 warps, 128 x 128 and 64 x 256 on 4, stored 276-580 B a thread to local
#   memory with GELU and 12-92 B with the row sum. At <= 64 elements (128 x 128 x 64 on 8 warps
#   first) nothing spills, and the tile is still one of the matmul tutorial's big mma tiles; the
#   tanh form (exp and a reciprocal) is held to the same bound.
# - fp32 operands with IEEE dots run on the FMA units, whose operand layouts keep a K slice of A
#   and B per thread in registers: at 128 elements a thread or BLOCK_K = 64 they spilled 300-600
#   B on sm_80 (the old first config, 128 x 128 x 32 on 4 warps, 564-580 on sm_80 and 80 on
#   sm_90); at <= 64 and BLOCK_K <= 32, 128 x 64 x 32 on 4 warps first, nothing. fp32 with
#   dropout keeps BLOCK_K <= 32 under TF32 too (its tiles are twice fp16's), and its first
#   config is 64 x 64 x 16 on 4 warps (168 / 130 registers on sm_80 / sm_90): 64 x 64 x 32 on 4
#   warps spilled 8 B a thread on sm_80, 32 x 64 x 32 on 2 warps 8 B on sm_90. BLOCK_K = 16 is
#   for it alone: a 16-bit mma wants longer K steps.
# The first candidate that may run is what TK_AUTOTUNE=0 takes, and spills nothing on either GPU;
# the other candidates stay within the compile check's budget.

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CONFIGS = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 256, 32, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 16, 4, 4),  # fp32 with dropout only
    (64, 64, 32, 4, 4),
    (32, 64, 32, 2, 5),
]
_INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
_TUNE_KEY = [
    "m_bucket",
    "n_bucket",
    "k_bucket",
    "layout",
    "ACTIVATION",
    "HAS_BIAS",
    "HAS_DROPOUT",
    "STORE_Z",
    "ROWSUM",
    "DOT_PRECISION",
]
_SMEM_BYTES = 160 * 1024  # what an A100 gives a block (an H100 gives 227 KiB)


def _acc_per_thread_max(activation: int, dropout: bool, rowsum: bool, ieee: bool) -> int:
    """Accumulator elements a thread may hold beside the epilogue (see above)."""
    if dropout:
        return 32
    if activation >= ACTIVATION_IDS["gelu"] or rowsum or ieee:
        return 64
    return 128


def _may_run(
    config: tuple, elt: int, *, activation: int = 0, dropout: bool = False, rowsum: bool = False, ieee: bool = False
) -> bool:
    """Whether the pipelined A and B tiles fit in shared memory (fp32 tiles take twice fp16's) and
    the accumulator leaves the epilogue its registers."""
    block_m, block_n, block_k, warps, stages = config
    if block_m * block_n > _acc_per_thread_max(activation, dropout, rowsum, ieee) * 32 * warps:
        return False
    if (ieee or (dropout and elt == 4)) and block_k > 32:
        return False
    if block_k < 32 and not (dropout and elt == 4):
        return False
    return (block_m + block_n) * block_k * elt * stages <= _SMEM_BYTES


def _epilogue(args: dict) -> dict:
    """The launch arguments that decide what may run, as ``_may_run`` takes them."""
    return dict(
        activation=args["ACTIVATION"],
        dropout=args["HAS_DROPOUT"],
        rowsum=args["ROWSUM"],
        ieee=args["DOT_PRECISION"] == "ieee",
    )


def _prune(configs, named_args, **kwargs):
    elt, epilogue = named_args["A"].element_size(), _epilogue(kwargs)
    tiles = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
    return [c for c in configs if _may_run(tiles(c), elt, **epilogue)]


def _first_config(elt: int, args: dict) -> dict:
    """The launch parameters without autotuning: the first candidate that may run."""
    m, n, k, w, s = next(c for c in _CONFIGS if _may_run(c, elt, **_epilogue(args)))
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)


def _autotune() -> bool:
    """Read at each launch, so a test or benchmark can switch it with the environment."""
    return not triton_interpret() and os.environ.get("TK_AUTOTUNE", "1") != "0"


@triton.jit
def _gemm_kernel(
    A,
    B,
    C,
    Z,
    BIAS,
    ROWSUM_OUT,  # A [M, K], B [K, N] (any strides); C, Z [M, N]; BIAS [N]; ROWSUM_OUT [M]
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    m_bucket,
    n_bucket,
    k_bucket,
    layout,  # next powers of two of M, N, K; which operands are K-contiguous: autotuning keys only
    SEED,
    threshold,
    scale,  # dropout: Philox seed (0-dim int64, read on the device), 24-bit threshold, 1 / (1 - p)
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_Z: tl.constexpr,  # also store z = A B + bias (before activation and dropout)
    ROWSUM: tl.constexpr,  # also store Σ_k A[m, k] (db, when A is dzᵀ), by the programs of column 0
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C = dropout(act(A B + bias)), dropout mask element (row, col) of C."""
    # Grouped order: GROUP_M row tiles sweep the columns together, so B's tiles stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns wrap (always in bounds, never stored), so only K needs a mask in the loop.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ROWSUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROWSUM:
        tl.store(ROWSUM_OUT + offs_m, row_sum, mask=(offs_m < M) & (pid_n == 0))
    if HAS_BIAS:
        acc += tl.load(BIAS + cols).to(tl.float32)[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_offs = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    if STORE_Z:
        tl.store(Z + c_offs, acc.to(Z.dtype.element_ty), mask=c_mask)
    acc = _activation(acc, ACTIVATION)
    if HAS_DROPOUT:
        keep = dropout_keep_tile(tl.load(SEED), offs_m.to(tl.int64), pid_n * BLOCK_N, threshold, BLOCK_N)
        acc = tl.where(keep, acc * scale, 0.0)
    tl.store(C + c_offs, acc.to(C.dtype.element_ty), mask=c_mask)


_tuned_gemm = autotune(
    [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _CONFIGS
    ],
    _TUNE_KEY,
    _prune,
)(_gemm_kernel)


@triton.jit
def _dz_kernel(
    DOUT,
    OUT,
    Z,
    DZ,  # [M, N] each, contiguous
    DB_PARTIAL,  # [cdiv(M, BLOCK_M), N] fp32: Σ of dz over each row tile
    M,
    N,
    SEED,
    threshold,
    scale,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz = dout ∘ keep · scale ∘ act'(z); ReLU reads ``out != 0`` (= keep ∧ z > 0) instead."""
    # One grid axis: axis 1 would cap N at 65,535 column tiles.
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    dz = tl.load(DOUT + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        dz = dz * scale
    if ACTIVATION == 1:
        dz = tl.where(tl.load(OUT + idx, mask=mask, other=0.0) != 0, dz, 0.0)
    else:
        if HAS_DROPOUT:
            keep = dropout_keep_tile(tl.load(SEED), offs_m.to(tl.int64), pid_n * BLOCK_N, threshold, BLOCK_N)
            dz = tl.where(keep, dz, 0.0)
        if ACTIVATION >= 2:
            dz = dz * _activation_grad(tl.load(Z + idx, mask=mask, other=0.0).to(tl.float32), ACTIVATION)
    tl.store(DZ + idx, dz.to(DZ.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # db from the fp32 dz: one rounding less than summing the stored dz
        tl.store(DB_PARTIAL + pid_m.to(tl.int64) * N + offs_n, tl.sum(dz, axis=0), mask=offs_n < N)


# ---------------------------------------------------------------------------------------------
# Launchers: the signatures of tk_C::fused_linear_fwd / _bwd.


def _gemm(a, b, c, *, z=None, bias=None, rowsum=None, activation="none", dropout_p=0.0, seed=None) -> None:
    """c = dropout(act(a @ b + bias)) for 2-D views of any strides; z and rowsum(a) if given."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:  # nothing to launch; only a row sum over a [M, K] with K > 0 is left
        if rowsum is not None:
            rowsum.copy_(a.float().sum(1))
        return
    args = dict(
        m_bucket=triton.next_power_of_2(m),
        n_bucket=triton.next_power_of_2(n),
        k_bucket=triton.next_power_of_2(k),
        layout=2 * (a.stride(1) == 1) + (b.stride(0) == 1),
        SEED=seed_arg(seed, dropout_p, a.device),
        threshold=dropout_threshold(dropout_p),
        scale=dropout_scale(dropout_p),
        ACTIVATION=ACTIVATION_IDS[activation],
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        STORE_Z=z is not None,
        ROWSUM=rowsum is not None,
        DOT_PRECISION=matmul_dot_precision(a.dtype),
    )
    tensors = (a, b, c, c if z is None else z, c if bias is None else bias, c if rowsum is None else rowsum)
    strides = (*a.stride(), *b.stride(), *c.stride())

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with device_ctx(a):
        if _autotune():
            _tuned_gemm[grid](*tensors, m, n, k, *strides, **args)
        else:
            config = _INTERPRET_CONFIG if triton_interpret() else _first_config(a.element_size(), args)
            _gemm_kernel[grid](*tensors, m, n, k, *strides, **args, **config)


def fused_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward GEMM with its epilogue.

    Args:
        x: [M, K] contiguous; weight: [N, K] contiguous; bias: [N] or None; all of one dtype.
        activation: "none", "relu", "gelu" or "gelu_tanh"; dropout_p, seed: the dropout's (the seed
            a 0-dim int64 tensor on x's device, read by the kernel there; None without dropout).
    Returns:
        out [M, N] = dropout(act(x Wᵀ + b)); preact z [M, N] for the GELUs, else an empty tensor.
    """
    m, n = x.shape[0], weight.shape[0]
    out = x.new_empty(m, n)
    z = x.new_empty(m, n) if activation in ("gelu", "gelu_tanh") else x.new_empty(0)
    _gemm(
        x, weight.t(), out, z=z if z.numel() else None, bias=bias, activation=activation, dropout_p=dropout_p, seed=seed
    )
    return out, z


def fused_linear_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    preact: torch.Tensor,
    has_bias: bool,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward: dz in one elementwise pass, then dx = dz W and dW = dzᵀ x (with db).

    Args:
        dout: [M, N] contiguous; x, weight, out, preact, activation, dropout_p, seed: the forward's.
    Returns:
        dx [M, K], dweight [N, K], dbias [N] (empty without bias), all in x's dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    dbias = torch.empty(n, dtype=torch.float32, device=x.device) if has_bias else None
    dz_is_dout = activation == "none" and dropout_p == 0.0
    if dz_is_dout:  # db is then summed in the dW GEMM (rowsum below)
        dz = dout
    else:
        dz = torch.empty_like(dout)
        block_m, block_n = (16, 32) if triton_interpret() else (64, 64)
        partial = torch.empty(triton.cdiv(m, block_m), n if has_bias else 0, dtype=torch.float32, device=x.device)
        if dz.numel():
            with device_ctx(x):  # unused pointers get dout / dz, never an empty tensor
                _dz_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
                    dout,
                    out,
                    preact if preact.numel() else dout,
                    dz,
                    partial if has_bias else dz,
                    m,
                    n,
                    seed_arg(seed, dropout_p, x.device),
                    dropout_threshold(dropout_p),
                    dropout_scale(dropout_p),
                    ACTIVATION=ACTIVATION_IDS[activation],
                    HAS_DROPOUT=dropout_p > 0.0,
                    HAS_BIAS=has_bias,
                    BLOCK_M=block_m,
                    BLOCK_N=block_n,
                    num_warps=4,
                )
        if has_bias:
            torch.sum(partial, 0, out=dbias)
    dx = x.new_empty(m, k)
    _gemm(dz, weight, dx)
    dweight = x.new_empty(n, k)
    _gemm(dz.t(), x, dweight, rowsum=dbias if dz_is_dout else None)
    return dx, dweight, dbias.to(x.dtype) if has_bias else x.new_empty(0)
