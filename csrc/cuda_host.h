// Host-side helpers for the op files that call the torch-free CUDA launchers: dtype codes, the
// current stream (through libc10 only, no CUDA build of torch needed) and error reporting.
#pragma once
#ifdef DAGAN_FAST_WITH_CUDA
#include <ATen/core/Tensor.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include "cuda/launch_common.h"

namespace dagan_fast {

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kDaganFloat32;
    case at::kDouble: return kDaganFloat64;
    case at::kHalf: return kDaganFloat16;
    case at::kBFloat16: return kDaganBFloat16;
    default: TORCH_CHECK(false, "dagan_fast CUDA kernels take float16/bfloat16/float32/float64, got ", t.scalar_type());
  }
}

inline void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

inline void check_cuda(int code, const char* what) {
  TORCH_CHECK(code == 0, "dagan_fast ", what, " CUDA kernel failed: ", dagan_fast_cuda_error_string(code));
}

}  // namespace dagan_fast
#endif
