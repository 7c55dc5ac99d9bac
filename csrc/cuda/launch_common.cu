// Definitions shared by every CUDA launcher.
#include <cuda_runtime.h>

#include "launch_common.h"

extern "C" const char* dagan_fast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
