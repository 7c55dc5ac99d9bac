// Shared by every torch-free CUDA launcher: dtype codes and the error-string lookup. The C++ op
// files (compiled against PyTorch) call the extern "C" launchers; .cu files never see PyTorch.
#pragma once

extern "C" {

enum DaganDtype { kDaganFloat32 = 0, kDaganFloat64 = 1, kDaganFloat16 = 2, kDaganBFloat16 = 3 };

// Message for a cudaError_t code returned by any dagan_fast launcher.
const char* dagan_fast_cuda_error_string(int code);
}
