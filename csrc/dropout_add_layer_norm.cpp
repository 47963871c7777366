// tk_C::dropout_add_layer_norm_{fwd,bwd}: schema, argument checks and dispatch registration.
// The kernels live in cuda/dropout_add_layer_norm_kernel.cu; autograd is wired up in Python.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

// Defined in cuda/dropout_add_layer_norm_kernel.cu.
int64_t dropout_add_layer_norm_cuda_max_hidden();
void dropout_add_layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double dropout_p,
                                     double eps, const int64_t* seed, bool rms_norm,
                                     const at::Tensor& out, const at::Tensor& s,
                                     const at::Tensor& mean, const at::Tensor& rstd);
void dropout_add_layer_norm_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& ds_in,
                                     const at::Tensor& s, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& mean, const at::Tensor& rstd,
                                     double dropout_p, const int64_t* seed, bool rms_norm,
                                     const at::Tensor& ds, const at::Tensor& dx,
                                     const at::Tensor& dweight, const at::Tensor& dbias);

namespace {

constexpr const char* kOp = "dropout_add_layer_norm";

// x (or dout in the backward): the [M, N] activation every other argument is checked against.
void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor (got ", t.device(),
              "); use backend='reference' or 'triton'");
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D [M, N] (got shape ", t.sizes(), ")");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp, ": ",
              name, " dtype ", dtype, " is not supported (must be Half, BFloat16 or Float)");
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
  const int64_t n = t.size(1);
  const int64_t max_n = dropout_add_layer_norm_cuda_max_hidden();
  TORCH_CHECK(n >= 1 && n <= max_n, kOp, ": hidden size ", n,
              " is not supported by the cuda backend (max ", max_n, "); use backend='triton'");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// An [M, N] tensor that must match the activation `ref` in shape, dtype and device.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), kOp, ": ", name, " shape ", t.sizes(),
              " does not match ", ref_name, " shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kOp, ": ", name, " dtype ", t.scalar_type(),
              " does not match ", ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// weight / bias: [N], the activation's dtype or fp32.
void check_param(const at::Tensor& t, const char* name, const at::Tensor& ref,
                 const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(1), kOp, ": ", name, " shape ", t.sizes(),
              " does not match the hidden size [", ref.size(1), "]");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() || t.scalar_type() == at::kFloat, kOp, ": ",
              name, " dtype ", t.scalar_type(), " is not supported (must be ", ref_name,
              "'s dtype ", ref.scalar_type(), " or Float)");
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// mean / rstd: [M] fp32.
void check_stat(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_same_device(t, name, ref, "dout");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(0), kOp, ": ", name, " shape ", t.sizes(),
              " does not match the number of rows [", ref.size(0), "]");
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": ", name, " dtype ", t.scalar_type(),
              " must be Float");
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, kOp, ": dropout_p must be in [0, 1] (got ", p, ")");
}

// The dropout seed: a 0-dim int64 tensor on the activation's device, which the kernels read there
// (never on the host, so a captured CUDA graph reads each replay's fresh draw); null without
// dropout.
const int64_t* seed_ptr(const std::optional<at::Tensor>& seed, double dropout_p,
                        const at::Tensor& ref, const char* ref_name) {
  if (dropout_p <= 0.0) return nullptr;
  TORCH_CHECK(seed.has_value(), kOp, ": seed must be given when dropout_p > 0");
  TORCH_CHECK(seed->dim() == 0 && seed->scalar_type() == at::kLong, kOp,
              ": seed must be a 0-dim int64 tensor (got ", seed->scalar_type(), " of shape ",
              seed->sizes(), ")");
  TORCH_CHECK(seed->device() == ref.device(), kOp, ": seed is on ", seed->device(), " but ",
              ref_name, " is on ", ref.device(), " (the kernels read it on the device)");
  return seed->data_ptr<int64_t>();
}

at::Tensor empty_of(const at::Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double dropout_p, double eps, const std::optional<at::Tensor>& seed, bool rms_norm,
    bool store_s) {
  check_activation(x, "x");
  if (residual.has_value()) check_like(*residual, "residual", x, "x");
  if (weight.has_value()) check_param(*weight, "weight", x, "x");
  if (bias.has_value()) {
    TORCH_CHECK(!rms_norm, kOp, ": bias must be None when rms_norm=True");
    check_param(*bias, "bias", x, "x");
  }
  check_dropout_p(dropout_p);
  const int64_t* seed_data = seed_ptr(seed, dropout_p, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(x);
  at::Tensor s = store_s ? at::empty_like(x) : empty_of(x);
  at::Tensor mean = rms_norm ? at::empty({0}, f32) : at::empty({rows}, f32);
  at::Tensor rstd = at::empty({rows}, f32);
  if (rows > 0) {
    dropout_add_layer_norm_fwd_cuda(x, residual, weight, bias, dropout_p, eps, seed_data, rms_norm,
                                    out, s, mean, rstd);
  }
  return {out, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& ds_in, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double dropout_p, const std::optional<at::Tensor>& seed, bool rms_norm, bool has_bias) {
  check_activation(dout, "dout");
  check_like(s, "s", dout, "dout");
  if (ds_in.has_value()) check_like(*ds_in, "ds_in", dout, "dout");
  if (weight.has_value()) check_param(*weight, "weight", dout, "dout");
  TORCH_CHECK(!(rms_norm && has_bias), kOp, ": has_bias must be False when rms_norm=True");
  if (!rms_norm) check_stat(mean, "mean", dout);
  check_stat(rstd, "rstd", dout);
  check_dropout_p(dropout_p);
  const int64_t* seed_data = seed_ptr(seed, dropout_p, dout, "dout");

  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t rows = dout.size(0);
  const int64_t cols = dout.size(1);
  const auto f32 = dout.options().dtype(at::kFloat);
  // With no rows there is nothing to launch, and the parameter gradients are zero.
  const auto param_grad = [&](bool wanted) {
    if (!wanted) return at::empty({0}, f32);
    return rows > 0 ? at::empty({cols}, f32) : at::zeros({cols}, f32);
  };
  at::Tensor ds = at::empty_like(dout);
  at::Tensor dx = dropout_p > 0.0 ? at::empty_like(dout) : empty_of(dout);
  at::Tensor dweight = param_grad(weight.has_value());
  at::Tensor dbias = param_grad(has_bias);
  if (rows > 0) {
    dropout_add_layer_norm_bwd_cuda(dout, ds_in, s, weight, mean, rstd, dropout_p, seed_data,
                                    rms_norm, ds, dx, dweight, dbias);
  }
  return {ds, dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) {
  m.def(
      "dropout_add_layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, "
      "float dropout_p, float eps, Tensor? seed, bool rms_norm, bool store_s) "
      "-> (Tensor out, Tensor s, Tensor mean, Tensor rstd)");
  m.def(
      "dropout_add_layer_norm_bwd(Tensor dout, Tensor? ds_in, Tensor s, Tensor? weight, "
      "Tensor mean, Tensor rstd, float dropout_p, Tensor? seed, bool rms_norm, bool has_bias) "
      "-> (Tensor ds, Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(tk_C, CUDA, m) {
  m.impl("dropout_add_layer_norm_fwd", &dropout_add_layer_norm_fwd);
  m.impl("dropout_add_layer_norm_bwd", &dropout_add_layer_norm_bwd);
}

// CPU inputs reach the same entry points only to fail the device check with a message that
// names the backends that do run on CPU, instead of the dispatcher's "no CPU kernel" error.
TORCH_LIBRARY_IMPL(tk_C, CPU, m) {
  m.impl("dropout_add_layer_norm_fwd", &dropout_add_layer_norm_fwd);
  m.impl("dropout_add_layer_norm_bwd", &dropout_add_layer_norm_bwd);
}
