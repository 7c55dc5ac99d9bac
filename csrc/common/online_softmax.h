// The online-softmax step of flash attention, shared by the CPU (g++) and CUDA (nvcc) kernels so that
// both rescale and finalise exactly the same way; the CPU tests therefore check the GPU's math too.
// Torch-free on purpose: nvcc compiles it without any PyTorch header.
//
// A row's state after seeing some key blocks is (running_max m, running_sum l) with
//   l = sum_j exp(s_j - m)   and the unnormalised output   o = sum_j exp(s_j - m) v_j.
// A new block with maximum b moves the max to m' = max(m, b); l and o are multiplied by
// exp(m - m') and the block's exp(s_j - m') terms are added. At the end out = o / l and the row's
// logsumexp is m + log(l), which the backward pass uses to recompute P = exp(s - lse).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define DAGAN_SOFTMAX_HD __host__ __device__ __forceinline__
#else
#define DAGAN_SOFTMAX_HD inline
#endif

namespace dagan_fast {
namespace attention {

// exp in the accumulation type (float or double); the same overload set on host and device.
DAGAN_SOFTMAX_HD float softmax_exp(float x) { return ::expf(x); }
DAGAN_SOFTMAX_HD double softmax_exp(double x) { return ::exp(x); }
DAGAN_SOFTMAX_HD float softmax_log(float x) { return ::logf(x); }
DAGAN_SOFTMAX_HD double softmax_log(double x) { return ::log(x); }

template <typename T>
DAGAN_SOFTMAX_HD T neg_infinity() {
  return -static_cast<T>(INFINITY);
}

// Running state of one query row. Starts at (-inf, 0): no key seen yet.
template <typename T>
struct SoftmaxState {
  T max;
  T sum;
};

template <typename T>
DAGAN_SOFTMAX_HD SoftmaxState<T> softmax_init() {
  return SoftmaxState<T>{neg_infinity<T>(), T(0)};
}

// Folds in a key block whose largest score is block_max: moves the running max and returns the
// factor exp(old_max - new_max) by which the caller must multiply its output accumulator; the
// running sum is already rescaled. The caller then adds exp(s_j - state.max) of the block's scores
// to state.sum. The first block (old max -inf) gives factor 0, never exp(-inf + inf) = NaN; a block
// whose scores are all -inf (fully masked) leaves the state unchanged and returns 1.
template <typename T>
DAGAN_SOFTMAX_HD T softmax_rescale(SoftmaxState<T>& state, T block_max) {
  const T new_max = block_max > state.max ? block_max : state.max;
  if (new_max == neg_infinity<T>()) return T(1);
  const T factor = state.max == neg_infinity<T>() ? T(0) : softmax_exp(state.max - new_max);
  state.sum *= factor;
  state.max = new_max;
  return factor;
}

// exp(score - running max): the unnormalised probability of one key under the current state.
template <typename T>
DAGAN_SOFTMAX_HD T softmax_prob(const SoftmaxState<T>& state, T score) {
  return softmax_exp(score - state.max);
}

// Combines two partial states of the same row (e.g. two lanes that each saw half of a block's
// columns under the same running max, or two disjoint key ranges); returns the merged state and
// the factors for the two partial output accumulators.
template <typename T>
DAGAN_SOFTMAX_HD SoftmaxState<T> softmax_merge(const SoftmaxState<T>& a, const SoftmaxState<T>& b, T* factor_a,
                                               T* factor_b) {
  const T m = a.max > b.max ? a.max : b.max;
  if (m == neg_infinity<T>()) {
    *factor_a = T(1);
    *factor_b = T(1);
    return a;
  }
  *factor_a = a.max == neg_infinity<T>() ? T(0) : softmax_exp(a.max - m);
  *factor_b = b.max == neg_infinity<T>() ? T(0) : softmax_exp(b.max - m);
  return SoftmaxState<T>{m, a.sum * *factor_a + b.sum * *factor_b};
}

// 1 / l: multiplies the output accumulator into the softmax-weighted average. l >= 1 whenever a
// row saw at least one finite score (its maximum term is exp(0)).
template <typename T>
DAGAN_SOFTMAX_HD T softmax_inv_sum(const SoftmaxState<T>& state) {
  return T(1) / state.sum;
}

// The row's logsumexp m + log(l), saved for the backward pass.
template <typename T>
DAGAN_SOFTMAX_HD T softmax_lse(const SoftmaxState<T>& state) {
  return state.max + softmax_log(state.sum);
}

// Backward: P = exp(s - lse) recomputed from the saved logsumexp, and dS = P * (dP - delta) with
// delta = rowsum(dO * O) (the softmax Jacobian applied to dP).
template <typename T>
DAGAN_SOFTMAX_HD T softmax_prob_from_lse(T score, T lse) {
  return softmax_exp(score - lse);
}

template <typename T>
DAGAN_SOFTMAX_HD T softmax_grad_score(T prob, T dprob, T delta) {
  return prob * (dprob - delta);
}

}  // namespace attention
}  // namespace dagan_fast
