// The dropout keep-mask on the CPU: the same Philox4x32-10 decision as the CUDA and Triton
// kernels (cuda/philox.cuh, shared host/device), computed in a parallel C++ loop. The PyTorch
// specification in transformer_kernels/reference/philox.py needs ~250 whole-tensor int64 ops
// per mask; this is what the reference backend uses on the CPU when the extension is built.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/philox.cuh"

namespace {

void check_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.dim() == 0 && seed.scalar_type() == at::kLong,
              "dropout_keep_mask: seed must be a 0-dim int64 CPU tensor, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
}

// Bool [rows, cols]: keep[i, j] = philox(seed, i * cols + j) >> 8 >= threshold.
at::Tensor dropout_keep_mask(const at::Tensor& seed, int64_t threshold, int64_t rows, int64_t cols) {
  check_seed(seed);
  TORCH_CHECK(rows >= 0 && cols >= 0, "dropout_keep_mask: rows and cols must be >= 0, got ", rows, ", ", cols);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24),
              "dropout_keep_mask: threshold must be in [0, 2^24], got ", threshold);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t thr = static_cast<uint32_t>(threshold);
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows * cols, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = tk_philox_keep(key, static_cast<uint64_t>(i), thr);
    }
  });
  return keep;
}

// First Philox word for arbitrary int64 counters, as int64 in [0, 2^32): lets the tests hold
// this implementation to the PyTorch one on counters whose high word is not zero.
at::Tensor philox_first_word(const at::Tensor& seed, const at::Tensor& idx) {
  check_seed(seed);
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong,
              "philox_first_word: idx must be an int64 CPU tensor, got ", idx.scalar_type(), " on ", idx.device());
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor idx_c = idx.contiguous();
  at::Tensor words = at::empty_like(idx_c);
  const int64_t* in = idx_c.data_ptr<int64_t>();
  int64_t* out = words.data_ptr<int64_t>();
  at::parallel_for(0, idx_c.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = tk::philox_first_word(key, static_cast<uint64_t>(in[i]));
    }
  });
  return words;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) {
  m.def("dropout_keep_mask(Tensor seed, int threshold, int rows, int cols) -> Tensor");
  m.def("philox_first_word(Tensor seed, Tensor idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(tk_C, CPU, m) {
  m.impl("dropout_keep_mask", &dropout_keep_mask);
  m.impl("philox_first_word", &philox_first_word);
}
