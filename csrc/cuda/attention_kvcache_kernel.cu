// Attention of a decoding step over a preallocated KV cache (flash-decoding), in CUDA: a few new
// queries, the cache's keys up to a per-sequence length read on the device, the new keys and values
// appended in the same kernel, key padding, GQA/MQA, causal bottom-right, head dims up to 256.
// Modelled on flash-attention's split-KV forward (flash_attn_with_kvcache), flash-decoding, and
// FasterTransformer's masked multi-head attention (a warp per key, fp32 dot products reduced by
// warp shuffles). A memory-bound kernel, so no tensor cores: each warp walks its own keys with its
// own online softmax over the rows of the program (the queries of a GQA group, so a key is read
// once per group), the warps of a block merge in shared memory, and with several splits a second
// kernel merges the splits' fp32 partials by their log-sum-exps. Trade-off: one key per warp step
// keeps a warp's registers to q and the accumulator of its rows (ROWS x D / 32 floats each, so a
// program takes at most 8 rows and more rows take more programs, each reading the keys again), at
// the cost of ROWS warp reductions per key: on short groups the kernel is bound by memory, on
// groups of 8 rows and more by those shuffles.
//
// Per program (batch b, KV head, rows r0 .. r0 + ROWS - 1, slice [start, end) of the n = seqlen +
// Lnew keys), with s = softmax_scale · log2(e) · q·k over the visible keys, in base 2:
//   m = max s,  l = Σ 2^(s - m),  o = Σ 2^(s - m) v / l,  lse₂ = m + log2 l   (o = 0, lse₂ = -inf: none)
// and the merge of the slices t: out = Σ_t 2^(lse₂_t - M) o_t / Σ_t 2^(lse₂_t - M), M = max_t lse₂_t.

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

namespace tk {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;  // warps per block, each walking every kWarps-th key of the slice
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxHeadDim = 256;
constexpr int kSplitKeys = 64;  // a slice's length is a multiple of this (the Python heuristic's unit)
constexpr int kCombineRowsPerBlock = kWarps;  // the merge: a warp per output row

struct KvcacheParams {
  const void* q;  // [B, Lq, Hq, D]
  void* k_cache;  // [B, Lmax, Hkv, D]
  void* v_cache;
  const int* seqlens;  // [B] int32
  const void* k_new;   // [B, Lnew, Hkv, D] or null
  const void* v_new;
  const bool* kpm;  // [B, Lmax] contiguous, true = padding; or null
  void* out;        // [B, Lq, Hq, D] contiguous
  float* o_part;    // [B·Hkv, splits, R, D] fp32 (splits > 1)
  float* lse_part;  // [B·Hkv, splits, R] fp32 (splits > 1)
  // Element strides (batch, position, head) of each tensor; the head dim has stride 1.
  int64_t q_b, q_m, q_h, kc_b, kc_n, kc_h, vc_b, vc_n, vc_h, kn_b, kn_n, kn_h, vn_b, vn_n, vn_h;
  int64_t batch;
  int hkv, group, lq, lnew, lmax, head_dim, n_splits, n_row_chunks;
  float scale_log2;  // softmax_scale · log2(e)
  bool causal;
  bool vec;  // every row is 16-byte-loadable by lanes (D == 32 · DPL, aligned bases and strides)
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// This lane's DPL elements [lane · DPL, lane · DPL + DPL) of a row of D, as fp32 (0 past D).
template <typename T, int DPL>
__device__ __forceinline__ void load_row(const T* row, int lane, int d, bool vec, float (&dst)[DPL]) {
  if (vec) {
    load_f32<DPL>(row + lane * DPL, dst);
  } else {
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int c = lane * DPL + e;
      dst[e] = c < d ? to_float(row[c]) : 0.f;
    }
  }
}

template <typename T, int DPL>
__device__ __forceinline__ void store_row(T* row, int lane, int d, bool vec, const float (&src)[DPL]) {
  if (vec) {
    store_f32<DPL>(row + lane * DPL, src);
  } else {
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int c = lane * DPL + e;
      if (c < d) row[c] = from_float<T>(src[e]);
    }
  }
}

// grid.x: (B · Hkv, row chunk, split), split fastest (axes y and z cap at 65,535). The minimum of
// one block per SM: without it ptxas capped some instantiations at 80 registers and spilled (fp32,
// D <= 128, 4 rows), where 255 are allowed.
template <typename T, int DPL, int ROWS>
__global__ void __launch_bounds__(kThreads, 1) attention_kvcache_fwd_kernel(const KvcacheParams p) {
  constexpr int DPAD = DPL * kWarpSize;
  __shared__ float s_m[kWarps][ROWS];
  __shared__ float s_l[kWarps][ROWS];
  __shared__ float s_acc[kWarps][ROWS][DPAD];

  const int pid = blockIdx.x;
  const int split = pid % p.n_splits;
  const int chunk_id = (pid / p.n_splits) % p.n_row_chunks;
  const int bkv = pid / (p.n_splits * p.n_row_chunks);
  const int b = bkv / p.hkv;
  const int kvh = bkv % p.hkv;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int rows = p.lq * p.group;
  const int r0 = chunk_id * ROWS;

  // q of this program's rows (row r = query i · G + head g of the group), pre-scaled.
  float q[ROWS][DPL];
  int qi[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = r0 + r;
    qi[r] = row < rows ? row / p.group : -1;
    if (row < rows) {
      const int64_t h = int64_t(kvh) * p.group + row % p.group;
      const T* qrow = static_cast<const T*>(p.q) + b * p.q_b + qi[r] * p.q_m + h * p.q_h;
      load_row<T, DPL>(qrow, lane, p.head_dim, p.vec, q[r]);
#pragma unroll
      for (int e = 0; e < DPL; ++e) q[r][e] *= p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < DPL; ++e) q[r][e] = 0.f;
    }
  }

  // min() keeps a length past the caller's contract (seqlen + Lnew <= Lmax) inside the buffers.
  const int seqlen = min(p.seqlens[b], p.lmax);
  const int n = seqlen + p.lnew;
  const int chunk = (n + kSplitKeys * p.n_splits - 1) / (kSplitKeys * p.n_splits) * kSplitKeys;
  const int start = split * chunk;
  int end = min(n, start + chunk);
  if (p.causal) {  // no row of the chunk sees a key past its last query's diagonal
    const int last_i = min((r0 + ROWS - 1) / p.group, p.lq - 1);
    end = min(end, n - p.lq + last_i + 1);
  }

  float m[ROWS], l[ROWS], acc[ROWS][DPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }

  T* const kc = static_cast<T*>(p.k_cache) + b * p.kc_b + int64_t(kvh) * p.kc_h;
  T* const vc = static_cast<T*>(p.v_cache) + b * p.vc_b + int64_t(kvh) * p.vc_h;
  for (int j = start + warp; j < end; j += kWarps) {
    float k[DPL], v[DPL];
    if (j < seqlen) {
      load_row<T, DPL>(kc + j * p.kc_n, lane, p.head_dim, p.vec, k);
      load_row<T, DPL>(vc + j * p.vc_n, lane, p.head_dim, p.vec, v);
    } else {  // an appended key: read from k / v, and written into the cache by the last row chunk
              // (causal, an earlier chunk's last query stops short of the last new keys)
      const int64_t t = j - seqlen;
      load_row<T, DPL>(static_cast<const T*>(p.k_new) + b * p.kn_b + t * p.kn_n + kvh * p.kn_h, lane,
                       p.head_dim, p.vec, k);
      load_row<T, DPL>(static_cast<const T*>(p.v_new) + b * p.vn_b + t * p.vn_n + kvh * p.vn_h, lane,
                       p.head_dim, p.vec, v);
      if (chunk_id == p.n_row_chunks - 1 && j < p.lmax) {
        store_row<T, DPL>(kc + j * p.kc_n, lane, p.head_dim, p.vec, k);
        store_row<T, DPL>(vc + j * p.vc_n, lane, p.head_dim, p.vec, v);
      }
    }
    if (p.kpm != nullptr && j < p.lmax && p.kpm[b * int64_t(p.lmax) + j]) continue;  // warp-uniform
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < DPL; ++e) dot = fmaf(q[r][e], k[e], dot);
      const float s = warp_sum(dot);
      const bool visible = qi[r] >= 0 && (!p.causal || j <= n - p.lq + qi[r]);
      if (!visible) continue;  // warp-uniform
      const float m_new = fmaxf(m[r], s);
      const float alpha = exp2f(m[r] - m_new);  // 0 while m is -inf
      const float pr = exp2f(s - m_new);
      l[r] = l[r] * alpha + pr;
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] = fmaf(pr, v[e], acc[r][e] * alpha);
      m[r] = m_new;
    }
  }

  // Merge the warps' softmax states.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < DPL; ++e) s_acc[warp][r][lane * DPL + e] = acc[r][e];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ROWS * DPAD; idx += kThreads) {
    const int r = idx / DPAD;
    const int d = idx % DPAD;
    const int row = r0 + r;
    if (row >= rows || d >= p.head_dim) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][r]);
    const float m_safe = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f(s_m[w][r] - m_safe);  // 0 for a warp that saw no key
      lsum = fmaf(s_l[w][r], wt, lsum);
      o = fmaf(s_acc[w][r][d], wt, o);
    }
    o = lsum > 0.f ? o / lsum : 0.f;
    if (p.n_splits == 1) {
      const int64_t i = row / p.group;
      const int64_t h = int64_t(kvh) * p.group + row % p.group;
      const int64_t hq = int64_t(p.hkv) * p.group;
      static_cast<T*>(p.out)[((b * p.lq + i) * hq + h) * p.head_dim + d] = from_float<T>(o);
    } else {
      const int64_t part = (int64_t(bkv) * p.n_splits + split) * rows + row;
      p.o_part[part * p.head_dim + d] = o;
      if (d == 0) p.lse_part[part] = lsum > 0.f ? mx + log2f(lsum) : -INFINITY;
    }
  }
}

// A warp per output row (b, i, h): merges the splits' partials. grid.x: rows / kCombineRowsPerBlock.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_kvcache_combine_kernel(const KvcacheParams p) {
  const int rows = p.lq * p.group;
  const int64_t idx = int64_t(blockIdx.x) * kCombineRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t bkv = idx / rows;
  const int row = static_cast<int>(idx % rows);
  const int64_t b = bkv / p.hkv;
  if (b >= p.batch) return;  // the last block's spare warps
  const int64_t base = bkv * p.n_splits * rows + row;  // split t's partial row: base + t · rows
  float mx = -INFINITY;
  for (int t = 0; t < p.n_splits; ++t) mx = fmaxf(mx, p.lse_part[base + int64_t(t) * rows]);
  const float m_safe = mx == -INFINITY ? 0.f : mx;
  float lsum = 0.f;
  for (int t = 0; t < p.n_splits; ++t) lsum += exp2f(p.lse_part[base + int64_t(t) * rows] - m_safe);
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  const int64_t i = row / p.group;
  const int64_t h = (bkv % p.hkv) * p.group + row % p.group;
  T* out = static_cast<T*>(p.out) + ((b * p.lq + i) * (int64_t(p.hkv) * p.group) + h) * p.head_dim;
  for (int d = lane; d < p.head_dim; d += kWarpSize) {
    float o = 0.f;
    for (int t = 0; t < p.n_splits; ++t) {
      const int64_t part = base + int64_t(t) * rows;
      o = fmaf(exp2f(p.lse_part[part] - m_safe), p.o_part[part * p.head_dim + d], o);
    }
    out[d] = from_float<T>(o * inv);
  }
}

template <typename T, int DPL, int ROWS>
void launch_fwd(KvcacheParams p, int64_t bsz, int rows, cudaStream_t stream) {
  p.n_row_chunks = (rows + ROWS - 1) / ROWS;
  const int64_t grid = bsz * p.hkv * p.n_row_chunks * p.n_splits;
  TORCH_CHECK(grid <= INT32_MAX, "attention_with_kvcache: ", grid, " programs exceed CUDA's grid limit");
  attention_kvcache_fwd_kernel<T, DPL, ROWS><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DPL>
void launch_rows(const KvcacheParams& p, int64_t bsz, int rows, cudaStream_t stream) {
  if (rows <= 1) {
    launch_fwd<T, DPL, 1>(p, bsz, rows, stream);
  } else if (rows <= 2) {
    launch_fwd<T, DPL, 2>(p, bsz, rows, stream);
  } else if (rows <= 4) {
    launch_fwd<T, DPL, 4>(p, bsz, rows, stream);
  } else {
    launch_fwd<T, DPL, 8>(p, bsz, rows, stream);
  }
}

template <typename T>
void launch(KvcacheParams p, int64_t bsz, cudaStream_t stream) {
  const int rows = p.lq * p.group;
  const int d = p.head_dim;
  if (d <= 32) {
    launch_rows<T, 1>(p, bsz, rows, stream);
  } else if (d <= 64) {
    launch_rows<T, 2>(p, bsz, rows, stream);
  } else if (d <= 128) {
    launch_rows<T, 4>(p, bsz, rows, stream);
  } else {
    launch_rows<T, 8>(p, bsz, rows, stream);
  }
  if (p.n_splits > 1) {
    const int64_t out_rows = bsz * p.hkv * rows;
    const int64_t grid = (out_rows + kCombineRowsPerBlock - 1) / kCombineRowsPerBlock;
    TORCH_CHECK(grid <= INT32_MAX, "attention_with_kvcache: ", grid, " programs exceed CUDA's grid limit");
    attention_kvcache_combine_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

int elements_per_lane(int d) { return d <= 32 ? 1 : d <= 64 ? 2 : d <= 128 ? 4 : 8; }

}  // namespace
}  // namespace tk

int64_t attention_with_kvcache_cuda_max_head_dim() { return tk::kMaxHeadDim; }

void attention_with_kvcache_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k,
                                     const std::optional<at::Tensor>& v,
                                     const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                     double softmax_scale, int64_t num_splits, const at::Tensor& out) {
  const int64_t bsz = q.size(0);
  const int64_t lmax = k_cache.size(1);
  const int64_t d = q.size(3);
  tk::KvcacheParams p{};
  p.batch = bsz;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.k_new = k ? k->data_ptr() : nullptr;
  p.v_new = v ? v->data_ptr() : nullptr;
  p.kpm = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.q_b = q.stride(0), p.q_m = q.stride(1), p.q_h = q.stride(2);
  p.kc_b = k_cache.stride(0), p.kc_n = k_cache.stride(1), p.kc_h = k_cache.stride(2);
  p.vc_b = v_cache.stride(0), p.vc_n = v_cache.stride(1), p.vc_h = v_cache.stride(2);
  if (k) {
    p.kn_b = k->stride(0), p.kn_n = k->stride(1), p.kn_h = k->stride(2);
    p.vn_b = v->stride(0), p.vn_n = v->stride(1), p.vn_h = v->stride(2);
  }
  p.hkv = static_cast<int>(k_cache.size(2));
  p.group = static_cast<int>(q.size(2) / k_cache.size(2));
  p.lq = static_cast<int>(q.size(1));
  p.lnew = k ? static_cast<int>(k->size(1)) : 0;
  p.lmax = static_cast<int>(lmax);
  p.head_dim = static_cast<int>(d);
  p.n_splits = static_cast<int>(std::clamp<int64_t>(num_splits, 1, (lmax + tk::kSplitKeys - 1) / tk::kSplitKeys));
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;

  // Vectorised rows: each lane's DPL elements are one aligned access of DPL · sizeof(T) bytes.
  const int64_t vec_elems = tk::elements_per_lane(static_cast<int>(d));
  const auto row_ok = [&](const at::Tensor& t) {
    const int64_t align = std::min<int64_t>(16, vec_elems * t.element_size());
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0 && t.stride(0) % vec_elems == 0 &&
           t.stride(1) % vec_elems == 0 && t.stride(2) % vec_elems == 0;
  };
  p.vec = d == 32 * vec_elems && row_ok(q) && row_ok(k_cache) && row_ok(v_cache) && (!k || (row_ok(*k) && row_ok(*v)));

  at::Tensor o_part, lse_part;
  const int rows = p.lq * p.group;
  if (p.n_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_part = at::empty({bsz * p.hkv, p.n_splits, rows, d}, f32);
    lse_part = at::empty({bsz * p.hkv, p.n_splits, rows}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  tk::dispatch_dtype("attention_with_kvcache", q.scalar_type(),
                     [&](auto tag) { tk::launch<typename decltype(tag)::type>(p, bsz, stream); });
}
