// Counter-based dropout RNG shared by the CUDA kernels and the CPU mask: Philox4x32-10 (Salmon
// et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the generator behind curand and
// Triton's tl.philox. Keeping one definition here keeps every backend's mask bit-identical to
// transformer_kernels/reference/philox.py:
//
//   element (row, col) of a [rows, cols] mask takes word col % 4 of
//   Philox4x32-10(counter = (col / 4, row_lo, row_hi, 0), key = (seed_lo, seed_hi)),
//   and is kept iff that word's top 24 bits are >= threshold = llrint(p * 2^24).
//
// One call (ten rounds of two 32x32->64 multiplies) serves four neighbouring columns; a vector
// of 4 or 8 columns starting at a multiple of 4 needs one call per 4 elements.
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
constexpr int kPhiloxWords = 4;  // elements served by one call

struct PhiloxWords {
  uint32_t w[kPhiloxWords];
};

TK_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) and key (seed_lo, seed_hi). Each round:
// (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)), then the
// key takes a Weyl step.
TK_HOST_DEVICE PhiloxWords philox4x32(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
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
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four words of the mask's elements (row, 4 * group + w), w < 4.
TK_HOST_DEVICE PhiloxWords dropout_words(uint64_t seed, uint64_t row, uint64_t group) {
  return philox4x32(seed, static_cast<uint32_t>(group), static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                    0u);
}

// Word w (a run-time value < 4) without indexing the array, which would put it in local memory.
TK_HOST_DEVICE uint32_t select_word(const PhiloxWords& r, uint32_t w) {
  return w == 0 ? r.w[0] : w == 1 ? r.w[1] : w == 2 ? r.w[2] : r.w[3];
}

TK_HOST_DEVICE bool dropout_keep_word(uint32_t word, uint32_t threshold) { return (word >> 8) >= threshold; }

// Keep decisions of the VEC elements (row, col .. col + VEC - 1), col a multiple of VEC, as
// factors (scale or 0). VEC >= 4: one call per 4 elements; VEC of 1 or 2 stays inside one group.
template <int VEC>
TK_HOST_DEVICE void dropout_factors(uint64_t seed, uint32_t threshold, float scale, uint64_t row, uint64_t col,
                                    float (&f)[VEC]) {
  static_assert(VEC == 1 || VEC == 2 || VEC % kPhiloxWords == 0, "a vector must not straddle two Philox calls");
  if constexpr (VEC % kPhiloxWords == 0) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int g = 0; g < VEC / kPhiloxWords; ++g) {
      const PhiloxWords r = dropout_words(seed, row, col / kPhiloxWords + g);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int w = 0; w < kPhiloxWords; ++w) {
        f[g * kPhiloxWords + w] = dropout_keep_word(r.w[w], threshold) ? scale : 0.f;
      }
    }
  } else {
    const PhiloxWords r = dropout_words(seed, row, col / kPhiloxWords);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < VEC; ++e) {
      f[e] = dropout_keep_word(select_word(r, static_cast<uint32_t>((col + e) % kPhiloxWords)), threshold) ? scale : 0.f;
    }
  }
}

}  // namespace tk
