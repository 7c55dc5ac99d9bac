// C interface of the torch-free CUDA attention kernels. ops_attention.cpp (compiled by the host
// compiler against PyTorch) calls it; the .cu file never sees a PyTorch header. Returns a cudaError_t code.
#pragma once
#include <cstdint>

#include "launch_common.h"

namespace dagan_fast {
namespace attention {

// Sizes of one attention call; q, k, v, out are contiguous (bh, rows, features) arrays.
struct AttentionDims {
  int64_t bh;   // batch * heads
  int64_t nq;   // query rows
  int64_t nk;   // key rows, >= 1
  int64_t dqk;  // query/key features, >= 1
  int64_t dv;   // value features, >= 1
};

}  // namespace attention
}  // namespace dagan_fast

extern "C" {

// q (BH,Nq,Dqk), k (BH,Nk,Dqk), v (BH,Nk,Dv), all contiguous and of dtype `dtype` -> out (BH,Nq,Dv)
// contiguous in the same dtype, lse (BH,Nq) contiguous float32 (float64 for float64 inputs).
// float16/bfloat16 with Dqk in {16,32,64,128,256} run on tensor cores (wmma, fp32 accumulation);
// everything else runs a SIMT kernel (fp32 math, fp64 for float64) that needs Dqk + Dv <= 4096.
int dagan_fast_attention_forward_cuda(int dtype, const dagan_fast::attention::AttentionDims* dims, const void* q,
                                      const void* k, const void* v, void* out, void* lse, double scale, int device,
                                      void* stream);

// The largest Dqk + Dv the SIMT kernel takes (its row buffers live in shared memory).
int dagan_fast_attention_simt_max_features(void);
}
