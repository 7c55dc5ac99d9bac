// CPU flash attention. Forward: parallel over (batch*head, query block); each task streams the key
// blocks, S = scale Q K^T and O += P V as ATen GEMMs on block views (MKL/OpenBLAS underneath; the
// raw cpublas::gemm entry points are not exported by libtorch), with the online softmax of
// common/online_softmax.h in between on the raw score rows. Backward: parallel over (batch*head, key range); each task
// owns its key rows of dK and dV, and dQ goes to a per-split partial buffer that is summed in a
// fixed order afterwards, so results are deterministic for a given thread count. float16/bfloat16
// operands are widened to float32 once (exactly), every product and sum is float32, and the
// outputs are rounded once. The block GEMMs run in ATen's BLAS (MKL/OpenBLAS choose their own
// vector ISA); the softmax row loops between them follow capability().
#include "attention.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>

#include "../common/online_softmax.h"
#include "../op_support.h"
#include "capability.h"

namespace dagan_fast {
namespace cpu {
namespace {

namespace sm = dagan_fast::attention;

// Forward: a 128 x 512 float score block is 256 KiB (L2-sized) and the 128 x Dv accumulator stays
// warm across the key loop. Backward keeps two bq x bk blocks (P, dS) plus the key block's dK/dV rows.
constexpr int64_t kFwdQueryBlock = 128;
constexpr int64_t kFwdKeyBlock = 512;
constexpr int64_t kBwdQueryBlock = 128;
constexpr int64_t kBwdKeyBlock = 256;

// The block GEMMs. Operands are 2-D row-major views (rows of one head); ATen runs them on one thread
// inside at::parallel_for. out = alpha * a b^T (out's old values ignored, NaN included, as beta = 0):
void mm_abt(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::addmm_out(out, out, a, b.t(), 0.0, alpha);
}

// out += alpha * a b
void add_mm_ab(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) { out.addmm_(a, b, 1.0, alpha); }

// out += alpha * a^T b
void add_mm_atb(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  out.addmm_(a.t(), b, 1.0, alpha);
}

// The exponentials are a large share of the work at small head dims (one per score, against 2*D
// flops of GEMM), and libm's expf does not vectorise without -ffast-math. This exp is a branch-free
// Cody-Waite reduction plus a degree-6 polynomial (relative error ~2e-7, below the float32 noise of
// the scores themselves) that the compiler turns into SIMD code; arguments below -87 give exactly 0.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  float r = xc - n * 0.693145751953125f;  // ln 2 split in a high part exact in float and a low part
  r = r - n * 1.428606765330187e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float e = p * std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : e;
}

// The float32 row loops below are written once (the *_body functions, always inlined) and compiled
// three times: baseline x86-64, AVX2 and AVX-512 (512-bit vectors); capability() picks one per call
// (DAGAN_FAST_CPU_CAPABILITY / ATEN_CPU_CAPABILITY, capped by the CPU). Element-wise results are
// the same at every level; the sums and maxima of a row are reduced in a lane order that depends on
// the vector width, so they may differ in the last bits between levels (never between runs).
#if defined(__GNUC__) && defined(__x86_64__)
#define DAGAN_TARGET_AVX2 __attribute__((target("avx2")))
#define DAGAN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")))
#else
#define DAGAN_TARGET_AVX2
#define DAGAN_TARGET_AVX512
#endif

#define DAGAN_SIMD_VARIANTS(ret, name, params, args)                      \
  ret name##_default params { return name##_body args; }                \
  DAGAN_TARGET_AVX2 ret name##_avx2 params { return name##_body args; } \
  DAGAN_TARGET_AVX512 ret name##_avx512 params { return name##_body args; } \
  ret name params {                                                      \
    switch (capability()) {                                              \
      case Capability::kAVX512: return name##_avx512 args;               \
      case Capability::kAVX2: return name##_avx2 args;                   \
      default: return name##_default args;                               \
    }                                                                    \
  }

// x[i] = exp(x[i] - shift) in place; returns the sum of the new values (fixed order per level).
__attribute__((always_inline)) inline float exp_shift_sum_body(float* x, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_nonpositive(x[i] - shift);
    x[i] = e;
    sum += e;
  }
  return sum;
}
DAGAN_SIMD_VARIANTS(float, exp_shift_sum, (float* x, int64_t n, float shift), (x, n, shift))

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = sm::softmax_prob_from_lse(x[i], shift);
    sum += x[i];
  }
  return sum;
}

__attribute__((always_inline)) inline float row_max_body(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
DAGAN_SIMD_VARIANTS(float, row_max, (const float* x, int64_t n), (x, n))

double row_max(const double* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// Backward: P = exp(S - lse) and then dS = P * (dP - delta), row by row.
__attribute__((always_inline)) inline void exp_shift_body(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_nonpositive(x[i] - shift);
}
DAGAN_SIMD_VARIANTS(void, exp_shift, (float* x, int64_t n, float shift), (x, n, shift))

void exp_shift(double* x, int64_t n, double shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = sm::softmax_prob_from_lse(x[i], shift);
}

// dS = P * (dP - delta) in place of dP (element-wise: the same bits at every level).
__attribute__((always_inline)) inline void grad_scores_body(const float* prob, float* dprob, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dprob[i] = sm::softmax_grad_score(prob[i], dprob[i], delta);
}
DAGAN_SIMD_VARIANTS(void, grad_scores, (const float* prob, float* dprob, int64_t n, float delta),
                    (prob, dprob, n, delta))

void grad_scores(const double* prob, double* dprob, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) dprob[i] = sm::softmax_grad_score(prob[i], dprob[i], delta);
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

// Sizes of one attention problem; the operands are contiguous (BH, rows, features) tensors.
struct Dims {
  int64_t bh, nq, nk, dqk, dv;
};

template <typename T>
void forward_kernel(const at::Tensor& q,  // (BH, Nq, Dqk), contiguous, T
                    const at::Tensor& k,  // (BH, Nk, Dqk), contiguous, T
                    const at::Tensor& v,  // (BH, Nk, Dv), contiguous, T
                    at::Tensor& out,      // (BH, Nq, Dv), contiguous, T
                    at::Tensor& lse,      // (BH, Nq), contiguous, T
                    const Dims& d, double scale) {
  const int64_t query_blocks = (d.nq + kFwdQueryBlock - 1) / kFwdQueryBlock;
  const int64_t key_block = std::min(kFwdKeyBlock, d.nk);
  T* const out_p = out.mutable_data_ptr<T>();
  T* const lse_p = lse.mutable_data_ptr<T>();
  at::parallel_for(0, d.bh * query_blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain buffers: skip the autograd layer per GEMM
    auto scores_buf = at::empty({kFwdQueryBlock * key_block}, q.options());
    auto acc_buf = at::empty({kFwdQueryBlock, d.dv}, q.options());
    std::vector<sm::SoftmaxState<T>> state(kFwdQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / query_blocks;
      const int64_t i0 = (task % query_blocks) * kFwdQueryBlock;
      const int64_t bq = std::min(kFwdQueryBlock, d.nq - i0);
      const auto qb = q.select(0, bh).narrow(0, i0, bq);
      const auto kh = k.select(0, bh), vh = v.select(0, bh);
      auto acc = acc_buf.narrow(0, 0, bq);
      acc.zero_();
      T* const acc_p = acc.mutable_data_ptr<T>();
      std::fill(state.begin(), state.begin() + bq, sm::softmax_init<T>());
      for (int64_t j0 = 0; j0 < d.nk; j0 += kFwdKeyBlock) {
        const int64_t bk = std::min(kFwdKeyBlock, d.nk - j0);
        auto scores = scores_buf.narrow(0, 0, bq * bk).view({bq, bk});
        mm_abt(scores, qb, kh.narrow(0, j0, bk), scale);
        T* const s_p = scores.mutable_data_ptr<T>();
        for (int64_t r = 0; r < bq; ++r) {
          T* row = s_p + r * bk;
          const T factor = sm::softmax_rescale(state[r], row_max(row, bk));
          state[r].sum += exp_shift_sum(row, bk, state[r].max);
          if (factor != T(1)) scale_row(acc_p + r * d.dv, d.dv, factor);
        }
        add_mm_ab(acc, scores, vh.narrow(0, j0, bk), 1.0);
      }
      T* ob = out_p + (bh * d.nq + i0) * d.dv;
      for (int64_t r = 0; r < bq; ++r) {
        const T inv = sm::softmax_inv_sum(state[r]);
        const T* a = acc_p + r * d.dv;
        T* o = ob + r * d.dv;
        for (int64_t c = 0; c < d.dv; ++c) o[c] = a[c] * inv;
        lse_p[bh * d.nq + i0 + r] = sm::softmax_lse(state[r]);
      }
    }
  });
}

// Operands of the backward kernel: contiguous tensors of the accumulation type T.
struct BackwardArgs {
  at::Tensor grad_out;  // (BH, Nq, Dv)
  at::Tensor q;         // (BH, Nq, Dqk)
  at::Tensor k;         // (BH, Nk, Dqk)
  at::Tensor v;         // (BH, Nk, Dv)
  at::Tensor lse;       // (BH, Nq)
  at::Tensor delta;     // (BH, Nq): rowsum(dO * O); undefined when neither dQ nor dK is wanted
  at::Tensor dq_parts;  // (splits, BH, Nq, Dqk): unscaled dQ per key range; undefined if dQ is not wanted
  at::Tensor dk;        // (BH, Nk, Dqk) or undefined
  at::Tensor dv;        // (BH, Nk, Dv) or undefined
};

template <typename T>
void backward_kernel(const BackwardArgs& a, const Dims& d, double scale, int64_t splits) {
  const int64_t key_blocks = (d.nk + kBwdKeyBlock - 1) / kBwdKeyBlock;
  const int64_t key_block = std::min(kBwdKeyBlock, d.nk);
  const bool want_dq = a.dq_parts.defined(), want_dk = a.dk.defined(), want_dv = a.dv.defined();
  const bool want_ds = want_dq || want_dk;
  const T* const lse_p = a.lse.const_data_ptr<T>();
  const T* const delta_p = want_ds ? a.delta.const_data_ptr<T>() : nullptr;
  at::parallel_for(0, d.bh * splits, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto prob_buf = at::empty({kBwdQueryBlock * key_block}, a.q.options());
    auto dprob_buf = want_ds ? at::empty({kBwdQueryBlock * key_block}, a.q.options()) : at::Tensor();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / splits, split = task % splits;
      // Key blocks [kb_begin, kb_end) of this head; the ranges of one head's splits tile all its blocks.
      const int64_t kb_begin = split * key_blocks / splits, kb_end = (split + 1) * key_blocks / splits;
      const auto qh = a.q.select(0, bh), goh = a.grad_out.select(0, bh);
      const auto kh = a.k.select(0, bh), vh = a.v.select(0, bh);
      at::Tensor dqh = want_dq ? a.dq_parts.select(0, split).select(0, bh) : at::Tensor();
      if (want_dq) dqh.zero_();
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBwdKeyBlock, bk = std::min(kBwdKeyBlock, d.nk - j0);
        const auto kj = kh.narrow(0, j0, bk), vj = vh.narrow(0, j0, bk);
        at::Tensor dkj = want_dk ? a.dk.select(0, bh).narrow(0, j0, bk) : at::Tensor();
        at::Tensor dvj = want_dv ? a.dv.select(0, bh).narrow(0, j0, bk) : at::Tensor();
        if (want_dk) dkj.zero_();
        if (want_dv) dvj.zero_();
        for (int64_t i0 = 0; i0 < d.nq; i0 += kBwdQueryBlock) {
          const int64_t bq = std::min(kBwdQueryBlock, d.nq - i0);
          const auto qi = qh.narrow(0, i0, bq), goi = goh.narrow(0, i0, bq);
          auto prob = prob_buf.narrow(0, 0, bq * bk).view({bq, bk});
          mm_abt(prob, qi, kj, scale);
          T* const p_p = prob.mutable_data_ptr<T>();
          const T* lse_i = lse_p + bh * d.nq + i0;
          for (int64_t r = 0; r < bq; ++r) exp_shift(p_p + r * bk, bk, lse_i[r]);
          if (want_dv) add_mm_atb(dvj, prob, goi, 1.0);
          if (!want_ds) continue;
          auto dprob = dprob_buf.narrow(0, 0, bq * bk).view({bq, bk});
          mm_abt(dprob, goi, vj, 1.0);
          T* const dp_p = dprob.mutable_data_ptr<T>();
          const T* delta_i = delta_p + bh * d.nq + i0;
          for (int64_t r = 0; r < bq; ++r) grad_scores(p_p + r * bk, dp_p + r * bk, bk, delta_i[r]);
          if (want_dk) add_mm_atb(dkj, dprob, qi, scale);
          if (want_dq) {
            auto dqi = dqh.narrow(0, i0, bq);
            add_mm_ab(dqi, dprob, kj, 1.0);
          }
        }
      }
    }
  });
}

// delta[r] = sum_c grad_out[r, c] * out[r, c]: the softmax-Jacobian term of the backward pass.
template <typename T>
void row_dots(const T* grad_out, const T* out, T* delta, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T s = T(0);
      for (int64_t c = 0; c < cols; ++c) s += grad_out[r * cols + c] * out[r * cols + c];
      delta[r] = s;
    }
  });
}

// dq = scale * sum over splits of the partial buffers, summed in split order (deterministic).
template <typename T>
void reduce_dq(const T* parts, T* dq, int64_t splits, int64_t numel, T scale) {
  at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = parts[i];
      for (int64_t p = 1; p < splits; ++p) s += parts[p * numel + i];
      dq[i] = s * scale;
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A contiguous copy in the accumulation type (no copy when the input already is one).
at::Tensor as_acc(const at::Tensor& t) { return t.to(acc_type(t.scalar_type())).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dqk = q.size(3), Dv = v.size(3);
  const auto acc = acc_type(q.scalar_type());
  auto out_acc = at::empty({B * H, Nq, Dv}, q.options().dtype(acc));
  auto lse = at::empty({B * H, Nq}, q.options().dtype(acc));
  if (out_acc.numel() > 0) {
    poison(out_acc);
    poison(lse);
    const auto qa = as_acc(q).view({B * H, Nq, Dqk}), ka = as_acc(k).view({B * H, Nk, Dqk});
    const auto va = as_acc(v).view({B * H, Nk, Dv});
    const Dims d{B * H, Nq, Nk, Dqk, Dv};
    AT_DISPATCH_FLOATING_TYPES(acc, "cross_modal_attention_fwd",
                               [&] { forward_kernel<scalar_t>(qa, ka, va, out_acc, lse, d, scale); });
  }
  auto out = out_acc.view({B, H, Nq, Dv});
  if (out.scalar_type() != q.scalar_type()) out = out.to(q.scalar_type());
  return {out, lse.view({B, H, Nq})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, std::array<bool, 3> mask) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), Dqk = q.size(3), Dv = v.size(3);
  const int64_t BH = B * H;
  const auto acc = acc_type(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  at::Tensor dq = mask[0] ? at::empty({BH, Nq, Dqk}, opts) : at::Tensor();
  at::Tensor dk = mask[1] ? at::empty({BH, Nk, Dqk}, opts) : at::Tensor();
  at::Tensor dv = mask[2] ? at::empty({BH, Nk, Dv}, opts) : at::Tensor();
  poison(dq);
  poison(dk);
  poison(dv);
  if (Nq == 0 || BH == 0) {
    // No query: no score reaches any key, so dK and dV are zero (dQ is empty).
    if (dk.defined()) dk.zero_();
    if (dv.defined()) dv.zero_();
  } else if (mask[0] || mask[1] || mask[2]) {
    BackwardArgs args;
    args.grad_out = as_acc(grad_out).view({BH, Nq, Dv});
    args.q = as_acc(q).view({BH, Nq, Dqk});
    args.k = as_acc(k).view({BH, Nk, Dqk});
    args.v = as_acc(v).view({BH, Nk, Dv});
    args.lse = lse.to(acc).contiguous();
    const int64_t key_blocks = (Nk + kBwdKeyBlock - 1) / kBwdKeyBlock;
    // Without dQ every key block is independent; with it, each head's key blocks are split into just
    // enough ranges to occupy the threads, each range owning one dQ partial buffer (O(N) memory).
    const int64_t threads = at::get_num_threads();
    const int64_t splits = mask[0] ? std::clamp<int64_t>((threads + BH - 1) / BH, 1, key_blocks) : key_blocks;
    if (mask[0]) args.dq_parts = splits == 1 ? dq.unsqueeze(0) : at::empty({splits, BH, Nq, Dqk}, opts);
    args.dk = dk;
    args.dv = dv;
    const Dims d{BH, Nq, Nk, Dqk, Dv};
    AT_DISPATCH_FLOATING_TYPES(acc, "cross_modal_attention_bwd", [&] {
      if (mask[0] || mask[1]) {
        args.delta = at::empty({BH, Nq}, opts);
        const auto outa = as_acc(out);
        row_dots<scalar_t>(args.grad_out.const_data_ptr<scalar_t>(), outa.const_data_ptr<scalar_t>(),
                           args.delta.mutable_data_ptr<scalar_t>(), BH * Nq, Dv);
      }
      backward_kernel<scalar_t>(args, d, scale, splits);
      if (mask[0]) {
        reduce_dq<scalar_t>(args.dq_parts.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(), splits,
                            BH * Nq * Dqk, static_cast<scalar_t>(scale));
      }
    });
  }
  auto finish = [](const at::Tensor& g, const at::Tensor& like) {
    if (!g.defined()) return at::empty({0}, like.options());
    const auto shaped = g.view(like.sizes());
    return shaped.scalar_type() == like.scalar_type() ? shaped : shaped.to(like.scalar_type());
  };
  return {finish(dq, q), finish(dk, k), finish(dv, v)};
}

}  // namespace cpu
}  // namespace dagan_fast
