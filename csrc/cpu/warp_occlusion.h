// CPU implementations of the compiled warp ops (registered for the CPU dispatch key in ops_warp.cpp).
#pragma once
#include <array>
#include <tuple>

#include <ATen/core/Tensor.h>


namespace dagan_fast {
namespace cpu {

// input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo) or none -> (B,C,Ho,Wo), contiguous.
at::Tensor warp_occlusion_forward(const at::Tensor& input, const at::Tensor& grid,
                                  const c10::optional<at::Tensor>& occlusion);

// -> (grad_input, grad_grid, grad_occlusion); a gradient not asked for in output_mask is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> warp_occlusion_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid,
    const c10::optional<at::Tensor>& occlusion, std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace dagan_fast
