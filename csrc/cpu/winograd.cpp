// Winograd F(4x4, 3x3) (Lavin & Gray 2016) for CPU float32 inference: each 4x4 output tile comes from a
// 6x6 input tile as Y = A^T [ (G g G^T) . (B^T d B) ] A, so a 3x3 convolution costs 36 matrix products of
// (tiles x C) by (C x Co) instead of 9 of (pixels x C) by (C x Co): 2.25x fewer multiply-adds per output
// pixel before the transforms, which are memory-bound and cheap. The products run through at::bmm (MKL);
// the transforms here run over 16 channels at a time (channels_last: channels are contiguous in memory).
//
// Tiles are processed in chunks, so that one chunk's transformed input and products stay near the last cache
// level (a 256x256 map with 128 channels would otherwise spill ~110 MB of transforms to memory).
#include "cpu/winograd.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "cpu/capability.h"
#include "op_support.h"

namespace dagan_fast {
namespace cpu {
namespace {

constexpr int kLanes = 16;                 // channels per step: 2 AVX2 / 1 AVX-512 float32 vector
constexpr int kXi = 36;                    // 6x6 transform points
// transformed input (or products) of one chunk of tiles; measured on the AVX2 VM (2 threads): 12 MiB beat
// 0.5-6 MiB and 24 MiB on DaGAN's 128-256 channel maps by 10-30%
constexpr int64_t kChunkBytes = 12 << 20;

struct Geometry {
  int64_t batch, channels, out_channels;
  int64_t in_h, in_w;        // stored input
  int64_t src_h, src_w;      // the convolution's input (2x the stored one when upsampling)
  int64_t out_h, out_w, pad;
  int64_t tiles_h, tiles_w, tiles;
};

struct Epilogue {
  const float* bias;
  const float* residual;     // channels_last, like the output
  bool relu;
};

struct Prologue {
  const float* scale;
  const float* shift;
  bool upsample;
};

// B^T r for a column r of 6 values (applied to rows, then to columns).
#define DAGAN_BT(r0, r1, r2, r3, r4, r5, o0, o1, o2, o3, o4, o5) \
  o0 = 4.f * (r0) - 5.f * (r2) + (r4);                           \
  o1 = -4.f * ((r1) + (r2)) + (r3) + (r4);                       \
  o2 = 4.f * ((r1) - (r2)) - (r3) + (r4);                        \
  o3 = 2.f * ((r3) - (r1)) - (r2) + (r4);                        \
  o4 = 2.f * ((r1) - (r3)) - (r2) + (r4);                        \
  o5 = 4.f * (r1) - 5.f * (r3) + (r5);

// A^T m for 6 values -> 4.
#define DAGAN_AT(m0, m1, m2, m3, m4, m5, o0, o1, o2, o3) \
  o0 = (m0) + (m1) + (m2) + (m3) + (m4);                 \
  o1 = (m1) - (m2) + 2.f * ((m3) - (m4));                \
  o2 = (m1) + (m2) + 4.f * ((m3) + (m4));                \
  o3 = (m1) - (m2) + 8.f * ((m3) - (m4)) + (m5);

// 16 float32 lanes as a GCC vector: each caller's target attribute picks its instructions (two AVX2
// registers, one AVX-512 register, four SSE registers).
#pragma GCC diagnostic ignored "-Wpsabi"  // Lanes never crosses a call: every user is always_inline
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

__attribute__((always_inline)) inline Lanes load(const float* src, int n) {
  Lanes v = {};
  std::memcpy(&v, src, (n == kLanes ? kLanes : n) * sizeof(float));
  return v;
}

__attribute__((always_inline)) inline void store(float* dst, const Lanes& v, int n) {
  std::memcpy(dst, &v, (n == kLanes ? kLanes : n) * sizeof(float));
}

__attribute__((always_inline)) inline Lanes relu(const Lanes& v) {
  const Lanes zero = {};
  return v > zero ? v : zero;
}

// One tile's input transform into v[xi * ldv + c] for all channels.
template <bool kPre>
__attribute__((always_inline)) inline void input_tile(const float* x, const Geometry& g, const Prologue& p,
                                                      int64_t tile, float* v, int64_t ldv) {
  const int64_t per_image = g.tiles_h * g.tiles_w;
  const int64_t b = tile / per_image, r = tile % per_image;
  const int64_t y0 = (r / g.tiles_w) * 4 - g.pad, x0 = (r % g.tiles_w) * 4 - g.pad;
  const int64_t C = g.channels;
  const float* image = x + b * g.in_h * g.in_w * C;
  Lanes d[6][6], t[6][6];
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, C - c0));
    Lanes scale = {}, shift = {};
    if (kPre) {
      scale = load(p.scale + c0, n);
      shift = load(p.shift + c0, n);
    }
    for (int i = 0; i < 6; ++i) {
      const int64_t iy = y0 + i;
      for (int j = 0; j < 6; ++j) {
        const int64_t ix = x0 + j;
        if (iy < 0 || iy >= g.src_h || ix < 0 || ix >= g.src_w) {
          d[i][j] = Lanes{};
          continue;
        }
        const int64_t sy = p.upsample ? iy / 2 : iy, sx = p.upsample ? ix / 2 : ix;
        const Lanes value = load(image + (sy * g.in_w + sx) * C + c0, n);
        // padding stays zero: the pre-activation acts on the input's pixels only
        d[i][j] = kPre ? relu(value * scale + shift) : value;
      }
    }
    for (int j = 0; j < 6; ++j) {
      DAGAN_BT(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], t[0][j], t[1][j], t[2][j], t[3][j], t[4][j],
               t[5][j])
    }
    for (int i = 0; i < 6; ++i) {
      Lanes o[6];
      DAGAN_BT(t[i][0], t[i][1], t[i][2], t[i][3], t[i][4], t[i][5], o[0], o[1], o[2], o[3], o[4], o[5])
      for (int j = 0; j < 6; ++j) store(v + (i * 6 + j) * ldv + c0, o[j], n);
    }
  }
}

// One tile's output transform from m[xi * ldm + co] into the channels_last output.
__attribute__((always_inline)) inline void output_tile(const float* m, int64_t ldm, const Geometry& g,
                                                       const Epilogue& e, int64_t tile, float* out) {
  const int64_t per_image = g.tiles_h * g.tiles_w;
  const int64_t b = tile / per_image, r = tile % per_image;
  const int64_t oy0 = (r / g.tiles_w) * 4, ox0 = (r % g.tiles_w) * 4;
  const int64_t Co = g.out_channels;
  const int64_t image = b * g.out_h * g.out_w * Co;
  Lanes s[4][6], y[4][4];
  for (int64_t c0 = 0; c0 < Co; c0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, Co - c0));
    for (int j = 0; j < 6; ++j) {
      Lanes col[6];
      for (int i = 0; i < 6; ++i) col[i] = load(m + (i * 6 + j) * ldm + c0, n);
      DAGAN_AT(col[0], col[1], col[2], col[3], col[4], col[5], s[0][j], s[1][j], s[2][j], s[3][j])
    }
    const Lanes bias = e.bias ? load(e.bias + c0, n) : Lanes{};
    for (int u = 0; u < 4; ++u) {
      DAGAN_AT(s[u][0], s[u][1], s[u][2], s[u][3], s[u][4], s[u][5], y[u][0], y[u][1], y[u][2], y[u][3])
    }
    for (int u = 0; u < 4; ++u) {
      const int64_t oy = oy0 + u;
      if (oy >= g.out_h) break;
      for (int w = 0; w < 4; ++w) {
        const int64_t ox = ox0 + w;
        if (ox >= g.out_w) break;
        const int64_t at = image + (oy * g.out_w + ox) * Co + c0;
        Lanes z = y[u][w] + bias;
        if (e.residual) z += load(e.residual + at, n);
        store(out + at, e.relu ? relu(z) : z, n);
      }
    }
  }
}

// The transforms of tiles [first, first + count): the same source compiled per vector level.
#define DAGAN_TRANSFORMS(SUFFIX, TARGET)                                                                      \
  TARGET __attribute__((noinline)) void input_tiles_##SUFFIX(const float* x, const Geometry& g,                \
                                                             const Prologue& p, int64_t first, int64_t lo,      \
                                                             int64_t hi, float* v, int64_t ldv) {               \
    for (int64_t t = lo; t < hi; ++t) {                                                                       \
      if (p.scale) {                                                                                          \
        input_tile<true>(x, g, p, first + t, v + t * g.channels, ldv);                                        \
      } else {                                                                                                \
        input_tile<false>(x, g, p, first + t, v + t * g.channels, ldv);                                       \
      }                                                                                                       \
    }                                                                                                         \
  }                                                                                                           \
  TARGET __attribute__((noinline)) void output_tiles_##SUFFIX(const float* m, int64_t ldm, const Geometry& g,  \
                                                              const Epilogue& e, int64_t first, int64_t lo,     \
                                                              int64_t hi, float* out) {                         \
    for (int64_t t = lo; t < hi; ++t) output_tile(m + t * g.out_channels, ldm, g, e, first + t, out);         \
  }

DAGAN_TRANSFORMS(default, )
DAGAN_TRANSFORMS(avx2, __attribute__((target("avx2,fma"))))
DAGAN_TRANSFORMS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))))

void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n,
              "winograd_conv3x3: ", name, " must be a float32 CPU vector of ", n, " values, got ", t->scalar_type(),
              " ", t->sizes(), " on ", t->device());
}

}  // namespace

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight_u, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& pre_scale, const c10::optional<at::Tensor>& pre_shift,
                            bool upsample, int64_t pad, bool relu, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "winograd_conv3x3: input must be a float32 CPU tensor (B,C,H,W), got ", input.scalar_type(), " ",
              input.sizes(), " on ", input.device());
  TORCH_CHECK(weight_u.device().is_cpu() && weight_u.scalar_type() == at::kFloat && weight_u.dim() == 3 &&
                  weight_u.size(0) == kXi && weight_u.size(1) == input.size(1),
              "winograd_conv3x3: weight_u must be float32 (36,C,Co) with C = ", input.size(1),
              " (the input's channels), got ", weight_u.scalar_type(), " ", weight_u.sizes());
  TORCH_CHECK(pad >= 0 && pad <= 2, "winograd_conv3x3: pad must be 0, 1 or 2, got ", pad);
  TORCH_CHECK(pre_scale.has_value() == pre_shift.has_value(),
              "winograd_conv3x3: pre_scale and pre_shift come together (got only one)");
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.out_channels = weight_u.size(2);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.src_h = upsample ? 2 * g.in_h : g.in_h;
  g.src_w = upsample ? 2 * g.in_w : g.in_w;
  g.pad = pad;
  g.out_h = g.src_h + 2 * pad - 2;
  g.out_w = g.src_w + 2 * pad - 2;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "winograd_conv3x3: input ", input.sizes(), " with pad ", pad,
              " leaves no output pixel");
  check_vector(bias, "bias", g.out_channels);
  check_vector(pre_scale, "pre_scale", g.channels);
  check_vector(pre_shift, "pre_shift", g.channels);
  g.tiles_h = (g.out_h + 3) / 4;
  g.tiles_w = (g.out_w + 3) / 4;
  g.tiles = g.batch * g.tiles_h * g.tiles_w;

  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor u = weight_u.contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat &&
                    residual->sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}),
                "winograd_conv3x3: residual must be float32 (B,Co,Ho,Wo) = (", g.batch, ",", g.out_channels, ",",
                g.out_h, ",", g.out_w, "), got ", residual->scalar_type(), " ", residual->sizes());
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  poison(out);
  if (out.numel() == 0) return out;

  const int64_t widest = std::max(g.channels, g.out_channels);
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (kXi * widest * 4), 16, g.tiles);
  at::Tensor v_buf = at::empty({kXi * chunk * g.channels}, input.options());
  at::Tensor m_buf = at::empty({kXi * chunk * g.out_channels}, input.options());
  // held here: the kernels read through raw pointers into them
  const at::Tensor scale = pre_scale.has_value() ? pre_scale->contiguous() : at::Tensor();
  const at::Tensor shift = pre_shift.has_value() ? pre_shift->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Prologue p{scale.defined() ? scale.const_data_ptr<float>() : nullptr,
                   shift.defined() ? shift.const_data_ptr<float>() : nullptr, upsample};
  const Epilogue e{bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr,
                   res.defined() ? res.const_data_ptr<float>() : nullptr, relu};
  const Capability level = capability();
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  for (int64_t first = 0; first < g.tiles; first += chunk) {
    const int64_t count = std::min(chunk, g.tiles - first);
    at::Tensor v = v_buf.narrow(0, 0, kXi * count * g.channels).view({kXi, count, g.channels});
    at::Tensor m = m_buf.narrow(0, 0, kXi * count * g.out_channels).view({kXi, count, g.out_channels});
    float* vp = v.mutable_data_ptr<float>();
    const int64_t ldv = count * g.channels, ldm = count * g.out_channels;
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      if (level == Capability::kAVX512) {
        input_tiles_avx512(xp, g, p, first, lo, hi, vp, ldv);
      } else if (level == Capability::kAVX2) {
        input_tiles_avx2(xp, g, p, first, lo, hi, vp, ldv);
      } else {
        input_tiles_default(xp, g, p, first, lo, hi, vp, ldv);
      }
    });
    at::bmm_out(m, v, u);
    const float* mp = m.const_data_ptr<float>();
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      if (level == Capability::kAVX512) {
        output_tiles_avx512(mp, ldm, g, e, first, lo, hi, op);
      } else if (level == Capability::kAVX2) {
        output_tiles_avx2(mp, ldm, g, e, first, lo, hi, op);
      } else {
        output_tiles_default(mp, ldm, g, e, first, lo, hi, op);
      }
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace dagan_fast
