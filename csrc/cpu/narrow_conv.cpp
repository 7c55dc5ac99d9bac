// Direct convolution for few output channels: vectorised over input channels (channels_last rows are
// contiguous in them) instead of over output channels. Each step keeps P output pixels x Co outputs of
// vector accumulators in registers (9 of 16 AVX2 registers for Co = 3, 24 of 32 AVX-512 ones), loads Co filter
// vectors and P input vectors per tap and channel block, and reduces each accumulator's lanes once at the
// end. Measured on the AVX2 VM (2 threads), 64 -> 3 channels 7x7 at 256x256: 10 ms against oneDNN's 21 ms
// (channels_last) and 44 ms (NCHW); what bounds it is the input's loads from L2 (Co = 1 takes as long).
#include "cpu/narrow_conv.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "cpu/capability.h"
#include "cpu/winograd.h"
#include "op_support.h"

// The project builds with -ffp-contract=off (kernels round like their references, step by step); here the
// accumulations are fused multiply-adds on purpose: separate multiplies and adds would take both of the
// vector units' slots for one product (half the rate), and a fused step only rounds less.
#pragma GCC optimize("fp-contract=fast")

namespace dagan_fast {
namespace cpu {
namespace {

#pragma GCC diagnostic ignored "-Wpsabi"  // the vector types never cross a call: every user is always_inline
typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
typedef float V16 __attribute__((vector_size(16 * sizeof(float))));

struct Shape {
  int64_t channels, padded_channels, in_h, in_w, out_h, out_w, kh, kw, pad_h, pad_w;
  int64_t out_pixel_stride, out_channel_stride;  // in the output, per pixel and per output channel
};

template <typename V>
__attribute__((always_inline)) inline V load(const float* src, int64_t n) {
  V v = {};
  std::memcpy(&v, src, n * sizeof(float));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline V load_full(const float* src) {
  V v;
  std::memcpy(&v, src, sizeof(V));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline float lane_sum(const V& v) {
  float s = 0.f;
  for (size_t i = 0; i < sizeof(V) / sizeof(float); ++i) s += v[i];
  return s;
}

// Output pixels [ox0, ox0 + P) of row oy of one image: every tap's input column inside the image when
// `kInside`; otherwise (the borders, the row's last pixels) each pixel checks its columns. `kWhole`: the
// channels are a multiple of the vector width (no partial loads: the accumulators then stay in registers
// across taps).
template <typename V, int CO, int P, bool kInside, bool kWhole>
__attribute__((always_inline)) inline void pixels(const float* x, const float* w, const float* bias, const Shape& s,
                                                  int64_t oy, int64_t ox0, int64_t count, float* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t C = s.channels, Cp = s.padded_channels;
  V acc[P][CO];
  for (int p = 0; p < P; ++p)
    for (int o = 0; o < CO; ++o) acc[p][o] = V{};
  const int64_t i_lo = std::max<int64_t>(0, s.pad_h - oy), i_hi = std::min<int64_t>(s.kh, s.in_h + s.pad_h - oy);
  const int64_t full = C / L * L;
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* row = x + (oy + i - s.pad_h) * s.in_w * C;
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* wt = w + (i * s.kw + j) * CO * Cp;
      const int64_t col0 = ox0 + j - s.pad_w;
      const float* src = row + col0 * C;
      int64_t c0 = 0;
      if (kInside) {
        for (; c0 < full; c0 += L) {
          V wv[CO];
          for (int o = 0; o < CO; ++o) wv[o] = load_full<V>(wt + o * Cp + c0);
          for (int p = 0; p < P; ++p) {
            const V xv = load_full<V>(src + p * C + c0);
            for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
          }
        }
      }
      if (kInside && kWhole) continue;
      // the channel tail (and every channel of pixels that check their columns): partial loads
      for (; c0 < C; c0 += L) {
        const int64_t n = std::min<int64_t>(L, C - c0);
        V wv[CO];
        for (int o = 0; o < CO; ++o) wv[o] = load_full<V>(wt + o * Cp + c0);  // zero beyond C
        for (int p = 0; p < P; ++p) {
          if (!kInside && (p >= count || col0 + p < 0 || col0 + p >= s.in_w)) continue;
          const V xv = load<V>(src + p * C + c0, n);
          for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
        }
      }
    }
  }
  for (int p = 0; p < P && p < count; ++p) {
    float* dst = out + (oy * s.out_w + ox0 + p) * s.out_pixel_stride;
    for (int o = 0; o < CO; ++o) dst[o * s.out_channel_stride] = lane_sum(acc[p][o]) + (bias ? bias[o] : 0.f);
  }
}

// Output rows [lo, hi) of the flattened (image, row) range.
template <typename V, int CO, int P, bool kWhole>
__attribute__((always_inline)) inline void rows(const float* x, const float* w, const float* bias, const Shape& s,
                                                int64_t lo, int64_t hi, float* out, int64_t out_image_stride) {
  // the first pixel whose P-wide block reads only columns inside the image, and one past the last such
  const int64_t first_inside = s.pad_w, last_inside_end = s.in_w + s.pad_w - s.kw + 1;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / s.out_h, oy = r % s.out_h;
    const float* image = x + b * s.in_h * s.in_w * s.channels;
    float* out_image = out + b * out_image_stride;
    int64_t ox = 0;
    for (; ox < std::min(first_inside, s.out_w); ox += P)
      pixels<V, CO, P, false, kWhole>(image, w, bias, s, oy, ox, std::min<int64_t>(P, s.out_w - ox), out_image);
    for (; ox + P <= last_inside_end; ox += P)
      pixels<V, CO, P, true, kWhole>(image, w, bias, s, oy, ox, P, out_image);
    for (; ox < s.out_w; ox += P)
      pixels<V, CO, P, false, kWhole>(image, w, bias, s, oy, ox, std::min<int64_t>(P, s.out_w - ox), out_image);
  }
}

// One noinline entry per vector level; registers: P x Co accumulators + Co filter vectors + 1 input vector
// (AVX2: 9-12 of 16, measured best; all 16 made GCC spill the accumulators around each tap).
#define DAGAN_NARROW_LEVEL(SUFFIX, TARGET, V, P1, P2, P3, P4)                                                  \
  TARGET __attribute__((noinline)) void rows_##SUFFIX(int co, const float* x, const float* w, const float* bias, \
                                                      const Shape& s, int64_t lo, int64_t hi, float* out,         \
                                                      int64_t out_image_stride) {                                 \
    const bool whole = s.channels % (sizeof(V) / sizeof(float)) == 0;                                             \
    switch (co * 2 + whole) {                                                                                     \
      case 2: return rows<V, 1, P1, false>(x, w, bias, s, lo, hi, out, out_image_stride);                         \
      case 3: return rows<V, 1, P1, true>(x, w, bias, s, lo, hi, out, out_image_stride);                          \
      case 4: return rows<V, 2, P2, false>(x, w, bias, s, lo, hi, out, out_image_stride);                         \
      case 5: return rows<V, 2, P2, true>(x, w, bias, s, lo, hi, out, out_image_stride);                          \
      case 6: return rows<V, 3, P3, false>(x, w, bias, s, lo, hi, out, out_image_stride);                         \
      case 7: return rows<V, 3, P3, true>(x, w, bias, s, lo, hi, out, out_image_stride);                          \
      case 8: return rows<V, 4, P4, false>(x, w, bias, s, lo, hi, out, out_image_stride);                         \
      default: return rows<V, 4, P4, true>(x, w, bias, s, lo, hi, out, out_image_stride);                         \
    }                                                                                                             \
  }

DAGAN_NARROW_LEVEL(default, , V8, 8, 5, 3, 3)
DAGAN_NARROW_LEVEL(avx2, __attribute__((target("avx2,fma"))), V8, 8, 5, 3, 3)
DAGAN_NARROW_LEVEL(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), V16, 8, 8, 8, 6)

}  // namespace

at::Tensor narrow_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t pad_h, int64_t pad_w, bool channels_last) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "narrow_conv2d: input must be a float32 CPU tensor (B,C,H,W), got ", input.scalar_type(), " ",
              input.sizes(), " on ", input.device());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(0) >= 1 && weight.size(0) <= 4 && weight.size(1) == input.size(1),
              "narrow_conv2d: weight must be float32 CPU (Co,C,kh,kw) with 1 <= Co <= 4 and C = ", input.size(1),
              " (the input's channels), got ", weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  const int64_t Co = weight.size(0), C = input.size(1), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(pad_h >= 0 && pad_h < kh && pad_w >= 0 && pad_w < kw, "narrow_conv2d: padding must be below the ",
              kh, "x", kw, " kernel size and >= 0, got (", pad_h, ", ", pad_w, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == Co,
                "narrow_conv2d: bias must be a float32 CPU vector of ", Co, " values, got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }
  const int64_t B = input.size(0), H = input.size(2), W = input.size(3);
  const int64_t Ho = H + 2 * pad_h - kh + 1, Wo = W + 2 * pad_w - kw + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "narrow_conv2d: a ", kh, "x", kw, " kernel with padding (", pad_h, ", ", pad_w,
              ") does not fit the ", H, "x", W, " input");
  at::Tensor out = at::empty({B, Co, Ho, Wo}, input.options().memory_format(
                                                  channels_last ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
  poison(out);
  if (out.numel() == 0) return out;
  const at::Tensor x = as_channels_last(input);

  // filters as (kh, kw, Co, C rounded up to 16) with zeros past C, so every filter load is a full vector
  const int64_t Cp = (C + 15) / 16 * 16;
  at::Tensor packed = at::zeros({kh, kw, Co, Cp}, weight.options());
  packed.narrow(3, 0, C).copy_(weight.permute({2, 3, 0, 1}));
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  Shape s{C, Cp, H, W, Ho, Wo, kh, kw, pad_h, pad_w, channels_last ? Co : 1, channels_last ? 1 : Ho * Wo};
  const float* xp = x.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const int64_t out_image_stride = Co * Ho * Wo;
  const Capability level = capability();
  at::parallel_for(0, B * Ho, 1, [&](int64_t lo, int64_t hi) {
    if (level == Capability::kAVX512) {
      rows_avx512(Co, xp, wp, bp, s, lo, hi, op, out_image_stride);
    } else if (level == Capability::kAVX2) {
      rows_avx2(Co, xp, wp, bp, s, lo, hi, op, out_image_stride);
    } else {
      rows_default(Co, xp, wp, bp, s, lo, hi, op, out_image_stride);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace dagan_fast
