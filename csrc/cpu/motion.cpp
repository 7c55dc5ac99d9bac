// CPU kernels of dagan_fast::sparse_motion_inputs_fwd/_bwd and dense_motion_fwd/_bwd.
//
// The per-keypoint affine (A_k, b_k) is computed once, the separable Gaussians exp(-(x-c)^2/(2v)) are
// tabulated once per keypoint and axis (H + W exponentials instead of H W), and the (K+1)(C+1)
// interleaved output is written directly, row by row. The bilinear taps of a row of pixels are computed
// in one vectorised pass and read a zero-bordered channels-last copy of the source (one vector load per
// tap, no bounds tests); the backward reuses them for the gather (coordinate gradient) and the scatter
// (source gradient, into a private padded buffer per task). Reductions (source gradient, keypoint
// gradients) go through per-tile partial buffers summed in tile order afterwards; the tiling depends
// only on the shapes, never on the thread count, so results are bitwise reproducible.
#include "motion.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../common/motion_math.h"
#include "../common/warp_math.h"
#include "../op_support.h"

namespace dagan_fast {
namespace cpu {
namespace {

using motion::Affine;
using motion::KeypointParams;
using motion::MotionGeometry;

// Rounds an accumulated value to the output type; float16/bfloat16 clamp to their finite range
// first (a near-singular Jacobian moves points by ~1e6), like reference._to_finite.
template <typename scalar_t, typename acc_t>
inline scalar_t to_output(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    const acc_t limit = static_cast<acc_t>(std::numeric_limits<scalar_t>::max());
    v = v > limit ? limit : (v < -limit ? -limit : v);
  }
  return static_cast<scalar_t>(v);
}

// Keypoint inputs of every (b, k), gathered once through the strides, in the accumulation type.
template <typename kp_t, typename acc_t>
std::vector<KeypointParams<acc_t>> gather_keypoints(const MotionGeometry& g, const kp_t* kps, const kp_t* jacs,
                                                    const kp_t* kpd, const kp_t* jacd) {
  std::vector<KeypointParams<acc_t>> params(g.batch * g.keypoints);
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t k = 0; k < g.keypoints; ++k) {
      auto& p = params[b * g.keypoints + k];
      p.has_js = jacs != nullptr;
      p.has_jd = jacd != nullptr;
      for (int i = 0; i < 2; ++i) {
        p.ks[i] = static_cast<acc_t>(kps[b * g.kps_stride[0] + k * g.kps_stride[1] + i * g.kps_stride[2]]);
        p.kd[i] = static_cast<acc_t>(kpd[b * g.kpd_stride[0] + k * g.kpd_stride[1] + i * g.kpd_stride[2]]);
      }
      for (int i = 0; i < 4; ++i) {
        const int r = i / 2, c = i % 2;
        p.js[i] = jacs ? static_cast<acc_t>(jacs[b * g.jacs_stride[0] + k * g.jacs_stride[1] + r * g.jacs_stride[2] +
                                                 c * g.jacs_stride[3]])
                       : acc_t(r == c);
        p.jd[i] = jacd ? static_cast<acc_t>(jacd[b * g.jacd_stride[0] + k * g.jacd_stride[1] + r * g.jacd_stride[2] +
                                                 c * g.jacd_stride[3]])
                       : acc_t(r == c);
      }
    }
  }
  return params;
}

template <typename acc_t>
std::vector<Affine<acc_t>> affines_of(const std::vector<KeypointParams<acc_t>>& params) {
  std::vector<Affine<acc_t>> out(params.size());
  for (size_t i = 0; i < params.size(); ++i) out[i] = motion::keypoint_affine(params[i]);
  return out;
}

template <typename acc_t>
std::vector<acc_t> axis_coordinates(int64_t n) {
  std::vector<acc_t> z(n);
  for (int64_t i = 0; i < n; ++i) z[i] = motion::grid_coordinate<acc_t>(i, n);
  return z;
}

// Gaussian factor tables per (b, k): [driving x (W) | source x (W) | driving y (H) | source y (H)].
template <typename acc_t>
struct GaussianTables {
  int64_t H, W;
  std::vector<acc_t> data;
  const acc_t* of(int64_t bk) const { return data.data() + bk * 2 * (H + W); }
};

template <typename acc_t>
GaussianTables<acc_t> gaussian_tables(const std::vector<KeypointParams<acc_t>>& params, const std::vector<acc_t>& zx,
                                      const std::vector<acc_t>& zy, acc_t variance) {
  GaussianTables<acc_t> t{static_cast<int64_t>(zy.size()), static_cast<int64_t>(zx.size()), {}};
  t.data.resize(params.size() * 2 * (t.H + t.W));
  const int64_t per = 2 * (t.H + t.W);
  at::parallel_for(0, static_cast<int64_t>(params.size()), std::max<int64_t>(1, 4096 / per), [&](int64_t lo, int64_t hi) {
    for (int64_t bk = lo; bk < hi; ++bk) {
      const auto& p = params[bk];
      acc_t* d = t.data.data() + bk * per;
      for (int64_t x = 0; x < t.W; ++x) {
        d[x] = motion::gaussian_factor(zx[x], p.kd[0], variance);
        d[t.W + x] = motion::gaussian_factor(zx[x], p.ks[0], variance);
      }
      for (int64_t y = 0; y < t.H; ++y) {
        d[2 * t.W + y] = motion::gaussian_factor(zy[y], p.kd[1], variance);
        d[2 * t.W + t.H + y] = motion::gaussian_factor(zy[y], p.ks[1], variance);
      }
    }
  });
  return t;
}

// Row tiles of the reductions: enough tasks for a few threads at small batch, one tile per image at
// large batch (no partial buffers then). A function of the shapes only, for reproducibility.
struct RowTiling {
  int64_t tiles, rows;
};

RowTiling row_tiling(int64_t batch, int64_t height) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(height, 16 / std::max<int64_t>(1, batch)));
  const int64_t rows = (height + want - 1) / want;
  return {(height + rows - 1) / rows, rows};
}

// ---------------------------------------------------------------------- sparse_motion_inputs
// Four lanes of the accumulation type (GCC/Clang vector extension): the channels of one source pixel,
// so a bilinear tap is one load (gather) or one read-add-write (scatter) for C <= 4 instead of C.
template <typename acc_t>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(4 * sizeof(acc_t))));
};
template <typename acc_t>
using lanes_t = typename Lanes<acc_t>::type;
constexpr int64_t kLanes = 4;

// Channels-last image with a zero border: clamp_source_coord keeps every tap coordinate in
// [-2, size + 2], so with 2 cells before and 3 after each axis every tap lies inside the buffer and
// an out-of-image tap reads zero (gather) or lands in the discarded border (scatter) without a test.
// The border holds zeros, not data, so an inf in the source is still read only by valid taps.
struct PaddedLayout {
  int64_t height, width, groups;  // padded H + 5, W + 5; lane groups per pixel ceil(C / 4)
  int64_t cells() const { return height * width * groups; }
  // Vector index of the tap (x, y) in image coordinates, x, y >= -2.
  int64_t at(int64_t x, int64_t y) const { return ((y + 2) * width + (x + 2)) * groups; }
};

// Tap geometry of one row of sample points z = (zx[x], z_y) under T: top-left tap (x0, y0) and the
// bilinear fractions, with the expressions of warp::bilinear_taps, in a branch-free loop over x that
// vectorises (restrict parameters: GCC ignores restrict on local pointers and gives up on the alias
// checks).
template <typename acc_t>
void row_taps(const Affine<acc_t>& t, const acc_t* __restrict__ zx, acc_t z_y, int64_t H, int64_t W,
              int32_t* __restrict__ x0, int32_t* __restrict__ y0, acc_t* __restrict__ fx, acc_t* __restrict__ fy,
              acc_t* __restrict__ ex, acc_t* __restrict__ ey /* (x0 + 1) - ix, (y0 + 1) - iy */) {
  // apply_affine's (a0 x + a1 y) + b0 with the y product hoisted out of the row: same rounding.
  const acc_t ty = t.a[1] * z_y, tyy = t.a[3] * z_y;
  const acc_t a00 = t.a[0], a10 = t.a[2], b0 = t.b[0], b1 = t.b[1];
  const acc_t lo = acc_t(-2), hi_x = static_cast<acc_t>(W + 1), hi_y = static_cast<acc_t>(H + 1);
  for (int64_t x = 0; x < W; ++x) {
    const acc_t mx = (a00 * zx[x] + ty) + b0;
    const acc_t my = (a10 * zx[x] + tyy) + b1;
    acc_t ix = warp::unnormalize(mx, W), iy = warp::unnormalize(my, H);
    // warp::clamp_source_coord written as max/min selects (NaN goes to lo) so the loop vectorises.
    ix = ix > lo ? ix : lo;
    ix = ix < hi_x ? ix : hi_x;
    iy = iy > lo ? iy : lo;
    iy = iy < hi_y ? iy : hi_y;
    // floor of a clamped (small) value through int32, which vectorises where int64 does not.
    int32_t xi = static_cast<int32_t>(ix), yi = static_cast<int32_t>(iy);
    xi -= static_cast<acc_t>(xi) > ix;
    yi -= static_cast<acc_t>(yi) > iy;
    const acc_t xf = static_cast<acc_t>(xi), yf = static_cast<acc_t>(yi);
    x0[x] = xi;
    y0[x] = yi;
    fx[x] = ix - xf;
    fy[x] = iy - yf;
    ex[x] = (xf + acc_t(1)) - ix;
    ey[x] = (yf + acc_t(1)) - iy;
  }
}

// Per-row tap buffers of a task.
template <typename acc_t>
struct RowTaps {
  std::vector<int32_t> x0, y0;
  std::vector<acc_t> fx, fy, ex, ey;
  explicit RowTaps(int64_t W) : x0(W), y0(W), fx(W), fy(W), ex(W), ey(W) {}
  void compute(const Affine<acc_t>& t, const acc_t* zx, acc_t z_y, int64_t H, int64_t W) {
    row_taps(t, zx, z_y, H, W, x0.data(), y0.data(), fx.data(), fy.data(), ex.data(), ey.data());
  }
};

// n <= 4 consecutive values into the first lanes, zeros after (a row's tail). Out-parameter, not a
// return value: a returned 32-byte double vector would trip GCC's AVX-ABI note without -mavx.
template <typename V, typename T>
inline void load_lanes(V& v, const T* p, int64_t n) {
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    v = V{};
    for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  }
}

// Lanes summed in a fixed order (deterministic).
template <typename V>
inline auto lane_sum(const V& v) -> std::remove_reference_t<decltype(v[0])> {
  return ((v[0] + v[1]) + v[2]) + v[3];
}

// Padded channels-last copy of every source image (B x PaddedLayout), in the accumulation type.
template <typename scalar_t, typename V>
std::vector<V> padded_source(const MotionGeometry& g, const scalar_t* src, const PaddedLayout& pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = g.batch, C = g.channels, H = g.height, W = g.width;
  std::vector<V> out(B * pad.cells(), V{});
  // Grain: about 32K elements per chunk, so a small batch copies inline without waking threads.
  at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / (H * W)), [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const scalar_t* plane = src + b * g.in_stride[0] + c * g.in_stride[1];
      V* dst = out.data() + b * pad.cells() + c / kLanes;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          dst[pad.at(x, y)][c % kLanes] = static_cast<acc_t>(plane[y * g.in_stride[2] + x * g.in_stride[3]]);
        }
      }
    }
  });
  return out;
}

template <typename scalar_t, typename kp_t>
void sparse_forward_kernel(const MotionGeometry& g, double variance, const scalar_t* src, const kp_t* kps,
                           const kp_t* jacs, const kp_t* kpd, const kp_t* jacd,
                           scalar_t* out /* contiguous (B,(K+1)(C+1),H,W) */) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = g.batch, K = g.keypoints, C = g.channels, H = g.height, W = g.width, HW = H * W;
  const auto params = gather_keypoints<kp_t, acc_t>(g, kps, jacs, kpd, jacd);
  const auto affine = affines_of(params);
  const auto zx = axis_coordinates<acc_t>(W), zy = axis_coordinates<acc_t>(H);
  const auto gauss = gaussian_tables(params, zx, zy, static_cast<acc_t>(variance));
  const Affine<acc_t> identity{{acc_t(1), acc_t(0), acc_t(0), acc_t(1)}, {acc_t(0), acc_t(0)}};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (K + 1) * W * (C + 2)));
  using V = lanes_t<acc_t>;
  const int64_t G = std::max<int64_t>(1, (C + kLanes - 1) / kLanes);  // lane groups per pixel
  const PaddedLayout pad{H + 5, W + 5, G};
  const int64_t down = pad.width * G;  // vector distance from a tap to the one below it
  // Channels-last, zero-bordered source: a tap is one vector load and needs no bounds test.
  const auto src_pad = padded_source<scalar_t, V>(g, src, pad);
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    RowTaps<acc_t> taps(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, y = task % H;
      const acc_t z_y = zy[y];
      const V* sp = src_pad.data() + b * pad.cells();
      for (int64_t k = 0; k <= K; ++k) {
        scalar_t* heat = out + (b * (K + 1) + k) * (C + 1) * HW + y * W;
        if (k == 0) {
          std::fill(heat, heat + W, scalar_t(0));
        } else {
          const acc_t* t = gauss.of(b * K + k - 1);
          const acc_t gyd = t[2 * W + y], gys = t[2 * W + H + y];
          for (int64_t x = 0; x < W; ++x) heat[x] = static_cast<scalar_t>(t[x] * gyd - t[W + x] * gys);
        }
        taps.compute(k == 0 ? identity : affine[b * K + k - 1], zx.data(), z_y, H, W);
        for (int64_t x = 0; x < W; ++x) {
          const acc_t fx = taps.fx[x], fy = taps.fy[x], ex = taps.ex[x], ey = taps.ey[x];
          const acc_t w_nw = ex * ey, w_ne = fx * ey, w_sw = ex * fy, w_se = fx * fy;
          const V* s = sp + pad.at(taps.x0[x], taps.y0[x]);
          for (int64_t j = 0; j < G; ++j) {
            // The tap order of the scalar sum over valid taps; an out-of-image tap adds an exact 0.
            const V v = ((w_nw * s[j] + w_ne * s[G + j]) + w_sw * s[down + j]) + w_se * s[down + G + j];
            for (int64_t c = j * kLanes; c < std::min(C, (j + 1) * kLanes); ++c) {
              heat[(1 + c) * HW + x] = static_cast<scalar_t>(v[c - j * kLanes]);
            }
          }
        }
      }
    }
  });
}

// Backward. Task (b, tile of rows) computes every keypoint's taps of its rows once and uses them for
// both the coordinate gradient (gather from a padded channels-last copy of the source) and the source
// gradient (scatter into the task's private padded buffer). The buffers of an image's tiles and the
// tasks' keypoint sums are reduced in tile order afterwards; the tiling depends only on the shapes,
// so the result does not depend on the thread count.
template <typename scalar_t, typename kp_t>
void sparse_backward_kernel(const MotionGeometry& g, double variance, const scalar_t* grad, const scalar_t* src,
                            const kp_t* kps, const kp_t* jacs, const kp_t* kpd, const kp_t* jacd,
                            at::Tensor& grad_source, std::array<kp_t*, 4> kp_out /* kps, jacs, kpd, jacd */) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = lanes_t<acc_t>;
  const int64_t B = g.batch, K = g.keypoints, C = g.channels, H = g.height, W = g.width, HW = H * W;
  const bool want_source = grad_source.defined();
  const bool want_kp = kp_out[0] || kp_out[1] || kp_out[2] || kp_out[3];
  const auto params = gather_keypoints<kp_t, acc_t>(g, kps, jacs, kpd, jacd);
  const auto affine = affines_of(params);
  const auto zx = axis_coordinates<acc_t>(W), zy = axis_coordinates<acc_t>(H);
  const acc_t var = static_cast<acc_t>(variance);
  GaussianTables<acc_t> gauss{H, W, {}};
  if (want_kp) gauss = gaussian_tables(params, zx, zy, var);
  const Affine<acc_t> identity{{acc_t(1), acc_t(0), acc_t(0), acc_t(1)}, {acc_t(0), acc_t(0)}};
  const acc_t sx = warp::grid_coord_scale<acc_t>(W), sy = warp::grid_coord_scale<acc_t>(H);
  const RowTiling tiling = row_tiling(B, H);
  const int64_t T = tiling.tiles;
  // Lane groups per pixel; at least one, so C = 0 still has valid (all-zero) buffers to point into.
  const int64_t G = std::max<int64_t>(1, (C + kLanes - 1) / kLanes);
  const PaddedLayout pad{H + 5, W + 5, G};
  const int64_t down = pad.width * G;  // vector distance from a tap to the one below it

  // Padded source for the coordinate gradient (the source gradient alone needs no source values).
  std::vector<V> src_pad;
  if (want_kp) src_pad = padded_source<scalar_t, V>(g, src, pad);
  // Tile partials of the source gradient (B,T,C,H,W), only when an image has several tiles; a single
  // tile writes grad_source directly.
  at::Tensor partial;
  acc_t* partial_data = nullptr;
  if (want_source && T > 1) {
    partial = at::empty({B, T, C, H, W}, grad_source.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    partial_data = partial.mutable_data_ptr<acc_t>();
  }
  scalar_t* gs_out = want_source ? grad_source.mutable_data_ptr<scalar_t>() : nullptr;
  // Keypoint sums in double whatever the dtype: a 64x64 sum in float would cost ~1e-6 relative.
  std::vector<double> sums(want_kp ? B * T * K * motion::kSparseSums : 0, 0.0);

  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> acc(want_source ? pad.cells() : 0);
    std::vector<V> gv(W * G, V{});  // channel gradients of one (keypoint, row), lanes past C stay 0
    std::vector<acc_t> gh(W);  // heat gradient of one (keypoint, row)
    RowTaps<acc_t> taps(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / T, tile = task % T;
      const int64_t y0 = tile * tiling.rows, y1 = std::min(H, y0 + tiling.rows);
      const scalar_t* grad_b = grad + b * g.grad_stride[0];
      const V* sp = want_kp ? src_pad.data() + b * pad.cells() : nullptr;
      double* task_sums = want_kp ? sums.data() + task * K * motion::kSparseSums : nullptr;
      std::fill(acc.begin(), acc.end(), V{});
      // Keypoint-major: each gradient plane is then read as one stream over the tile's rows.
      for (int64_t k = 0; k <= K; ++k) {
        if (k == 0 && !want_source) continue;  // T_0 has no parameters
        const bool kp_row = k > 0 && want_kp;
        for (int64_t y = y0; y < y1; ++y) {
          const acc_t z_y = zy[y];
          taps.compute(k == 0 ? identity : affine[b * K + k - 1], zx.data(), z_y, H, W);
          const scalar_t* gk = grad_b + k * (C + 1) * g.grad_stride[1] + y * g.grad_stride[2];
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* gc = gk + (1 + c) * g.grad_stride[1];
            V* dst = gv.data() + c / kLanes;
            for (int64_t x = 0; x < W; ++x) dst[x * G][c % kLanes] = static_cast<acc_t>(gc[x * g.grad_stride[3]]);
          }
          // Coordinate-gradient sums of the row, per channel lane: sum_x g_ix zx, sum_x g_ix, same for iy.
          V s_gx_z{}, s_gx{}, s_gy_z{}, s_gy{};
          for (int64_t x = 0; x < W; ++x) {
            const acc_t fx = taps.fx[x], fy = taps.fy[x], ex = taps.ex[x], ey = taps.ey[x];
            const int64_t nw = pad.at(taps.x0[x], taps.y0[x]);
            const V* gx = gv.data() + x * G;
            if (kp_row) {
              // d(sample)/d(ix, iy), as warp::accumulate_coord_grad, for all channels at once.
              const acc_t north = acc_t(1) - fy, west = acc_t(1) - fx;
              const V* s = sp + nw;
              V dx{}, dy{};
              for (int64_t j = 0; j < G; ++j) {
                const V v_nw = s[j], v_ne = s[G + j], v_sw = s[down + j], v_se = s[down + G + j];
                dx += ((v_ne - v_nw) * north + (v_se - v_sw) * fy) * gx[j];
                dy += ((v_sw - v_nw) * west + (v_se - v_ne) * fx) * gx[j];
              }
              s_gx_z += dx * zx[x];
              s_gx += dx;
              s_gy_z += dy * zx[x];
              s_gy += dy;
            }
            if (want_source) {
              V* a = acc.data() + nw;
              const acc_t w_nw = ex * ey, w_ne = fx * ey, w_sw = ex * fy, w_se = fx * fy;
              for (int64_t j = 0; j < G; ++j) {
                const V gj = gx[j];
                a[j] += w_nw * gj;
                a[G + j] += w_ne * gj;
                a[down + j] += w_sw * gj;
                a[down + G + j] += w_se * gj;
              }
            }
          }
          if (kp_row) {
            const acc_t* gt = gauss.of(b * K + k - 1);
            const KeypointParams<acc_t>& p = params[b * K + k - 1];
            const acc_t gyd = gt[2 * W + y], gys = gt[2 * W + H + y];
            for (int64_t x = 0; x < W; ++x) gh[x] = static_cast<acc_t>(gk[x * g.grad_stride[3]]);
            // The row's pixel sums of accumulate_affine_grad / accumulate_heat_grad with the factors
            // constant along the row (z_y, the grid scales, the y Gaussians) pulled out; the heat
            // terms in four lanes along x.
            V s_hd_z{}, s_hd{}, s_hs_z{}, s_hs{};
            for (int64_t x = 0; x < W; x += kLanes) {
              const int64_t n = std::min<int64_t>(kLanes, W - x);
              V z, h, td, ts;
              load_lanes(z, zx.data() + x, n);
              load_lanes(h, gh.data() + x, n);
              load_lanes(td, gt + x, n);
              load_lanes(ts, gt + W + x, n);
              const V hd = h * td, hs = h * ts;
              s_hd_z += hd * (z - p.kd[0]);
              s_hd += hd;
              s_hs_z += hs * (z - p.ks[0]);
              s_hs += hs;
            }
            const double dsx = sx, dsy = sy, dzy = z_y, dgyd = gyd, dgys = gys;
            double* s = task_sums + (k - 1) * motion::kSparseSums;
            s[motion::kSumA00] += dsx * lane_sum(s_gx_z);
            s[motion::kSumA01] += dsx * lane_sum(s_gx) * dzy;
            s[motion::kSumA10] += dsy * lane_sum(s_gy_z);
            s[motion::kSumA11] += dsy * lane_sum(s_gy) * dzy;
            s[motion::kSumB0] += dsx * lane_sum(s_gx);
            s[motion::kSumB1] += dsy * lane_sum(s_gy);
            s[motion::kSumHeatD0] += dgyd * lane_sum(s_hd_z);
            s[motion::kSumHeatD1] += dgyd * lane_sum(s_hd) * (dzy - p.kd[1]);
            s[motion::kSumHeatS0] += dgys * lane_sum(s_hs_z);
            s[motion::kSumHeatS1] += dgys * lane_sum(s_hs) * (dzy - p.ks[1]);
          }
        }
      }
      if (want_source) {
        // The task's buffer without its border: straight to grad_source or to its tile slot.
        for (int64_t c = 0; c < C; ++c) {
          const V* a = acc.data() + c / kLanes;
          for (int64_t y = 0; y < H; ++y) {
            if (T > 1) {
              acc_t* dst = partial_data + ((task * C + c) * H + y) * W;
              for (int64_t x = 0; x < W; ++x) dst[x] = a[pad.at(x, y)][c % kLanes];
            } else {
              scalar_t* dst = gs_out + ((b * C + c) * H + y) * W;
              for (int64_t x = 0; x < W; ++x) dst[x] = to_output<scalar_t>(a[pad.at(x, y)][c % kLanes]);
            }
          }
        }
      }
    }
  });

  if (want_source && T > 1) {
    // Sum the tile partials in tile order, in chunks of one image so that each tile is read as one
    // sequential stream (an element-by-element walk across the tiles is latency-bound).
    const int64_t plane = C * HW, chunk = 2048;
    const int64_t chunks = (plane + chunk - 1) / chunk;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> v(chunk);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / chunks, e0 = (i % chunks) * chunk, n = std::min(chunk, plane - e0);
        const acc_t* base = partial_data + b * T * plane + e0;
        std::copy(base, base + n, v.begin());
        for (int64_t t = 1; t < T; ++t) {
          const acc_t* tile = base + t * plane;
          for (int64_t e = 0; e < n; ++e) v[e] += tile[e];
        }
        scalar_t* out = gs_out + b * plane + e0;
        for (int64_t e = 0; e < n; ++e) out[e] = to_output<scalar_t>(v[e]);
      }
    });
  }
  if (want_kp) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        double total[motion::kSparseSums] = {};
        for (int64_t t = 0; t < T; ++t) {
          const double* s = sums.data() + ((b * T + t) * K + k) * motion::kSparseSums;
          for (int i = 0; i < motion::kSparseSums; ++i) total[i] += s[i];
        }
        acc_t g_kps[2] = {}, g_jacs[4] = {}, g_kpd[2] = {}, g_jacd[4] = {};
        motion::keypoint_grads_from_sums(params[b * K + k], total, true, var, g_kps, g_jacs, g_kpd, g_jacd);
        const int64_t bk = b * K + k;
        for (int i = 0; i < 2; ++i) {
          if (kp_out[0]) kp_out[0][bk * 2 + i] = to_output<kp_t>(g_kps[i]);
          if (kp_out[2]) kp_out[2][bk * 2 + i] = to_output<kp_t>(g_kpd[i]);
        }
        for (int i = 0; i < 4; ++i) {
          if (kp_out[1]) kp_out[1][bk * 4 + i] = to_output<kp_t>(g_jacs[i]);
          if (kp_out[3]) kp_out[3][bk * 4 + i] = to_output<kp_t>(g_jacd[i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------- dense_motion
template <typename scalar_t, typename kp_t>
void dense_forward_kernel(const MotionGeometry& g, const scalar_t* logits, const kp_t* kps, const kp_t* jacs,
                          const kp_t* kpd, const kp_t* jacd, scalar_t* deformation /* (B,H,W,2) */,
                          scalar_t* mask /* (B,K+1,H,W) */) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = g.batch, K = g.keypoints, H = g.height, W = g.width, HW = H * W;
  const auto params = gather_keypoints<kp_t, acc_t>(g, kps, jacs, kpd, jacd);
  const auto affine = affines_of(params);
  const auto zx = axis_coordinates<acc_t>(W), zy = axis_coordinates<acc_t>(H);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (K + 1) * W));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e((K + 1) * W), top(W), total(W), dx(W), dy(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, y = task % H;
      const scalar_t* lrow = logits + b * g.in_stride[0] + y * g.in_stride[2];
      std::fill(top.begin(), top.end(), -std::numeric_limits<acc_t>::infinity());
      for (int64_t k = 0; k <= K; ++k) {
        for (int64_t x = 0; x < W; ++x) {
          const acc_t v = static_cast<acc_t>(lrow[k * g.in_stride[1] + x * g.in_stride[3]]);
          e[k * W + x] = v;
          top[x] = std::max(top[x], v);
        }
      }
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t k = 0; k <= K; ++k) {
        for (int64_t x = 0; x < W; ++x) {
          const acc_t v = motion::exp_t(e[k * W + x] - top[x]);
          e[k * W + x] = v;
          total[x] += v;
        }
      }
      std::fill(dx.begin(), dx.end(), acc_t(0));
      std::fill(dy.begin(), dy.end(), acc_t(0));
      for (int64_t k = 0; k <= K; ++k) {
        scalar_t* mrow = mask + (b * (K + 1) + k) * HW + y * W;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t m = e[k * W + x] / total[x];
          mrow[x] = static_cast<scalar_t>(m);
          acc_t mx = zx[x], my = zy[y];
          if (k > 0) motion::apply_affine(affine[b * K + k - 1], zx[x], zy[y], mx, my);
          dx[x] += m * mx;
          dy[x] += m * my;
        }
      }
      scalar_t* drow = deformation + (b * H + y) * W * 2;
      for (int64_t x = 0; x < W; ++x) {
        drow[2 * x] = to_output<scalar_t>(dx[x]);
        drow[2 * x + 1] = to_output<scalar_t>(dy[x]);
      }
    }
  });
}

template <typename scalar_t, typename kp_t>
void dense_backward_kernel(const MotionGeometry& g, const scalar_t* grad_def, const scalar_t* grad_mask,
                           const scalar_t* logits, const kp_t* kps, const kp_t* jacs, const kp_t* kpd,
                           const kp_t* jacd, scalar_t* grad_logits /* (B,K+1,H,W) or null */,
                           std::array<kp_t*, 4> kp_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = g.batch, K = g.keypoints, H = g.height, W = g.width, HW = H * W;
  const bool want_kp = kp_out[0] || kp_out[1] || kp_out[2] || kp_out[3];
  const auto params = gather_keypoints<kp_t, acc_t>(g, kps, jacs, kpd, jacd);
  const auto affine = affines_of(params);
  const auto zx = axis_coordinates<acc_t>(W), zy = axis_coordinates<acc_t>(H);
  const RowTiling tiling = row_tiling(B, H);
  const int64_t T = tiling.tiles;
  std::vector<double> sums(want_kp ? B * T * K * motion::kDenseSums : 0, 0.0);
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m((K + 1) * W), gm(grad_logits ? (K + 1) * W : 0), top(W), total(W), wsum(W), gdx(W), gdy(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / T, tile = task % T;
      const int64_t y0 = tile * tiling.rows, y1 = std::min(H, y0 + tiling.rows);
      double* task_sums = want_kp ? sums.data() + task * K * motion::kDenseSums : nullptr;
      for (int64_t y = y0; y < y1; ++y) {
        const scalar_t* lrow = logits + b * g.in_stride[0] + y * g.in_stride[2];
        const scalar_t* gmrow = grad_mask + b * g.grad_stride[0] + y * g.grad_stride[2];
        const scalar_t* gdrow = grad_def + b * g.gdef_stride[0] + y * g.gdef_stride[1];
        std::fill(top.begin(), top.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t k = 0; k <= K; ++k) {
          for (int64_t x = 0; x < W; ++x) {
            const acc_t v = static_cast<acc_t>(lrow[k * g.in_stride[1] + x * g.in_stride[3]]);
            m[k * W + x] = v;
            top[x] = std::max(top[x], v);
          }
        }
        std::fill(total.begin(), total.end(), acc_t(0));
        for (int64_t k = 0; k <= K; ++k) {
          for (int64_t x = 0; x < W; ++x) {
            const acc_t v = motion::exp_t(m[k * W + x] - top[x]);
            m[k * W + x] = v;
            total[x] += v;
          }
        }
        for (int64_t x = 0; x < W; ++x) {
          gdx[x] = static_cast<acc_t>(gdrow[x * g.gdef_stride[2]]);
          gdy[x] = static_cast<acc_t>(gdrow[x * g.gdef_stride[2] + g.gdef_stride[3]]);
        }
        for (int64_t k = 0; k <= K; ++k) {
          for (int64_t x = 0; x < W; ++x) m[k * W + x] /= total[x];
        }
        if (grad_logits) {
          // gm_k = grad_mask_k + gd . T_k(z); grad_logit_k = m_k (gm_k - sum_j m_j gm_j). gm_k is
          // computed once per row into a buffer: the second pass then streams contiguous values.
          std::fill(wsum.begin(), wsum.end(), acc_t(0));
          for (int64_t k = 0; k <= K; ++k) {
            acc_t* gmk = gm.data() + k * W;
            for (int64_t x = 0; x < W; ++x) {
              acc_t mx = zx[x], my = zy[y];
              if (k > 0) motion::apply_affine(affine[b * K + k - 1], zx[x], zy[y], mx, my);
              gmk[x] = static_cast<acc_t>(gmrow[k * g.grad_stride[1] + x * g.grad_stride[3]]) + (gdx[x] * mx + gdy[x] * my);
              wsum[x] += m[k * W + x] * gmk[x];
            }
          }
          for (int64_t k = 0; k <= K; ++k) {
            scalar_t* out = grad_logits + (b * (K + 1) + k) * HW + y * W;
            const acc_t* gmk = gm.data() + k * W;
            for (int64_t x = 0; x < W; ++x) out[x] = to_output<scalar_t>(motion::softmax_grad(m[k * W + x], gmk[x], wsum[x]));
          }
        }
        if (task_sums) {
          for (int64_t k = 1; k <= K; ++k) {
            double* s = task_sums + (k - 1) * motion::kDenseSums;
            acc_t row[motion::kDenseSums] = {};  // row sums, added to the double sums once per row
            for (int64_t x = 0; x < W; ++x) {
              const acc_t w = m[k * W + x];
              motion::accumulate_affine_grad(row, w * gdx[x], w * gdy[x], zx[x], zy[y]);
            }
            for (int i = 0; i < motion::kDenseSums; ++i) s[i] += static_cast<double>(row[i]);
          }
        }
      }
    }
  });
  if (want_kp) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        double total[motion::kDenseSums] = {};
        for (int64_t t = 0; t < T; ++t) {
          const double* s = sums.data() + ((b * T + t) * K + k) * motion::kDenseSums;
          for (int i = 0; i < motion::kDenseSums; ++i) total[i] += s[i];
        }
        acc_t g_kps[2] = {}, g_jacs[4] = {}, g_kpd[2] = {}, g_jacd[4] = {};
        motion::keypoint_grads_from_sums(params[b * K + k], total, false, acc_t(1), g_kps, g_jacs, g_kpd, g_jacd);
        const int64_t bk = b * K + k;
        for (int i = 0; i < 2; ++i) {
          if (kp_out[0]) kp_out[0][bk * 2 + i] = to_output<kp_t>(g_kps[i]);
          if (kp_out[2]) kp_out[2][bk * 2 + i] = to_output<kp_t>(g_kpd[i]);
        }
        for (int i = 0; i < 4; ++i) {
          if (kp_out[1]) kp_out[1][bk * 4 + i] = to_output<kp_t>(g_jacs[i]);
          if (kp_out[3]) kp_out[3][bk * 4 + i] = to_output<kp_t>(g_jacd[i]);
        }
      }
    }
  }
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// The four keypoint-gradient outputs: fresh contiguous tensors where asked for (and the Jacobian is
// present), distinct empty tensors elsewhere (custom-op outputs may not alias).
std::array<at::Tensor, 4> keypoint_grad_outputs(const at::Tensor& kp_source,
                                                const c10::optional<at::Tensor>& jac_source,
                                                const c10::optional<at::Tensor>& jac_driving,
                                                const std::array<bool, 5>& mask) {
  const int64_t B = kp_source.size(0), K = kp_source.size(1);
  const auto opts = kp_source.options();
  const bool want[4] = {mask[1], mask[2] && jac_source.has_value(), mask[3], mask[4] && jac_driving.has_value()};
  std::array<at::Tensor, 4> out;
  for (int i = 0; i < 4; ++i) {
    if (!want[i]) {
      out[i] = at::empty({0}, opts);
    } else {
      out[i] = i % 2 == 0 ? at::empty({B, K, 2}, opts) : at::empty({B, K, 2, 2}, opts);
      poison(out[i]);
    }
  }
  return out;
}

template <typename scalar_t>
std::array<scalar_t*, 4> kp_pointers(std::array<at::Tensor, 4>& grads) {
  std::array<scalar_t*, 4> p{};
  for (int i = 0; i < 4; ++i) p[i] = grads[i].numel() > 0 ? grads[i].mutable_data_ptr<scalar_t>() : nullptr;
  return p;
}

// Runs fn.template operator()<kp_t>() with kp_t the keypoints' C++ type: scalar_t itself, or float
// for float32 keypoints with a float16/bfloat16 image (the checks allow no other combination).
template <typename scalar_t, typename Fn>
void with_keypoint_type(const at::Tensor& kp_source, Fn&& fn) {
  if (kp_source.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    fn.template operator()<scalar_t>();
  } else if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    TORCH_INTERNAL_ASSERT(kp_source.scalar_type() == at::kFloat);
    fn.template operator()<float>();
  } else {
    TORCH_INTERNAL_ASSERT(false, "keypoint dtype ", kp_source.scalar_type(), " passed the checks");
  }
}

}  // namespace

at::Tensor sparse_motion_inputs_forward(const at::Tensor& source, const at::Tensor& kp_source,
                                        const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
                                        const c10::optional<at::Tensor>& jac_driving, double variance) {
  const int64_t K = check_sparse_args(source, kp_source, jac_source, kp_driving, jac_driving, variance, true);
  const int64_t B = source.size(0), C = source.size(1), H = source.size(2), W = source.size(3);
  auto out = at::empty({B, (K + 1) * (C + 1), H, W}, source.options());
  if (out.numel() == 0) return out;
  poison(out);
  const auto g = make_motion_geometry(source, kp_source, jac_source, kp_driving, jac_driving, nullptr, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), "sparse_motion_inputs_fwd_cpu", [&] {
    with_keypoint_type<scalar_t>(kp_source, [&]<typename kp_t>() {
      sparse_forward_kernel<scalar_t, kp_t>(g, variance, source.const_data_ptr<scalar_t>(),
                                            kp_source.const_data_ptr<kp_t>(), ptr_or_null<kp_t>(jac_source),
                                            kp_driving.const_data_ptr<kp_t>(), ptr_or_null<kp_t>(jac_driving),
                                            out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_motion_inputs_backward(
    const at::Tensor& grad, const at::Tensor& source, const at::Tensor& kp_source,
    const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
    const c10::optional<at::Tensor>& jac_driving, double variance, std::array<bool, 5> output_mask) {
  const int64_t K = check_sparse_args(source, kp_source, jac_source, kp_driving, jac_driving, variance, true);
  const int64_t B = source.size(0), C = source.size(1), H = source.size(2), W = source.size(3);
  check_grad_shape("sparse_motion_inputs backward: grad", grad, {B, (K + 1) * (C + 1), H, W}, source);
  at::Tensor grad_source = output_mask[0] ? at::empty(source.sizes(), source.options()) : at::empty({0}, source.options());
  poison(grad_source);
  auto kp_grads = keypoint_grad_outputs(kp_source, jac_source, jac_driving, output_mask);
  const bool want_kp = kp_grads[0].numel() + kp_grads[1].numel() + kp_grads[2].numel() + kp_grads[3].numel() > 0;
  if (output_mask[0] || want_kp) {
    const auto g = make_motion_geometry(source, kp_source, jac_source, kp_driving, jac_driving, &grad, nullptr);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), "sparse_motion_inputs_bwd_cpu", [&] {
      at::Tensor gs = output_mask[0] ? grad_source : at::Tensor();
      with_keypoint_type<scalar_t>(kp_source, [&]<typename kp_t>() {
        sparse_backward_kernel<scalar_t, kp_t>(g, variance, grad.const_data_ptr<scalar_t>(),
                                               source.const_data_ptr<scalar_t>(), kp_source.const_data_ptr<kp_t>(),
                                               ptr_or_null<kp_t>(jac_source), kp_driving.const_data_ptr<kp_t>(),
                                               ptr_or_null<kp_t>(jac_driving), gs, kp_pointers<kp_t>(kp_grads));
      });
    });
  }
  return {grad_source, kp_grads[0], kp_grads[1], kp_grads[2], kp_grads[3]};
}

std::tuple<at::Tensor, at::Tensor> dense_motion_forward(const at::Tensor& mask_logits, const at::Tensor& kp_source,
                                                        const c10::optional<at::Tensor>& jac_source,
                                                        const at::Tensor& kp_driving,
                                                        const c10::optional<at::Tensor>& jac_driving) {
  check_dense_args(mask_logits, kp_source, jac_source, kp_driving, jac_driving, true);
  const int64_t B = mask_logits.size(0), H = mask_logits.size(2), W = mask_logits.size(3);
  auto deformation = at::empty({B, H, W, 2}, mask_logits.options());
  auto mask = at::empty(mask_logits.sizes(), mask_logits.options());
  if (mask.numel() == 0) return {deformation, mask};
  poison(deformation);
  poison(mask);
  const auto g = make_motion_geometry(mask_logits, kp_source, jac_source, kp_driving, jac_driving, nullptr, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_logits.scalar_type(), "dense_motion_fwd_cpu", [&] {
    with_keypoint_type<scalar_t>(kp_source, [&]<typename kp_t>() {
      dense_forward_kernel<scalar_t, kp_t>(g, mask_logits.const_data_ptr<scalar_t>(), kp_source.const_data_ptr<kp_t>(),
                                           ptr_or_null<kp_t>(jac_source), kp_driving.const_data_ptr<kp_t>(),
                                           ptr_or_null<kp_t>(jac_driving), deformation.mutable_data_ptr<scalar_t>(),
                                           mask.mutable_data_ptr<scalar_t>());
    });
  });
  return {deformation, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_motion_backward(
    const at::Tensor& grad_deformation, const at::Tensor& grad_mask, const at::Tensor& mask_logits,
    const at::Tensor& kp_source, const c10::optional<at::Tensor>& jac_source, const at::Tensor& kp_driving,
    const c10::optional<at::Tensor>& jac_driving, std::array<bool, 5> output_mask) {
  check_dense_args(mask_logits, kp_source, jac_source, kp_driving, jac_driving, true);
  const int64_t B = mask_logits.size(0), H = mask_logits.size(2), W = mask_logits.size(3);
  check_grad_shape("dense_motion backward: grad_deformation", grad_deformation, {B, H, W, 2}, mask_logits);
  check_grad_shape("dense_motion backward: grad_mask", grad_mask, mask_logits.sizes(), mask_logits);
  at::Tensor grad_logits =
      output_mask[0] ? at::empty(mask_logits.sizes(), mask_logits.options()) : at::empty({0}, mask_logits.options());
  poison(grad_logits);
  auto kp_grads = keypoint_grad_outputs(kp_source, jac_source, jac_driving, output_mask);
  const bool want_kp = kp_grads[0].numel() + kp_grads[1].numel() + kp_grads[2].numel() + kp_grads[3].numel() > 0;
  if ((output_mask[0] && grad_logits.numel() > 0) || want_kp) {
    const auto g = make_motion_geometry(mask_logits, kp_source, jac_source, kp_driving, jac_driving, &grad_mask,
                                        &grad_deformation);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_logits.scalar_type(), "dense_motion_bwd_cpu", [&] {
      with_keypoint_type<scalar_t>(kp_source, [&]<typename kp_t>() {
        dense_backward_kernel<scalar_t, kp_t>(
            g, grad_deformation.const_data_ptr<scalar_t>(), grad_mask.const_data_ptr<scalar_t>(),
            mask_logits.const_data_ptr<scalar_t>(), kp_source.const_data_ptr<kp_t>(), ptr_or_null<kp_t>(jac_source),
            kp_driving.const_data_ptr<kp_t>(), ptr_or_null<kp_t>(jac_driving),
            output_mask[0] && grad_logits.numel() > 0 ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr,
            kp_pointers<kp_t>(kp_grads));
      });
    });
  }
  return {grad_logits, kp_grads[0], kp_grads[1], kp_grads[2], kp_grads[3]};
}

}  // namespace cpu
}  // namespace dagan_fast
