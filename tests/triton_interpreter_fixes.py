"""Test-time fixes for two bf16 holes of Triton's CPU interpreter (``TRITON_INTERPRET=1``).

CI runs every Triton kernel in the interpreter, where bf16 values are held as raw uint16 bit
patterns in numpy. Two of its operations get bf16 wrong, while the GPU compiler gets them right:

1. ``tl.dot`` with bf16 operands multiplies the raw bit patterns as integers (garbage).
   Upstream: triton-lang/triton#11584 (declined). Fix: convert bf16 operands to fp32 first, which
   is what the tensor cores do (exact products, fp32 accumulation).
2. fp32 -> bf16 conversion (``x.to(tl.bfloat16)``, and the implicit one of ``tl.store`` into a
   bf16 tensor) truncates the mantissa instead of rounding to nearest-even as the GPU does
   (checked with Triton 3.8: 561 of 1024 random values differ from ``torch``'s conversion, each by
   one ulp towards zero). Fix: do the conversion with torch, which rounds to nearest-even.

Without these, a correct bf16 kernel looks wrong under the interpreter; the tests must not loosen
their tolerances to hide that. ``tests/test_triton_interpreter_fixes.py`` checks both fixes.
Applied by ``tests/conftest.py`` when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import numpy as np
import torch


def _f32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_bits_to_f32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def apply() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_tk_bf16_fixed", False):
        return
    TensorHandle = interpreter.TensorHandle
    cast_impl, fp_to_fp, create_dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot

    def to_bf16(src):
        return TensorHandle(_f32_to_bf16_bits(src.data).reshape(np.shape(src.data)), tl.bfloat16)

    def fixed_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return cast_impl(self, src, dst_type)

    def fixed_fp_to_fp(self, src, dst_type, rounding_mode):
        # Round-to-nearest-even is the default downcast; rtz requests keep the original path.
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and not rtz:
            return to_bf16(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def fixed_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = TensorHandle(_bf16_bits_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = TensorHandle(_bf16_bits_to_f32(b.data), tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = fixed_cast_impl
    builder.create_fp_to_fp = fixed_fp_to_fp
    builder.create_dot = fixed_dot
    builder._tk_bf16_fixed = True
