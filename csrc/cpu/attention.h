// CPU flash attention (registered for the CPU dispatch key in ops_attention.cpp): query/key blocks
// with an online softmax, block GEMMs through ATen's BLAS, O(N) memory (never an Nq x Nk matrix).
// Callers validate shapes first (ops_attention.cpp); these functions trust them.
#pragma once
#include <array>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace dagan_fast {
namespace cpu {

// q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv), Nk >= 1 -> (out (B,H,Nq,Dv) in q's dtype, contiguous;
// lse (B,H,Nq) float32, float64 for float64 inputs). float16/bfloat16 are computed in float32.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale);

// grad_out and out (B,H,Nq,Dv), lse (B,H,Nq) from attention_forward -> (dq, dk, dv) shaped like q, k, v;
// a gradient not asked for in output_mask is an empty tensor. Recomputes P = exp(S - lse) block by block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace dagan_fast
