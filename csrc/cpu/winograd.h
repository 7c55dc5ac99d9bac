// Winograd F(4x4, 3x3) convolution for CPU float32 inference and training (the 3x3 stride-1 convolutions
// that make up most of a DaGAN frame: the bottleneck res-blocks and the decoder up-blocks).
#pragma once
#include <ATen/core/Tensor.h>

namespace dagan_fast {
namespace cpu {

// input (B,C,H,W) float32; weight_u (36,C,Co): the filters transformed by G g G^T (models/fast_conv.py);
// bias (Co) or none; pre_scale/pre_shift (C) or none: relu(x * scale + shift) is applied to the input
// before the convolution (a pre-activation BatchNorm + ReLU); upsample: the input is first enlarged 2x by
// nearest neighbour; pad: zero padding (0..2); relu: on the output; residual (B,Co,Ho,Wo) or none: added
// before the output ReLU. -> (B,Co,Ho,Wo), Ho = H' + 2 pad - 2 with H' = H (2H when upsample); channels_last,
// or contiguous NCHW when !channels_last (NCHW inputs and outputs go through blocked transpositions).
at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight_u, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& pre_scale, const c10::optional<at::Tensor>& pre_shift,
                            bool upsample, int64_t pad, bool relu, const c10::optional<at::Tensor>& residual,
                            bool channels_last);

// t (B,C,H,W) as channels_last: itself when it already is; a blocked transposition for contiguous float32
// CPU NCHW (faster than at::Tensor::contiguous on power-of-two maps); else a copy.
at::Tensor as_channels_last(const at::Tensor& t);

// weight (Co,C,3,3) float32 -> weight_u (36,C,Co): G g G^T per filter (one float32 matrix product). transposed:
// (36,Co,C) of the filters flipped in both axes, the weight_u of the input gradient's convolution.
at::Tensor winograd_filter(const at::Tensor& weight, bool transposed);

// The filters' gradient (Co,C,3,3) of the plain convolution above (no upsample, prologue or epilogue) at
// input (B,C,H,W) for grad_output (B,Co,Ho,Wo): G^T [sum over tiles of (B^T d B) (A dY A^T)] G, the adjoint
// of the forward's transforms.
at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, int64_t pad);

}  // namespace cpu
}  // namespace dagan_fast
