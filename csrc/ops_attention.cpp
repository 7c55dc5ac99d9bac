// dagan_fast::cross_modal_attention_fwd/_bwd: schemas, argument checks, the C++ CPU kernels and (when
// nvcc built it) the CUDA forward kernel behind the CUDA dispatch key. The CUDA backward is not a
// compiled kernel: dagan_fast/ops/attention.py routes it to the Triton backend (or the reference).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>

#include "cpu/attention.h"
#include "cuda_host.h"
#include "op_support.h"
#ifdef DAGAN_FAST_WITH_CUDA
#include "cuda/attention_launchers.h"
#endif

namespace dagan_fast {
namespace {

bool attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The kernels index q, k, v with these sizes, so every mismatch must stop here (the Python layer
// checks first with friendlier messages; this guards direct torch.ops.dagan_fast.* calls).
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          const char* backend) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cross_modal_attention(", backend,
              "): q, k, v must be 4-D (B,H,N,D), got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(0) == q.size(0) && v.size(1) == q.size(1),
              "cross_modal_attention(", backend, "): q, k, v must share (B,H), got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "cross_modal_attention(", backend, "): k's Dqk ", k.size(3), " != q's ",
              q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "cross_modal_attention(", backend, "): v has ", v.size(2), " keys, k has ",
              k.size(2));
  TORCH_CHECK(k.size(2) >= 1, "cross_modal_attention(", backend, "): k must hold at least one key");
  TORCH_CHECK(q.size(3) >= 1 && v.size(3) >= 1, "cross_modal_attention(", backend, "): Dqk and Dv must be >= 1");
  TORCH_CHECK(attention_dtype(q.scalar_type()), "cross_modal_attention(", backend,
              "): q must be float16/bfloat16/float32/float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "cross_modal_attention(",
              backend, "): q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "cross_modal_attention(", backend,
              "): q, k, v must be on one device");
  TORCH_CHECK(std::isfinite(scale), "cross_modal_attention(", backend, "): scale must be finite, got ", scale);
}

void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                                   const char* backend) {
  check_attention_args(q, k, v, scale, backend);
  const auto B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == Nq && t->size(3) == Dv,
                "cross_modal_attention backward(", backend, "): grad_out and out must be (B,H,Nq,Dv) = (", B, ",", H,
                ",", Nq, ",", Dv, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), "cross_modal_attention backward(",
                backend, "): grad_out and out must match q's dtype and device");
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Nq,
              "cross_modal_attention backward(", backend, "): lse must be (B,H,Nq) = (", B, ",", H, ",", Nq,
              "), got ", lse.sizes());
  TORCH_CHECK((lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble) && lse.device() == q.device(),
              "cross_modal_attention backward(", backend, "): lse must be float32/float64 on q's device, got ",
              lse.scalar_type(), " on ", lse.device());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         double scale) {
  check_attention_args(q, k, v, scale, "cpu");
  return cpu::attention_forward(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse,
                                                                      double scale, std::array<bool, 3> mask) {
  check_attention_backward_args(grad_out, q, k, v, out, lse, scale, "cpu");
  return cpu::attention_backward(grad_out, q, k, v, out, lse, scale, mask);
}

#ifdef DAGAN_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  check_attention_args(q, k, v, scale, "cuda");
  c10::DeviceGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dqk = q.size(3), Dv = v.size(3);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B, H, Nq, Dv}, q.options());
  auto lse = at::empty({B, H, Nq}, q.options().dtype(lse_type));
  if (out.numel() == 0) return {out, lse};
  const bool tensor_cores = (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
                            (Dqk == 16 || Dqk == 32 || Dqk == 64 || Dqk == 128 || Dqk == 256);
  TORCH_CHECK(tensor_cores || Dqk + Dv <= dagan_fast_attention_simt_max_features(),
              "cross_modal_attention(cuda): Dqk + Dv = ", Dqk + Dv, " exceeds the ",
              dagan_fast_attention_simt_max_features(), " features of the non-tensor-core kernel (",
              q.scalar_type(), ", Dqk ", Dqk, "); use backend='triton' or 'reference'");
  poison(out);
  poison(lse);
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const attention::AttentionDims dims{B * H, Nq, Nk, Dqk, Dv};
  check_cuda(dagan_fast_attention_forward_cuda(dtype_code(q), &dims, qc.const_data_ptr(), kc.const_data_ptr(),
                                               vc.const_data_ptr(), out.mutable_data_ptr(), lse.mutable_data_ptr(),
                                               scale, q.device().index(), current_stream(q.device())),
             "cross_modal_attention forward");
  return {out, lse};
}
#endif

}  // namespace
}  // namespace dagan_fast

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) {
  m.def("cross_modal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "cross_modal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale,"
      " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dagan_fast, CPU, m) {
  m.impl("cross_modal_attention_fwd", &dagan_fast::attention_forward_cpu);
  m.impl("cross_modal_attention_bwd", &dagan_fast::attention_backward_cpu);
}

#ifdef DAGAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dagan_fast, CUDA, m) { m.impl("cross_modal_attention_fwd", &dagan_fast::attention_forward_cuda); }
#endif
