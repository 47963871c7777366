"""The fp32 precision of the Triton kernels' dot products: each op computes fp32 the way the torch
op it replaces does on a GPU.

- GEMMs (``fused_linear``, ``ffn``: they replace ``F.linear``) follow torch's fp32 matmul setting:
  TF32 tensor cores when it is ``"tf32"``, IEEE fp32 otherwise. The compiled extension's cuBLASLt
  GEMMs read the same setting (``csrc/cuda/cublaslt_gemm.cu``).
- ``attention`` (it replaces ``F.scaled_dot_product_attention``): IEEE fp32 whatever that setting.
  SDPA runs fp32 CUDA inputs on its memory-efficient kernel (the flash and cuDNN kernels take only
  fp16/bf16), which computes with 3xTF32 (CUTLASS's ``OpMultiplyAddFastF32``: fp32-accurate) and
  does not read the TF32 setting. Only its math fallback (used when that kernel is disabled or
  cannot take the shapes) follows the matmul setting.

fp16 and bf16 dots need no precision argument (``None``: Triton's default for them).
"""

from __future__ import annotations

import torch


def matmul_allows_tf32() -> bool:
    """Whether torch computes fp32 CUDA matmuls on TF32 tensor cores.

    torch >= 2.9 has one fp32 precision setting per backend and op
    (``torch.backends.cuda.matmul.fp32_precision``: "ieee", "tf32" or "none" = inherit from
    ``torch.backends.cuda.fp32_precision`` / ``torch.backends.fp32_precision``; the getter resolves
    the inheritance). The legacy setters (``allow_tf32 = ...``,
    ``torch.set_float32_matmul_precision``) write it too, but once a user has set it directly,
    reading the legacy ``allow_tf32`` raises: so read the new setting wherever torch has it.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9 (before the setting existed)
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def matmul_dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s ``input_precision`` for a GEMM on ``dtype`` operands, as ``F.linear`` computes."""
    if dtype != torch.float32:
        return None
    return "tf32" if matmul_allows_tf32() else "ieee"


def attention_dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s ``input_precision`` for attention on ``dtype`` inputs, as SDPA computes."""
    return "ieee" if dtype == torch.float32 else None
