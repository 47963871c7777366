// tk_C::attention_with_kvcache_fwd: schema, argument checks and dispatch registration. The kernels
// live in cuda/attention_kvcache_kernel.cu. The schema declares the in-place append into the
// caches (Tensor(a!)); nothing reads cache_seqlens on the host, so a step can be graph-captured.
// num_splits must be >= 1 here: transformer_kernels.attention_with_kvcache resolves 0 (its
// heuristic) before calling this op.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

// Defined in cuda/attention_kvcache_kernel.cu.
int64_t attention_with_kvcache_cuda_max_head_dim();
void attention_with_kvcache_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k,
                                     const std::optional<at::Tensor>& v,
                                     const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                     double softmax_scale, int64_t num_splits, const at::Tensor& out);

namespace {

constexpr const char* kOp = "attention_with_kvcache";

// A [B, L, H, D] tensor of q's dtype and device whose head dim has stride 1.
void check_bshd(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, kOp, ": ", name, " must be 4-D [B, L, H, D] (got shape ", t.sizes(), ")");
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " dtype ", t.scalar_type(),
              " does not match q dtype ", q.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, ": ", name,
              " must have stride 1 in its last dim for the cuda backend; use backend='triton'");
}

at::Tensor attention_with_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k,
                                      const std::optional<at::Tensor>& v,
                                      const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                      double softmax_scale, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor (got ", q.device(),
              "); use backend='reference', 'native' or 'triton'");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp, ": q dtype ", dtype,
              " is not supported (must be Half, BFloat16 or Float)");
  check_bshd(q, "q", q);
  check_bshd(k_cache, "k_cache", q);
  check_bshd(v_cache, "v_cache", q);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), kOp, ": k_cache shape ", k_cache.sizes(),
              " and v_cache shape ", v_cache.sizes(), " must match");
  const int64_t b = q.size(0), hq = q.size(2), d = q.size(3);
  const int64_t lmax = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == b && k_cache.size(3) == d, kOp, ": k_cache shape ", k_cache.sizes(),
              " does not match q's batch and head dim ", q.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, kOp, ": the number of query heads (", hq,
              ") must be a multiple of the number of key/value heads (", hkv, ")");
  const int64_t max_d = attention_with_kvcache_cuda_max_head_dim();
  TORCH_CHECK(d <= max_d, kOp, ": head_dim ", d, " is not supported by the cuda backend (max ", max_d,
              "); use backend='reference'");
  TORCH_CHECK(cache_seqlens.device() == q.device() && cache_seqlens.scalar_type() == at::kInt &&
                  cache_seqlens.dim() == 1 && cache_seqlens.size(0) == b && cache_seqlens.is_contiguous(),
              kOp, ": cache_seqlens must be a contiguous int32 [B] tensor on q's device (got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes(), " on ", cache_seqlens.device(), ")");
  TORCH_CHECK(k.has_value() == v.has_value(), kOp, ": k and v must be given together, or neither");
  if (k.has_value()) {
    check_bshd(*k, "k", q);
    check_bshd(*v, "v", q);
    TORCH_CHECK(k->sizes() == v->sizes() && k->size(0) == b && k->size(2) == hkv && k->size(3) == d &&
                    k->size(1) <= lmax,
                kOp, ": k shape ", k->sizes(), " and v shape ", v->sizes(), " must match [B, Lnew, Hkv, D] = [", b,
                ", Lnew, ", hkv, ", ", d, "] with Lnew <= Lmax = ", lmax);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == b &&
                    m.size(1) == lmax && m.is_contiguous(),
                kOp, ": key_padding_mask must be a contiguous bool [B, Lmax] = [", b, ", ", lmax,
                "] tensor on q's device (got ", m.scalar_type(), " ", m.sizes(), ")");
  }
  TORCH_CHECK(num_splits >= 1, kOp, ": num_splits must be >= 1 (got ", num_splits,
              "; transformer_kernels.attention_with_kvcache resolves 0 by its heuristic)");
  TORCH_CHECK(lmax + (k.has_value() ? k->size(1) : 0) < (int64_t{1} << 31) && q.size(1) * hq < (int64_t{1} << 31),
              kOp, ": lengths past 2^31 are not supported");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  if (lmax == 0) return out.zero_();
  attention_with_kvcache_fwd_cuda(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, causal, softmax_scale,
                                  num_splits, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tk_C, m) {
  m.def(
      "attention_with_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor? k, Tensor? v, Tensor? key_padding_mask, bool causal, float softmax_scale, int num_splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(tk_C, CUDA, m) { m.impl("attention_with_kvcache_fwd", &attention_with_kvcache_fwd); }

// CPU inputs reach the entry point only to fail the device check with a message that names the
// backends that do run on CPU, instead of the dispatcher's "no CPU kernel" error.
TORCH_LIBRARY_IMPL(tk_C, CPU, m) { m.impl("attention_with_kvcache_fwd", &attention_with_kvcache_fwd); }
