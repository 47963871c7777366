// tk_C::fused_linear_{fwd,bwd}: schema, argument checks and dispatch registration of
// out = dropout(act(x Wᵀ + b)). The cuBLASLt GEMMs and kernels live in
// cuda/fused_linear_kernel.cu; autograd is wired up in Python.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

// Defined in cuda/fused_linear_kernel.cu.
int64_t fused_linear_cuda_activation(c10::string_view name);  // throws for an unknown name
void fused_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t activation,
                           double dropout_p, const int64_t* seed, const at::Tensor& out,
                           const at::Tensor& preact);
void fused_linear_bwd_cuda(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& out, const at::Tensor& preact, int64_t activation,
                           double dropout_p, const int64_t* seed, const at::Tensor& dx,
                           const at::Tensor& dweight, const at::Tensor& dbias);
namespace tk {
bool matmul_allows_tf32();  // Defined in cuda/cublaslt_gemm.cu.
}

namespace {

constexpr const char* kOp = "fused_linear";

bool stores_preact(c10::string_view activation) {
  return activation == "gelu" || activation == "gelu_tanh";
}

// x (or dout in the backward): the 2-D activation every other argument is checked against.
void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor (got ", t.device(),
              "); use backend='reference' or 'triton'");
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D (got shape ", t.sizes(), ")");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp, ": ",
              name, " dtype ", dtype, " is not supported (must be Half, BFloat16 or Float)");
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// Device, dtype and contiguity of any other tensor argument.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kOp, ": ", name, " dtype ", t.scalar_type(),
              " does not match ", ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

// weight [N, K] for an input with in-features K.
void check_weight(const at::Tensor& weight, const at::Tensor& ref, const char* ref_name) {
  check_like(weight, "weight", ref, ref_name);
  const int64_t in_dim = ref.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_dim, kOp, ": weight shape ",
              weight.sizes(), " does not match ", ref_name, "'s in-features ", in_dim,
              " (expected [N, ", in_dim, "])");
  TORCH_CHECK(in_dim >= 1 && weight.size(0) >= 1, kOp,
              ": in-features and out-features must be >= 1 (got weight shape ", weight.sizes(),
              ")");
}

// An [M, N] tensor of the backward (out, preact) that must match dout.
void check_like_dout(const at::Tensor& t, const char* name, const at::Tensor& dout) {
  check_like(t, name, dout, "dout");
  TORCH_CHECK(t.sizes() == dout.sizes(), kOp, ": ", name, " shape ", t.sizes(),
              " does not match dout shape ", dout.sizes());
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

std::tuple<at::Tensor, at::Tensor> fused_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    c10::string_view activation,
                                                    double dropout_p,
                                                    const std::optional<at::Tensor>& seed) {
  check_activation(x, "x");
  check_weight(weight, x, "x");
  const int64_t out_dim = weight.size(0);
  if (bias.has_value()) {
    check_like(*bias, "bias", x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_dim, kOp, ": bias shape ", bias->sizes(),
                " does not match weight's out-features (expected [", out_dim, "])");
  }
  const int64_t act = fused_linear_cuda_activation(activation);
  check_dropout_p(dropout_p);
  const int64_t* seed_data = seed_ptr(seed, dropout_p, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, out_dim}, x.options());
  // z is kept for the GELUs' backward; ReLU's backward reads out != 0 instead.
  at::Tensor preact = stores_preact(activation) ? at::empty({rows, out_dim}, x.options())
                                                : at::empty({0}, x.options());
  if (rows > 0) {
    fused_linear_fwd_cuda(x, weight, bias, act, dropout_p, seed_data, out, preact);
  }
  return {out, preact};
}

// out is read only for relu and preact only for gelu / gelu_tanh; otherwise they may be empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& preact, bool has_bias, c10::string_view activation, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  check_activation(dout, "dout");
  check_like(x, "x", dout, "dout");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == dout.size(0), kOp, ": x shape ", x.sizes(),
              " does not match dout's ", dout.size(0), " rows");
  check_weight(weight, x, "x");
  TORCH_CHECK(weight.size(0) == dout.size(1), kOp, ": weight shape ", weight.sizes(),
              " does not match dout's out-features ", dout.size(1));
  const int64_t act = fused_linear_cuda_activation(activation);
  if (activation == "relu") check_like_dout(out, "out", dout);
  if (stores_preact(activation)) check_like_dout(preact, "preact", dout);
  check_dropout_p(dropout_p);
  const int64_t* seed_data = seed_ptr(seed, dropout_p, dout, "dout");

  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t rows = dout.size(0);
  const int64_t out_dim = dout.size(1);
  const int64_t in_dim = x.size(1);
  const auto& options = dout.options();
  // With no rows there is nothing to launch, and the parameter gradients are zero.
  at::Tensor dx = at::empty({rows, in_dim}, options);
  at::Tensor dweight =
      rows > 0 ? at::empty({out_dim, in_dim}, options) : at::zeros({out_dim, in_dim}, options);
  at::Tensor dbias = !has_bias   ? at::empty({0}, options)
                     : rows > 0 ? at::empty({out_dim}, options)
                                : at::zeros({out_dim}, options);
  if (rows > 0) {
    fused_linear_bwd_cuda(dout, x, weight, out, preact, act, dropout_p, seed_data, dx, dweight,
                          dbias);
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) {
  m.def(
      "fused_linear_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, float dropout_p, "
      "Tensor? seed) -> (Tensor out, Tensor preact)");
  m.def(
      "fused_linear_bwd(Tensor dout, Tensor x, Tensor weight, Tensor out, Tensor preact, "
      "bool has_bias, str activation, float dropout_p, Tensor? seed) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  // Whether fp32 GEMMs run on TF32 tensor cores, as read from torch's settings: lets tests check
  // that reading on any machine, GPU or not.
  m.def("_matmul_allows_tf32() -> bool", &tk::matmul_allows_tf32);
}

TORCH_LIBRARY_IMPL(tk_C, CUDA, m) {
  m.impl("fused_linear_fwd", &fused_linear_fwd);
  m.impl("fused_linear_bwd", &fused_linear_bwd);
}

// CPU inputs reach the same entry points only to fail the device check with a message that
// names the backends that do run on CPU, instead of the dispatcher's "no CPU kernel" error.
TORCH_LIBRARY_IMPL(tk_C, CPU, m) {
  m.impl("fused_linear_fwd", &fused_linear_fwd);
  m.impl("fused_linear_bwd", &fused_linear_bwd);
}
