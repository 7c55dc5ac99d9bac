// C interface of the torch-free CUDA Taylor-motion kernels. ops_motion.cpp (compiled against PyTorch)
// calls these; the .cu file never sees a PyTorch header. Each returns a cudaError_t code.
//
// Scratch buffers are allocated by the caller (through PyTorch's caching allocator):
//   workspace: dagan_fast_motion_workspace_bytes(dtype, B, K) bytes, any content (per-keypoint
//              parameters and affines, written by the launcher);
//   kp_sums:   zeroed (B,K,10) in the accumulation type (float for f32/f16/bf16, double for f64).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/motion_math.h"
#include "launch_common.h"

extern "C" {

size_t dagan_fast_motion_workspace_bytes(int dtype, int64_t batch, int64_t keypoints);

// source (B,C,H,W), kp_* (B,K,2), jac_* (B,K,2,2) or null -> out contiguous (B,(K+1)(C+1),H,W).
int dagan_fast_sparse_motion_forward_cuda(int dtype, const dagan_fast::motion::MotionGeometry* geometry,
                                          double variance, const void* source, const void* kp_source,
                                          const void* jac_source, const void* kp_driving, const void* jac_driving,
                                          void* out, void* workspace, int device, void* stream);

// grad (strides in geometry->grad_stride). grad_source_acc: zeroed contiguous (B,C,H,W) in the
// accumulation type, or null. grad_kps/grad_kpd contiguous (B,K,2), grad_jacs/grad_jacd contiguous
// (B,K,2,2), each null when not wanted; kp_sums must be given when any of them is.
int dagan_fast_sparse_motion_backward_cuda(int dtype, const dagan_fast::motion::MotionGeometry* geometry,
                                           double variance, const void* grad, const void* source,
                                           const void* kp_source, const void* jac_source, const void* kp_driving,
                                           const void* jac_driving, void* grad_source_acc, void* kp_sums,
                                           void* grad_kps, void* grad_jacs, void* grad_kpd, void* grad_jacd,
                                           void* workspace, int device, void* stream);

// mask_logits (B,K+1,H,W) -> deformation contiguous (B,H,W,2), mask contiguous (B,K+1,H,W).
int dagan_fast_dense_motion_forward_cuda(int dtype, const dagan_fast::motion::MotionGeometry* geometry,
                                         const void* mask_logits, const void* kp_source, const void* jac_source,
                                         const void* kp_driving, const void* jac_driving, void* deformation,
                                         void* mask, void* workspace, int device, void* stream);

// grad_deformation (B,H,W,2) and grad_mask (B,K+1,H,W) with strides in geometry->gdef_stride /
// grad_stride. grad_logits contiguous (B,K+1,H,W) or null; keypoint outputs as for the sparse op.
int dagan_fast_dense_motion_backward_cuda(int dtype, const dagan_fast::motion::MotionGeometry* geometry,
                                          const void* grad_deformation, const void* grad_mask,
                                          const void* mask_logits, const void* kp_source, const void* jac_source,
                                          const void* kp_driving, const void* jac_driving, void* grad_logits,
                                          void* kp_sums, void* grad_kps, void* grad_jacs, void* grad_kpd,
                                          void* grad_jacd, void* workspace, int device, void* stream);
}
