// The dropout keep-mask on the CPU: the same Philox4x32-10 decision as the CUDA and Triton
// kernels (cuda/philox.cuh, shared host/device), computed in a parallel C++ loop, one Philox call
// per four elements of a row. The PyTorch specification in transformer_kernels/reference/philox.py
// needs ~60 whole-tensor int64 ops per four elements; this is what the reference backend uses on
// the CPU when the extension is built.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cuda/philox.cuh"

namespace {

void check_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "dropout_keep_mask: seed must be a 0-dim int64 CPU tensor, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
}

// Bool [rows, cols]: keep[i, j] = (word j % 4 of philox(seed, (j / 4, i_lo, i_hi, 0))) >> 8 >= threshold.
at::Tensor dropout_keep_mask(const at::Tensor& seed, int64_t threshold, int64_t rows, int64_t cols) {
  check_seed(seed);
  TORCH_CHECK(rows >= 0 && cols >= 0, "dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24),
              "dropout_keep_mask: threshold must be in [0, 2^24], got ", threshold);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t thr = static_cast<uint32_t>(threshold);
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  constexpr int64_t W = tk::kPhiloxWords;
  const int64_t groups = (cols + W - 1) / W;  // Philox calls per row
  // Parallel over (row, group) pairs: rows can be few and long, or many and short.
  at::parallel_for(0, rows * groups, std::max<int64_t>(1, (1 << 14) / W), [&](int64_t begin, int64_t end) {
    int64_t row = begin / groups;  // (row, g) of pair t, stepped rather than divided per pair
    int64_t g = begin - row * groups;
    for (int64_t t = begin; t < end; ++t) {
      const tk::PhiloxWords r = tk::dropout_words(key, static_cast<uint64_t>(row), static_cast<uint64_t>(g));
      bool* dst = out + row * cols + g * W;
      if (g * W + W <= cols) {
        for (int64_t w = 0; w < W; ++w) dst[w] = tk::dropout_keep_word(r.w[w], thr);
      } else {
        for (int64_t w = 0; w < cols - g * W; ++w) dst[w] = tk::dropout_keep_word(r.w[w], thr);
      }
      if (++g == groups) {
        g = 0;
        ++row;
      }
    }
  });
  return keep;
}

// Philox4x32-10 of arbitrary counters: int64 [..., 4] counters with values in [0, 2^32) -> int64
// [..., 4] words. Lets the tests hold this implementation to the PyTorch one and to Random123's
// known answers on counters the masks never reach.
at::Tensor philox4x32(const at::Tensor& seed, const at::Tensor& counters) {
  check_seed(seed);
  TORCH_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kLong && counters.dim() >= 1 &&
                  counters.size(-1) == tk::kPhiloxWords,
              "philox4x32: counters must be an int64 CPU tensor [..., 4], got ", counters.scalar_type(), " ",
              counters.sizes(), " on ", counters.device());
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor c = counters.contiguous();
  at::Tensor words = at::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* out = words.data_ptr<int64_t>();
  at::parallel_for(0, c.numel() / tk::kPhiloxWords, 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* ci = in + i * tk::kPhiloxWords;
      const tk::PhiloxWords r = tk::philox4x32(key, static_cast<uint32_t>(ci[0]), static_cast<uint32_t>(ci[1]),
                                               static_cast<uint32_t>(ci[2]), static_cast<uint32_t>(ci[3]));
      for (int w = 0; w < tk::kPhiloxWords; ++w) out[i * tk::kPhiloxWords + w] = r.w[w];
    }
  });
  return words;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) {
  m.def("dropout_keep_mask(Tensor seed, int threshold, int rows, int cols) -> Tensor");
  m.def("philox4x32(Tensor seed, Tensor counters) -> Tensor");
}

TORCH_LIBRARY_IMPL(tk_C, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask);
  m.impl("philox4x32", &philox4x32);
}
