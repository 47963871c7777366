// Fused residual + dropout + LayerNorm/RMSNorm over the rows of [M, N], forward and backward.
// Modelled on Apex / flash-attention's dropout_add_ln CUDA kernels (thread group per row, 16-byte
// loads, warp-shuffle + shared-memory reductions, fp32 math). Trade-off: the row stays in registers
// (one HBM pass; the per-thread slice is a template, hence N <= 16384), while the backward keeps
// dweight/dbias partials in shared memory (no spills at large N, lower occupancy there).

#include "column_sum.cuh"
#include "dispatch.cuh"
#include "elementwise.cuh"
#include "launch.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace tk {
namespace {

constexpr int kMaxHidden = 16384;    // largest N every (dtype, alignment) path below can hold
constexpr int kWarpSize = 32;
constexpr int kMinCtaThreads = 128;  // short rows are packed several to a CTA up to this size
constexpr int kFwdTargetThreads = 128;
constexpr int kBwdTargetThreads = 256;

// Vectors per thread (a vector is 16 bytes of the activation dtype, or 1 element on the
// unaligned path). The vector lists end where a full row of kMaxHidden takes at most 512 threads
// (the forward: 256 threads of 64 elements): a CTA of 1024 threads is capped at 64 registers a thread, too few
// for a row slice of 16 elements in fp32 (two values each in the backward: xhat and wdy) beside
// the Philox state, and ptxas spilled there (fp16 backward, sm_90: 72 B; fp32 forward, sm_80:
// 16 B). The unaligned (scalar) lists keep 1024-thread CTAs of at most 16 elements.
template <int... NVs>
struct NvList {};
using FwdVec8List = NvList<1, 2, 4, 8>;      // 16-bit dtypes: 256 threads x 64 elements at most
using FwdVec4List = NvList<1, 2, 4, 8, 16>;  // fp32: 256 threads x 64 elements at most
using FwdScalarList = NvList<1, 2, 4, 8, 16>;
using BwdVec8List = NvList<1, 2, 4>;     // 16-bit dtypes: 512 threads x 32 elements at most
using BwdVec4List = NvList<1, 2, 4, 8>;  // fp32: 512 threads x 32 elements at most
using BwdScalarList = NvList<1, 2, 4, 8, 16>;

constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// Parameters of either dtype.

// Loads a weight/bias slice that is either T or fp32 (a warp-uniform branch), or fills `fill`
// when the parameter is absent.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const void* p, bool is_f32, int col, float fill,
                                           float (&dst)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = fill;
  } else if (is_f32) {
    load_f32<VEC>(static_cast<const float*>(p) + col, dst);
  } else {
    load_f32<VEC>(static_cast<const T*>(p) + col, dst);
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. A CTA is blockDim.y row groups of blockDim.x threads (a multiple of 32), so no warp
// straddles two rows.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums each v[k] over this thread's row group; every thread gets the totals. Every thread of the
// CTA must call it (it synchronises when a row group spans several warps).
template <int K>
__device__ __forceinline__ void row_group_sum(float (&v)[K]) {
  __shared__ float warp_totals[1024 / kWarpSize][K];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  const int warps_per_row = blockDim.x / kWarpSize;
  if (warps_per_row == 1) return;  // uniform across the CTA
  const int lane = threadIdx.x % kWarpSize;
  const int first_warp = threadIdx.y * warps_per_row;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_totals[first_warp + threadIdx.x / kWarpSize][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < warps_per_row ? warp_totals[first_warp + lane][k] : 0.f;
  __syncthreads();  // warp_totals is reused by the next call
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
}

// ---------------------------------------------------------------------------------------------
// Forward.
//   s    = T(residual + x * keep * scale)                                 [M, N]
//   LN:  mean = sum(s) / N, rstd = rsqrt(sum((s - mean)^2) / N + eps), xhat = (s - mean) * rstd
//   RMS: rstd = rsqrt(sum(s^2) / N + eps), xhat = s * rstd
//   out  = T(xhat * weight + bias)                                        [M, N]

struct FwdParams {
  const void* x;         // [M, N] T
  const void* residual;  // [M, N] T or null
  const void* weight;    // [N] T or fp32, or null (= 1)
  const void* bias;      // [N] T or fp32, or null (= 0)
  void* out;             // [M, N] T
  void* s;               // [M, N] T, or null: not stored
  float* mean;           // [M], or null (RMSNorm)
  float* rstd;           // [M]
  int64_t rows;          // M
  int cols;              // N
  float eps;
  Dropout dropout;
  bool weight_f32;
  bool bias_f32;
  bool rms_norm;
};

template <typename T, int VEC, int NV, int kMaxThreads>
__global__ void __launch_bounds__(kMaxThreads) dropout_add_ln_fwd_kernel(const FwdParams p) {
  const int n = p.cols;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = row < p.rows;
  const int64_t row_start = row_ok ? row * n : 0;
  const T* x = static_cast<const T*>(p.x) + row_start;
  const T* residual = p.residual ? static_cast<const T*>(p.residual) + row_start : nullptr;

  // This thread's vectors start at columns (threadIdx.x + k * blockDim.x) * VEC, k < NV; on the
  // vector path N % VEC == 0, so a vector is either wholly inside the row or wholly outside.
  float s[NV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (row_ok && col < n) {
      float xv[VEC];
      float rv[VEC];
      load_f32<VEC>(x + col, xv);
      if (residual) load_f32<VEC>(residual + col, rv);
      float keep[VEC];
      if (p.dropout.enabled) dropout_factors(p.dropout, row, col, keep);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float v = xv[e];
        if (p.dropout.enabled) v *= keep[e];
        if (residual) v = rv[e] + v;
        s[k][e] = round_to<T>(v);
        sum += p.rms_norm ? s[k][e] * s[k][e] : s[k][e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[k][e] = 0.f;
    }
  }

  float total[1] = {sum};
  row_group_sum(total);
  float mean = 0.f;
  float rstd;
  if (p.rms_norm) {
    rstd = rsqrtf(total[0] / n + p.eps);
  } else {
    mean = total[0] / n;
    float sq = 0.f;  // second pass over the registers: no E[s^2] - E[s]^2 cancellation
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (threadIdx.x + k * blockDim.x) * VEC;
      if (row_ok && col < n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = s[k][e] - mean;
          sq += d * d;
        }
      }
    }
    float sq_total[1] = {sq};
    row_group_sum(sq_total);
    rstd = rsqrtf(sq_total[0] / n + p.eps);
  }
  if (!row_ok) return;  // no barrier follows
  if (threadIdx.x == 0) {
    if (p.mean) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  T* out = static_cast<T*>(p.out) + row_start;
  T* s_out = p.s ? static_cast<T*>(p.s) + row_start : nullptr;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (col < n) {
      float w[VEC];
      float b[VEC];
      float o[VEC];
      load_param<T, VEC>(p.weight, p.weight_f32, col, 1.f, w);
      load_param<T, VEC>(p.bias, p.bias_f32, col, 0.f, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = (s[k][e] - mean) * rstd * w[e] + b[e];
      store_f32<VEC>(out + col, o);
      if (s_out) store_f32<VEC>(s_out + col, s[k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, per row, with wdy = weight * dout and xhat recomputed from s, mean, rstd:
//   c1 = sum(xhat * wdy) / N, c2 = sum(wdy) / N
//   LN:  ds = (wdy - (xhat * c1 + c2)) * rstd      RMS: ds = (wdy - xhat * c1) * rstd
//   ds += ds_in;  dx = ds * keep * scale
//   dweight = sum_rows(dout * xhat), dbias = sum_rows(dout): per row group partials here, summed
//   by column_sum_kernel.

struct BwdParams {
  const void* dout;        // [M, N] T
  const void* ds_in;       // [M, N] T or null
  const void* s;           // [M, N] T
  const void* weight;      // [N] T or fp32, or null (= 1)
  const float* mean;       // [M], or null (RMSNorm)
  const float* rstd;       // [M]
  void* ds;                // [M, N] T
  void* dx;                // [M, N] T, or null when dropout is off
  float* dweight_partial;  // [gridDim.x * blockDim.y, N], or null: not wanted
  float* dbias_partial;    // [gridDim.x * blockDim.y, N], or null: not wanted
  int64_t rows;            // M
  int cols;                // N
  Dropout dropout;
  bool weight_f32;
  bool rms_norm;
};

template <typename T, int VEC, int NV, int kMaxThreads>
__global__ void __launch_bounds__(kMaxThreads) dropout_add_ln_bwd_kernel(const BwdParams p) {
  // [blockDim.y][2][N]: this row group's dweight and dbias partials. Each thread only touches its
  // own columns, so the accumulators need no barrier.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int n = p.cols;
  const bool want_dw = p.dweight_partial != nullptr;
  const bool want_db = p.dbias_partial != nullptr;
  float* dw_acc = reinterpret_cast<float*>(smem_raw) + static_cast<int64_t>(threadIdx.y) * 2 * n;
  float* db_acc = dw_acc + n;
  const float zeros[VEC] = {};
  if (want_dw || want_db) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (threadIdx.x + k * blockDim.x) * VEC;
      if (col < n) {
        store_f32<VEC>(dw_acc + col, zeros);
        store_f32<VEC>(db_acc + col, zeros);
      }
    }
  }

  // Row groups walk rows in lockstep so that every thread reaches the same barriers.
  const int64_t group_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < p.rows;
       first += group_stride) {
    const int64_t row = first + threadIdx.y;
    const bool row_ok = row < p.rows;
    const int64_t row_start = row_ok ? row * n : 0;
    const float rstd = row_ok ? p.rstd[row] : 0.f;
    const float mean = (row_ok && p.mean) ? p.mean[row] : 0.f;
    const T* s = static_cast<const T*>(p.s) + row_start;
    const T* dout = static_cast<const T*>(p.dout) + row_start;

    float xhat[NV][VEC];
    float wdy[NV][VEC];
    float sums[2] = {0.f, 0.f};  // sum(xhat * wdy), sum(wdy)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (threadIdx.x + k * blockDim.x) * VEC;
      if (row_ok && col < n) {
        float sv[VEC];
        float dy[VEC];
        float w[VEC];
        load_f32<VEC>(s + col, sv);
        load_f32<VEC>(dout + col, dy);
        load_param<T, VEC>(p.weight, p.weight_f32, col, 1.f, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          xhat[k][e] = (sv[e] - mean) * rstd;
          wdy[k][e] = w[e] * dy[e];
          sums[0] += xhat[k][e] * wdy[k][e];
          sums[1] += wdy[k][e];
        }
        if (want_dw) {
          float acc[VEC];
          load_f32<VEC>(dw_acc + col, acc);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += dy[e] * xhat[k][e];
          store_f32<VEC>(dw_acc + col, acc);
        }
        if (want_db) {
          float acc[VEC];
          load_f32<VEC>(db_acc + col, acc);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += dy[e];
          store_f32<VEC>(db_acc + col, acc);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xhat[k][e] = wdy[k][e] = 0.f;
      }
    }

    row_group_sum(sums);
    if (!row_ok) continue;  // the next iteration's barriers are reached by all: `first` is shared
    const float c1 = sums[0] / n;
    const float c2 = p.rms_norm ? 0.f : sums[1] / n;
    const T* ds_in = p.ds_in ? static_cast<const T*>(p.ds_in) + row_start : nullptr;
    T* ds = static_cast<T*>(p.ds) + row_start;
    T* dx = p.dx ? static_cast<T*>(p.dx) + row_start : nullptr;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (threadIdx.x + k * blockDim.x) * VEC;
      if (col < n) {
        float g[VEC];
        float g_in[VEC];
        if (ds_in) load_f32<VEC>(ds_in + col, g_in);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[e] = (wdy[k][e] - (xhat[k][e] * c1 + c2)) * rstd;
          if (ds_in) g[e] += g_in[e];
          g[e] = round_to<T>(g[e]);  // dx is computed from the ds that is returned
        }
        store_f32<VEC>(ds + col, g);
        if (dx) {
          float keep[VEC];
          dropout_factors(p.dropout, row, col, keep);
#pragma unroll
          for (int e = 0; e < VEC; ++e) g[e] *= keep[e];
          store_f32<VEC>(dx + col, g);
        }
      }
    }
  }

  if (!want_dw && !want_db) return;
  const int64_t partial_row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (threadIdx.x + k * blockDim.x) * VEC;
    if (col < n) {
      float acc[VEC];
      if (want_dw) {
        load_f32<VEC>(dw_acc + col, acc);
        store_f32<VEC>(p.dweight_partial + partial_row * n + col, acc);
      }
      if (want_db) {
        load_f32<VEC>(db_acc + col, acc);
        store_f32<VEC>(p.dbias_partial + partial_row * n + col, acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration.

struct RowLayout {
  int nv;               // vectors per thread
  int threads_per_row;  // blockDim.x, a multiple of 32
  int rows_per_cta;     // blockDim.y
};

template <int First, int... Rest>
constexpr int last_of() {
  if constexpr (sizeof...(Rest) == 0) {
    return First;
  } else {
    return last_of<Rest...>();
  }
}

// The fewest vectors per thread that cover the row with at most `target` threads, else the most
// the list allows; short rows are then packed into CTAs of kMinCtaThreads.
template <int... NVs>
RowLayout choose_layout(NvList<NVs...>, int nvec, int target) {
  int nv = last_of<NVs...>();
  for (const int candidate : {NVs...}) {
    if (ceil_div(nvec, candidate) <= target) {
      nv = candidate;
      break;
    }
  }
  const int threads = round_up(ceil_div(nvec, nv), kWarpSize);
  return {nv, threads, threads >= kMinCtaThreads ? 1 : kMinCtaThreads / threads};
}

// Each (VEC, NV) instantiation is compiled for CTAs of up to max(target, kMinCtaThreads) threads,
// which leaves it registers to spare. Only rows too long for the target, which take the last NV of
// the list, get a second instantiation bounded by the most threads such a row can need.
template <int kTarget>
constexpr int kSmallCta = kTarget > kMinCtaThreads ? kTarget : kMinCtaThreads;

template <int VEC, int NV>
constexpr int kFullRowCta = round_up(ceil_div(kMaxHidden, VEC * NV), kWarpSize);

// Calls f(std::integral_constant<int, NV>, std::integral_constant<int, CTA thread bound>).
template <int VEC, int kTarget, int... NVs, typename F>
void dispatch_nv(NvList<NVs...>, const RowLayout& layout, F&& f) {
  constexpr int kLast = last_of<NVs...>();
  constexpr int kSmall = kSmallCta<kTarget>;
  const int threads = layout.threads_per_row * layout.rows_per_cta;
  const auto try_nv = [&](auto nv_c) {
    constexpr int NV = decltype(nv_c)::value;
    if (layout.nv != NV) return false;
    if (threads <= kSmall) {
      f(nv_c, std::integral_constant<int, kSmall>{});
      return true;
    }
    constexpr int kFull = kFullRowCta<VEC, NV>;
    if constexpr (NV == kLast && kFull > kSmall) {
      static_assert(kFull <= 1024, "kMaxHidden needs a longer NV list");
      TORCH_INTERNAL_ASSERT(threads <= kFull);
      f(nv_c, std::integral_constant<int, kFull>{});
      return true;
    }
    TORCH_INTERNAL_ASSERT(false, "dropout_add_layer_norm: no kernel for ", threads, " threads");
    return false;
  };
  const bool found = (try_nv(std::integral_constant<int, NVs>{}) || ...);
  TORCH_INTERNAL_ASSERT(found, "dropout_add_layer_norm: no kernel for ", layout.nv,
                        " vectors per thread");
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

bool is_f32(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->scalar_type() == at::kFloat;
}

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

template <int kVec>
using FwdVecList = std::conditional_t<kVec == 8, FwdVec8List, FwdVec4List>;

template <typename T>
void launch_fwd(const FwdParams& params) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = params.cols % kVec == 0 &&
                      all_aligned16(params.x, params.residual, params.weight, params.bias,
                                    params.out, params.s);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto vec_c, auto list) {
    constexpr int VEC = decltype(vec_c)::value;
    const RowLayout layout = choose_layout(list, params.cols / VEC, kFwdTargetThreads);
    dispatch_nv<VEC, kFwdTargetThreads>(list, layout, [&](auto nv_c, auto threads_c) {
      const dim3 block(layout.threads_per_row, layout.rows_per_cta);
      const int64_t grid = (params.rows + layout.rows_per_cta - 1) / layout.rows_per_cta;
      TORCH_CHECK(grid <= INT32_MAX, "dropout_add_layer_norm: too many rows (", params.rows, ")");
      dropout_add_ln_fwd_kernel<T, VEC, decltype(nv_c)::value, decltype(threads_c)::value>
          <<<static_cast<unsigned>(grid), block, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  if (vector) {
    launch(std::integral_constant<int, kVec>{}, FwdVecList<kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{}, FwdScalarList{});
  }
}

template <int kVec>
using BwdVecList = std::conditional_t<kVec == 8, BwdVec8List, BwdVec4List>;

template <typename T>
void launch_bwd(BwdParams params, const at::Tensor& dweight, const at::Tensor& dbias,
                const at::TensorOptions& f32) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector =
      params.cols % kVec == 0 && all_aligned16(params.dout, params.ds_in, params.s, params.weight,
                                               params.ds, params.dx);
  const bool want_dw = dweight.numel() > 0;
  const bool want_db = dbias.numel() > 0;
  const int device = current_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sm_count = 0;
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));

  auto launch = [&](auto vec_c, auto list) {
    constexpr int VEC = decltype(vec_c)::value;
    const RowLayout layout = choose_layout(list, params.cols / VEC, kBwdTargetThreads);
    dispatch_nv<VEC, kBwdTargetThreads>(list, layout, [&](auto nv_c, auto threads_c) {
      const auto kernel =
          dropout_add_ln_bwd_kernel<T, VEC, decltype(nv_c)::value, decltype(threads_c)::value>;
      const int threads = layout.threads_per_row * layout.rows_per_cta;
      const size_t smem = (want_dw || want_db)
                              ? sizeof(float) * 2 * params.cols * layout.rows_per_cta
                              : 0;
      // The static reduction scratch (row_group_sum) takes at most 256 bytes more.
      TORCH_CHECK(smem + 256 <= static_cast<size_t>(smem_optin),
                  "dropout_add_layer_norm: hidden size ", params.cols, " needs ", smem,
                  " bytes of shared memory per block for dweight/dbias but this GPU allows ",
                  smem_optin, "; use backend='triton'");
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
      }
      int ctas_per_sm = 0;
      C10_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, threads, smem));
      const int64_t needed = (params.rows + layout.rows_per_cta - 1) / layout.rows_per_cta;
      const int grid = static_cast<int>(
          std::min<int64_t>(needed, static_cast<int64_t>(std::max(ctas_per_sm, 1)) * sm_count));

      // Partials: [2, grid * rows_per_cta, N] fp32, dweight's then dbias's.
      const int64_t partial_rows = static_cast<int64_t>(grid) * layout.rows_per_cta;
      at::Tensor partial;
      if (want_dw || want_db) {
        partial = at::empty({2, partial_rows, params.cols}, f32);
        float* base = partial.data_ptr<float>();
        params.dweight_partial = want_dw ? base : nullptr;
        params.dbias_partial = want_db ? base + partial_rows * params.cols : nullptr;
      }
      kernel<<<grid, dim3(layout.threads_per_row, layout.rows_per_cta), smem, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      if (want_dw || want_db) {
        ColumnSumParams<float> cs;
        cs.in0 = params.dweight_partial;
        cs.in1 = params.dbias_partial;
        cs.out0 = want_dw ? dweight.data_ptr<float>() : nullptr;
        cs.out1 = want_db ? dbias.data_ptr<float>() : nullptr;
        cs.rows = partial_rows;
        cs.cols = params.cols;
        const dim3 cs_grid(ceil_div(params.cols, kColSumCols), 2);
        column_sum_kernel<float><<<cs_grid, dim3(kColSumCols, kColSumRows), 0, stream>>>(cs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  };
  if (vector) {
    launch(std::integral_constant<int, kVec>{}, BwdVecList<kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{}, BwdScalarList{});
  }
}

}  // namespace
}  // namespace tk

int64_t dropout_add_layer_norm_cuda_max_hidden() { return tk::kMaxHidden; }

void dropout_add_layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double dropout_p,
                                     double eps, const int64_t* seed, bool rms_norm,
                                     const at::Tensor& out, const at::Tensor& s,
                                     const at::Tensor& mean, const at::Tensor& rstd) {
  tk::FwdParams p;
  p.x = x.data_ptr();
  p.residual = tk::data_or_null(residual);
  p.weight = tk::data_or_null(weight);
  p.bias = tk::data_or_null(bias);
  p.out = out.data_ptr();
  p.s = s.numel() > 0 ? s.data_ptr() : nullptr;
  p.mean = mean.numel() > 0 ? mean.data_ptr<float>() : nullptr;
  p.rstd = rstd.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = static_cast<int>(x.size(1));
  p.eps = static_cast<float>(eps);
  p.dropout = tk::make_dropout(dropout_p, seed);
  p.weight_f32 = tk::is_f32(weight);
  p.bias_f32 = tk::is_f32(bias);
  p.rms_norm = rms_norm;
  tk::dispatch_dtype("dropout_add_layer_norm", x.scalar_type(),
                     [&](auto tag) { tk::launch_fwd<typename decltype(tag)::type>(p); });
}

void dropout_add_layer_norm_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& ds_in,
                                     const at::Tensor& s, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& mean, const at::Tensor& rstd,
                                     double dropout_p, const int64_t* seed, bool rms_norm,
                                     const at::Tensor& ds, const at::Tensor& dx,
                                     const at::Tensor& dweight, const at::Tensor& dbias) {
  tk::BwdParams p;
  p.dout = dout.data_ptr();
  p.ds_in = tk::data_or_null(ds_in);
  p.s = s.data_ptr();
  p.weight = tk::data_or_null(weight);
  p.mean = rms_norm ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.ds = ds.data_ptr();
  p.dx = dx.numel() > 0 ? dx.data_ptr() : nullptr;
  p.dweight_partial = nullptr;
  p.dbias_partial = nullptr;
  p.rows = dout.size(0);
  p.cols = static_cast<int>(dout.size(1));
  p.dropout = tk::make_dropout(dropout_p, seed);
  p.weight_f32 = tk::is_f32(weight);
  p.rms_norm = rms_norm;
  const at::TensorOptions f32 = dout.options().dtype(at::kFloat);
  tk::dispatch_dtype("dropout_add_layer_norm", dout.scalar_type(),
                     [&](auto tag) {
    tk::launch_bwd<typename decltype(tag)::type>(p, dweight, dbias, f32);
  });
}
