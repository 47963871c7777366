// Counter-based dropout RNG shared by the CUDA kernels: Philox4x32-10 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), the generator behind curand and
// Triton's tl.philox. Keeping one definition here keeps every backend's mask bit-identical.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TK_HOST_DEVICE inline
#endif

namespace tk {

constexpr uint32_t kPhiloxMul0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMul1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

TK_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32-10 for counter (idx_lo, idx_hi, 0, 0) and key
// (seed_lo, seed_hi). Each round: (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2),
// hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)), then the key takes a Weyl step.
TK_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t idx) {
  uint32_t c0 = static_cast<uint32_t>(idx);
  uint32_t c1 = static_cast<uint32_t>(idx >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi0 = mul_hi_u32(kPhiloxMul0, c0);
    const uint32_t lo0 = kPhiloxMul0 * c0;
    const uint32_t hi1 = mul_hi_u32(kPhiloxMul1, c2);
    const uint32_t lo1 = kPhiloxMul1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return c0;
}

}  // namespace tk

// Dropout keep decision for element `idx` (= row * N + col) of a call seeded with `seed`:
// keep iff the top 24 bits of the Philox word are >= threshold, where the host computes
// threshold = llrint(p * 2^24), so P(drop) = p to 2^-24 and p = 1 drops everything.
TK_HOST_DEVICE bool tk_philox_keep(uint64_t seed, uint64_t idx, uint32_t threshold) {
  return (tk::philox_first_word(seed, idx) >> 8) >= threshold;
}
