// Direct CPU float32 convolution for 1-4 output channels, the shape oneDNN handles worst: DaGAN's last
// convolution (7x7, 64 -> 3 at 256x256) runs at ~30% of the machine's convolution rate there, because its
// kernels vectorise over output channels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dagan_fast {
namespace cpu {

// input (B,C,H,W) float32 (channels_last is read in place; NCHW goes through a blocked transposition);
// weight (Co,C,kh,kw), 1 <= Co <= 4; bias (Co) or none; stride 1, zero padding pad_h, pad_w (each below its
// kernel size) -> (B,Co,Ho,Wo), Ho = H + 2 pad_h - kh + 1, channels_last or contiguous NCHW.
at::Tensor narrow_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t pad_h, int64_t pad_w, bool channels_last);

}  // namespace cpu
}  // namespace dagan_fast
