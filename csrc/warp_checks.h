// Argument checks of the compiled warp ops (CPU and CUDA impls in ops_warp.cpp). The Python layer
// validates first with friendlier messages; these guard direct torch.ops.dagan_fast.* calls so that
// no kernel ever reads out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace dagan_fast {

// input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo) or none: one dtype, one device.
inline void check_warp_args(const at::Tensor& input, const at::Tensor& grid,
                            const c10::optional<at::Tensor>& occlusion, const char* backend) {
  TORCH_CHECK(input.dim() == 4, "warp_occlusion(", backend, "): input must be (B,C,Hi,Wi), got shape ", input.sizes());
  TORCH_CHECK(grid.dim() == 4 && grid.size(3) == 2, "warp_occlusion(", backend,
              "): grid must be (B,Ho,Wo,2), got shape ", grid.sizes());
  TORCH_CHECK(grid.size(0) == input.size(0), "warp_occlusion(", backend, "): grid batch ", grid.size(0),
              " != input batch ", input.size(0));
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, "warp_occlusion(", backend,
              "): input spatial size must be at least 1x1, got ", input.sizes());
  TORCH_CHECK(grid.scalar_type() == input.scalar_type(), "warp_occlusion(", backend, "): grid dtype ",
              grid.scalar_type(), " != input dtype ", input.scalar_type());
  TORCH_CHECK(grid.device() == input.device(), "warp_occlusion(", backend, "): grid on ", grid.device(),
              ", input on ", input.device());
  if (occlusion.has_value()) {
    const auto& occ = occlusion.value();
    TORCH_CHECK(occ.dim() == 4 && occ.size(0) == grid.size(0) && occ.size(1) == 1 && occ.size(2) == grid.size(1) &&
                    occ.size(3) == grid.size(2),
                "warp_occlusion(", backend, "): occlusion must be (B,1,Ho,Wo) = (", grid.size(0), ",1,", grid.size(1),
                ",", grid.size(2), "), got ", occ.sizes());
    TORCH_CHECK(occ.scalar_type() == input.scalar_type(), "warp_occlusion(", backend, "): occlusion dtype ",
                occ.scalar_type(), " != input dtype ", input.scalar_type());
    TORCH_CHECK(occ.device() == input.device(), "warp_occlusion(", backend, "): occlusion on ", occ.device(),
                ", input on ", input.device());
  }
}

inline void check_warp_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1) &&
                  grad_output.size(2) == grid.size(1) && grad_output.size(3) == grid.size(2),
              "warp_occlusion backward: grad_output must be (B,C,Ho,Wo) = ", input.size(0), ",", input.size(1), ",",
              grid.size(1), ",", grid.size(2), "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
              "warp_occlusion backward: grad_output must match input dtype/device");
}

}  // namespace dagan_fast
