// CPU implementations of the compiled Taylor-motion ops (registered for the CPU key in ops_motion.cpp).
#pragma once
#include <array>
#include <cmath>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "../common/motion_math.h"
#include "../motion_checks.h"

namespace dagan_fast {

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
