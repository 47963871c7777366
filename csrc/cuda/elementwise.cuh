// Element-wise building blocks of the CUDA kernels: fp16/bf16/fp32 conversion, vectorised
// (16-byte) loads and stores through fp32 registers, and the Philox dropout factor.
#pragma once

#include "philox.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tk {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// fp32 value of v after a round trip through T: what storing v in T and reading it back gives.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename E, int K>
struct alignas(sizeof(E) * K) Pack {
  E v[K];
};

// Elements of E moved per memory instruction when moving VEC of them: at most 16 bytes, so a
// VEC-element access needs 16-byte alignment when it spans >= 16 bytes, element alignment else.
template <typename E, int VEC>
constexpr int kChunk = (16 / int(sizeof(E)) < VEC) ? 16 / int(sizeof(E)) : VEC;

template <int VEC, typename E>
__device__ __forceinline__ void load_f32(const E* p, float (&dst)[VEC]) {
  constexpr int C = kChunk<E, VEC>;
#pragma unroll
  for (int c = 0; c < VEC / C; ++c) {
    const Pack<E, C> pk = reinterpret_cast<const Pack<E, C>*>(p)[c];
#pragma unroll
    for (int e = 0; e < C; ++e) dst[c * C + e] = to_float(pk.v[e]);
  }
}

template <int VEC, typename E>
__device__ __forceinline__ void store_f32(E* p, const float (&src)[VEC]) {
  constexpr int C = kChunk<E, VEC>;
#pragma unroll
  for (int c = 0; c < VEC / C; ++c) {
    Pack<E, C> pk;
#pragma unroll
    for (int e = 0; e < C; ++e) pk.v[e] = from_float<E>(src[c * C + e]);
    reinterpret_cast<Pack<E, C>*>(p)[c] = pk;
  }
}

struct Dropout {
  // The Philox key in device memory, written there by the generator's draw: read in the kernel,
  // never on the host, so a captured CUDA graph uses each replay's fresh seed. Null when disabled.
  const int64_t* seed;
  uint32_t threshold;  // keep iff (philox >> 8) >= threshold
  float scale;         // 1 / (1 - p), 0 for p = 1
  bool enabled;        // p > 0
};

// keep * scale of the VEC elements (row, col .. col + VEC - 1) of the [M, N] mask, col % VEC == 0.
template <int VEC>
__device__ __forceinline__ void dropout_factors(const Dropout& d, int64_t row, int64_t col, float (&f)[VEC]) {
  const uint64_t seed = static_cast<uint64_t>(__ldg(reinterpret_cast<const long long*>(d.seed)));
  dropout_factors<VEC>(seed, d.threshold, d.scale, static_cast<uint64_t>(row),
                       static_cast<uint64_t>(col), f);
}

}  // namespace tk
