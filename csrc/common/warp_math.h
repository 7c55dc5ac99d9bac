// Bilinear tap math of F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False),
// shared by the CPU (g++) and CUDA (nvcc) warp kernels so both compute exactly the same taps.
// Torch-free on purpose: nvcc compiles it without any PyTorch header.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DAGAN_HD __host__ __device__ __forceinline__
#else
#define DAGAN_HD inline
#endif

namespace dagan_fast {
namespace warp {

// Sizes and element strides of the warp operands; the same struct drives the CPU and CUDA kernels,
// so any layout (NCHW, channels_last, sliced views) is read in place without a copy.
struct WarpGeometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int64_t in_stride[4];    // input     (B, C, Hi, Wi)
  int64_t grid_stride[4];  // grid      (B, Ho, Wo, 2)
  int64_t occ_stride[4];   // occlusion (B, 1, Ho, Wo); unused when there is no occlusion
  int64_t out_stride[4];   // output or grad_output (B, C, Ho, Wo)
  int64_t grad_in_stride[4];  // backward: the input-gradient (accumulation) buffer (B, C, Hi, Wi)
};

// The four taps of one sample point. Invalid taps (outside the input) carry weight zero and offset
// zero, and `valid` says which ones exist: kernels must skip them, not multiply by zero, so an
// inf stored at offset 0 cannot turn into NaN.
template <typename T>
struct BilinearTaps {
  T ix, iy;                  // unnormalised, clamped source coordinates
  T frac_x, frac_y;          // ix - floor(ix), iy - floor(iy)
  T weight[4];               // nw, ne, sw, se
  int64_t offset[4];         // element offsets of the taps inside one (b, c) plane
  bool valid[4];
};

// Coordinates further out than this read only zeros, whatever the exact value, so clamping to it
// changes no value and no gradient but keeps the float->int conversion defined (inf, 1e30, NaN).
template <typename T>
DAGAN_HD T clamp_source_coord(T v, int64_t size) {
  const T lo = T(-2);
  const T hi = T(size + 1);
  if (!(v >= lo)) return lo;  // also maps NaN to lo
  return v > hi ? hi : v;
}

template <typename T>
DAGAN_HD int64_t floor_to_int(T v) {  // v is clamped, so the cast is exact and in range
  const int64_t t = static_cast<int64_t>(v);
  return (static_cast<T>(t) > v) ? t - 1 : t;
}

// align_corners=False: -1 and +1 are the outer edges of the border pixels.
template <typename T>
DAGAN_HD T unnormalize(T coord, int64_t size) {
  return ((coord + T(1)) * static_cast<T>(size) - T(1)) / T(2);
}

// Taps of the grid point (grid_x, grid_y) in [-1, 1] units, for a plane with the given strides.
template <typename T>
DAGAN_HD BilinearTaps<T> bilinear_taps(T grid_x, T grid_y, int64_t in_h, int64_t in_w,
                                       int64_t stride_h, int64_t stride_w) {
  BilinearTaps<T> t;
  t.ix = clamp_source_coord(unnormalize(grid_x, in_w), in_w);
  t.iy = clamp_source_coord(unnormalize(grid_y, in_h), in_h);
  const int64_t x0 = floor_to_int(t.ix);
  const int64_t y0 = floor_to_int(t.iy);
  const T x0f = static_cast<T>(x0), y0f = static_cast<T>(y0);
  // Same expressions as ATen's grid sampler, so float32 results agree to the last bits.
  t.frac_x = t.ix - x0f;
  t.frac_y = t.iy - y0f;
  const T east = (x0f + T(1)) - t.ix, south = (y0f + T(1)) - t.iy;
  t.weight[0] = east * south;                 // nw
  t.weight[1] = t.frac_x * south;             // ne
  t.weight[2] = east * t.frac_y;              // sw
  t.weight[3] = t.frac_x * t.frac_y;          // se
  const bool vx0 = x0 >= 0 && x0 < in_w, vx1 = x0 + 1 >= 0 && x0 + 1 < in_w;
  const bool vy0 = y0 >= 0 && y0 < in_h, vy1 = y0 + 1 >= 0 && y0 + 1 < in_h;
  t.valid[0] = vx0 && vy0;
  t.valid[1] = vx1 && vy0;
  t.valid[2] = vx0 && vy1;
  t.valid[3] = vx1 && vy1;
  const int64_t base = y0 * stride_h + x0 * stride_w;
  t.offset[0] = t.valid[0] ? base : 0;
  t.offset[1] = t.valid[1] ? base + stride_w : 0;
  t.offset[2] = t.valid[2] ? base + stride_h : 0;
  t.offset[3] = t.valid[3] ? base + stride_h + stride_w : 0;
  for (int i = 0; i < 4; ++i) {
    if (!t.valid[i]) t.weight[i] = T(0);
  }
  return t;
}

// Bilinear value from the four tap values (the caller passes zero for invalid taps).
template <typename T>
DAGAN_HD T bilinear_value(const BilinearTaps<T>& t, T v_nw, T v_ne, T v_sw, T v_se) {
  return t.weight[0] * v_nw + t.weight[1] * v_ne + t.weight[2] * v_sw + t.weight[3] * v_se;
}

// Adds d(sample)/d(ix, iy) * g to (gix, giy). Multiply by grid_coord_scale() for grid units.
template <typename T>
DAGAN_HD void accumulate_coord_grad(const BilinearTaps<T>& t, T v_nw, T v_ne, T v_sw, T v_se, T g,
                                    T& gix, T& giy) {
  const T north = T(1) - t.frac_y, west = T(1) - t.frac_x;
  gix += ((v_ne - v_nw) * north + (v_se - v_sw) * t.frac_y) * g;
  giy += ((v_sw - v_nw) * west + (v_se - v_ne) * t.frac_x) * g;
}

// d(ix)/d(grid_x) for align_corners=False.
template <typename T>
DAGAN_HD T grid_coord_scale(int64_t size) {
  return static_cast<T>(size) / T(2);
}

}  // namespace warp
}  // namespace dagan_fast
