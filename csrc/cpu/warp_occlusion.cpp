// CPU kernels of dagan_fast::warp_occlusion_fwd / _bwd: grid_sample(bilinear, zeros,
// align_corners=False) times an optional occlusion map; any input strides, deterministic.
//
// One definition, several implementations of the same numerics:
//  * generic (any dtype, any CPU): output pixels in row tiles of kTile pixels; the taps of a tile
//    are computed once (warp::bilinear_taps), then every channel runs a loop over the tile. It is
//    the definition the vector paths reproduce (same float32 operations in the same order).
//  * vector paths, chosen at run time by capability() (DAGAN_FAST_CPU_CAPABILITY / ATEN_CPU_CAPABILITY):
//    the taps of 8 pixels at a time in AVX2 registers (same IEEE operations, same bits); planar
//    inputs read each pixel's two tap rows as two "row pairs" clamped inside the plane, channels_last
//    inputs read 8 (AVX2) or 16 (AVX-512) contiguous channels per tap and transpose 8x8 blocks into
//    the planar output; inputs whose planes exceed L2 are processed in channel blocks over a
//    per-image taps table, so each plane is fetched about once. float32 and bfloat16 (read as
//    bfloat16, summed in float32, rounded once) share the scheduling; the avx512 level runs the
//    channels_last forward tiles (float32, bfloat16) and bfloat16 row pairs 16 lanes wide. The backward is the AVX2 float32 code;
//    bfloat16 runs it on exact float32 copies.
// Both backward passes are race-free: the grid/occlusion gradients are per-pixel sums over
// channels, and each task owns whole planes (or fixed pixel segments, summed in a fixed order) of
// the input gradient.
#include "warp_occlusion.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../common/warp_math.h"
#include "../op_support.h"
#include "../warp_checks.h"
#include "capability.h"

namespace dagan_fast {
namespace cpu {
namespace {

using warp::WarpGeometry;

constexpr int64_t kTile = 64;

template <typename acc_t>
struct TapTile {
  int64_t count = 0;
  bool all_valid = true;
  int64_t offset[4][kTile];
  acc_t weight[4][kTile];
  bool valid[4][kTile];
  acc_t frac_x[kTile], frac_y[kTile];
  acc_t occlusion[kTile];
};

// Taps of output pixels (b, y, x0 .. x0+count-1) for a plane with strides (stride_h, stride_w).
template <typename scalar_t, typename acc_t>
void fill_tile(TapTile<acc_t>& t, const WarpGeometry& g, const scalar_t* grid, const scalar_t* occ, int64_t b,
               int64_t y, int64_t x0, int64_t count, int64_t stride_h, int64_t stride_w) {
  t.count = count;
  t.all_valid = true;
  const scalar_t* gp = grid + b * g.grid_stride[0] + y * g.grid_stride[1];
  const scalar_t* op = occ ? occ + b * g.occ_stride[0] + y * g.occ_stride[2] : nullptr;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t x = x0 + i;
    const auto taps = warp::bilinear_taps<acc_t>(static_cast<acc_t>(gp[x * g.grid_stride[2]]),
                                                 static_cast<acc_t>(gp[x * g.grid_stride[2] + g.grid_stride[3]]),
                                                 g.in_h, g.in_w, stride_h, stride_w);
    for (int k = 0; k < 4; ++k) {
      t.offset[k][i] = taps.offset[k];
      t.weight[k][i] = taps.weight[k];
      t.valid[k][i] = taps.valid[k];
      t.all_valid = t.all_valid && taps.valid[k];
    }
    t.frac_x[i] = taps.frac_x;
    t.frac_y[i] = taps.frac_y;
    t.occlusion[i] = op ? static_cast<acc_t>(op[x * g.occ_stride[3]]) : acc_t(1);
  }
}

// The four tap values of tile pixel i in one input plane; invalid taps read as zero (never loaded
// through a weight of zero, so inf in the input cannot become NaN).
template <typename scalar_t, typename acc_t>
inline void tap_values(const TapTile<acc_t>& t, const scalar_t* plane, int64_t i, acc_t v[4]) {
  for (int k = 0; k < 4; ++k) v[k] = t.valid[k][i] ? static_cast<acc_t>(plane[t.offset[k][i]]) : acc_t(0);
}

// Runs fn(tile, b, y, x0) over every row tile of output pixels, in parallel; the tile's taps are
// filled for the input's strides before each call.
template <typename scalar_t, typename acc_t, typename Fn>
void parallel_over_tiles(const WarpGeometry& g, const scalar_t* grid, const scalar_t* occ, Fn&& fn) {
  const int64_t tiles_per_row = (g.out_w + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.channels * kTile));
  at::parallel_for(0, g.batch * g.out_h * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    TapTile<acc_t> t;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (g.out_h * tiles_per_row);
      const int64_t y = (task / tiles_per_row) % g.out_h;
      const int64_t x0 = (task % tiles_per_row) * kTile;
      fill_tile<scalar_t, acc_t>(t, g, grid, occ, b, y, x0, std::min(kTile, g.out_w - x0), g.in_stride[2],
                                 g.in_stride[3]);
      fn(t, b, y, x0);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const WarpGeometry& g, const scalar_t* input, const scalar_t* grid, const scalar_t* occ,
                    scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_over_tiles<scalar_t, acc_t>(g, grid, occ, [&](const TapTile<acc_t>& t, int64_t b, int64_t y, int64_t x0) {
    const int64_t n = t.count;
    const scalar_t* in_b = input + b * g.in_stride[0];
    scalar_t* out_row = out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3];
    for (int64_t c = 0; c < g.channels; ++c) {
      const scalar_t* plane = in_b + c * g.in_stride[1];
      scalar_t* o = out_row + c * g.out_stride[1];
      if (t.all_valid) {
        for (int64_t i = 0; i < n; ++i) {
          const acc_t s = t.weight[0][i] * static_cast<acc_t>(plane[t.offset[0][i]]) +
                          t.weight[1][i] * static_cast<acc_t>(plane[t.offset[1][i]]) +
                          t.weight[2][i] * static_cast<acc_t>(plane[t.offset[2][i]]) +
                          t.weight[3][i] * static_cast<acc_t>(plane[t.offset[3][i]]);
          o[i * g.out_stride[3]] = static_cast<scalar_t>(s * t.occlusion[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          acc_t v[4];
          tap_values(t, plane, i, v);
          const acc_t s = t.weight[0][i] * v[0] + t.weight[1][i] * v[1] + t.weight[2][i] * v[2] +
                          t.weight[3][i] * v[3];
          o[i * g.out_stride[3]] = static_cast<scalar_t>(s * t.occlusion[i]);
        }
      }
    }
  });
}

// Pass 1 of the backward: per output pixel, the grid and occlusion gradients (sums over channels).
template <typename scalar_t>
void grid_occlusion_grad_kernel(const WarpGeometry& g, const scalar_t* grad_out, const scalar_t* input,
                                const scalar_t* grid, const scalar_t* occ, scalar_t* grad_grid,
                                scalar_t* grad_occ) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sx = warp::grid_coord_scale<acc_t>(g.in_w), sy = warp::grid_coord_scale<acc_t>(g.in_h);
  parallel_over_tiles<scalar_t, acc_t>(g, grid, occ, [&](const TapTile<acc_t>& t, int64_t b, int64_t y, int64_t x0) {
    const int64_t n = t.count;
    acc_t gix[kTile], giy[kTile], gocc[kTile];
    std::fill(gix, gix + n, acc_t(0));
    std::fill(giy, giy + n, acc_t(0));
    std::fill(gocc, gocc + n, acc_t(0));
    const scalar_t* in_b = input + b * g.in_stride[0];
    const scalar_t* go_row = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3];
    for (int64_t c = 0; c < g.channels; ++c) {
      const scalar_t* plane = in_b + c * g.in_stride[1];
      const scalar_t* go = go_row + c * g.out_stride[1];
      for (int64_t i = 0; i < n; ++i) {
        acc_t v[4];
        tap_values(t, plane, i, v);
        const acc_t gv = static_cast<acc_t>(go[i * g.out_stride[3]]);
        gocc[i] += gv * (t.weight[0][i] * v[0] + t.weight[1][i] * v[1] + t.weight[2][i] * v[2] +
                         t.weight[3][i] * v[3]);
        const acc_t gs = gv * t.occlusion[i];
        const acc_t fx = t.frac_x[i], fy = t.frac_y[i];
        gix[i] += ((v[1] - v[0]) * (acc_t(1) - fy) + (v[3] - v[2]) * fy) * gs;
        giy[i] += ((v[2] - v[0]) * (acc_t(1) - fx) + (v[3] - v[1]) * fx) * gs;
      }
    }
    const int64_t pix = (b * g.out_h + y) * g.out_w + x0;  // gradient outputs are contiguous
    for (int64_t i = 0; i < n; ++i) {
      if (grad_grid) {
        grad_grid[2 * (pix + i)] = static_cast<scalar_t>(gix[i] * sx);
        grad_grid[2 * (pix + i) + 1] = static_cast<scalar_t>(giy[i] * sy);
      }
      if (grad_occ) grad_occ[pix + i] = static_cast<scalar_t>(gocc[i]);
    }
  });
}

// Pass 2: the input gradient. Each task owns whole (b, channel-block) planes of grad_input, so the
// scatter needs no atomics and every element sums in output-pixel order whatever the thread count:
// bitwise deterministic.
template <typename scalar_t, typename acc_t>
void input_grad_kernel(const WarpGeometry& g, const scalar_t* grad_out, const scalar_t* grid, const scalar_t* occ,
                       acc_t* grad_in /* zeroed, contiguous (B,C,Hi,Wi) */) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t batch = std::max<int64_t>(1, g.batch);
  const int64_t blocks_per_batch = std::max<int64_t>(1, std::min<int64_t>(g.channels, (threads * 4 + batch - 1) / batch));
  const int64_t block_c = (g.channels + blocks_per_batch - 1) / blocks_per_batch;
  const int64_t plane = g.in_h * g.in_w;
  const int64_t tiles_per_row = (g.out_w + kTile - 1) / kTile;
  at::parallel_for(0, g.batch * blocks_per_batch, 1, [&](int64_t begin, int64_t end) {
    TapTile<acc_t> t;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t c0 = (task % blocks_per_batch) * block_c;
      const int64_t c1 = std::min(g.channels, c0 + block_c);
      for (int64_t y = 0; y < g.out_h && c0 < c1; ++y) {
        for (int64_t tile = 0; tile < tiles_per_row; ++tile) {
          const int64_t x0 = tile * kTile, n = std::min(kTile, g.out_w - x0);
          fill_tile<scalar_t, acc_t>(t, g, grid, occ, b, y, x0, n, g.in_w, 1);
          const scalar_t* go_row = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3];
          for (int64_t c = c0; c < c1; ++c) {
            const scalar_t* go = go_row + c * g.out_stride[1];
            acc_t* gi = grad_in + (b * g.channels + c) * plane;
            for (int64_t i = 0; i < n; ++i) {
              const acc_t gs = static_cast<acc_t>(go[i * g.out_stride[3]]) * t.occlusion[i];
              for (int k = 0; k < 4; ++k) {
                if (t.valid[k][i]) gi[t.offset[k][i]] += t.weight[k][i] * gs;
              }
            }
          }
        }
      }
    }
  });
}

// grad_input is zeroed and contiguous. Half/bfloat16 accumulate in a float buffer, rounded once.
template <typename scalar_t>
void input_grad(const WarpGeometry& g, const scalar_t* grad_out, const scalar_t* grid, const scalar_t* occ,
                at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    input_grad_kernel<scalar_t, acc_t>(g, grad_out, grid, occ, grad_input.mutable_data_ptr<scalar_t>());
  } else {
    auto acc = at::zeros(grad_input.sizes(), grad_input.options().dtype(at::kFloat));
    input_grad_kernel<scalar_t, acc_t>(g, grad_out, grid, occ, acc.mutable_data_ptr<acc_t>());
    grad_input.copy_(acc);
  }
}


// ---------------------------------------------------------------------------------------------------
// float32 fast path for x86-64 CPUs with AVX2, chosen at run time (the library itself is built for
// baseline x86-64, so these functions carry their own target attribute and are only called after
// __builtin_cpu_supports("avx2")). Eight output pixels per vector: the tap math is the same sequence
// of IEEE operations as warp::bilinear_taps (no FMA contraction: "avx2" only, not "fma"), so the
// forward returns the same bits as the generic path above. Invalid taps never load: masked gathers
// and masked loads skip them, and row-pair lanes that hold no tap are masked to zero before they
// are weighted (no out-of-bounds read, no inf * 0).
#if defined(__x86_64__) && defined(__GNUC__)
#define DAGAN_WARP_HAVE_AVX2 1
#define DAGAN_AVX2 __attribute__((target("avx2")))

// Taps of up to kTile output pixels, padded to a multiple of 8 lanes with invalid taps.
struct alignas(32) TapsF32 {
  int32_t offset[4][kTile];  // element offsets inside one input plane (0 where the tap is invalid)
  int32_t mask[4][kTile];    // -1 where the tap exists, 0 elsewhere (gather masks)
  float weight[4][kTile];    // 0 where the tap is invalid
  float frac_x[kTile], frac_y[kTile], occlusion[kTile];
  // Row-pair form, filled when the plane rows are contiguous and at least 2 wide: row r (0: top,
  // 1: bottom) of pixel i is read as the two adjacent floats at pair_offset[r][i], a position
  // clamped inside the plane, and lane l of that pair (index 2 * i + l) carries the weight and
  // mask of whichever tap it holds (0 for none). So each pixel costs two 8-byte loads, none out of
  // bounds, and invalid taps are masked to zero before they are weighted.
  int32_t pair_offset[2][kTile];
  float pair_weight[2][2 * kTile];
  int32_t pair_mask[2][2 * kTile];
  // d(value)/d(ix) and d(value)/d(iy) per pair lane (backward only; see grid_grad_pairs_avx2).
  float pair_dx[2][2 * kTile], pair_dy[2][2 * kTile];
};

DAGAN_AVX2 inline __m256i lane_mask(int64_t lanes) {  // -1 in the first `lanes` (0..8) lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Stores per-pixel lanes (l0, l1) of pixels 0..7 interleaved: [p0 l0, p0 l1, p1 l0, ..., p7 l1].
DAGAN_AVX2 inline void store_interleaved(float* dst, __m256 l0, __m256 l1) {
  const __m256 lo = _mm256_unpacklo_ps(l0, l1), hi = _mm256_unpackhi_ps(l0, l1);
  _mm256_store_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_store_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

// Taps of output pixels (b, y, x0 .. x0+n-1); offsets for plane strides (sh, sw) that fit int32.
DAGAN_AVX2 __attribute__((noinline)) void fill_taps_avx2(TapsF32& t, const WarpGeometry& g, const float* grid,
                                                          const float* occ, int64_t b, int64_t y, int64_t x0,
                                                          int64_t n, int32_t sh, int32_t sw, bool pairs,
                                                          bool pair_grads) {
  alignas(32) float gx[kTile], gy[kTile];
  const float* gp = grid + b * g.grid_stride[0] + y * g.grid_stride[1] + x0 * g.grid_stride[2];
  const float* op = occ ? occ + b * g.occ_stride[0] + y * g.occ_stride[2] + x0 * g.occ_stride[3] : nullptr;
  int64_t done = 0;
  if (g.grid_stride[3] == 1 && g.grid_stride[2] == 2) {  // contiguous (x, y) pairs: deinterleave 8 at a time
    for (; done + 8 <= n; done += 8) {
      const __m256 a = _mm256_loadu_ps(gp + 2 * done), c = _mm256_loadu_ps(gp + 2 * done + 8);
      // shuffles give lanes [0 1 4 5 2 3 6 7]; the 64-bit permute restores pixel order
      _mm256_store_ps(gx + done, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, c, 0x88)), 0xD8)));
      _mm256_store_ps(gy + done, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, c, 0xDD)), 0xD8)));
      _mm256_store_ps(t.occlusion + done,
                      !op ? _mm256_set1_ps(1.0f)
                          : g.occ_stride[3] == 1 ? _mm256_loadu_ps(op + done)
                                                 : _mm256_setr_ps(op[(done + 0) * g.occ_stride[3]], op[(done + 1) * g.occ_stride[3]],
                                                                  op[(done + 2) * g.occ_stride[3]], op[(done + 3) * g.occ_stride[3]],
                                                                  op[(done + 4) * g.occ_stride[3]], op[(done + 5) * g.occ_stride[3]],
                                                                  op[(done + 6) * g.occ_stride[3]], op[(done + 7) * g.occ_stride[3]]));
    }
  }
  for (int64_t i = done; i < n; ++i) {
    gx[i] = gp[i * g.grid_stride[2]];
    gy[i] = gp[i * g.grid_stride[2] + g.grid_stride[3]];
    t.occlusion[i] = op ? op[i * g.occ_stride[3]] : 1.0f;
  }
  const int64_t padded = (n + 7) & ~int64_t(7);
  for (int64_t i = n; i < padded; ++i) {  // far outside: all four taps invalid, so never read
    gx[i] = gy[i] = -1e4f;
    t.occlusion[i] = 0.0f;
  }
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), lo = _mm256_set1_ps(-2.0f);
  const __m256 wf = _mm256_set1_ps(static_cast<float>(g.in_w)), hf = _mm256_set1_ps(static_cast<float>(g.in_h));
  const __m256 hi_x = _mm256_set1_ps(static_cast<float>(g.in_w + 1)), hi_y = _mm256_set1_ps(static_cast<float>(g.in_h + 1));
  const __m256i wi = _mm256_set1_epi32(static_cast<int32_t>(g.in_w)), hi = _mm256_set1_epi32(static_cast<int32_t>(g.in_h));
  const __m256i wi1 = _mm256_set1_epi32(static_cast<int32_t>(g.in_w - 1)), hi1 = _mm256_set1_epi32(static_cast<int32_t>(g.in_h - 1));
  const __m256i m1 = _mm256_set1_epi32(-1), m2 = _mm256_set1_epi32(-2);
  const __m256i vsh = _mm256_set1_epi32(sh), vsw = _mm256_set1_epi32(sw);
  for (int64_t i = 0; i < padded; i += 8) {
    // clamp_source_coord(unnormalize(.)): max_ps returns its second operand for NaN, like the scalar code.
    __m256 ix = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_load_ps(gx + i), one), wf), one), half);
    __m256 iy = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_load_ps(gy + i), one), hf), one), half);
    ix = _mm256_min_ps(_mm256_max_ps(ix, lo), hi_x);
    iy = _mm256_min_ps(_mm256_max_ps(iy, lo), hi_y);
    const __m256 fx0 = _mm256_floor_ps(ix), fy0 = _mm256_floor_ps(iy);
    const __m256i xi = _mm256_cvttps_epi32(fx0), yi = _mm256_cvttps_epi32(fy0);
    const __m256 frac_x = _mm256_sub_ps(ix, fx0), frac_y = _mm256_sub_ps(iy, fy0);
    const __m256 east = _mm256_sub_ps(_mm256_add_ps(fx0, one), ix), south = _mm256_sub_ps(_mm256_add_ps(fy0, one), iy);
    const __m256i vx0 = _mm256_and_si256(_mm256_cmpgt_epi32(xi, m1), _mm256_cmpgt_epi32(wi, xi));
    const __m256i vx1 = _mm256_and_si256(_mm256_cmpgt_epi32(xi, m2), _mm256_cmpgt_epi32(wi1, xi));
    const __m256i vy0 = _mm256_and_si256(_mm256_cmpgt_epi32(yi, m1), _mm256_cmpgt_epi32(hi, yi));
    const __m256i vy1 = _mm256_and_si256(_mm256_cmpgt_epi32(yi, m2), _mm256_cmpgt_epi32(hi1, yi));
    const __m256i mk[4] = {_mm256_and_si256(vx0, vy0), _mm256_and_si256(vx1, vy0), _mm256_and_si256(vx0, vy1),
                           _mm256_and_si256(vx1, vy1)};
    // Wrapping int32 arithmetic: intermediate sums of invalid rows may wrap, valid offsets fit.
    const __m256i base = _mm256_add_epi32(_mm256_mullo_epi32(yi, vsh), _mm256_mullo_epi32(xi, vsw));
    const __m256i off[4] = {base, _mm256_add_epi32(base, vsw), _mm256_add_epi32(base, vsh),
                            _mm256_add_epi32(base, _mm256_add_epi32(vsh, vsw))};
    const __m256 w[4] = {_mm256_mul_ps(east, south), _mm256_mul_ps(frac_x, south), _mm256_mul_ps(east, frac_y),
                         _mm256_mul_ps(frac_x, frac_y)};
    for (int k = 0; k < 4; ++k) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(t.offset[k] + i), _mm256_and_si256(off[k], mk[k]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(t.mask[k] + i), mk[k]);
      _mm256_store_ps(t.weight[k] + i, _mm256_and_ps(w[k], _mm256_castsi256_ps(mk[k])));
    }
    _mm256_store_ps(t.frac_x + i, frac_x);
    _mm256_store_ps(t.frac_y + i, frac_y);
    if (pairs) {  // sw == 1 and in_w >= 2 (see TapsF32)
      const __m256i px = _mm256_min_epi32(_mm256_max_epi32(xi, _mm256_setzero_si256()),
                                           _mm256_set1_epi32(static_cast<int32_t>(g.in_w - 2)));
      const __m256i zero = _mm256_setzero_si256();
      const __m256i at = _mm256_cmpeq_epi32(xi, px);                                 // taps at lanes (0, 1)
      const __m256i right = _mm256_cmpeq_epi32(xi, _mm256_add_epi32(px, _mm256_set1_epi32(1)));  // x0 = W-1: lane 1
      const __m256i left = _mm256_cmpeq_epi32(_mm256_add_epi32(xi, _mm256_set1_epi32(1)), px);    // x0 = -1: lane 0
      for (int r = 0; r < 2; ++r) {
        const __m256i row = _mm256_min_epi32(_mm256_max_epi32(r == 0 ? yi : _mm256_add_epi32(yi, _mm256_set1_epi32(1)), zero), hi1);
        _mm256_store_si256(reinterpret_cast<__m256i*>(t.pair_offset[r] + i),
                           _mm256_add_epi32(_mm256_mullo_epi32(row, vsh), px));
        const int west = 2 * r, east_k = 2 * r + 1;  // tap indices nw/ne (r = 0) or sw/se (r = 1)
        const __m256 w_w = _mm256_and_ps(w[west], _mm256_castsi256_ps(mk[west]));
        const __m256 w_e = _mm256_and_ps(w[east_k], _mm256_castsi256_ps(mk[east_k]));
        const __m256 l0w = _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(at), w_w), _mm256_and_ps(_mm256_castsi256_ps(left), w_e));
        const __m256 l1w = _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(at), w_e), _mm256_and_ps(_mm256_castsi256_ps(right), w_w));
        const __m256i l0m = _mm256_or_si256(_mm256_and_si256(at, mk[west]), _mm256_and_si256(left, mk[east_k]));
        const __m256i l1m = _mm256_or_si256(_mm256_and_si256(at, mk[east_k]), _mm256_and_si256(right, mk[west]));
        store_interleaved(t.pair_weight[r] + 2 * i, l0w, l1w);
        store_interleaved(reinterpret_cast<float*>(t.pair_mask[r] + 2 * i), _mm256_castsi256_ps(l0m),
                          _mm256_castsi256_ps(l1m));
        if (pair_grads) {
          // Per-tap derivatives of warp::accumulate_coord_grad: d/dix is -(1-fy), (1-fy), -fy, fy and
          // d/diy is -(1-fx), -fx, (1-fx), fx for nw, ne, sw, se.
          const __m256 neg = _mm256_set1_ps(-0.0f);
          const __m256 ry = r == 0 ? _mm256_sub_ps(one, frac_y) : frac_y;  // row factor of d/dix
          const __m256 dx_w = _mm256_xor_ps(ry, neg), dx_e = ry;
          const __m256 dy_w = r == 0 ? _mm256_xor_ps(_mm256_sub_ps(one, frac_x), neg) : _mm256_sub_ps(one, frac_x);
          const __m256 dy_e = r == 0 ? _mm256_xor_ps(frac_x, neg) : frac_x;
          const __m256 a = _mm256_castsi256_ps(at), le = _mm256_castsi256_ps(left), ri = _mm256_castsi256_ps(right);
          store_interleaved(t.pair_dx[r] + 2 * i, _mm256_or_ps(_mm256_and_ps(a, dx_w), _mm256_and_ps(le, dx_e)),
                            _mm256_or_ps(_mm256_and_ps(a, dx_e), _mm256_and_ps(ri, dx_w)));
          store_interleaved(t.pair_dy[r] + 2 * i, _mm256_or_ps(_mm256_and_ps(a, dy_w), _mm256_and_ps(le, dy_e)),
                            _mm256_or_ps(_mm256_and_ps(a, dy_e), _mm256_and_ps(ri, dy_w)));
        }
      }
    }
  }
}

// Bilinear value (before occlusion) of the 8 pixels at lane offset i of the tile, in one plane.
DAGAN_AVX2 inline void gather_taps(const TapsF32& t, const float* plane, int64_t i, __m256 v[4]) {
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), plane,
                                    _mm256_load_si256(reinterpret_cast<const __m256i*>(t.offset[k] + i)),
                                    _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.mask[k] + i))),
                                    4);
  }
}

DAGAN_AVX2 inline __m256 blend_taps(const TapsF32& t, int64_t i, const __m256 v[4]) {
  __m256 s = _mm256_mul_ps(_mm256_load_ps(t.weight[0] + i), v[0]);
  s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_load_ps(t.weight[1] + i), v[1]));
  s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_load_ps(t.weight[2] + i), v[2]));
  return _mm256_add_ps(s, _mm256_mul_ps(_mm256_load_ps(t.weight[3] + i), v[3]));
}

// Eight values of a row with element stride `stride` (grad_output may be expanded or transposed);
// lanes past `lanes` read nothing and are zero.
DAGAN_AVX2 inline __m256 load_row(const float* p, int64_t stride, int64_t lanes) {
  if (stride == 1) {
    return lanes >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(lanes));
  }
  alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < std::min<int64_t>(lanes, 8); ++j) tmp[j] = p[j * stride];
  return _mm256_load_ps(tmp);
}

// Two rows x four pixels of pairs: [p0 l0, p0 l1, p1 l0, p1 l1 | p2 l0, p2 l1, p3 l0, p3 l1].
DAGAN_AVX2 inline __m256 load_pairs4(const float* plane, const int32_t* off) {
  const __m128 lo = _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(plane + off[0])),
                                 reinterpret_cast<const __m64*>(plane + off[1]));
  const __m128 hi = _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(plane + off[2])),
                                 reinterpret_cast<const __m64*>(plane + off[3]));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// Weighted lanes of row r for pixels i..i+7, split by lane: l0/l1 in pixel order [0 1 4 5 2 3 6 7].
DAGAN_AVX2 inline void pair_row(const TapsF32& t, const float* plane, int64_t i, int r, __m256& l0, __m256& l1) {
  const float* w = t.pair_weight[r] + 2 * i;
  const float* m = reinterpret_cast<const float*>(t.pair_mask[r] + 2 * i);
  const __m256 a = _mm256_mul_ps(_mm256_and_ps(load_pairs4(plane, t.pair_offset[r] + i), _mm256_load_ps(m)),
                                 _mm256_load_ps(w));
  const __m256 b = _mm256_mul_ps(_mm256_and_ps(load_pairs4(plane, t.pair_offset[r] + i + 4), _mm256_load_ps(m + 8)),
                                 _mm256_load_ps(w + 8));
  l0 = _mm256_shuffle_ps(a, b, 0x88);
  l1 = _mm256_shuffle_ps(a, b, 0xDD);
}

// Bilinear values of pixels i..i+7 from the row pairs, summed in the order of warp::bilinear_value
// (nw + ne) + sw + se, so the result is bitwise that of the gather path; back in pixel order.
DAGAN_AVX2 inline __m256 sample_pairs8(const TapsF32& t, const float* plane, int64_t i) {
  __m256 t0, t1, b0, b1;
  pair_row(t, plane, i, 0, t0, t1);
  pair_row(t, plane, i, 1, b0, b1);
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(t0, t1), b0), b1);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
}

// Forward of one tile for channels [c0, c1); channel-outer so each input plane's lines stay in L1.
DAGAN_AVX2 __attribute__((noinline)) void forward_tile_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g,
                                                             const float* in_b, float* out_row, bool pairs, int64_t c0,
                                                             int64_t c1) {
  const __m256i tail = lane_mask(n & 7);
  const int64_t n8 = n & ~int64_t(7);
  for (int64_t c = c0; c < c1; ++c) {
    const float* plane = in_b + c * g.in_stride[1];
    float* o = out_row + c * g.out_stride[1];
    if (pairs) {
      for (int64_t i = 0; i < n8; i += 8) {
        _mm256_storeu_ps(o + i, _mm256_mul_ps(sample_pairs8(t, plane, i), _mm256_load_ps(t.occlusion + i)));
      }
      if (n8 < n) {
        _mm256_maskstore_ps(o + n8, tail, _mm256_mul_ps(sample_pairs8(t, plane, n8), _mm256_load_ps(t.occlusion + n8)));
      }
      continue;
    }
    __m256 v[4];
    for (int64_t i = 0; i < n8; i += 8) {
      gather_taps(t, plane, i, v);
      _mm256_storeu_ps(o + i, _mm256_mul_ps(blend_taps(t, i, v), _mm256_load_ps(t.occlusion + i)));
    }
    if (n8 < n) {
      gather_taps(t, plane, n8, v);
      _mm256_maskstore_ps(o + n8, tail, _mm256_mul_ps(blend_taps(t, n8, v), _mm256_load_ps(t.occlusion + n8)));
    }
  }
}

// 8x8 transpose: r[p] holds 8 channels of pixel p on entry, 8 pixels of channel j in r[j] on exit.
DAGAN_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// channels_last forward (in_stride[1] == 1, C >= 8): each tap of a pixel is a contiguous run of
// channels, read 8 at a time (masked past C); an 8x8 transpose turns 8 pixels x 8 channels into
// pixel-contiguous rows of the (B,C,Ho,Wo) output. Channel chunks are the outer loop so the
// tile's tap lines stay in L1 from one chunk to the next. Same operation order as the generic
// path, so the same bits.
DAGAN_AVX2 __attribute__((noinline)) void forward_tile_cl_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g,
                                                                const float* in_b, float* out_row) {
  for (int64_t c = 0; c < g.channels; c += 8) {
    const int64_t lanes_c = std::min<int64_t>(8, g.channels - c);
    const __m256i cmask = lane_mask(lanes_c);
    const float* in_c = in_b + c;
    for (int64_t i = 0; i < n; i += 8) {
      __m256 r[8];
      for (int p = 0; p < 8; ++p) {
        const int64_t q = i + p;  // padded pixels have all taps masked: they read nothing
        __m256 s = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
          const __m256i m = _mm256_and_si256(cmask, _mm256_set1_epi32(t.mask[k][q]));
          const __m256 v = _mm256_maskload_ps(in_c + t.offset[k][q], m);
          const __m256 wv = _mm256_mul_ps(_mm256_broadcast_ss(t.weight[k] + q), v);
          s = k == 0 ? wv : _mm256_add_ps(s, wv);
        }
        r[p] = _mm256_mul_ps(s, _mm256_broadcast_ss(t.occlusion + q));
      }
      transpose8(r);
      const int64_t lanes_p = std::min<int64_t>(8, n - i);
      const __m256i pmask = lane_mask(lanes_p);
      for (int j = 0; j < lanes_c; ++j) {
        float* o = out_row + (c + j) * g.out_stride[1] + i;
        if (lanes_p == 8) {
          _mm256_storeu_ps(o, r[j]);
        } else {
          _mm256_maskstore_ps(o, pmask, r[j]);
        }
      }
    }
  }
}

// Grid and occlusion gradients of one tile (sums over channels, channel-outer as the forward).
// Channels [c0, c1) are added to the accumulators, which are zeroed first when `first`.
DAGAN_AVX2 __attribute__((noinline)) void grid_grad_tile_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g,
                                                               const float* in_b, const float* go_row, float* gix,
                                                               float* giy, float* gocc, int64_t c0, int64_t c1,
                                                               bool first) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n && first; i += 8) {
    _mm256_store_ps(gix + i, _mm256_setzero_ps());
    _mm256_store_ps(giy + i, _mm256_setzero_ps());
    _mm256_store_ps(gocc + i, _mm256_setzero_ps());
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float* plane = in_b + c * g.in_stride[1];
    const float* go = go_row + c * g.out_stride[1];
    for (int64_t i = 0; i < n; i += 8) {
      __m256 v[4];
      gather_taps(t, plane, i, v);
      const __m256 gv = load_row(go + i * g.out_stride[3], g.out_stride[3], n - i);
      _mm256_store_ps(gocc + i, _mm256_add_ps(_mm256_load_ps(gocc + i), _mm256_mul_ps(gv, blend_taps(t, i, v))));
      const __m256 gs = _mm256_mul_ps(gv, _mm256_load_ps(t.occlusion + i));
      const __m256 fx = _mm256_load_ps(t.frac_x + i), fy = _mm256_load_ps(t.frac_y + i);
      const __m256 dx = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[1], v[0]), _mm256_sub_ps(one, fy)),
                                      _mm256_mul_ps(_mm256_sub_ps(v[3], v[2]), fy));
      const __m256 dy = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[2], v[0]), _mm256_sub_ps(one, fx)),
                                      _mm256_mul_ps(_mm256_sub_ps(v[3], v[1]), fx));
      _mm256_store_ps(gix + i, _mm256_add_ps(_mm256_load_ps(gix + i), _mm256_mul_ps(dx, gs)));
      _mm256_store_ps(giy + i, _mm256_add_ps(_mm256_load_ps(giy + i), _mm256_mul_ps(dy, gs)));
    }
  }
}

// Grid and occlusion gradients from the row pairs. Accumulators stay in the pairs' lane order
// [0 1 4 5 2 3 6 7] across channels and are put back in pixel order once at the end.
DAGAN_AVX2 inline __m256 swap_middle(__m256 v) {  // [0 1 2 3 4 5 6 7] <-> [0 1 4 5 2 3 6 7]
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}

DAGAN_AVX2 inline __m256 lane_sum(__m256 ta, __m256 tb, __m256 ba, __m256 bb, const float* ct, const float* cb) {
  const __m256 pa = _mm256_mul_ps(ta, _mm256_load_ps(ct)), pb = _mm256_mul_ps(tb, _mm256_load_ps(ct + 8));
  const __m256 qa = _mm256_mul_ps(ba, _mm256_load_ps(cb)), qb = _mm256_mul_ps(bb, _mm256_load_ps(cb + 8));
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_shuffle_ps(pa, pb, 0x88), _mm256_shuffle_ps(pa, pb, 0xDD)),
                                     _mm256_shuffle_ps(qa, qb, 0x88)),
                       _mm256_shuffle_ps(qa, qb, 0xDD));
}

// Channels [c0, c1); accumulators zeroed when `first`, put back in pixel order when `last`.
DAGAN_AVX2 __attribute__((noinline)) void grid_grad_pairs_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g,
                                                                const float* in_b, const float* go_row, float* gix,
                                                                float* giy, float* gocc, int64_t c0, int64_t c1,
                                                                bool first, bool last) {
  for (int64_t i = 0; i < n && first; i += 8) {
    _mm256_store_ps(gix + i, _mm256_setzero_ps());
    _mm256_store_ps(giy + i, _mm256_setzero_ps());
    _mm256_store_ps(gocc + i, _mm256_setzero_ps());
  }
  for (int64_t c = c0; c < c1; ++c) {
    const float* plane = in_b + c * g.in_stride[1];
    const float* go = go_row + c * g.out_stride[1];
    for (int64_t i = 0; i < n; i += 8) {
      const __m256i* m0 = reinterpret_cast<const __m256i*>(t.pair_mask[0] + 2 * i);
      const __m256i* m1 = reinterpret_cast<const __m256i*>(t.pair_mask[1] + 2 * i);
      const __m256 ta = _mm256_and_ps(load_pairs4(plane, t.pair_offset[0] + i), _mm256_castsi256_ps(_mm256_load_si256(m0)));
      const __m256 tb = _mm256_and_ps(load_pairs4(plane, t.pair_offset[0] + i + 4), _mm256_castsi256_ps(_mm256_load_si256(m0 + 1)));
      const __m256 ba = _mm256_and_ps(load_pairs4(plane, t.pair_offset[1] + i), _mm256_castsi256_ps(_mm256_load_si256(m1)));
      const __m256 bb = _mm256_and_ps(load_pairs4(plane, t.pair_offset[1] + i + 4), _mm256_castsi256_ps(_mm256_load_si256(m1 + 1)));
      const __m256 gv = swap_middle(load_row(go + i * g.out_stride[3], g.out_stride[3], n - i));
      const __m256 value = lane_sum(ta, tb, ba, bb, t.pair_weight[0] + 2 * i, t.pair_weight[1] + 2 * i);
      _mm256_store_ps(gocc + i, _mm256_add_ps(_mm256_load_ps(gocc + i), _mm256_mul_ps(gv, value)));
      const __m256 gs = _mm256_mul_ps(gv, swap_middle(_mm256_load_ps(t.occlusion + i)));
      const __m256 dx = lane_sum(ta, tb, ba, bb, t.pair_dx[0] + 2 * i, t.pair_dx[1] + 2 * i);
      const __m256 dy = lane_sum(ta, tb, ba, bb, t.pair_dy[0] + 2 * i, t.pair_dy[1] + 2 * i);
      _mm256_store_ps(gix + i, _mm256_add_ps(_mm256_load_ps(gix + i), _mm256_mul_ps(dx, gs)));
      _mm256_store_ps(giy + i, _mm256_add_ps(_mm256_load_ps(giy + i), _mm256_mul_ps(dy, gs)));
    }
  }
  for (int64_t i = 0; i < n && last; i += 8) {
    _mm256_store_ps(gix + i, swap_middle(_mm256_load_ps(gix + i)));
    _mm256_store_ps(giy + i, swap_middle(_mm256_load_ps(giy + i)));
    _mm256_store_ps(gocc + i, swap_middle(_mm256_load_ps(gocc + i)));
  }
}

// Scatter of one tile into one contiguous grad_input plane, in pixel order. The products are
// formed eight at a time and masked, so an invalid tap adds exactly +0 at offset 0 (never w * inf);
// the read-modify-writes stay scalar (neighbouring pixels share taps, and exact-address store
// forwarding keeps those chains short).
DAGAN_AVX2 __attribute__((noinline)) void input_grad_tile_avx2(const TapsF32& t, int64_t n, const float* go,
                                                                int64_t go_stride, float* gi) {
  alignas(32) float contrib[4][kTile];
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 gs = _mm256_mul_ps(load_row(go + i * go_stride, go_stride, n - i), _mm256_load_ps(t.occlusion + i));
    for (int k = 0; k < 4; ++k) {
      const __m256 m = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.mask[k] + i)));
      _mm256_store_ps(contrib[k] + i, _mm256_and_ps(_mm256_mul_ps(_mm256_load_ps(t.weight[k] + i), gs), m));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    gi[t.offset[0][i]] += contrib[0][i];
    gi[t.offset[1][i]] += contrib[1][i];
    gi[t.offset[2][i]] += contrib[2][i];
    gi[t.offset[3][i]] += contrib[3][i];
  }
}

// ---------------------------------------------------------------------------------------------------
// bfloat16 and AVX-512 tile kernels. They read the taps of fill_taps_avx2 (computed in float32 from a
// float32 copy of the grid, the values the generic path converts one by one) and run the generic
// path's sequence of float32 operations, so they return its bits: bfloat16 inputs are widened exactly
// (a 16-bit shift), every sum is float32, and the result is rounded to bfloat16 once, to nearest
// even like c10::BFloat16 (AVX512-BF16's vcvtneps2bf16 also flushes float32 denormals to zero).

// Converts n float32 values to bfloat16 (round to nearest even, NaN -> 0x7FC0 like c10::BFloat16).
using Bf16Store = void (*)(const float* src, at::BFloat16* dst, int64_t n);

void store_bf16_scalar(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
}

// 8 bfloat16 -> 8 float32 (exact: the bits move to the upper half).
DAGAN_AVX2 inline __m256 widen_bf16x8(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 float32 -> 8 bfloat16 in the low 16 bits of each 32-bit lane, c10::BFloat16's rounding.
DAGAN_AVX2 inline __m256i round_bf16x8(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

DAGAN_AVX2 __attribute__((noinline)) void store_bf16_avx2(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i r = round_bf16x8(_mm256_loadu_ps(src + i));
    // packus works per 128-bit half: [r0..r3 r0..r3 | r4..r7 r4..r7]; qwords 0 and 2 hold r0..r7.
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(p));
  }
  store_bf16_scalar(src + i, dst + i, n - i);
}

// Row pairs of 8 pixels from a bfloat16 plane: one 32-bit gather (a pair is two adjacent bfloat16,
// both inside the plane), widened to the float layout of load_pairs4: a = pixels 0-3, b = 4-7.
DAGAN_AVX2 inline void load_pairs8_bf16(const at::BFloat16* plane, const int32_t* off, __m256& a, __m256& b) {
  const __m256i w = _mm256_i32gather_epi32(reinterpret_cast<const int*>(plane),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)), 2);
  a = widen_bf16x8(_mm256_castsi256_si128(w));
  b = widen_bf16x8(_mm256_extracti128_si256(w, 1));
}

// sample_pairs8 for a bfloat16 plane (same lanes, same order of operations).
DAGAN_AVX2 inline __m256 sample_pairs8_bf16(const TapsF32& t, const at::BFloat16* plane, int64_t i) {
  __m256 l[2][2];
  for (int r = 0; r < 2; ++r) {
    __m256 va, vb;
    load_pairs8_bf16(plane, t.pair_offset[r] + i, va, vb);
    const float* w = t.pair_weight[r] + 2 * i;
    const float* m = reinterpret_cast<const float*>(t.pair_mask[r] + 2 * i);
    const __m256 a = _mm256_mul_ps(_mm256_and_ps(va, _mm256_load_ps(m)), _mm256_load_ps(w));
    const __m256 b = _mm256_mul_ps(_mm256_and_ps(vb, _mm256_load_ps(m + 8)), _mm256_load_ps(w + 8));
    l[r][0] = _mm256_shuffle_ps(a, b, 0x88);
    l[r][1] = _mm256_shuffle_ps(a, b, 0xDD);
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(l[0][0], l[0][1]), l[1][0]), l[1][1]);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
}

// bfloat16 planar forward of one tile (row pairs only), channels [c0, c1): float32 results of a
// channel's row go through a tile buffer and are rounded once.
DAGAN_AVX2 __attribute__((noinline)) void forward_tile_pairs_bf16_avx2(const TapsF32& t, int64_t n,
                                                                        const WarpGeometry& g,
                                                                        const at::BFloat16* in_b,
                                                                        at::BFloat16* out_row, int64_t c0,
                                                                        int64_t c1, Bf16Store store) {
  alignas(32) float buf[kTile];
  for (int64_t c = c0; c < c1; ++c) {
    const at::BFloat16* plane = in_b + c * g.in_stride[1];
    for (int64_t i = 0; i < n; i += 8) {  // padded lanes have in-plane pair offsets and zero weights
      _mm256_store_ps(buf + i, _mm256_mul_ps(sample_pairs8_bf16(t, plane, i), _mm256_load_ps(t.occlusion + i)));
    }
    store(buf, out_row + c * g.out_stride[1], n);
  }
}

// 8 channels of one bfloat16 tap, the first `lanes` of them (0 when the tap is invalid).
DAGAN_AVX2 inline __m256 load_channels_bf16(const at::BFloat16* p, int64_t lanes, bool valid) {
  if (!valid) return _mm256_setzero_ps();
  if (lanes == 8) return widen_bf16x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, static_cast<size_t>(lanes) * sizeof(uint16_t));
  return widen_bf16x8(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// bfloat16 channels_last forward of one tile (forward_tile_cl_avx2's loop and order).
DAGAN_AVX2 __attribute__((noinline)) void forward_tile_cl_bf16_avx2(const TapsF32& t, int64_t n,
                                                                     const WarpGeometry& g,
                                                                     const at::BFloat16* in_b,
                                                                     at::BFloat16* out_row, Bf16Store store) {
  alignas(32) float buf[8][kTile];
  for (int64_t c = 0; c < g.channels; c += 8) {
    const int64_t lanes_c = std::min<int64_t>(8, g.channels - c);
    const at::BFloat16* in_c = in_b + c;
    for (int64_t i = 0; i < n; i += 8) {
      __m256 r[8];
      for (int p = 0; p < 8; ++p) {
        const int64_t q = i + p;
        __m256 s = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
          const __m256 v = load_channels_bf16(in_c + t.offset[k][q], lanes_c, t.mask[k][q] != 0);
          const __m256 wv = _mm256_mul_ps(_mm256_broadcast_ss(t.weight[k] + q), v);
          s = k == 0 ? wv : _mm256_add_ps(s, wv);
        }
        r[p] = _mm256_mul_ps(s, _mm256_broadcast_ss(t.occlusion + q));
      }
      transpose8(r);
      for (int j = 0; j < lanes_c; ++j) _mm256_store_ps(buf[j] + i, r[j]);
    }
    for (int j = 0; j < lanes_c; ++j) store(buf[j], out_row + (c + j) * g.out_stride[1], n);
  }
}

// ------------------------------------------------------------------------------------- AVX-512
// GCC 12 warns about the _mm512_undefined_* placeholders inside its own AVX-512 headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Sixteen pixels (planar) or sixteen channels (channels_last) per vector; AVX-512 F/BW/VL/DQ.
#define DAGAN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2")))
#define DAGAN_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,avx512bf16")))

DAGAN_AVX512 __attribute__((noinline)) void store_bf16_avx512(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, src + i);
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(dst + i, k, _mm512_cvtepi32_epi16(r));
  }
}

DAGAN_AVX512BF16 __attribute__((noinline)) void store_bf16_avx512bf16(const float* src, at::BFloat16* dst,
                                                                       int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, src + i));
    _mm256_mask_storeu_epi16(dst + i, k, (__m256i)h);
  }
}

DAGAN_AVX512 inline __mmask16 pixel_mask16(int64_t lanes) {
  return lanes >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1);
}

// Row r of 16 pixels of a bfloat16 plane, weighted per pair lane and split into lane 0 / lane 1 in
// pixel order. Pixels outside mask k are not loaded (their taps may be unset). (float32 planes keep
// the AVX2 kernel's 8-byte row-pair loads: 64-bit gathers measured no faster.)
DAGAN_AVX512 inline void pair_row16(const TapsF32& t, const at::BFloat16* plane, int64_t i, int r, __mmask16 k, __m512& l0,
                                    __m512& l1) {
  const __m512i off = _mm512_maskz_loadu_epi32(k, t.pair_offset[r] + i);
  // Pair lanes of pixels i..i+7 (va) and i+8..i+15 (vb), [p l0, p l1, ...]: one 32-bit gather.
  const __m512i pr = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, off, reinterpret_cast<const int*>(plane), 2);
  const __m512 va = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(pr)), 16));
  const __m512 vb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pr, 1)), 16));
  const float* w = t.pair_weight[r] + 2 * i;
  const int32_t* m = t.pair_mask[r] + 2 * i;
  const __m512 a = _mm512_mul_ps(_mm512_and_ps(va, _mm512_castsi512_ps(_mm512_loadu_si512(m))), _mm512_loadu_ps(w));
  const __m512 b = _mm512_mul_ps(_mm512_and_ps(vb, _mm512_castsi512_ps(_mm512_loadu_si512(m + 16))),
                                 _mm512_loadu_ps(w + 16));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  l0 = _mm512_permutex2var_ps(a, even, b);
  l1 = _mm512_permutex2var_ps(a, odd, b);
}

// bfloat16 planar forward of one tile from row pairs, channels [c0, c1).
DAGAN_AVX512 __attribute__((noinline)) void forward_tile_pairs_bf16_avx512(const TapsF32& t, int64_t n,
                                                                            const WarpGeometry& g,
                                                                            const at::BFloat16* in_b,
                                                                            at::BFloat16* out_row, int64_t c0,
                                                                            int64_t c1, Bf16Store store) {
  alignas(64) float buf[kTile];
  for (int64_t c = c0; c < c1; ++c) {
    const at::BFloat16* plane = in_b + c * g.in_stride[1];
    at::BFloat16* o = out_row + c * g.out_stride[1];
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = pixel_mask16(n - i);
      __m512 t0, t1, b0, b1;
      pair_row16(t, plane, i, 0, k, t0, t1);
      pair_row16(t, plane, i, 1, k, b0, b1);
      const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(t0, t1), b0), b1);
      _mm512_store_ps(buf + i, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, t.occlusion + i)));
    }
    store(buf, o, n);
  }
}

// 16 channels of one tap (masked past C and for invalid taps), widened to float32.
template <typename T>
DAGAN_AVX512 inline __m512 load_channels16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  }
}

// channels_last forward of one tile: 16 channels per load; 8 pixels x 16 channels are turned into
// channel rows by two 8x8 transposes. forward_tile_cl_avx2's order of operations.
template <typename T>
DAGAN_AVX512 __attribute__((noinline)) void forward_tile_cl_avx512(const TapsF32& t, int64_t n,
                                                                    const WarpGeometry& g, const T* in_b, T* out_row,
                                                                    Bf16Store store) {
  alignas(64) float buf[16][kTile];
  for (int64_t c = 0; c < g.channels; c += 16) {
    const int64_t lanes_c = std::min<int64_t>(16, g.channels - c);
    const __mmask16 cmask = pixel_mask16(lanes_c);
    const T* in_c = in_b + c;
    for (int64_t i = 0; i < n; i += 8) {
      __m512 r[8];
      for (int p = 0; p < 8; ++p) {
        const int64_t q = i + p;  // padded pixels have all taps masked: they read nothing
        __m512 s = _mm512_setzero_ps();
        for (int k = 0; k < 4; ++k) {
          const __m512 v = load_channels16(in_c + t.offset[k][q], t.mask[k][q] ? cmask : __mmask16(0));
          const __m512 wv = _mm512_mul_ps(_mm512_set1_ps(t.weight[k][q]), v);
          s = k == 0 ? wv : _mm512_add_ps(s, wv);
        }
        r[p] = _mm512_mul_ps(s, _mm512_set1_ps(t.occlusion[q]));
      }
      const int64_t lanes_p = std::min<int64_t>(8, n - i);
      const __mmask8 pmask = static_cast<__mmask8>((1u << lanes_p) - 1);
      for (int half = 0; half < 2 && 8 * half < lanes_c; ++half) {
        __m256 h[8];
        for (int p = 0; p < 8; ++p) {
          h[p] = half == 0 ? _mm512_castps512_ps256(r[p]) : _mm512_extractf32x8_ps(r[p], 1);
        }
        transpose8(h);
        const int64_t j1 = std::min<int64_t>(8, lanes_c - 8 * half);
        for (int j = 0; j < j1; ++j) {
          const int64_t ch = 8 * half + j;
          if constexpr (std::is_same_v<T, float>) {
            _mm256_mask_storeu_ps(out_row + (c + ch) * g.out_stride[1] + i, pmask, h[j]);
          } else {
            _mm256_store_ps(buf[ch] + i, h[j]);
          }
        }
      }
    }
    if constexpr (!std::is_same_v<T, float>) {
      for (int j = 0; j < lanes_c; ++j) store(buf[j], out_row + (c + j) * g.out_stride[1], n);
    }
  }
}
#pragma GCC diagnostic pop
#endif  // x86-64 AVX2

// The vector paths apply when capability() allows AVX2 or more (DAGAN_FAST_CPU_CAPABILITY /
// ATEN_CPU_CAPABILITY, capped by the CPU), every tap offset fits int32, and the test hook
// DAGAN_FAST_WARP_SCALAR=1 (read at each call) does not force the generic code.
bool use_avx2_path(const WarpGeometry& g) {
#ifdef DAGAN_WARP_HAVE_AVX2
  const bool has_avx2 = static_cast<int>(capability()) >= static_cast<int>(Capability::kAVX2);
  const char* force = std::getenv("DAGAN_FAST_WARP_SCALAR");
  if (!has_avx2 || (force != nullptr && std::strcmp(force, "") != 0 && std::strcmp(force, "0") != 0)) return false;
  constexpr int64_t limit = int64_t(1) << 30;  // margin: offsets plus one stride stay below 2^31
  const int64_t extent = (g.in_h + 1) * g.in_stride[2] + (g.in_w + 1) * g.in_stride[3];
  return extent < limit && (g.in_h + 1) * (g.in_w + 1) < limit && g.in_stride[2] >= 0 && g.in_stride[3] >= 0;
#else
  (void)g;
  return false;
#endif
}

#ifdef DAGAN_WARP_HAVE_AVX2
int64_t tasks_grain(const WarpGeometry& g) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.channels * kTile));
}

// Row pairs need contiguous rows at least two pixels wide (NCHW and sliced NCHW views).
bool row_pairs(const WarpGeometry& g) { return g.in_stride[3] == 1 && g.in_w >= 2; }

// The tile kernels of one (element type, vector level): planar(tile, n, g, in_b, out_row, pairs, c0, c1, store)
// and cl(tile, n, g, in_b, out_row, store); `store` rounds float32 rows to bfloat16 (unused for float).
template <typename T>
struct ForwardTiles {
  void (*planar)(const TapsF32&, int64_t, const WarpGeometry&, const T*, T*, bool, int64_t, int64_t, Bf16Store);
  void (*cl)(const TapsF32&, int64_t, const WarpGeometry&, const T*, T*, Bf16Store);
  Bf16Store store;
};

// Forward scheduling shared by every vector level and element type (planar bfloat16 needs row pairs:
// the caller checks). grid and occ are float32.
template <typename T>
void forward_vec(const WarpGeometry& g, const T* input, const float* grid, const float* occ, T* out,
                 const ForwardTiles<T>& kern) {
  const int64_t tiles_per_row = (g.out_w + kTile - 1) / kTile, tiles = g.out_h * tiles_per_row;
  const bool cl = g.in_stride[1] == 1 && g.channels >= 8;  // channels_last (or NHWC-strided) input
  const bool pairs = !cl && row_pairs(g);
  const int64_t plane_bytes = g.in_h * g.in_w * static_cast<int64_t>(sizeof(T));
  if (cl || g.channels < 8 || g.channels * plane_bytes <= (int64_t(256) << 10)) {
    // All of a tile's reads fit in L2 (or each tap is one contiguous channel run): one pass,
    // taps computed per tile and used at once by every channel.
    at::parallel_for(0, g.batch * tiles, tasks_grain(g), [&](int64_t begin, int64_t end) {
      TapsF32 t;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, y = (task % tiles) / tiles_per_row;
        const int64_t x0 = (task % tiles_per_row) * kTile, n = std::min(kTile, g.out_w - x0);
        fill_taps_avx2(t, g, grid, occ, b, y, x0, n, static_cast<int32_t>(g.in_stride[2]),
                       static_cast<int32_t>(g.in_stride[3]), pairs, false);
        T* out_row = out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3];
        if (cl) {
          kern.cl(t, n, g, input + b * g.in_stride[0], out_row, kern.store);
        } else {
          kern.planar(t, n, g, input + b * g.in_stride[0], out_row, pairs, 0, g.channels, kern.store);
        }
      }
    });
    return;
  }
  // Planar input larger than L2: otherwise every tile would stream all C planes again. The taps of
  // one batch element are computed once, then tasks take a block of channels whose planes fit in
  // half of L2 and a range of tiles, so each plane is fetched from memory about once.
  const int64_t block_c = std::max<int64_t>(1, std::min<int64_t>(g.channels, (int64_t(512) << 10) / plane_bytes));
  const int64_t blocks = (g.channels + block_c - 1) / block_c;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::min<int64_t>(tiles, std::max<int64_t>(1, (4 * threads + blocks - 1) / blocks));
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  std::unique_ptr<TapsF32[]> taps(new TapsF32[tiles]);  // default-initialised: every read tile is filled first
  for (int64_t b = 0; b < g.batch; ++b) {
    at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t y = tile / tiles_per_row, x0 = (tile % tiles_per_row) * kTile;
        fill_taps_avx2(taps[tile], g, grid, occ, b, y, x0, std::min(kTile, g.out_w - x0),
                       static_cast<int32_t>(g.in_stride[2]), static_cast<int32_t>(g.in_stride[3]), pairs, false);
      }
    });
    at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c0 = (task / chunks) * block_c, c1 = std::min(g.channels, c0 + block_c);
        const int64_t t0 = (task % chunks) * tiles_per_chunk, t1 = std::min(tiles, t0 + tiles_per_chunk);
        for (int64_t tile = t0; tile < t1; ++tile) {
          const int64_t y = tile / tiles_per_row, x0 = (tile % tiles_per_row) * kTile;
          kern.planar(taps[tile], std::min(kTile, g.out_w - x0), g, input + b * g.in_stride[0],
                      out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3], pairs, c0, c1,
                      kern.store);
        }
      }
    });
  }
}


// Adapters to the ForwardTiles signature.
void planar_f32_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g, const float* in_b, float* out_row, bool pairs,
                     int64_t c0, int64_t c1, Bf16Store) {
  forward_tile_avx2(t, n, g, in_b, out_row, pairs, c0, c1);
}
void cl_f32_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g, const float* in_b, float* out_row, Bf16Store) {
  forward_tile_cl_avx2(t, n, g, in_b, out_row);
}
void cl_f32_avx512(const TapsF32& t, int64_t n, const WarpGeometry& g, const float* in_b, float* out_row,
                   Bf16Store store) {
  forward_tile_cl_avx512<float>(t, n, g, in_b, out_row, store);
}
void planar_bf16_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g, const at::BFloat16* in_b,
                      at::BFloat16* out_row, bool, int64_t c0, int64_t c1, Bf16Store store) {
  forward_tile_pairs_bf16_avx2(t, n, g, in_b, out_row, c0, c1, store);
}
void cl_bf16_avx2(const TapsF32& t, int64_t n, const WarpGeometry& g, const at::BFloat16* in_b, at::BFloat16* out_row,
                  Bf16Store store) {
  forward_tile_cl_bf16_avx2(t, n, g, in_b, out_row, store);
}
void planar_bf16_avx512(const TapsF32& t, int64_t n, const WarpGeometry& g, const at::BFloat16* in_b,
                        at::BFloat16* out_row, bool, int64_t c0, int64_t c1, Bf16Store store) {
  forward_tile_pairs_bf16_avx512(t, n, g, in_b, out_row, c0, c1, store);
}
void cl_bf16_avx512(const TapsF32& t, int64_t n, const WarpGeometry& g, const at::BFloat16* in_b,
                    at::BFloat16* out_row, Bf16Store store) {
  forward_tile_cl_avx512<at::BFloat16>(t, n, g, in_b, out_row, store);
}

bool use_avx512() { return capability() == Capability::kAVX512; }

// The bfloat16 rounding of the level in use.
Bf16Store bf16_store() {
  if (use_avx512()) return avx512_bf16_native() ? &store_bf16_avx512bf16 : &store_bf16_avx512;
  return &store_bf16_avx2;
}

ForwardTiles<float> tiles_f32() {
  if (use_avx512()) return {&planar_f32_avx2, &cl_f32_avx512, nullptr};  // planar: see pair_row16
  return {&planar_f32_avx2, &cl_f32_avx2, nullptr};
}

ForwardTiles<at::BFloat16> tiles_bf16() {
  if (use_avx512()) return {&planar_bf16_avx512, &cl_bf16_avx512, bf16_store()};
  return {&planar_bf16_avx2, &cl_bf16_avx2, bf16_store()};
}

// Whether forward_vec<BFloat16> covers this layout: channels_last-like (C >= 8) or row pairs.
bool bf16_vector_layout(const WarpGeometry& g) {
  return (g.in_stride[1] == 1 && g.channels >= 8) || row_pairs(g);
}

// Backward. Grid and occlusion gradients: as in forward_avx2, planar inputs larger than L2 use a
// taps table per batch element and channel blocks; each task owns a range of tiles and runs the
// blocks in order, so every pixel still sums its channels 0..C-1 in order (same bits as one pass).
// Input gradient: from a taps table with offsets into the contiguous (B,C,Hi,Wi) buffer, each task
// scatters one (channel, pixel segment) into its own buffer, in pixel order. The segment count
// depends only on the shape (more segments when there are few channels, so two threads stay busy
// at C=3) and segments are added in a fixed order: bitwise deterministic whatever the thread count.
// When the input planes are contiguous the two tables are the same, so it is computed once.
void backward_avx2(const WarpGeometry& g, const float* grad_out, const float* input, const float* grid,
                   const float* occ, float* grad_grid, float* grad_occ,
                   float* grad_in /* zeroed, contiguous (B,C,Hi,Wi), or null */) {
  const int64_t tiles_per_row = (g.out_w + kTile - 1) / kTile, tiles = g.out_h * tiles_per_row;
  const float sx = warp::grid_coord_scale<float>(g.in_w), sy = warp::grid_coord_scale<float>(g.in_h);
  const bool coords = grad_grid || grad_occ, pairs = row_pairs(g);
  const int64_t plane = g.in_h * g.in_w, plane_bytes = plane * static_cast<int64_t>(sizeof(float));
  const bool blocked = g.in_stride[1] != 1 && g.channels >= 8 && g.channels * plane_bytes > (int64_t(256) << 10);
  const bool shared = grad_in && coords && g.in_stride[3] == 1 && g.in_stride[2] == g.in_w;
  const int64_t block_c = blocked ? std::max<int64_t>(1, std::min<int64_t>(g.channels, (int64_t(512) << 10) / plane_bytes))
                                  : std::max<int64_t>(1, g.channels);
  const int64_t blocks = std::max<int64_t>(1, (g.channels + block_c - 1) / block_c);
  auto write = [&](int64_t b, int64_t tile, int64_t n, const float* gix, const float* giy, const float* gocc) {
    const int64_t pix = (b * g.out_h + tile / tiles_per_row) * g.out_w + (tile % tiles_per_row) * kTile;
    for (int64_t i = 0; i < n; ++i) {  // gradient outputs are contiguous
      if (grad_grid) {
        grad_grid[2 * (pix + i)] = gix[i] * sx;
        grad_grid[2 * (pix + i) + 1] = giy[i] * sy;
      }
      if (grad_occ) grad_occ[pix + i] = gocc[i];
    }
  };
  auto coord_pass = [&](const TapsF32& t, int64_t b, int64_t tile, float* gix, float* giy, float* gocc, int64_t c0,
                        int64_t c1, bool first, bool last) {
    const int64_t y = tile / tiles_per_row, x0 = (tile % tiles_per_row) * kTile, n = std::min(kTile, g.out_w - x0);
    const float* go_row = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x0 * g.out_stride[3];
    if (pairs) {
      grid_grad_pairs_avx2(t, n, g, input + b * g.in_stride[0], go_row, gix, giy, gocc, c0, c1, first, last);
    } else {
      grid_grad_tile_avx2(t, n, g, input + b * g.in_stride[0], go_row, gix, giy, gocc, c0, c1, first);
    }
    if (last) write(b, tile, n, gix, giy, gocc);
  };
  auto fill = [&](TapsF32& t, int64_t b, int64_t tile, bool for_input_grad) {
    const int64_t x0 = (tile % tiles_per_row) * kTile, n = std::min(kTile, g.out_w - x0);
    if (for_input_grad) {
      fill_taps_avx2(t, g, grid, occ, b, tile / tiles_per_row, x0, n, static_cast<int32_t>(g.in_w), 1, false, false);
    } else {
      fill_taps_avx2(t, g, grid, occ, b, tile / tiles_per_row, x0, n, static_cast<int32_t>(g.in_stride[2]),
                     static_cast<int32_t>(g.in_stride[3]), pairs, pairs);
    }
  };
  const bool coords_in_table = coords && (blocked || shared);
  if (coords && !coords_in_table) {  // taps used as soon as computed, one tile at a time
    at::parallel_for(0, g.batch * tiles, tasks_grain(g), [&](int64_t begin, int64_t end) {
      TapsF32 t;
      alignas(32) float gix[kTile], giy[kTile], gocc[kTile];
      for (int64_t task = begin; task < end; ++task) {
        fill(t, task / tiles, task % tiles, false);
        coord_pass(t, task / tiles, task % tiles, gix, giy, gocc, 0, g.channels, true, true);
      }
    });
  }
  if (!coords_in_table && !grad_in) return;

  std::unique_ptr<TapsF32[]> taps(new TapsF32[tiles]);  // default-initialised: every read tile is filled first
  struct alignas(32) TileAcc {
    float gix[kTile], giy[kTile], gocc[kTile];
  };
  std::unique_ptr<TileAcc[]> acc(coords_in_table ? new TileAcc[tiles] : nullptr);
  const int64_t segments = g.channels >= 4 ? 1 : std::min<int64_t>(tiles, (4 + g.channels - 1) / g.channels);
  const int64_t tiles_per_segment = (tiles + segments - 1) / segments;
  // Segment s > 0 of channel c accumulates in partial[((c * (segments - 1)) + s - 1) * plane ...].
  std::vector<float> partial(static_cast<size_t>(grad_in && segments > 1 ? g.channels * (segments - 1) * plane : 0));
  for (int64_t b = 0; b < g.batch; ++b) {
    if (coords_in_table) {
      at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) fill(taps[tile], b, tile, false);
      });
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = 0; block < blocks; ++block) {
          const int64_t c0 = block * block_c, c1 = std::min(g.channels, c0 + block_c);
          for (int64_t tile = begin; tile < end; ++tile) {
            TileAcc& a = acc[tile];
            coord_pass(taps[tile], b, tile, a.gix, a.giy, a.gocc, c0, c1, block == 0, block == blocks - 1);
          }
        }
      });
    }
    if (!grad_in) continue;
    if (!(coords_in_table && shared)) {
      at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) fill(taps[tile], b, tile, true);
      });
    }
    at::parallel_for(0, g.channels * segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / segments, s = task % segments;
        float* gi = s == 0 ? grad_in + (b * g.channels + c) * plane
                           : partial.data() + ((c * (segments - 1)) + s - 1) * plane;
        if (s > 0) std::fill(gi, gi + plane, 0.0f);
        const float* go_bc = grad_out + b * g.out_stride[0] + c * g.out_stride[1];
        const int64_t t1 = std::min(tiles, (s + 1) * tiles_per_segment);
        for (int64_t tile = s * tiles_per_segment; tile < t1; ++tile) {
          const int64_t y = tile / tiles_per_row, x0 = (tile % tiles_per_row) * kTile;
          input_grad_tile_avx2(taps[tile], std::min(kTile, g.out_w - x0),
                               go_bc + y * g.out_stride[2] + x0 * g.out_stride[3], g.out_stride[3], gi);
        }
      }
    });
    if (segments > 1) {
      at::parallel_for(0, g.channels * plane, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end;) {  // runs of one channel: contiguous, vectorisable adds
          const int64_t c = e / plane, p0 = e % plane, p1 = std::min(plane, p0 + (end - e));
          float* dst = grad_in + (b * g.channels + c) * plane;
          for (int64_t s = 1; s < segments; ++s) {  // segment order fixed: deterministic sums
            const float* src = partial.data() + ((c * (segments - 1)) + s - 1) * plane;
            for (int64_t p = p0; p < p1; ++p) dst[p] += src[p];
          }
          e += p1 - p0;
        }
      });
    }
  }
}
#endif

WarpGeometry make_geometry(const at::Tensor& input, const at::Tensor& grid, const at::Tensor* occ,
                           const at::Tensor& out) {
  WarpGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_h = grid.size(1);
  g.out_w = grid.size(2);
  for (int i = 0; i < 4; ++i) {
    g.in_stride[i] = input.stride(i);
    g.grid_stride[i] = grid.stride(i);
    g.occ_stride[i] = occ ? occ->stride(i) : 0;
    g.out_stride[i] = out.stride(i);
  }
  // The CPU backward always accumulates the input gradient in a contiguous buffer.
  g.grad_in_stride[3] = 1;
  g.grad_in_stride[2] = g.in_w;
  g.grad_in_stride[1] = g.in_h * g.in_w;
  g.grad_in_stride[0] = g.channels * g.in_h * g.in_w;
  return g;
}

}  // namespace

at::Tensor warp_occlusion_forward(const at::Tensor& input, const at::Tensor& grid,
                                  const c10::optional<at::Tensor>& occlusion) {
  check_warp_args(input, grid, occlusion, "cpu");
  auto out = at::empty({input.size(0), input.size(1), grid.size(1), grid.size(2)}, input.options());
  if (out.numel() == 0) return out;
  poison(out);
  const at::Tensor* occ = occlusion.has_value() ? &occlusion.value() : nullptr;
  const auto g = make_geometry(input, grid, occ, out);
#ifdef DAGAN_WARP_HAVE_AVX2
  if (input.scalar_type() == at::kFloat && use_avx2_path(g)) {
    forward_vec<float>(g, input.const_data_ptr<float>(), grid.const_data_ptr<float>(),
                       occ ? occ->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), tiles_f32());
    return out;
  }
  if (input.scalar_type() == at::kBFloat16 && use_avx2_path(g) && bf16_vector_layout(g)) {
    // The taps come from float32 copies of grid and occlusion (small: B*Ho*Wo*3 values), the values
    // the generic path converts one at a time; the input is read as bfloat16.
    const at::Tensor grid32 = grid.to(at::kFloat);
    const at::Tensor occ32 = occ ? occ->to(at::kFloat) : at::Tensor();
    const auto g32 = make_geometry(input, grid32, occ ? &occ32 : nullptr, out);
    forward_vec<at::BFloat16>(g32, input.const_data_ptr<at::BFloat16>(), grid32.const_data_ptr<float>(),
                              occ ? occ32.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<at::BFloat16>(),
                              tiles_bf16());
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "warp_occlusion_fwd_cpu", [&] {
    forward_kernel<scalar_t>(g, input.const_data_ptr<scalar_t>(), grid.const_data_ptr<scalar_t>(),
                             occ ? occ->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> warp_occlusion_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid,
    const c10::optional<at::Tensor>& occlusion, std::array<bool, 3> output_mask) {
  check_warp_args(input, grid, occlusion, "cpu");
  check_warp_grad_output(grad_output, input, grid);
  const at::Tensor* occ = occlusion.has_value() ? &occlusion.value() : nullptr;
  const bool want_input = output_mask[0], want_grid = output_mask[1], want_occ = output_mask[2] && occ;
  const int64_t B = input.size(0), Ho = grid.size(1), Wo = grid.size(2);
#ifdef DAGAN_WARP_HAVE_AVX2
  if (input.scalar_type() == at::kBFloat16 && grad_output.numel() > 0 &&
      use_avx2_path(make_geometry(input, grid, occ, grad_output))) {
    // bfloat16: the float32 vector backward on exact float32 copies (same layouts; the input only when
    // the grid or occlusion gradient reads its values), gradients summed in float32 and rounded to
    // bfloat16 once. Every output is a fresh conversion: nothing poisoned is left unwritten.
    const bool coords = want_grid || want_occ;
    const at::Tensor input32 = coords ? input.to(at::kFloat) : at::Tensor();
    const at::Tensor grid32 = grid.to(at::kFloat), go32 = grad_output.to(at::kFloat);
    const at::Tensor occ32 = occ ? occ->to(at::kFloat) : at::Tensor();
    const auto g32 = make_geometry(coords ? input32 : input, grid32, occ ? &occ32 : nullptr, go32);
    if (use_avx2_path(g32)) {
      const auto f32 = grid.options().dtype(at::kFloat);
      at::Tensor gi32 = want_input ? at::zeros(input.sizes(), f32) : at::Tensor();
      at::Tensor gg32 = want_grid ? at::empty({B, Ho, Wo, 2}, f32) : at::Tensor();
      at::Tensor gocc32 = want_occ ? at::empty({B, 1, Ho, Wo}, f32) : at::Tensor();
      backward_avx2(g32, go32.const_data_ptr<float>(), coords ? input32.const_data_ptr<float>() : nullptr,
                    grid32.const_data_ptr<float>(), occ ? occ32.const_data_ptr<float>() : nullptr,
                    want_grid ? gg32.mutable_data_ptr<float>() : nullptr,
                    want_occ ? gocc32.mutable_data_ptr<float>() : nullptr,
                    want_input ? gi32.mutable_data_ptr<float>() : nullptr);
      const auto bf16 = at::kBFloat16;
      return {want_input ? gi32.to(bf16) : at::empty({0}, input.options()),
              want_grid ? gg32.to(bf16) : at::empty({0}, grid.options()),
              want_occ ? gocc32.to(bf16) : at::empty({0}, grid.options())};
    }
  }
#endif
  at::Tensor grad_input = want_input ? at::zeros(input.sizes(), input.options()) : at::empty({0}, input.options());
  at::Tensor grad_grid = want_grid ? at::empty({B, Ho, Wo, 2}, grid.options()) : at::empty({0}, grid.options());
  at::Tensor grad_occ = want_occ ? at::empty({B, 1, Ho, Wo}, grid.options()) : at::empty({0}, grid.options());
  poison(grad_grid);
  poison(grad_occ);
  if (grad_output.numel() == 0) {
    if (want_grid) grad_grid.zero_();
    if (want_occ) grad_occ.zero_();
    return {grad_input, grad_grid, grad_occ};
  }
  const auto g = make_geometry(input, grid, occ, grad_output);
#ifdef DAGAN_WARP_HAVE_AVX2
  if (input.scalar_type() == at::kFloat && use_avx2_path(g)) {
    const float* go = grad_output.const_data_ptr<float>();
    const float* gr = grid.const_data_ptr<float>();
    const float* oc = occ ? occ->const_data_ptr<float>() : nullptr;
    backward_avx2(g, go, input.const_data_ptr<float>(), gr, oc, want_grid ? grad_grid.mutable_data_ptr<float>() : nullptr,
                  want_occ ? grad_occ.mutable_data_ptr<float>() : nullptr,
                  want_input ? grad_input.mutable_data_ptr<float>() : nullptr);
    return {grad_input, grad_grid, grad_occ};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "warp_occlusion_bwd_cpu", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* gr = grid.const_data_ptr<scalar_t>();
    const scalar_t* oc = occ ? occ->const_data_ptr<scalar_t>() : nullptr;
    if (want_grid || want_occ) {
      grid_occlusion_grad_kernel<scalar_t>(g, go, input.const_data_ptr<scalar_t>(), gr, oc,
                                           want_grid ? grad_grid.mutable_data_ptr<scalar_t>() : nullptr,
                                           want_occ ? grad_occ.mutable_data_ptr<scalar_t>() : nullptr);
    }
    if (want_input) input_grad<scalar_t>(g, go, gr, oc, grad_input);
  });
  return {grad_input, grad_grid, grad_occ};
}

}  // namespace cpu
}  // namespace dagan_fast
