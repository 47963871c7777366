// Applying a dropout keep-mask on the CPU, in one pass:
//
//   out = residual + x · keep · scale        (residual optional; keep a bool tensor)
//
// computed in x's opmath type (fp32 for fp16/bf16/fp32, fp64 for fp64) and rounded once to x's
// dtype. It is the native backend's dropout (and, with the same mask, the dropout's backward,
// dx = dout · keep · scale): eager PyTorch spells it as a product with a bool tensor, which on the
// CPU first copies the mask into a float temporary (TensorIterator promotes CPU inputs by copy),
// then multiplies, then adds: three passes over the data and a float mask's worth of memory.
//
// The arithmetic is the reference's, bit for bit: x · k · scale with k = 0 or 1 in the compute
// type (a dropped inf or NaN gives NaN, as there), then + residual.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

// out[i] = (r[i] +) x[i] · k[i] · s over [begin, end): restrict pointers and bytes for the mask
// (k is 0 or 1), so that the compiler vectorises both loops.
template <typename scalar_t, typename acc_t>
void apply_range(const scalar_t* __restrict__ x, const uint8_t* __restrict__ k, const scalar_t* __restrict__ r,
                 scalar_t* __restrict__ out, acc_t s, int64_t begin, int64_t end) {
  if (r == nullptr) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(k[i]) * s);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(r[i]) + static_cast<acc_t>(x[i]) * static_cast<acc_t>(k[i]) * s);
    }
  }
}

at::Tensor dropout_apply(const at::Tensor& x, const at::Tensor& keep, double scale,
                         const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && keep.device().is_cpu(), "dropout_apply: x and keep must be CPU tensors");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "dropout_apply: keep must be a bool tensor, got ", keep.scalar_type());
  TORCH_CHECK(keep.sizes() == x.sizes(), "dropout_apply: keep shape ", keep.sizes(), " does not match x shape ",
              x.sizes());
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->sizes() == x.sizes() &&
                    residual->scalar_type() == x.scalar_type(),
                "dropout_apply: residual must be a CPU tensor of x's shape and dtype, got ", residual->scalar_type(),
                " ", residual->sizes());
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor kc = keep.contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dropout_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const bool* kp = kc.const_data_ptr<bool>();
    const scalar_t* rp = rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(scale);
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      apply_range<scalar_t, acc_t>(xp, reinterpret_cast<const uint8_t*>(kp), rp, op, s, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) { m.def("dropout_apply(Tensor x, Tensor keep, float scale, Tensor? residual) -> Tensor"); }

TORCH_LIBRARY_IMPL(tk_C, CPU, m) { m.impl("dropout_apply", &dropout_apply); }
