// dagan_fast::sparse_motion_inputs_fwd/_bwd and dense_motion_fwd/_bwd: schemas, the C++ CPU kernels
// and (when nvcc built them) the CUDA kernels behind the CUDA dispatch key.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>

#include "cpu/motion.h"
#include "cuda_host.h"
#include "motion_checks.h"
#include "op_support.h"
#ifdef DAGAN_FAST_WITH_CUDA
#include "cuda/motion_launchers.h"
#endif

namespace dagan_fast {
namespace {

#ifdef DAGAN_FAST_WITH_CUDA
using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor workspace(const at::Tensor& like, int64_t B, int64_t K) {
  const auto bytes = static_cast<int64_t>(dagan_fast_motion_workspace_bytes(dtype_code(like), B, K));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

// Keypoint gradient outputs (fresh, contiguous, poisoned) where asked for, distinct empties elsewhere.
std::array<at::Tensor, 4> keypoint_grads(const at::Tensor& kp_source, const c10::optional<at::Tensor>& jac_source,
                                         const c10::optional<at::Tensor>& jac_driving, const std::array<bool, 5>& m) {
  const int64_t B = kp_source.size(0), K = kp_source.size(1);
  const bool want[4] = {m[1], m[2] && jac_source.has_value(), m[3], m[4] && jac_driving.has_value()};
  std::array<at::Tensor, 4> out;
  for (int i = 0; i < 4; ++i) {
    if (!want[i]) {
      out[i] = at::empty({0}, kp_source.options());
    } else {
      out[i] = i % 2 == 0 ? at::empty({B, K, 2}, kp_source.options()) : at::empty({B, K, 2, 2}, kp_source.options());
      poison(out[i]);
    }
  }
  return out;
}

void* ptr_or_null(at::Tensor& t) { return t.numel() > 0 ? t.mutable_data_ptr() : nullptr; }
const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

// The float accumulation buffer rounded to the output dtype, clamped to its finite range for halves.
at::Tensor from_acc(const at::Tensor& acc, const at::Tensor& like) {
  if (acc.scalar_type() == like.scalar_type()) return acc;
  const double limit = like.scalar_type() == at::kHalf ? 65504.0 : 3.3895313892515355e38;
  return acc.clamp(-limit, limit).to(like.scalar_type());
}

at::Tensor sparse_forward_cuda(const at::Tensor& source, const at::Tensor& kp_source,
                               const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                               const c10::optional<at::Tensor>& jac_driving, double variance) {
  const int64_t K = check_sparse_args(source, kp_source, jac_source, kp_driving, jac_driving, variance, false);
  c10::DeviceGuard guard(source.device());
  const int64_t B = source.size(0), C = source.size(1), H = source.size(2), W = source.size(3);
  auto out = at::empty({B, (K + 1) * (C + 1), H, W}, source.options());
  if (out.numel() == 0) return out;
  poison(out);
  auto ws = workspace(source, B, K);
  const auto g = make_motion_geometry(source, kp_source, jac_source, kp_driving, jac_driving, nullptr, nullptr);
  check_cuda(dagan_fast_sparse_motion_forward_cuda(dtype_code(source), &g, variance, source.const_data_ptr(),
                                                   kp_source.const_data_ptr(), ptr_or_null(jac_source),
                                                   kp_driving.const_data_ptr(), ptr_or_null(jac_driving),
                                                   out.mutable_data_ptr(), ws.mutable_data_ptr(),
                                                   source.device().index(), current_stream(source.device())),
             "sparse_motion_inputs forward");
  return out;
}

Grads5 sparse_backward_cuda(const at::Tensor& grad, const at::Tensor& source, const at::Tensor& kp_source,
                            const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                            const c10::optional<at::Tensor>& jac_driving, double variance, std::array<bool, 5> mask) {
  const int64_t K = check_sparse_args(source, kp_source, jac_source, kp_driving, jac_driving, variance, false);
  const int64_t B = source.size(0), C = source.size(1), H = source.size(2), W = source.size(3);
  check_grad_shape("sparse_motion_inputs backward: grad", grad, {B, (K + 1) * (C + 1), H, W}, source);
  c10::DeviceGuard guard(source.device());
  auto kp = keypoint_grads(kp_source, jac_source, jac_driving, mask);
  const bool want_kp = kp[0].numel() + kp[1].numel() + kp[2].numel() + kp[3].numel() > 0;
  at::Tensor acc = mask[0] ? at::zeros(source.sizes(), source.options().dtype(acc_type(source))) : at::Tensor();
  if ((mask[0] && acc.numel() > 0) || want_kp) {
    auto ws = workspace(source, B, K);
    at::Tensor sums = want_kp ? at::zeros({B, K, motion::kSparseSums}, source.options().dtype(acc_type(source)))
                              : at::Tensor();
    const auto g = make_motion_geometry(source, kp_source, jac_source, kp_driving, jac_driving, &grad, nullptr);
    check_cuda(dagan_fast_sparse_motion_backward_cuda(
                   dtype_code(source), &g, variance, grad.const_data_ptr(), source.const_data_ptr(),
                   kp_source.const_data_ptr(), ptr_or_null(jac_source), kp_driving.const_data_ptr(),
                   ptr_or_null(jac_driving), mask[0] && acc.numel() > 0 ? acc.mutable_data_ptr() : nullptr,
                   want_kp ? sums.mutable_data_ptr() : nullptr, ptr_or_null(kp[0]), ptr_or_null(kp[1]),
                   ptr_or_null(kp[2]), ptr_or_null(kp[3]), ws.mutable_data_ptr(), source.device().index(),
                   current_stream(source.device())),
               "sparse_motion_inputs backward");
  }
  at::Tensor grad_source = mask[0] ? from_acc(acc, source) : at::empty({0}, source.options());
  return {grad_source, kp[0], kp[1], kp[2], kp[3]};
}

std::tuple<at::Tensor, at::Tensor> dense_forward_cuda(const at::Tensor& mask_logits, const at::Tensor& kp_source,
                                                      const c10::optional<at::Tensor>& jac_source,
                                                      const at::Tensor& kp_driving,
                                                      const c10::optional<at::Tensor>& jac_driving) {
  const int64_t K = check_dense_args(mask_logits, kp_source, jac_source, kp_driving, jac_driving, false);
  c10::DeviceGuard guard(mask_logits.device());
  const int64_t B = mask_logits.size(0), H = mask_logits.size(2), W = mask_logits.size(3);
  auto deformation = at::empty({B, H, W, 2}, mask_logits.options());
  auto mask = at::empty(mask_logits.sizes(), mask_logits.options());
  if (mask.numel() == 0) return {deformation, mask};
  poison(deformation);
  poison(mask);
  auto ws = workspace(mask_logits, B, K);
  const auto g = make_motion_geometry(mask_logits, kp_source, jac_source, kp_driving, jac_driving, nullptr, nullptr);
  check_cuda(dagan_fast_dense_motion_forward_cuda(dtype_code(mask_logits), &g, mask_logits.const_data_ptr(),
                                                  kp_source.const_data_ptr(), ptr_or_null(jac_source),
                                                  kp_driving.const_data_ptr(), ptr_or_null(jac_driving),
                                                  deformation.mutable_data_ptr(), mask.mutable_data_ptr(),
                                                  ws.mutable_data_ptr(), mask_logits.device().index(),
                                                  current_stream(mask_logits.device())),
             "dense_motion forward");
  return {deformation, mask};
}

Grads5 dense_backward_cuda(const at::Tensor& grad_deformation, const at::Tensor& grad_mask,
                           const at::Tensor& mask_logits, const at::Tensor& kp_source,
                           const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                           const c10::optional<at::Tensor>& jac_driving, std::array<bool, 5> mask) {
  const int64_t K = check_dense_args(mask_logits, kp_source, jac_source, kp_driving, jac_driving, false);
  const int64_t B = mask_logits.size(0), H = mask_logits.size(2), W = mask_logits.size(3);
  check_grad_shape("dense_motion backward: grad_deformation", grad_deformation, {B, H, W, 2}, mask_logits);
  check_grad_shape("dense_motion backward: grad_mask", grad_mask, mask_logits.sizes(), mask_logits);
  c10::DeviceGuard guard(mask_logits.device());
  at::Tensor grad_logits = mask[0] ? at::empty(mask_logits.sizes(), mask_logits.options())
                                   : at::empty({0}, mask_logits.options());
  poison(grad_logits);
  auto kp = keypoint_grads(kp_source, jac_source, jac_driving, mask);
  const bool want_kp = kp[0].numel() + kp[1].numel() + kp[2].numel() + kp[3].numel() > 0;
  if (grad_logits.numel() > 0 || want_kp) {
    auto ws = workspace(mask_logits, B, K);
    at::Tensor sums = want_kp ? at::zeros({B, K, motion::kDenseSums}, mask_logits.options().dtype(acc_type(mask_logits)))
                              : at::Tensor();
    const auto g = make_motion_geometry(mask_logits, kp_source, jac_source, kp_driving, jac_driving, &grad_mask,
                                        &grad_deformation);
    check_cuda(dagan_fast_dense_motion_backward_cuda(
                   dtype_code(mask_logits), &g, grad_deformation.const_data_ptr(), grad_mask.const_data_ptr(),
                   mask_logits.const_data_ptr(), kp_source.const_data_ptr(), ptr_or_null(jac_source),
                   kp_driving.const_data_ptr(), ptr_or_null(jac_driving), ptr_or_null(grad_logits),
                   want_kp ? sums.mutable_data_ptr() : nullptr, ptr_or_null(kp[0]), ptr_or_null(kp[1]),
                   ptr_or_null(kp[2]), ptr_or_null(kp[3]), ws.mutable_data_ptr(), mask_logits.device().index(),
                   current_stream(mask_logits.device())),
               "dense_motion backward");
  }
  return {grad_logits, kp[0], kp[1], kp[2], kp[3]};
}
#endif

}  // namespace
}  // namespace dagan_fast

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) {
  m.def(
      "sparse_motion_inputs_fwd(Tensor source, Tensor kp_source, Tensor? jac_source, Tensor kp_driving,"
      " Tensor? jac_driving, float variance) -> Tensor");
  m.def(
      "sparse_motion_inputs_bwd(Tensor grad, Tensor source, Tensor kp_source, Tensor? jac_source,"
      " Tensor kp_driving, Tensor? jac_driving, float variance, bool[5] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_motion_fwd(Tensor mask_logits, Tensor kp_source, Tensor? jac_source, Tensor kp_driving,"
      " Tensor? jac_driving) -> (Tensor, Tensor)");
  m.def(
      "dense_motion_bwd(Tensor grad_deformation, Tensor grad_mask, Tensor mask_logits, Tensor kp_source,"
      " Tensor? jac_source, Tensor kp_driving, Tensor? jac_driving, bool[5] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dagan_fast, CPU, m) {
  m.impl("sparse_motion_inputs_fwd", &dagan_fast::cpu::sparse_motion_inputs_forward);
  m.impl("sparse_motion_inputs_bwd", &dagan_fast::cpu::sparse_motion_inputs_backward);
  m.impl("dense_motion_fwd", &dagan_fast::cpu::dense_motion_forward);
  m.impl("dense_motion_bwd", &dagan_fast::cpu::dense_motion_backward);
}

#ifdef DAGAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dagan_fast, CUDA, m) {
  m.impl("sparse_motion_inputs_fwd", &dagan_fast::sparse_forward_cuda);
  m.impl("sparse_motion_inputs_bwd", &dagan_fast::sparse_backward_cuda);
  m.impl("dense_motion_fwd", &dagan_fast::dense_forward_cuda);
  m.impl("dense_motion_bwd", &dagan_fast::dense_backward_cuda);
}
#endif
