// Winograd F(4x4, 3x3) convolution for CPU float32 inference (the 3x3 stride-1 convolutions that make up
// most of a DaGAN frame: the bottleneck res-blocks and the decoder up-blocks).
#pragma once
#include <ATen/core/Tensor.h>

namespace dagan_fast {
namespace cpu {

// input (B,C,H,W) float32; weight_u (36,C,Co): the filters transformed by G g G^T (ops/winograd.py);
// bias (Co) or none; pre_scale/pre_shift (C) or none: relu(x * scale + shift) is applied to the input
// before the convolution (a pre-activation BatchNorm + ReLU); upsample: the input is first enlarged 2x by
// nearest neighbour; pad: zero padding (0..2); relu: on the output; residual (B,Co,Ho,Wo) or none: added
// before the output ReLU. -> (B,Co,Ho,Wo) channels_last, Ho = H' + 2 pad - 2 with H' = H (2H when upsample).
at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight_u, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& pre_scale, const c10::optional<at::Tensor>& pre_shift,
                            bool upsample, int64_t pad, bool relu, const c10::optional<at::Tensor>& residual);

}  // namespace cpu
}  // namespace dagan_fast
