// Argument checks and operand geometry of the compiled Taylor-motion ops, shared by their CPU
// (cpu/motion.cpp) and CUDA (ops_motion.cpp) impls.
#pragma once
#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "common/motion_math.h"

namespace dagan_fast {

// Argument checks shared by the CPU and CUDA impls. The Python layer validates first with friendlier
// messages; these guard direct torch.ops.dagan_fast.* calls so no kernel reads out of bounds.
inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " on ", t.device(), ", expected ", like.device());
}

// The dtype contract: the image (source / mask_logits) is float16, bfloat16, float32 or float64; the
// keypoints and Jacobians share one dtype, which is the image's, or float32 for a float16/bfloat16
// image when `float32_keypoints` (the CPU kernels: models keep keypoints in float32). Outputs follow
// the image's dtype, keypoint gradients the keypoints'. The CUDA kernels take one dtype for all.
inline void check_keypoint_dtype(const char* op, const char* image_name, const at::Tensor& image, const char* name,
                                 const at::Tensor& t, bool float32_keypoints) {
  const auto st = image.scalar_type(), kt = t.scalar_type();
  const bool low = st == at::kHalf || st == at::kBFloat16;
  TORCH_CHECK(kt == st || (float32_keypoints && low && kt == at::kFloat), op, ": ", name, " must be ", st,
              (float32_keypoints && low) ? " or float32" : "", " (the dtype of ", image_name,
              (float32_keypoints && low) ? ", or float32 for a float16/bfloat16 image" : "", "), got ", kt);
  TORCH_CHECK(t.device() == image.device(), op, ": ", name, " on ", t.device(), ", expected ", image.device());
}

// Checks the keypoints against batch B and returns K.
inline int64_t check_motion_keypoints(const char* op, const char* image_name, const at::Tensor& first,
                                      const at::Tensor& kp_source, const c10::optional<at::Tensor>& jac_source,
                                      const at::Tensor& kp_driving, const c10::optional<at::Tensor>& jac_driving,
                                      bool float32_keypoints) {
  const auto st = first.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", image_name,
              " must be float16/bfloat16/float32/float64, got ", st);
  const int64_t B = first.size(0);
  TORCH_CHECK(kp_source.dim() == 3 && kp_source.size(0) == B && kp_source.size(2) == 2, op,
              ": kp_source must be (B,K,2) with B = ", B, ", got ", kp_source.sizes());
  const int64_t K = kp_source.size(1);
  TORCH_CHECK(K >= 1, op, ": need at least one keypoint, got kp_source ", kp_source.sizes());
  TORCH_CHECK(kp_driving.sizes() == kp_source.sizes(), op, ": kp_driving must be ", kp_source.sizes(), ", got ",
              kp_driving.sizes());
  check_keypoint_dtype(op, image_name, first, "kp_source", kp_source, float32_keypoints);
  check_same(kp_driving, kp_source, op, "kp_driving (against kp_source)");
  for (const auto* jac : {&jac_source, &jac_driving}) {
    if (!jac->has_value()) continue;
    const auto& j = jac->value();
    TORCH_CHECK(j.dim() == 4 && j.size(0) == B && j.size(1) == K && j.size(2) == 2 && j.size(3) == 2, op,
                ": Jacobians must be (B,K,2,2) = (", B, ",", K, ",2,2), got ", j.sizes());
    check_same(j, kp_source, op, jac == &jac_source ? "jac_source (against kp_source)" : "jac_driving (against kp_source)");
  }
  return K;
}

inline int64_t check_sparse_args(const at::Tensor& source, const at::Tensor& kp_source,
                                 const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                 const c10::optional<at::Tensor>& jac_driving, double variance,
                                 bool float32_keypoints) {
  const char* op = "sparse_motion_inputs";
  TORCH_CHECK(source.dim() == 4, op, ": source must be (B,C,H,W), got ", source.sizes());
  TORCH_CHECK(source.size(2) > 0 && source.size(3) > 0, op, ": source must be at least 1x1, got ", source.sizes());
  TORCH_CHECK(std::isfinite(variance) && variance > 0, op, ": variance must be positive and finite, got ", variance);
  return check_motion_keypoints(op, "source", source, kp_source, jac_source, kp_driving, jac_driving, float32_keypoints);
}

inline int64_t check_dense_args(const at::Tensor& mask_logits, const at::Tensor& kp_source,
                                const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                const c10::optional<at::Tensor>& jac_driving, bool float32_keypoints) {
  const char* op = "dense_motion";
  TORCH_CHECK(mask_logits.dim() == 4, op, ": mask_logits must be (B,K+1,H,W), got ", mask_logits.sizes());
  TORCH_CHECK(mask_logits.size(2) > 0 && mask_logits.size(3) > 0, op, ": mask_logits must be at least 1x1, got ",
              mask_logits.sizes());
  const int64_t K = check_motion_keypoints(op, "mask_logits", mask_logits, kp_source, jac_source, kp_driving, jac_driving,
                                           float32_keypoints);
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

}  // namespace dagan_fast
