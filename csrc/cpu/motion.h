// CPU implementations of the compiled Taylor-motion ops (registered for the CPU key in ops_motion.cpp).
#pragma once
#include <array>
#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "../common/motion_math.h"

namespace dagan_fast {

// Argument checks shared by the CPU and CUDA impls. The Python layer validates first with friendlier
// messages; these guard direct torch.ops.dagan_fast.* calls so no kernel reads out of bounds.
inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " on ", t.device(), ", expected ", like.device());
}

// Checks the keypoints against batch B and returns K.
inline int64_t check_motion_keypoints(const char* op, const at::Tensor& first, const at::Tensor& kp_source,
                                      const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                      const c10::optional<at::Tensor>& jac_driving) {
  const auto st = first.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": takes float16/bfloat16/float32/float64, got ", st);
  const int64_t B = first.size(0);
  TORCH_CHECK(kp_source.dim() == 3 && kp_source.size(0) == B && kp_source.size(2) == 2, op,
              ": kp_source must be (B,K,2) with B = ", B, ", got ", kp_source.sizes());
  const int64_t K = kp_source.size(1);
  TORCH_CHECK(K >= 1, op, ": need at least one keypoint, got kp_source ", kp_source.sizes());
  TORCH_CHECK(kp_driving.sizes() == kp_source.sizes(), op, ": kp_driving must be ", kp_source.sizes(), ", got ",
              kp_driving.sizes());
  check_same(kp_source, first, op, "kp_source");
  check_same(kp_driving, first, op, "kp_driving");
  for (const auto* jac : {&jac_source, &jac_driving}) {
    if (!jac->has_value()) continue;
    const auto& j = jac->value();
    TORCH_CHECK(j.dim() == 4 && j.size(0) == B && j.size(1) == K && j.size(2) == 2 && j.size(3) == 2, op,
                ": Jacobians must be (B,K,2,2) = (", B, ",", K, ",2,2), got ", j.sizes());
    check_same(j, first, op, jac == &jac_source ? "jac_source" : "jac_driving");
  }
  return K;
}

inline int64_t check_sparse_args(const at::Tensor& source, const at::Tensor& kp_source,
                                 const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                 const c10::optional<at::Tensor>& jac_driving, double variance) {
  const char* op = "sparse_motion_inputs";
  TORCH_CHECK(source.dim() == 4, op, ": source must be (B,C,H,W), got ", source.sizes());
  TORCH_CHECK(source.size(2) > 0 && source.size(3) > 0, op, ": source must be at least 1x1, got ", source.sizes());
  TORCH_CHECK(std::isfinite(variance) && variance > 0, op, ": variance must be positive and finite, got ", variance);
  return check_motion_keypoints(op, source, kp_source, jac_source, kp_driving, jac_driving);
}

inline int64_t check_dense_args(const at::Tensor& mask_logits, const at::Tensor& kp_source,
                                const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                const c10::optional<at::Tensor>& jac_driving) {
  const char* op = "dense_motion";
  TORCH_CHECK(mask_logits.dim() == 4, op, ": mask_logits must be (B,K+1,H,W), got ", mask_logits.sizes());
  TORCH_CHECK(mask_logits.size(2) > 0 && mask_logits.size(3) > 0, op, ": mask_logits must be at least 1x1, got ",
              mask_logits.sizes());
  const int64_t K = check_motion_keypoints(op, mask_logits, kp_source, jac_source, kp_driving, jac_driving);
  TORCH_CHECK(mask_logits.size(1) == K + 1, op, ": mask_logits must have K+1 = ", K + 1, " channels, got ",
              mask_logits.sizes());
  return K;
}

inline void check_grad_shape(const char* what, const at::Tensor& grad, at::IntArrayRef expected,
                             const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == expected, what, " must be ", expected, ", got ", grad.sizes());
  check_same(grad, like, what, "gradient");
}

// Geometry of the operands (any strides). `in` is the source or mask_logits; grad/gdef may be null.
inline motion::MotionGeometry make_motion_geometry(const at::Tensor& in, const at::Tensor& kp_source,
                                                   const c10::optional<at::Tensor>& jac_source,
                                                   const at::Tensor& kp_driving,
                                                   const c10::optional<at::Tensor>& jac_driving,
                                                   const at::Tensor* grad, const at::Tensor* gdef) {
  motion::MotionGeometry g{};
  g.batch = in.size(0);
  g.keypoints = kp_source.size(1);
  g.channels = in.size(1);
  g.height = in.size(2);
  g.width = in.size(3);
  for (int i = 0; i < 4; ++i) {
    g.in_stride[i] = in.stride(i);
    g.jacs_stride[i] = jac_source.has_value() ? jac_source->stride(i) : 0;
    g.jacd_stride[i] = jac_driving.has_value() ? jac_driving->stride(i) : 0;
    g.grad_stride[i] = grad ? grad->stride(i) : 0;
    g.gdef_stride[i] = gdef ? gdef->stride(i) : 0;
  }
  for (int i = 0; i < 3; ++i) {
    g.kps_stride[i] = kp_source.stride(i);
    g.kpd_stride[i] = kp_driving.stride(i);
  }
  return g;
}

namespace cpu {

// source (B,C,H,W), kp_source/kp_driving (B,K,2), jac_source/jac_driving (B,K,2,2) or none
// -> (B,(K+1)(C+1),H,W) contiguous, [heat_k, source warped by T_k] for k = 0..K.
at::Tensor sparse_motion_inputs_forward(const at::Tensor& source, const at::Tensor& kp_source,
                                        const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                        const c10::optional<at::Tensor>& jac_driving, double variance);

// grad (B,(K+1)(C+1),H,W) -> (grad source, kp_source, jac_source, kp_driving, jac_driving); a gradient
// not asked for in output_mask, or of an absent Jacobian, is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_motion_inputs_backward(
    const at::Tensor& grad, const at::Tensor& source, const at::Tensor& kp_source,
    const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
    const c10::optional<at::Tensor>& jac_driving, double variance, std::array<bool, 5> output_mask);

// mask_logits (B,K+1,H,W), keypoints as above -> (deformation (B,H,W,2), mask (B,K+1,H,W)), contiguous.
std::tuple<at::Tensor, at::Tensor> dense_motion_forward(const at::Tensor& mask_logits, const at::Tensor& kp_source,
                                                        const c10::optional<at::Tensor>& jac_source,
                                                        const at::Tensor& kp_driving,
                                                        const c10::optional<at::Tensor>& jac_driving);

// grad_deformation (B,H,W,2), grad_mask (B,K+1,H,W) -> (grad mask_logits, kp_source, jac_source,
// kp_driving, jac_driving); empty where not asked for or the Jacobian is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_motion_backward(
    const at::Tensor& grad_deformation, const at::Tensor& grad_mask, const at::Tensor& mask_logits,
    const at::Tensor& kp_source, const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
    const c10::optional<at::Tensor>& jac_driving, std::array<bool, 5> output_mask);

}  // namespace cpu
}  // namespace dagan_fast
