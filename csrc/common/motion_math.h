// Taylor-motion math of sparse_motion_inputs and dense_motion (FOMM/DaGAN), shared by the CPU (g++)
// and CUDA (nvcc) kernels so both compute the same values. Torch-free on purpose.
//
// T_0(z) = z (background), T_k(z) = A_k z + b_k with A_k = J_s inv(J_d), b_k = kp_s - A_k kp_d. The
// affine is computed once per keypoint; the driving Jacobian's |det| is floored at kJacobianDetFloor
// (sign kept, zero counts as positive), exactly as dagan_fast/ops/reference.py does.
#pragma once
#include <math.h>
#include <stdint.h>

#include "warp_math.h"

namespace dagan_fast {
namespace motion {

constexpr double kJacobianDetFloor = 1e-6;

// Sizes and element strides of the motion operands; one struct drives the CPU and CUDA kernels.
struct MotionGeometry {
  int64_t batch, keypoints, channels, height, width;  // channels: source C (sparse), unused (dense)
  int64_t in_stride[4];    // source (B,C,H,W) (sparse) or mask_logits (B,K+1,H,W) (dense)
  int64_t kps_stride[3];   // kp_source   (B,K,2)
  int64_t kpd_stride[3];   // kp_driving  (B,K,2)
  int64_t jacs_stride[4];  // jac_source  (B,K,2,2); unused when absent
  int64_t jacd_stride[4];  // jac_driving (B,K,2,2); unused when absent
  int64_t grad_stride[4];  // sparse grad (B,(K+1)(C+1),H,W) or dense grad_mask (B,K+1,H,W)
  int64_t gdef_stride[4];  // dense grad_deformation (B,H,W,2)
};

// One keypoint's inputs in the accumulation type; absent Jacobians are the identity.
template <typename T>
struct KeypointParams {
  T ks[2], kd[2];
  T js[4], jd[4];  // row-major 2x2
  bool has_js, has_jd;
};

// T(z) = A z + b.
template <typename T>
struct Affine {
  T a[4];  // row-major 2x2
  T b[2];
};

// Per-keypoint gradient sums over pixels, in this order (the sparse op uses all ten, dense the first six).
enum KeypointSum : int {
  kSumA00 = 0, kSumA01, kSumA10, kSumA11,  // dL/dA
  kSumB0, kSumB1,                          // dL/db
  kSumHeatD0, kSumHeatD1,                  // sum g_heat G_d (z - kp_d)
  kSumHeatS0, kSumHeatS1,                  // sum g_heat G_s (z - kp_s)
  kSparseSums = 10, kDenseSums = 6
};

DAGAN_HD float exp_t(float v) { return expf(v); }
DAGAN_HD double exp_t(double v) { return exp(v); }

// (H,W) coordinate grid of the official make_coordinate_grid: endpoints included, a size-1 axis is 0.
// Same expression as the reference (2 * (i / (n-1)) - 1) so float32 agrees bitwise.
template <typename T>
DAGAN_HD T grid_coordinate(int64_t i, int64_t n) {
  return n == 1 ? T(0) : T(2) * (static_cast<T>(i) / static_cast<T>(n - 1)) - T(1);
}

template <typename T>
DAGAN_HD T floored_det(T det) {
  const T floor = static_cast<T>(kJacobianDetFloor);
  if (det < T(0) ? -det < floor : det < floor) return det < T(0) ? -floor : floor;
  return det;
}

template <typename T>
DAGAN_HD bool det_is_floored(T det) {
  const T floor = static_cast<T>(kJacobianDetFloor);
  return (det < T(0) ? -det : det) < floor;
}

// Closed-form inverse with the determinant floor.
template <typename T>
DAGAN_HD void inverse_2x2(const T j[4], T inv[4]) {
  const T det = floored_det(j[0] * j[3] - j[1] * j[2]);
  inv[0] = j[3] / det;
  inv[1] = -j[1] / det;
  inv[2] = -j[2] / det;
  inv[3] = j[0] / det;
}

// d inverse_2x2 / d j, chained with grad_inv; the path through a floored det carries no gradient.
template <typename T>
DAGAN_HD void inverse_2x2_backward(const T grad_inv[4], const T j[4], T grad_j[4]) {
  const T a = j[0], b = j[1], c = j[2], d = j[3];
  const T raw = a * d - b * c;
  const T det = floored_det(raw);
  const T adj[4] = {d, -b, -c, a};
  T grad_det = -(grad_inv[0] * adj[0] + grad_inv[1] * adj[1] + grad_inv[2] * adj[2] + grad_inv[3] * adj[3]) /
               (det * det);
  if (det_is_floored(raw)) grad_det = T(0);
  grad_j[0] = grad_det * d + grad_inv[3] / det;
  grad_j[3] = grad_det * a + grad_inv[0] / det;
  grad_j[1] = -grad_det * c - grad_inv[1] / det;
  grad_j[2] = -grad_det * b - grad_inv[2] / det;
}

template <typename T>
DAGAN_HD void matmul_2x2(const T x[4], const T y[4], T out[4]) {
  out[0] = x[0] * y[0] + x[1] * y[2];
  out[1] = x[0] * y[1] + x[1] * y[3];
  out[2] = x[2] * y[0] + x[3] * y[2];
  out[3] = x[2] * y[1] + x[3] * y[3];
}

template <typename T>
DAGAN_HD Affine<T> keypoint_affine(const KeypointParams<T>& p) {
  Affine<T> t;
  T inv[4] = {T(1), T(0), T(0), T(1)};
  if (p.has_jd) inverse_2x2(p.jd, inv);
  if (p.has_js) {
    matmul_2x2(p.js, inv, t.a);
  } else {
    for (int i = 0; i < 4; ++i) t.a[i] = inv[i];
  }
  t.b[0] = p.ks[0] - (t.a[0] * p.kd[0] + t.a[1] * p.kd[1]);
  t.b[1] = p.ks[1] - (t.a[2] * p.kd[0] + t.a[3] * p.kd[1]);
  return t;
}

template <typename T>
DAGAN_HD void apply_affine(const Affine<T>& t, T x, T y, T& mx, T& my) {
  mx = t.a[0] * x + t.a[1] * y + t.b[0];
  my = t.a[2] * x + t.a[3] * y + t.b[1];
}

// One axis of the separable Gaussian exp(-|z - kp|^2 / (2 variance)) = factor(x) * factor(y);
// the CPU kernel tabulates the factors per keypoint, the CUDA one evaluates them per pixel.
template <typename T>
DAGAN_HD T gaussian_factor(T z, T center, T variance) {
  const T d = z - center;
  return exp_t(T(-0.5) * (d * d) / variance);
}

// Adds one pixel's motion gradient (gmx, gmy) of T_k at z = (x, y) to sums[kSumA00 .. kSumB1].
template <typename S, typename T>
DAGAN_HD void accumulate_affine_grad(S* sums, T gmx, T gmy, T x, T y) {
  sums[kSumA00] += S(gmx * x);
  sums[kSumA01] += S(gmx * y);
  sums[kSumA10] += S(gmy * x);
  sums[kSumA11] += S(gmy * y);
  sums[kSumB0] += S(gmx);
  sums[kSumB1] += S(gmy);
}

// Adds one pixel's heat gradient g_heat (heat = G_d - G_s) to sums[kSumHeatD0 .. kSumHeatS1].
template <typename S, typename T>
DAGAN_HD void accumulate_heat_grad(S* sums, T g_heat, T gauss_d, T gauss_s, T x, T y, const KeypointParams<T>& p) {
  const T wd = g_heat * gauss_d, ws = g_heat * gauss_s;
  sums[kSumHeatD0] += S(wd * (x - p.kd[0]));
  sums[kSumHeatD1] += S(wd * (y - p.kd[1]));
  sums[kSumHeatS0] += S(ws * (x - p.ks[0]));
  sums[kSumHeatS1] += S(ws * (y - p.ks[1]));
}

// Gradients of one keypoint's inputs from its summed gradient (dA, db) and the direct (heat)
// gradients of kp_s and kp_d: the chain through keypoint_affine (reference.keypoint_affine_backward).
// g_jacs / g_jacd are written only when the Jacobian is present.
template <typename T>
DAGAN_HD void keypoint_affine_backward(const KeypointParams<T>& p, const T grad_a_in[4], const T grad_b[2],
                                       const T direct_s[2], const T direct_d[2], T g_kps[2], T g_jacs[4],
                                       T g_kpd[2], T g_jacd[4]) {
  const Affine<T> t = keypoint_affine(p);
  g_kps[0] = grad_b[0] + direct_s[0];
  g_kps[1] = grad_b[1] + direct_s[1];
  T ga[4];
  ga[0] = grad_a_in[0] - grad_b[0] * p.kd[0];
  ga[1] = grad_a_in[1] - grad_b[0] * p.kd[1];
  ga[2] = grad_a_in[2] - grad_b[1] * p.kd[0];
  ga[3] = grad_a_in[3] - grad_b[1] * p.kd[1];
  g_kpd[0] = -(t.a[0] * grad_b[0] + t.a[2] * grad_b[1]) + direct_d[0];
  g_kpd[1] = -(t.a[1] * grad_b[0] + t.a[3] * grad_b[1]) + direct_d[1];
  T inv[4] = {T(1), T(0), T(0), T(1)};
  if (p.has_jd) {
    inverse_2x2(p.jd, inv);
    T grad_inv[4];
    if (p.has_js) {  // J_s^T ga
      grad_inv[0] = p.js[0] * ga[0] + p.js[2] * ga[2];
      grad_inv[1] = p.js[0] * ga[1] + p.js[2] * ga[3];
      grad_inv[2] = p.js[1] * ga[0] + p.js[3] * ga[2];
      grad_inv[3] = p.js[1] * ga[1] + p.js[3] * ga[3];
    } else {
      for (int i = 0; i < 4; ++i) grad_inv[i] = ga[i];
    }
    inverse_2x2_backward(grad_inv, p.jd, g_jacd);
  }
  if (p.has_js) {  // ga inv^T
    g_jacs[0] = ga[0] * inv[0] + ga[1] * inv[1];
    g_jacs[1] = ga[0] * inv[2] + ga[1] * inv[3];
    g_jacs[2] = ga[2] * inv[0] + ga[3] * inv[1];
    g_jacs[3] = ga[2] * inv[2] + ga[3] * inv[3];
  }
}

// Keypoint gradients from the pixel sums (kSparseSums for the sparse op with its heat terms,
// kDenseSums for dense_motion, whose heat terms are absent: pass has_heat = false).
template <typename T, typename S>
DAGAN_HD void keypoint_grads_from_sums(const KeypointParams<T>& p, const S* sums, bool has_heat, T variance,
                                       T g_kps[2], T g_jacs[4], T g_kpd[2], T g_jacd[4]) {
  const T ga[4] = {T(sums[kSumA00]), T(sums[kSumA01]), T(sums[kSumA10]), T(sums[kSumA11])};
  const T gb[2] = {T(sums[kSumB0]), T(sums[kSumB1])};
  T ds[2] = {T(0), T(0)}, dd[2] = {T(0), T(0)};
  if (has_heat) {
    dd[0] = T(sums[kSumHeatD0]) / variance;
    dd[1] = T(sums[kSumHeatD1]) / variance;
    ds[0] = -(T(sums[kSumHeatS0]) / variance);
    ds[1] = -(T(sums[kSumHeatS1]) / variance);
  }
  keypoint_affine_backward(p, ga, gb, ds, dd, g_kps, g_jacs, g_kpd, g_jacd);
}

// The motion's bilinear sample reuses the warp taps (grid_sample, bilinear, zeros, align_corners=False);
// this gives the top-left tap (x0, y0) again, to address a second (contiguous) plane layout.
template <typename T>
DAGAN_HD int64_t tap_offset_in(const warp::BilinearTaps<T>& t, int tap, int64_t stride_h, int64_t stride_w) {
  const int64_t x0 = warp::floor_to_int(t.ix) + (tap & 1);
  const int64_t y0 = warp::floor_to_int(t.iy) + (tap >> 1);
  return y0 * stride_h + x0 * stride_w;
}

// Softmax-mixture backward of one pixel: grad_logit_k = m_k (gm_k - sum_j m_j gm_j).
template <typename T>
DAGAN_HD T softmax_grad(T m, T gm, T weighted_sum) {
  return m * (gm - weighted_sum);
}

}  // namespace motion
}  // namespace dagan_fast
