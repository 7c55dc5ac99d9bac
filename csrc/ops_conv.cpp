// dagan_fast::winograd_conv3x3 and its weight gradient, dagan_fast::narrow_conv2d: the schemas and the C++ CPU
// kernels (float32 convolutions; see cpu/winograd.cpp, cpu/narrow_conv.cpp and dagan_fast/models/fast_conv.py).
#include <torch/library.h>

#include "cpu/narrow_conv.h"
#include "cpu/winograd.h"

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) {
  m.def(
      "winograd_conv3x3(Tensor input, Tensor weight_u, Tensor? bias, Tensor? pre_scale, Tensor? pre_shift, "
      "bool upsample, int pad, bool relu, Tensor? residual, bool channels_last=True) -> Tensor");
  m.def("winograd_conv3x3_weight_grad(Tensor input, Tensor grad_output, int pad) -> Tensor");
  m.def("winograd_filter(Tensor weight, bool transposed) -> Tensor");
  m.def("as_channels_last(Tensor input) -> Tensor");
  m.def("narrow_conv2d(Tensor input, Tensor weight, Tensor? bias, int pad_h, int pad_w, bool channels_last=True) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(dagan_fast, CPU, m) {
  m.impl("winograd_conv3x3", &dagan_fast::cpu::winograd_conv3x3);
  m.impl("winograd_conv3x3_weight_grad", &dagan_fast::cpu::winograd_conv3x3_weight_grad);
  m.impl("winograd_filter", &dagan_fast::cpu::winograd_filter);
  m.impl("as_channels_last", &dagan_fast::cpu::as_channels_last);
  m.impl("narrow_conv2d", &dagan_fast::cpu::narrow_conv2d);
}
