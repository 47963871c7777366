// Host-side dispatch of a kernel launcher over the activation dtypes the CUDA ops support.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tk {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA type of `dtype` (fp32, fp16, bf16); anything else is an
// error naming `op`.
template <typename F>
void dispatch_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, op, ": dtype ", dtype, " is not supported");
  }
}

}  // namespace tk
