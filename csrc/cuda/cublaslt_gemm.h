// A small cuBLASLt matmul wrapper: one GEMM with an optional fused epilogue, on torch's current
// stream, cuBLASLt handle and workspace. Modelled on the way PyTorch's CUDABlas.cpp and Apex's
// fused_dense call cuBLASLt; trade-off: the heuristic is asked on every call (no plan cache),
// which costs a few microseconds of host time per GEMM and keeps the wrapper stateless.
#pragma once

#include <ATen/core/Tensor.h>
#include <cublasLt.h>

#include <cstdint>

namespace tk {

// Column-major, as cuBLAS sees memory: D [m, n] = op(A) [m, k] · op(B) [k, n], then the epilogue.
// A is stored [m, k] (trans_a false) or [k, m] (trans_a true) with leading dimension lda; B is
// stored [k, n] or [n, k] with ldb; D is stored [m, n] with ldd. A row-major [R, C] tensor is the
// column-major [C, R] matrix with ld = C, so callers map row-major problems by transposing.
struct LtMatmul {
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  bool trans_a = false;
  const void* a = nullptr;
  int64_t lda = 0;
  bool trans_b = false;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;  // C = D, beta = 0: D is only written
  int64_t ldd = 0;
  at::ScalarType dtype = at::kFloat;  // of A, B, D and of the bias / aux vectors (cuBLASLt default)
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;  // *_BIAS: [m] input; BGRADA: [m] output; BGRADB: [n] output
  void* aux = nullptr;   // GELU_AUX*: the pre-GELU values, [m, n] output with leading dim ld_aux
  int64_t ld_aux = 0;    // GELU aux: a multiple of 8 and >= m
};

// Whether torch computes fp32 CUDA matmuls on TF32 tensor cores (its fp32 matmul precision
// setting); fp32 GEMMs here do the same.
bool matmul_allows_tf32();

// Runs the matmul on the current stream. Returns false, having done nothing, when cuBLASLt has no
// algorithm for a non-default epilogue with these shapes / types / alignments, so that the caller
// can fall back to a plain GEMM and its own kernel; throws (naming `op`) on any other failure,
// including a plain GEMM that cuBLASLt cannot run.
bool lt_matmul(const LtMatmul& p, const char* op);

}  // namespace tk
