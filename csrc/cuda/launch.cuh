// Host-side launch helpers shared by the CUDA ops: the 16-byte alignment test that picks the
// vectorised kernels, and the dropout parameters a kernel receives.
#pragma once

#include "elementwise.cuh"

#include <cmath>
#include <cstdint>

namespace tk {

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename... Ptrs>
bool all_aligned16(Ptrs... ptrs) {
  return (aligned16(ptrs) && ...);  // null pointers count as aligned
}

// seed: the 0-dim int64 seed tensor's device pointer (null when p == 0), read by the kernels.
inline Dropout make_dropout(double p, const int64_t* seed) {
  Dropout d;
  d.seed = seed;
  d.threshold = static_cast<uint32_t>(std::llrint(p * 16777216.0));
  d.scale = static_cast<float>(p < 1.0 ? 1.0 / (1.0 - p) : 0.0);
  d.enabled = p > 0.0;
  return d;
}

}  // namespace tk
