// dagan_fast::winograd_conv3x3: the schema and the C++ CPU kernel (float32 inference convolutions; see
// cpu/winograd.cpp and dagan_fast/models/winograd_conv.py).
#include <torch/library.h>

#include "cpu/winograd.h"

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) {
  m.def(
      "winograd_conv3x3(Tensor input, Tensor weight_u, Tensor? bias, Tensor? pre_scale, Tensor? pre_shift, "
      "bool upsample, int pad, bool relu, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(dagan_fast, CPU, m) { m.impl("winograd_conv3x3", &dagan_fast::cpu::winograd_conv3x3); }
