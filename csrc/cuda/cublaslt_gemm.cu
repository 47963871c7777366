// cuBLASLt matmul wrapper (see cublaslt_gemm.h): descriptors, preferences and the heuristic for
// one GEMM, run on torch's current stream with torch's cuBLASLt handle and workspace.

#include "cublaslt_gemm.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <memory>
#include <type_traits>

namespace tk {
namespace {

void check_lt(cublasStatus_t status, const char* op, const char* call) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, op, ": ", call, " failed with ",
              cublasLtGetStatusName(status), " (", cublasLtGetStatusString(status), ")");
}

// Owning wrappers of the three cuBLASLt descriptors.
struct LtDeleter {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, LtDeleter>;
using MatrixLayout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, LtDeleter>;
using Preference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, LtDeleter>;

template <typename V>
void set_attr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value,
              const char* op) {
  check_lt(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), op,
           "cublasLtMatmulDescSetAttribute");
}

template <typename V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
              const V& value, const char* op) {
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)), op,
           "cublasLtMatmulPreferenceSetAttribute");
}

cudaDataType_t cuda_dtype(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, op, ": dtype ", dtype, " is not supported by the cuBLASLt GEMM");
  }
}

// fp32 accumulation always; fp32 inputs use TF32 tensor cores only when torch's own fp32 matmuls
// do (matmul_allows_tf32).
cublasComputeType_t compute_type(at::ScalarType dtype) {
  if (dtype == at::kFloat && matmul_allows_tf32()) {
    return CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  return CUBLAS_COMPUTE_32F;
}

// Largest power of two <= 256 that divides the address. The heuristic assumes 256-byte aligned
// A/B/C/D unless told otherwise, and tensors that are views (x[1:]) need not be.
uint32_t alignment(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

MatrixLayout layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, const char* op) {
  cublasLtMatrixLayout_t raw = nullptr;
  check_lt(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                      static_cast<uint64_t>(cols), ld),
           op, "cublasLtMatrixLayoutCreate");
  return MatrixLayout(raw);
}

}  // namespace

// torch >= 2.9 keeps one fp32 precision per backend and op (torch.backends.cuda.matmul
// .fp32_precision, inheriting from torch.backends.fp32_precision when "none"); the legacy setters
// write it too. The legacy getter allowTF32CuBLAS() throws once a user has set the new one
// directly (the two disagree), so read the new one wherever it exists: it is what torch's own
// cuBLAS calls read.
bool matmul_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9  // the same setting, keyed by strings
  return at::globalContext().float32Precision("cuda", "matmul") == "tf32";
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

bool lt_matmul(const LtMatmul& p, const char* op) {
  const cudaDataType_t type = cuda_dtype(p.dtype, op);
  const bool plain = p.epilogue == CUBLASLT_EPILOGUE_DEFAULT;

  cublasLtMatmulDesc_t raw_desc = nullptr;
  check_lt(cublasLtMatmulDescCreate(&raw_desc, compute_type(p.dtype), CUDA_R_32F), op,
           "cublasLtMatmulDescCreate");
  const MatmulDesc desc(raw_desc);
  const int32_t trans_a = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t trans_b = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, trans_a, op);
  set_attr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, trans_b, op);
  if (!plain) {
    set_attr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(p.epilogue), op);
    // Bias / bias-gradient and aux elements default to D's type (BIAS_DATA_TYPE and
    // EPILOGUE_AUX_DATA_TYPE = -1), which is what every caller here passes.
    if (p.bias != nullptr) set_attr(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias, op);
    if (p.aux != nullptr) {
      set_attr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux, op);
      set_attr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.ld_aux, op);
    }
  }

  // Stored shapes (before op): A is [m, k] or [k, m], B is [k, n] or [n, k]; C = D is [m, n].
  const MatrixLayout a_layout = p.trans_a ? layout(type, p.k, p.m, p.lda, op)
                                          : layout(type, p.m, p.k, p.lda, op);
  const MatrixLayout b_layout = p.trans_b ? layout(type, p.n, p.k, p.ldb, op)
                                          : layout(type, p.k, p.n, p.ldb, op);
  const MatrixLayout d_layout = layout(type, p.m, p.n, p.ldd, op);

  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const uint64_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  cublasLtMatmulPreference_t raw_pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&raw_pref), op, "cublasLtMatmulPreferenceCreate");
  const Preference pref(raw_pref);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size, op);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(p.a), op);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(p.b), op);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(p.d), op);
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(p.d), op);
  if (p.dtype != at::kFloat) {
    // Split-K partial sums stay fp32 (summed in the workspace): the INPLACE and OUTPUT_TYPE
    // schemes would add them up in fp16/bf16, i.e. round more than once.
    const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    set_pref(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, schemes, op);
  }

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, desc.get(), a_layout.get(), b_layout.get(), d_layout.get(), d_layout.get(),
      pref.get(), 1, &heuristic, &found);
  // An epilogue cuBLASLt cannot run for these shapes / alignments is reported as NOT_SUPPORTED
  // (or, for some shapes, INVALID_VALUE): the caller then falls back to a plain GEMM.
  const bool unsupported = status == CUBLAS_STATUS_NOT_SUPPORTED ||
                           status == CUBLAS_STATUS_INVALID_VALUE ||
                           (status == CUBLAS_STATUS_SUCCESS && found == 0);
  if (unsupported && !plain) return false;
  TORCH_CHECK(!unsupported, op, ": cuBLASLt has no algorithm for the ", p.dtype, " GEMM m=", p.m,
              ", n=", p.n, ", k=", p.k, " (", cublasLtGetStatusName(status), ")");
  check_lt(status, op, "cublasLtMatmulAlgoGetHeuristic");

  const float alpha = 1.f;
  const float beta = 0.f;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_lt(cublasLtMatmul(handle, desc.get(), &alpha, p.a, a_layout.get(), p.b, b_layout.get(),
                          &beta, p.d, d_layout.get(), p.d, d_layout.get(), &heuristic.algo,
                          workspace, workspace_size, stream),
           op, "cublasLtMatmul");
  return true;
}

}  // namespace tk
