// Winograd F(4x4, 3x3) (Lavin & Gray 2016) for CPU float32 convolutions: each 4x4 output tile comes from a
// 6x6 input tile as Y = A^T [ (G g G^T) . (B^T d B) ] A, so a 3x3 convolution costs 36 matrix products of
// (tiles x C) by (C x Co) instead of 9 of (pixels x C) by (C x Co): 2.25x fewer multiply-adds per output
// pixel before the transforms, which are memory-bound and cheap. The products run through at::bmm (MKL);
// the transforms here run over 16 channels at a time (channels_last: channels are contiguous in memory;
// NCHW maps, training's layout, are transposed to and from channels_last in cache-sized blocks).
//
// Tiles are processed in chunks, so that one chunk's transformed input and products stay near the last cache
// level (a 256x256 map with 128 channels would otherwise spill ~110 MB of transforms to memory).
#include "cpu/winograd.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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

// A y for 4 values -> 6: the adjoint of A^T, for the weight gradient.
#define DAGAN_A(y0, y1, y2, y3, o0, o1, o2, o3, o4, o5) \
  o0 = (y0);                                              \
  o1 = (y0) + (y1) + (y2) + (y3);                         \
  o2 = (y0) - (y1) + (y2) - (y3);                         \
  o3 = (y0) + 2.f * (y1) + 4.f * ((y2) + 2.f * (y3));     \
  o4 = (y0) - 2.f * (y1) + 4.f * ((y2) - 2.f * (y3));     \
  o5 = (y3);

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

// One 4x4 output-gradient tile's transform A dY A^T into z[xi * ldz + co] for all output channels (the
// gradient with respect to the 36 products; pixels past the output's edge count as zero).
__attribute__((always_inline)) inline void grad_tile(const float* gy, const Geometry& g, int64_t tile, float* z,
                                                     int64_t ldz) {
  const int64_t per_image = g.tiles_h * g.tiles_w;
  const int64_t b = tile / per_image, r = tile % per_image;
  const int64_t oy0 = (r / g.tiles_w) * 4, ox0 = (r % g.tiles_w) * 4;
  const int64_t Co = g.out_channels;
  const float* image = gy + b * g.out_h * g.out_w * Co;
  Lanes d[4][4], t[6][4];
  for (int64_t c0 = 0; c0 < Co; c0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, Co - c0));
    for (int u = 0; u < 4; ++u) {
      for (int w = 0; w < 4; ++w) {
        const int64_t oy = oy0 + u, ox = ox0 + w;
        d[u][w] = (oy < g.out_h && ox < g.out_w) ? load(image + (oy * g.out_w + ox) * Co + c0, n) : Lanes{};
      }
    }
    for (int w = 0; w < 4; ++w) {
      DAGAN_A(d[0][w], d[1][w], d[2][w], d[3][w], t[0][w], t[1][w], t[2][w], t[3][w], t[4][w], t[5][w])
    }
    for (int i = 0; i < 6; ++i) {
      Lanes o[6];
      DAGAN_A(t[i][0], t[i][1], t[i][2], t[i][3], o[0], o[1], o[2], o[3], o[4], o[5])
      for (int j = 0; j < 6; ++j) store(z + (i * 6 + j) * ldz + c0, o[j], n);
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
  }                                                                                                           \
  TARGET __attribute__((noinline)) void grad_tiles_##SUFFIX(const float* gy, const Geometry& g, int64_t first,   \
                                                            int64_t lo, int64_t hi, float* z, int64_t ldz) {     \
    for (int64_t t = lo; t < hi; ++t) grad_tile(gy, g, first + t, z + t * g.out_channels, ldz);               \
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

// G of F(4x4, 3x3), points 0, +-1, +-2 and infinity (6x3).
constexpr double kG[6][3] = {{1. / 4, 0, 0},           {-1. / 6, -1. / 6, -1. / 6}, {-1. / 6, 1. / 6, -1. / 6},
                             {1. / 24, 1. / 12, 1. / 6}, {1. / 24, -1. / 12, 1. / 6},  {0, 0, 1}};

// G (x) G (36,9), float32: row i * 6 + j, column a * 3 + b holds G[i][a] G[j][b], so that G g G^T of a
// filter g is this times g's 9 values.
const at::Tensor& filter_transform() {
  static const at::Tensor kron = [] {
    at::Tensor k = at::empty({kXi, 9}, at::kFloat);
    float* p = k.mutable_data_ptr<float>();
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 6; ++j)
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) p[(i * 6 + j) * 9 + a * 3 + b] = static_cast<float>(kG[i][a] * kG[j][b]);
    return k;
  }();
  return kron;
}

// One call of the transform `fn` compiled for this CPU's vector level.
#define DAGAN_BY_LEVEL(level, fn, ...)                                                                     \
  ((level) == Capability::kAVX512 ? fn##_avx512(__VA_ARGS__)                                               \
                                  : (level) == Capability::kAVX2 ? fn##_avx2(__VA_ARGS__) : fn##_default(__VA_ARGS__))

// The geometry of a convolution of `input` (B,C,H,W) to `out_channels` with zero padding `pad`.
void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4, op,
              ": input must be a float32 CPU tensor (B,C,H,W), got ", input.scalar_type(), " ", input.sizes(), " on ",
              input.device());
}

Geometry geometry(const char* op, const at::Tensor& input, int64_t out_channels, bool upsample, int64_t pad) {
  check_input(op, input);
  TORCH_CHECK(pad >= 0 && pad <= 2, op, ": pad must be 0, 1 or 2, got ", pad);
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.out_channels = out_channels;
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.src_h = upsample ? 2 * g.in_h : g.in_h;
  g.src_w = upsample ? 2 * g.in_w : g.in_w;
  g.pad = pad;
  g.out_h = g.src_h + 2 * pad - 2;
  g.out_w = g.src_w + 2 * pad - 2;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, op, ": input ", input.sizes(), " with pad ", pad, " leaves no output pixel");
  g.tiles_h = (g.out_h + 3) / 4;
  g.tiles_w = (g.out_w + 3) / 4;
  g.tiles = g.batch * g.tiles_h * g.tiles_w;
  return g;
}

// dst (batch, cols, rows) = src (batch, rows, cols) transposed per batch, in 16x16 blocks that stay in the
// first cache level: the NCHW <-> channels_last conversion of training's activations, faster than
// at::Tensor::contiguous on DaGAN's power-of-two maps (whose channel planes collide in the caches).
void transpose_batched(const float* src, float* dst, int64_t batch, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 16;
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, batch * row_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t b = k / row_blocks, r0 = (k % row_blocks) * kBlock, r1 = std::min(rows, r0 + kBlock);
      const float* s = src + b * rows * cols;
      float* d = dst + b * rows * cols;
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t c1 = std::min(cols, c0 + kBlock);
        // the inner loop walks the side whose other side has the shorter stride: 16 lines a large power of
        // two apart share one cache set and would evict each other on every access
        if (cols < rows) {
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t r = r0; r < r1; ++r) d[c * rows + r] = s[r * cols + c];
          }
        } else {
          for (int64_t r = r0; r < r1; ++r) {
            for (int64_t c = c0; c < c1; ++c) d[c * rows + r] = s[r * cols + c];
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor as_channels_last(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast) || !t.is_contiguous() || t.numel() == 0 || t.dim() != 4 ||
      t.scalar_type() != at::kFloat || !t.device().is_cpu()) {
    return t.contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast));
  transpose_batched(t.const_data_ptr<float>(), out.mutable_data_ptr<float>(), t.size(0), t.size(1),
                    t.size(2) * t.size(3));
  return out;
}

namespace {

// Tiles per chunk: one chunk's 36 transformed rows of the wider side stay within kChunkBytes.
int64_t chunk_tiles(const Geometry& g) {
  const int64_t widest = std::max(g.channels, g.out_channels);
  return std::clamp<int64_t>(kChunkBytes / (kXi * widest * 4), 16, std::max<int64_t>(g.tiles, 16));
}

}  // namespace

at::Tensor winograd_conv3x3(const at::Tensor& input, const at::Tensor& weight_u, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& pre_scale, const c10::optional<at::Tensor>& pre_shift,
                            bool upsample, int64_t pad, bool relu, const c10::optional<at::Tensor>& residual,
                            bool channels_last) {
  check_input("winograd_conv3x3", input);
  TORCH_CHECK(weight_u.device().is_cpu() && weight_u.scalar_type() == at::kFloat && weight_u.dim() == 3 &&
                  weight_u.size(0) == kXi && weight_u.size(1) == input.size(1),
              "winograd_conv3x3: weight_u must be float32 (36,C,Co) with C = ", input.size(1),
              " (the input's channels), got ", weight_u.scalar_type(), " ", weight_u.sizes());
  TORCH_CHECK(pre_scale.has_value() == pre_shift.has_value(),
              "winograd_conv3x3: pre_scale and pre_shift come together (got only one)");
  const Geometry g = geometry("winograd_conv3x3", input, weight_u.size(2), upsample, pad);
  check_vector(bias, "bias", g.out_channels);
  check_vector(pre_scale, "pre_scale", g.channels);
  check_vector(pre_shift, "pre_shift", g.channels);

  const at::Tensor x = as_channels_last(input);
  const at::Tensor u = weight_u.contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat &&
                    residual->sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}),
                "winograd_conv3x3: residual must be float32 (B,Co,Ho,Wo) = (", g.batch, ",", g.out_channels, ",",
                g.out_h, ",", g.out_w, "), got ", residual->scalar_type(), " ", residual->sizes());
    res = as_channels_last(*residual);
  }
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  poison(out);
  if (out.numel() == 0) return channels_last ? out : out.contiguous();

  const int64_t chunk = std::min(chunk_tiles(g), g.tiles);
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
      DAGAN_BY_LEVEL(level, input_tiles, xp, g, p, first, lo, hi, vp, ldv);
    });
    at::bmm_out(m, v, u);
    const float* mp = m.const_data_ptr<float>();
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      DAGAN_BY_LEVEL(level, output_tiles, mp, ldm, g, e, first, lo, hi, op);
    });
  }
  if (channels_last || out.is_contiguous()) return out;
  at::Tensor nchw = at::empty(out.sizes(), out.options());
  transpose_batched(out.const_data_ptr<float>(), nchw.mutable_data_ptr<float>(), g.batch, g.out_h * g.out_w,
                    g.out_channels);
  return nchw;
}

at::Tensor winograd_filter(const at::Tensor& weight, bool transposed) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_filter: weight must be float32 CPU (Co,C,3,3), got ", weight.scalar_type(), " ", weight.sizes(),
              " on ", weight.device());
  // the gradient with respect to the input convolves with the filters flipped in both axes
  const at::Tensor w = transposed ? weight.flip({2, 3}) : weight.transpose(0, 1);
  const int64_t rows = w.size(0), cols = w.size(1);
  // (36,9) @ (9, rows cols): one matrix product, memory-bound
  return at::mm(filter_transform(), w.reshape({rows * cols, 9}).t()).view({kXi, rows, cols});
}

at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, int64_t pad) {
  check_input("winograd_conv3x3_weight_grad", input);
  TORCH_CHECK(grad_output.device().is_cpu() && grad_output.scalar_type() == at::kFloat && grad_output.dim() == 4 &&
                  grad_output.size(0) == input.size(0),
              "winograd_conv3x3_weight_grad: grad_output must be float32 (B,Co,Ho,Wo) with the input's batch (input ",
              input.sizes(), "), got ", grad_output.scalar_type(), " ", grad_output.sizes(), " on ",
              grad_output.device());
  const Geometry g = geometry("winograd_conv3x3_weight_grad", input, grad_output.size(1), false, pad);
  TORCH_CHECK(grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
              "winograd_conv3x3_weight_grad: grad_output must be (", g.batch, ",", g.out_channels, ",", g.out_h, ",",
              g.out_w, ") for input ", input.sizes(), " and pad ", pad, ", got ", grad_output.sizes());
  at::Tensor grad_u = at::zeros({kXi, g.channels, g.out_channels}, input.options());
  if (g.tiles == 0 || g.channels == 0 || g.out_channels == 0) {
    return at::zeros({g.out_channels, g.channels, 3, 3}, input.options());
  }

  const at::Tensor x = as_channels_last(input);
  const at::Tensor gy = as_channels_last(grad_output);
  const int64_t chunk = std::min(chunk_tiles(g), g.tiles);
  at::Tensor v_buf = at::empty({kXi * chunk * g.channels}, input.options());
  at::Tensor z_buf = at::empty({kXi * chunk * g.out_channels}, input.options());
  const Prologue p{nullptr, nullptr, false};
  const Capability level = capability();
  const float* xp = x.const_data_ptr<float>();
  const float* gp = gy.const_data_ptr<float>();
  for (int64_t first = 0; first < g.tiles; first += chunk) {
    const int64_t count = std::min(chunk, g.tiles - first);
    at::Tensor v = v_buf.narrow(0, 0, kXi * count * g.channels).view({kXi, count, g.channels});
    at::Tensor z = z_buf.narrow(0, 0, kXi * count * g.out_channels).view({kXi, count, g.out_channels});
    float* vp = v.mutable_data_ptr<float>();
    float* zp = z.mutable_data_ptr<float>();
    const int64_t ldv = count * g.channels, ldz = count * g.out_channels;
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      DAGAN_BY_LEVEL(level, input_tiles, xp, g, p, first, lo, hi, vp, ldv);
      DAGAN_BY_LEVEL(level, grad_tiles, gp, g, first, lo, hi, zp, ldz);
    });
    grad_u.baddbmm_(v.transpose(1, 2), z);  // sum over tiles of V^T Z, per transform point
  }
  // the filters' gradient: G^T (grad_u) G per channel pair, the adjoint of G g G^T
  const at::Tensor grad_w = at::mm(filter_transform().t(), grad_u.view({kXi, g.channels * g.out_channels}));
  return grad_w.view({3, 3, g.channels, g.out_channels}).permute({3, 2, 0, 1}).contiguous();
}

}  // namespace cpu
}  // namespace dagan_fast
