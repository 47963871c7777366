// Fused linear layer out = dropout(act(x Wᵀ + b)) and its backward, through cuBLASLt: its fused
// epilogues (BIAS, RELU_BIAS, GELU_AUX_BIAS forward; BGRADB backward, the way Apex's fused_dense
// uses them) plus the elementwise kernels below for what cuBLASLt cannot fuse: dropout, exact-erf
// GELU, and dz = dout · keep · scale · act'(z). Trade-off: dropout and exact GELU cost one extra
// read + write of [M, N] after the GEMM, and the backward materialises dz [M, N] once for both
// GEMMs. cuBLASLt's DGELU / DRELU epilogues apply to the GEMM that *produces* the activation's
// output gradient (the next layer's dgrad); in this op dout arrives ready-made, so they do not.
//
// Forward paths (M rows, N out-features, K in-features; z = x Wᵀ + b; "aligned" = 16 bytes):
//   relu, bias absent or aligned:            RELU_BIAS / RELU epilogue -> out
//   gelu_tanh, N % 8 == 0, bias absent or aligned, preact aligned:
//                                            GELU_AUX_BIAS / GELU_AUX -> out, aux (= z) -> preact
//   none, bias absent or aligned:            BIAS / DEFAULT -> out
//   gelu, or gelu_tanh otherwise:            BIAS / DEFAULT -> preact, then the kernel
//                                            out = dropout(act(preact))
//   misaligned bias, or no cuBLASLt algorithm for the epilogue above:
//                                            DEFAULT -> out (none, relu) or preact (gelus), then
//                                            the kernel adds the bias (z rounded to x's dtype,
//                                            stored back), applies act and dropout
//   the first three, when p > 0:             then the kernel applies dropout to out in place.
// An epilogue's activation acts on the fp32 accumulator (+ bias) and is rounded once; the kernel's
// reads z as stored in x's dtype (the preact returned is exactly the z it used).
// Backward: dz = dout when act is none and p = 0, else the dz kernel writes it; dx = dz W (plain
// GEMM); dweight = dzᵀ x with dbias fused by BGRADB, or a plain GEMM + column_sum_kernel when dbias
// is misaligned or cuBLASLt has no BGRADB algorithm for the shape / dtype.

#include "column_sum.cuh"
#include "cublaslt_gemm.h"
#include "dispatch.cuh"
#include "elementwise.cuh"
#include "launch.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string_view>
#include <type_traits>

namespace tk {
namespace {

constexpr const char* kOp = "fused_linear";
constexpr int kThreads = 256;        // elementwise kernels: threads per CTA
constexpr int kCtasPerSm = 8;        // grid-stride grids cover the GPU this many times over

// Activation codes, as returned by fused_linear_cuda_activation.
enum class Act : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3 };

// ---------------------------------------------------------------------------------------------
// Activations and their derivatives, in fp32.
//   gelu(z) = z Φ(z) = ½ z (1 + erf(z / √2)),   gelu'(z) = Φ(z) + z φ(z),   φ(z) = e^(-z²/2) / √(2π)
//   gelu_tanh(z) = ½ z (1 + tanh u), u = √(2/π) (z + 0.044715 z³),
//   gelu_tanh'(z) = ½ (1 + tanh u) + ½ z (1 - tanh² u) √(2/π) (1 + 3 · 0.044715 z²)

constexpr float kSqrtHalf = 0.70710678118654752440f;     // 1 / √2
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / √(2π)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // √(2/π)
constexpr float kGeluTanhCoef = 0.044715f;

template <Act A>
__device__ __forceinline__ float activate(float z) {
  if constexpr (A == Act::kRelu) {
    return z < 0.f ? 0.f : z;  // NaN passes through, like torch.relu
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * z * (1.f + erff(z * kSqrtHalf));
  } else if constexpr (A == Act::kGeluTanh) {
    return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z)));
  } else {
    return z;
  }
}

// act'(z) for the GELUs (ReLU's derivative comes from out != 0, identity's is 1).
template <Act A>
__device__ __forceinline__ float activation_grad(float z) {
  if constexpr (A == Act::kGelu) {
    return 0.5f * (1.f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
  } else if constexpr (A == Act::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z));
    return 0.5f * (1.f + t) +
           0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCoef * z * z);
  } else {
    return 1.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward epilogue, for what the GEMM's epilogue did not do, over the [M, N] GEMM output:
//   z = T(src + bias)  (when bias is given; z is then stored to preact if given), else z = src
//   out = T(act(z) · keep · scale)
// src may alias preact or out: each thread reads its elements before writing them.

struct EpilogueParams {
  const void* src;   // [M, N] T: the GEMM output
  const void* bias;  // [N] T, or null: already added by the GEMM, or absent
  void* preact;      // [M, N] T, or null: z is not stored here (written only when bias is given)
  void* out;         // [M, N] T
  int64_t numel;     // M * N
  int64_t cols;      // N
  Dropout dropout;
};

template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(kThreads) fused_linear_epilogue_kernel(const EpilogueParams p) {
  const T* src = static_cast<const T*>(p.src);
  const T* bias = static_cast<const T*>(p.bias);
  T* preact = static_cast<T*>(p.preact);
  T* out = static_cast<T*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  // On the vector path N % VEC == 0, so a vector never straddles two rows.
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < p.numel; i += stride) {
    float z[VEC];
    load_f32<VEC>(src + i, z);
    if (bias != nullptr) {
      float b[VEC];
      load_f32<VEC>(bias + i % p.cols, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = round_to<T>(z[e] + b[e]);
      if (preact != nullptr) store_f32<VEC>(preact + i, z);
    }
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = activate<A>(z[e]);
    if (p.dropout.enabled) {
      float f[VEC];
      const int64_t row = i / p.cols;
      dropout_factors(p.dropout, row, i - row * p.cols, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] *= f[e];
    }
    store_f32<VEC>(out + i, o);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward prologue: dz = T(dout · keep · scale · act'(z)) over [M, N].
//   relu: keep · (z > 0) == (out != 0) for p < 1, and scale = 0 for p = 1, so
//         dz = dout · (out != 0) · scale needs neither z nor the Philox stream.

struct DzParams {
  const void* dout;    // [M, N] T
  const void* out;     // [M, N] T, read for relu only
  const void* preact;  // [M, N] T, read for gelu / gelu_tanh only
  void* dz;            // [M, N] T
  int64_t numel;       // M * N
  int64_t cols;        // N
  Dropout dropout;
};

template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(kThreads) fused_linear_dz_kernel(const DzParams p) {
  const T* dout = static_cast<const T*>(p.dout);
  T* dz = static_cast<T*>(p.dz);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < p.numel; i += stride) {
    float g[VEC];
    load_f32<VEC>(dout + i, g);
    if constexpr (A == Act::kRelu) {
      float o[VEC];
      load_f32<VEC>(static_cast<const T*>(p.out) + i, o);
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] *= o[e] != 0.f ? p.dropout.scale : 0.f;
    } else {
      if constexpr (A == Act::kGelu || A == Act::kGeluTanh) {
        float z[VEC];
        load_f32<VEC>(static_cast<const T*>(p.preact) + i, z);
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[e] *= activation_grad<A>(z[e]);
      }
      if (p.dropout.enabled) {
        float f[VEC];
        const int64_t row = i / p.cols;
        dropout_factors(p.dropout, row, i - row * p.cols, f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) g[e] *= f[e];
      }
    }
    store_f32<VEC>(dz + i, g);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Grid-stride grid for `vectors` units of work.
unsigned grid_for(int64_t vectors) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (vectors + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * kCtasPerSm)));
}


template <Act A>
using ActTag = std::integral_constant<Act, A>;

template <typename F>
void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kNone:
      f(ActTag<Act::kNone>{});
      break;
    case Act::kRelu:
      f(ActTag<Act::kRelu>{});
      break;
    case Act::kGelu:
      f(ActTag<Act::kGelu>{});
      break;
    case Act::kGeluTanh:
      f(ActTag<Act::kGeluTanh>{});
      break;
  }
}

// Calls f(std::integral_constant<int, VEC>): 16-byte vectors when the row length and every
// pointer allow it, single elements otherwise.
template <typename T, typename F, typename... Ptrs>
void dispatch_vec(int64_t cols, F&& f, Ptrs... ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (cols % kVec == 0 && all_aligned16(ptrs...)) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

void launch_epilogue(at::ScalarType dtype, Act act, const EpilogueParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(kOp, dtype, [&](auto dtype_tag) {
    using T = typename decltype(dtype_tag)::type;
    dispatch_act(act, [&](auto act_tag) {
      dispatch_vec<T>(p.cols, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        fused_linear_epilogue_kernel<T, decltype(act_tag)::value, VEC>
            <<<grid_for(p.numel / VEC), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }, p.src, p.bias, p.preact, p.out);
    });
  });
}

void launch_dz(at::ScalarType dtype, Act act, int64_t cols, const DzParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(kOp, dtype, [&](auto dtype_tag) {
    using T = typename decltype(dtype_tag)::type;
    dispatch_act(act, [&](auto act_tag) {
      dispatch_vec<T>(cols, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        fused_linear_dz_kernel<T, decltype(act_tag)::value, VEC>
            <<<grid_for(p.numel / VEC), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }, p.dout, p.out, p.preact, p.dz);
    });
  });
}

void launch_column_sum(const at::Tensor& in, const at::Tensor& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t cols = in.size(1);
  const auto grid = static_cast<unsigned>((cols + kColSumCols - 1) / kColSumCols);
  dispatch_dtype(kOp, in.scalar_type(), [&](auto dtype_tag) {
    using T = typename decltype(dtype_tag)::type;
    // One matrix: grid.y = 1, the second pair left null.
    ColumnSumParams<T> cs;
    cs.in0 = static_cast<const T*>(in.data_ptr());
    cs.in1 = nullptr;
    cs.out0 = static_cast<T*>(out.data_ptr());
    cs.out1 = nullptr;
    cs.rows = in.size(0);
    cs.cols = cols;
    column_sum_kernel<T><<<dim3(grid, 1), dim3(kColSumCols, kColSumRows), 0, stream>>>(cs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace tk

int64_t fused_linear_cuda_activation(c10::string_view name) {
  // Indexed by tk::Act.
  constexpr std::string_view kNames[] = {"none", "relu", "gelu", "gelu_tanh"};
  const auto* found = std::find(std::begin(kNames), std::end(kNames), name);
  TORCH_CHECK(found != std::end(kNames), tk::kOp, ": unknown activation '", name,
              "' (expected none, relu, gelu, gelu_tanh)");
  return found - std::begin(kNames);
}

// x [M, K], weight [N, K], bias [N] or absent, out [M, N], preact [M, N] (gelu, gelu_tanh) or
// empty; M >= 1, all checked by the caller.
void fused_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t activation,
                           double dropout_p, const int64_t* seed, const at::Tensor& out,
                           const at::Tensor& preact) {
  using tk::Act;
  const Act act = static_cast<Act>(activation);
  const int64_t rows = x.size(0);      // M
  const int64_t in_dim = x.size(1);    // K
  const int64_t out_dim = weight.size(0);  // N
  void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  void* preact_ptr = preact.numel() > 0 ? preact.data_ptr() : nullptr;
  const tk::Dropout dropout = tk::make_dropout(dropout_p, seed);

  // Row-major z [M, N] is the column-major zᵀ [N, M] (ld N) = W [N, K] · xᵀ [K, M], where
  // weight's buffer is the column-major Wᵀ [K, N] (ld K), used transposed, and x's buffer is the
  // column-major xᵀ [K, M] (ld K), used as is. Bias then runs along D's rows (length N), as the
  // BIAS epilogue wants; the GELU aux is [N, M] with ld N: row-major preact [M, N].
  tk::LtMatmul gemm;
  gemm.m = out_dim;
  gemm.n = rows;
  gemm.k = in_dim;
  gemm.trans_a = true;
  gemm.a = weight.data_ptr();
  gemm.lda = in_dim;
  gemm.trans_b = false;
  gemm.b = x.data_ptr();
  gemm.ldb = in_dim;
  gemm.ldd = out_dim;
  gemm.dtype = x.scalar_type();

  // The plain path: GEMM (+ BIAS epilogue) into z's buffer, the kernel does the rest.
  void* z_ptr = preact_ptr != nullptr ? preact_ptr : out.data_ptr();
  const bool bias_fusable = tk::aligned16(bias_ptr);  // null counts as aligned
  Act kernel_act = act;
  gemm.d = z_ptr;
  gemm.bias = bias_fusable ? bias_ptr : nullptr;
  gemm.epilogue = gemm.bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (act == Act::kRelu && bias_fusable) {
    gemm.epilogue = bias_ptr != nullptr ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    kernel_act = Act::kNone;
  } else if (act == Act::kGeluTanh && bias_fusable && out_dim % 8 == 0 &&
             tk::aligned16(preact_ptr)) {
    // cuBLASLt's GELU is the tanh approximation; aux receives z, the preact we return.
    gemm.epilogue =
        bias_ptr != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    gemm.d = out.data_ptr();
    gemm.aux = preact_ptr;
    gemm.ld_aux = out_dim;
    kernel_act = Act::kNone;
  }
  if (!tk::lt_matmul(gemm, tk::kOp)) {
    // No algorithm for that epilogue: a plain GEMM into z's buffer, bias and act in the kernel.
    gemm.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    gemm.d = z_ptr;
    gemm.bias = nullptr;
    gemm.aux = nullptr;
    gemm.ld_aux = 0;
    kernel_act = act;
    tk::lt_matmul(gemm, tk::kOp);
  }

  tk::EpilogueParams p;
  p.src = gemm.d;
  p.bias = gemm.bias != nullptr ? nullptr : bias_ptr;  // what the GEMM did not add
  p.preact = p.bias != nullptr ? preact_ptr : nullptr;
  p.out = out.data_ptr();
  p.numel = rows * out_dim;
  p.cols = out_dim;
  p.dropout = dropout;
  if (p.bias != nullptr || kernel_act != Act::kNone || dropout.enabled) {
    tk::launch_epilogue(x.scalar_type(), kernel_act, p);
  }
}

// dout [M, N], x [M, K], weight [N, K]; out [M, N] (read for relu), preact [M, N] (read for gelu,
// gelu_tanh); dx [M, K], dweight [N, K], dbias [N] or empty; M >= 1, all checked by the caller.
void fused_linear_bwd_cuda(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& out, const at::Tensor& preact, int64_t activation,
                           double dropout_p, const int64_t* seed, const at::Tensor& dx,
                           const at::Tensor& dweight, const at::Tensor& dbias) {
  using tk::Act;
  const Act act = static_cast<Act>(activation);
  const int64_t rows = dout.size(0);     // M
  const int64_t out_dim = dout.size(1);  // N
  const int64_t in_dim = x.size(1);      // K
  const tk::Dropout dropout = tk::make_dropout(dropout_p, seed);

  // dz [M, N] = dout · keep · scale · act'(z); without act or dropout it is dout itself.
  at::Tensor dz = dout;
  if (act != Act::kNone || dropout.enabled) {
    dz = at::empty_like(dout);
    tk::DzParams p;
    p.dout = dout.data_ptr();
    p.out = act == Act::kRelu ? out.data_ptr() : nullptr;
    p.preact = act == Act::kGelu || act == Act::kGeluTanh ? preact.data_ptr() : nullptr;
    p.dz = dz.data_ptr();
    p.numel = rows * out_dim;
    p.cols = out_dim;
    p.dropout = dropout;
    tk::launch_dz(dout.scalar_type(), act, out_dim, p);
  }

  // dx: row-major dx [M, K] is the column-major dxᵀ [K, M] (ld K) = Wᵀ [K, N] · dzᵀ [N, M]:
  // weight's buffer is the column-major Wᵀ [K, N] (ld K) and dz's the column-major dzᵀ [N, M]
  // (ld N), both used as is.
  tk::LtMatmul dgrad;
  dgrad.m = in_dim;
  dgrad.n = rows;
  dgrad.k = out_dim;
  dgrad.trans_a = false;
  dgrad.a = weight.data_ptr();
  dgrad.lda = in_dim;
  dgrad.trans_b = false;
  dgrad.b = dz.data_ptr();
  dgrad.ldb = out_dim;
  dgrad.d = dx.data_ptr();
  dgrad.ldd = in_dim;
  dgrad.dtype = dout.scalar_type();
  tk::lt_matmul(dgrad, tk::kOp);

  // dweight: row-major dW [N, K] is the column-major dWᵀ [K, N] (ld K) = xᵀ [K, M] · dz [M, N]:
  // x's buffer is the column-major xᵀ [K, M] (ld K), used as is; dz's buffer is the column-major
  // dzᵀ [N, M] (ld N), used transposed. dbias = Σ_rows dz is then the sum of op(B) = dz over the
  // GEMM's k (= M) for each of D's N columns: the BGRADB epilogue.
  tk::LtMatmul wgrad;
  wgrad.m = in_dim;
  wgrad.n = out_dim;
  wgrad.k = rows;
  wgrad.trans_a = false;
  wgrad.a = x.data_ptr();
  wgrad.lda = in_dim;
  wgrad.trans_b = true;
  wgrad.b = dz.data_ptr();
  wgrad.ldb = out_dim;
  wgrad.d = dweight.data_ptr();
  wgrad.ldd = in_dim;
  wgrad.dtype = dout.scalar_type();
  const bool want_dbias = dbias.numel() > 0;
  bool dbias_done = false;
  if (want_dbias && tk::aligned16(dbias.data_ptr())) {
    wgrad.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    wgrad.bias = dbias.data_ptr();
    dbias_done = tk::lt_matmul(wgrad, tk::kOp);
  }
  if (!dbias_done) {
    wgrad.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    wgrad.bias = nullptr;
    tk::lt_matmul(wgrad, tk::kOp);
    if (want_dbias) tk::launch_column_sum(dz, dbias);
  }
}
