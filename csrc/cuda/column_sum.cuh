// Column sums of a row-major [rows, N] matrix: dweight / dbias from per-row-group partials
// (dropout_add_layer_norm's backward) and dbias when cuBLASLt cannot fuse it (fused_linear's).
#pragma once

#include "elementwise.cuh"

#include <cstdint>

namespace tk {

// out_k[j] = T(Σ_r in_k[r, j]), fp32 sums; blockIdx.y picks the pair k (0 or 1), so one launch
// can sum two matrices of the same shape (grid.y = 2) or one (grid.y = 1).
// A CTA owns 32 columns; its 32 warps stride over the rows, each warp reading 32 consecutive
// elements of a row, each lane keeping 4 independent sums so that 4 loads are in flight per
// thread (short rows give many rows to sum).
constexpr int kColSumCols = 32;
constexpr int kColSumRows = 32;
constexpr int kColSumUnroll = 4;

template <typename T>
struct ColumnSumParams {
  const T* in0;  // [rows, N] or null: skipped
  const T* in1;  // [rows, N] or null: skipped
  T* out0;       // [N]
  T* out1;       // [N]
  int64_t rows;
  int64_t cols;
};

template <typename T>
__global__ void __launch_bounds__(kColSumCols * kColSumRows)
    column_sum_kernel(const ColumnSumParams<T> p) {
  __shared__ float tile[kColSumRows][kColSumCols + 1];
  const T* in = blockIdx.y == 0 ? p.in0 : p.in1;
  T* out = blockIdx.y == 0 ? p.out0 : p.out1;
  if (in == nullptr) return;  // uniform across the CTA
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColSumCols + threadIdx.x;
  float acc[kColSumUnroll] = {};
  if (col < p.cols) {
    int64_t r = threadIdx.y;
    for (; r + (kColSumUnroll - 1) * kColSumRows < p.rows; r += kColSumUnroll * kColSumRows) {
#pragma unroll
      for (int u = 0; u < kColSumUnroll; ++u) {
        acc[u] += to_float(in[(r + u * kColSumRows) * p.cols + col]);
      }
    }
    for (; r < p.rows; r += kColSumRows) acc[0] += to_float(in[r * p.cols + col]);
  }
  float partial = 0.f;
#pragma unroll
  for (int u = 0; u < kColSumUnroll; ++u) partial += acc[u];
  tile[threadIdx.y][threadIdx.x] = partial;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kColSumRows; ++r) total += tile[r][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

}  // namespace tk
