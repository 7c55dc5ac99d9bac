// C interface of the torch-free CUDA warp kernels. ops_warp.cpp (compiled by the host compiler against
// PyTorch) calls these; the .cu files never see a PyTorch header. Each returns a cudaError_t code.
#pragma once
#include <cstdint>

#include "../common/warp_math.h"
#include "launch_common.h"

extern "C" {

// input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo) or null -> out (B,C,Ho,Wo); any strides.
int dagan_fast_warp_forward_cuda(int dtype, const dagan_fast::warp::WarpGeometry* geometry, const void* input,
                                 const void* grid, const void* occlusion, void* out, int device, void* stream);

// Device workspace (bytes) that dagan_fast_warp_backward_cuda needs for the input gradient in
// deterministic mode; 0 otherwise. Host-only query, launches nothing.
int dagan_fast_warp_backward_workspace_cuda(const dagan_fast::warp::WarpGeometry* geometry, int deterministic,
                                            unsigned long long* bytes);

// grad_input_acc: zeroed (B,C,Hi,Wi) in the accumulation type (float for f32/f16/bf16, double for
// f64), strides in geometry->grad_in_stride, or null; grad_grid contiguous (B,Ho,Wo,2) or null;
// grad_occlusion contiguous (B,1,Ho,Wo) or null. grad_output strides are in geometry->out_stride.
// deterministic != 0: no atomics (bitwise reproducible), using `workspace` of the queried size.
int dagan_fast_warp_backward_cuda(int dtype, const dagan_fast::warp::WarpGeometry* geometry, const void* grad_output,
                                  const void* input, const void* grid, const void* occlusion, void* grad_input_acc,
                                  void* grad_grid, void* grad_occlusion, int deterministic, void* workspace,
                                  unsigned long long workspace_bytes, int device, void* stream);
}
