// CUDA kernels of the Taylor-motion ops: one thread per (image, pixel), math from common/motion_math.h
// (the same code the CPU kernel runs). Torch-free: compiled by nvcc alone.
//
// Every launcher first runs keypoint_setup_kernel, which gathers each keypoint's inputs and its affine
// (A_k, b_k) once into the workspace; the pixel kernels only read them. Backward: the source gradient
// goes through atomics into an fp32/fp64 buffer; the per-keypoint pixel sums are reduced per block
// (warp shuffles, then shared memory) and added atomically, then keypoint_grads_kernel chains them
// through the affine.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/motion_math.h"
#include "../common/warp_math.h"
#include "motion_launchers.h"

namespace {

using dagan_fast::motion::Affine;
using dagan_fast::motion::KeypointParams;
using dagan_fast::motion::MotionGeometry;
namespace motion = dagan_fast::motion;
namespace warp = dagan_fast::warp;

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds to the output type; halves clamp to their finite range first (like reference._to_finite).
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(fminf(fmaxf(v, -65504.0f), 65504.0f));
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(fminf(fmaxf(v, -3.3895313892515355e38f), 3.3895313892515355e38f));
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename A>
struct KeypointSlot {  // one workspace entry
  KeypointParams<A> params;
  Affine<A> affine;
};

// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void keypoint_setup_kernel(MotionGeometry g,
                                      const T* __restrict__ kps,   // (B,K,2)
                                      const T* __restrict__ jacs,  // (B,K,2,2) or null
                                      const T* __restrict__ kpd,   // (B,K,2)
                                      const T* __restrict__ jacd,  // (B,K,2,2) or null
                                      KeypointSlot<typename Acc<T>::type>* __restrict__ slots) {  // (B,K)
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= g.batch * g.keypoints) return;
  const int64_t b = i / g.keypoints, k = i % g.keypoints;
  KeypointParams<A> p;
  p.has_js = jacs != nullptr;
  p.has_jd = jacd != nullptr;
  for (int c = 0; c < 2; ++c) {
    p.ks[c] = to_acc<A>(kps[b * g.kps_stride[0] + k * g.kps_stride[1] + c * g.kps_stride[2]]);
    p.kd[c] = to_acc<A>(kpd[b * g.kpd_stride[0] + k * g.kpd_stride[1] + c * g.kpd_stride[2]]);
  }
  for (int e = 0; e < 4; ++e) {
    const int r = e / 2, c = e % 2;
    p.js[e] = jacs ? to_acc<A>(jacs[b * g.jacs_stride[0] + k * g.jacs_stride[1] + r * g.jacs_stride[2] +
                                    c * g.jacs_stride[3]])
                   : A(r == c);
    p.jd[e] = jacd ? to_acc<A>(jacd[b * g.jacd_stride[0] + k * g.jacd_stride[1] + r * g.jacd_stride[2] +
                                    c * g.jacd_stride[3]])
                   : A(r == c);
  }
  slots[i].params = p;
  slots[i].affine = motion::keypoint_affine(p);
}

// Motion T_k of pixel (x, y); k = 0 is the identity.
template <typename A>
__device__ __forceinline__ void motion_at(const KeypointSlot<A>* slots_b, int64_t k, A zx, A zy, A& mx, A& my) {
  if (k == 0) {
    mx = zx;
    my = zy;
  } else {
    motion::apply_affine(slots_b[k - 1].affine, zx, zy, mx, my);
  }
}

// Sums `n` values over the block and atomically adds them to out[0..n); every thread must call it.
template <typename A, int N>
__device__ void block_sum_atomic(A (&v)[N], A* out, A* shared /* kWarps * N */) {
  const int lane = threadIdx.x % 32, warp_id = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int off = 16; off > 0; off /= 2) v[i] += __shfl_down_sync(0xffffffffu, v[i], off);
    if (lane == 0) shared[warp_id * N + i] = v[i];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    A total = 0;
    for (int w = 0; w < kWarps; ++w) total += shared[w * N + threadIdx.x];
    atomicAdd(out + threadIdx.x, total);
  }
  __syncthreads();
}

// occupancy plan: 256 threads/block, 2 blocks/SM, <= 128 registers/thread (fp32 ~72: 3 blocks/SM; fp64 96)
template <typename T>
__global__ void sparse_forward_kernel(MotionGeometry g, typename Acc<T>::type variance,
                                      const T* __restrict__ src,  // (B,C,H,W), any strides
                                      const KeypointSlot<typename Acc<T>::type>* __restrict__ slots,  // (B,K)
                                      T* __restrict__ out) {  // contiguous (B,(K+1)(C+1),H,W)
  using A = typename Acc<T>::type;
  const int64_t HW = g.height * g.width, K = g.keypoints, C = g.channels;
  const int64_t pixels = g.batch * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / HW, pix = i % HW, y = pix / g.width, x = pix % g.width;
    const A zx = motion::grid_coordinate<A>(x, g.width), zy = motion::grid_coordinate<A>(y, g.height);
    const KeypointSlot<A>* slots_b = slots + b * K;
    const T* src_b = src + b * g.in_stride[0];
    for (int64_t k = 0; k <= K; ++k) {
      T* o = out + ((b * (K + 1) + k) * (C + 1)) * HW + pix;
      A heat = 0;
      if (k > 0) {
        const KeypointParams<A>& p = slots_b[k - 1].params;
        heat = motion::gaussian_factor(zx, p.kd[0], variance) * motion::gaussian_factor(zy, p.kd[1], variance) -
               motion::gaussian_factor(zx, p.ks[0], variance) * motion::gaussian_factor(zy, p.ks[1], variance);
      }
      o[0] = from_acc<T, A>(heat);
      A mx, my;
      motion_at(slots_b, k, zx, zy, mx, my);
      const auto taps = warp::bilinear_taps<A>(mx, my, g.height, g.width, g.in_stride[2], g.in_stride[3]);
      for (int64_t c = 0; c < C; ++c) {
        const T* plane = src_b + c * g.in_stride[1];
        A v = 0;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (taps.valid[t]) v += taps.weight[t] * to_acc<A>(plane[taps.offset[t]]);
        }
        o[(1 + c) * HW] = from_acc<T, A>(v);
      }
    }
  }
}

// Grid: (pixel blocks, B); a block never spans two images, so its keypoint sums belong to one image.
// occupancy plan: 256 threads/block, 2 blocks/SM, <= 128 registers/thread
template <typename T>
__global__ void sparse_backward_kernel(MotionGeometry g, typename Acc<T>::type variance,
                                       const T* __restrict__ grad,  // (B,(K+1)(C+1),H,W), any strides
                                       const T* __restrict__ src,   // (B,C,H,W), any strides
                                       const KeypointSlot<typename Acc<T>::type>* __restrict__ slots,  // (B,K)
                                       typename Acc<T>::type* __restrict__ grad_src,  // zeroed (B,C,H,W) or null
                                       typename Acc<T>::type* __restrict__ kp_sums) {  // zeroed (B,K,10) or null
  using A = typename Acc<T>::type;
  __shared__ A shared[kWarps * motion::kSparseSums];
  const int64_t HW = g.height * g.width, K = g.keypoints, C = g.channels;
  const int64_t b = blockIdx.y;
  const int64_t pix = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const bool active = pix < HW;
  const int64_t y = active ? pix / g.width : 0, x = active ? pix % g.width : 0;
  const A zx = motion::grid_coordinate<A>(x, g.width), zy = motion::grid_coordinate<A>(y, g.height);
  const A sx = warp::grid_coord_scale<A>(g.width), sy = warp::grid_coord_scale<A>(g.height);
  const KeypointSlot<A>* slots_b = slots + b * K;
  const T* src_b = src + b * g.in_stride[0];
  const T* grad_b = grad + b * g.grad_stride[0] + y * g.grad_stride[2] + x * g.grad_stride[3];
  A* gsrc_b = grad_src ? grad_src + b * C * HW : nullptr;
  for (int64_t k = 0; k <= K; ++k) {
    if (k == 0 && !gsrc_b) continue;
    A sums[motion::kSparseSums];
#pragma unroll
    for (int s = 0; s < motion::kSparseSums; ++s) sums[s] = A(0);
    if (active) {
      A mx, my;
      motion_at(slots_b, k, zx, zy, mx, my);
      const auto taps = warp::bilinear_taps<A>(mx, my, g.height, g.width, g.in_stride[2], g.in_stride[3]);
      A gix = 0, giy = 0;
      for (int64_t c = 0; c < C; ++c) {
        const A gv = to_acc<A>(grad_b[(k * (C + 1) + 1 + c) * g.grad_stride[1]]);
        if (kp_sums && k > 0) {
          const T* plane = src_b + c * g.in_stride[1];
          A v[4];
#pragma unroll
          for (int t = 0; t < 4; ++t) v[t] = taps.valid[t] ? to_acc<A>(plane[taps.offset[t]]) : A(0);
          warp::accumulate_coord_grad(taps, v[0], v[1], v[2], v[3], gv, gix, giy);
        }
        if (gsrc_b) {
          A* plane = gsrc_b + c * HW;
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            if (taps.valid[t]) atomicAdd(plane + motion::tap_offset_in(taps, t, g.width, 1), taps.weight[t] * gv);
          }
        }
      }
      if (kp_sums && k > 0) {
        const KeypointParams<A>& p = slots_b[k - 1].params;
        motion::accumulate_affine_grad(sums, gix * sx, giy * sy, zx, zy);
        const A gh = to_acc<A>(grad_b[k * (C + 1) * g.grad_stride[1]]);
        const A gd = motion::gaussian_factor(zx, p.kd[0], variance) * motion::gaussian_factor(zy, p.kd[1], variance);
        const A gs = motion::gaussian_factor(zx, p.ks[0], variance) * motion::gaussian_factor(zy, p.ks[1], variance);
        motion::accumulate_heat_grad(sums, gh, gd, gs, zx, zy, p);
      }
    }
    if (kp_sums && k > 0) block_sum_atomic(sums, kp_sums + (b * K + k - 1) * motion::kSparseSums, shared);
  }
}

// One thread per (b, k): the summed pixel gradients chained through the keypoint affine.
// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void keypoint_grads_kernel(int64_t count, int sums_per_keypoint, bool has_heat,
                                      typename Acc<T>::type variance,
                                      const KeypointSlot<typename Acc<T>::type>* __restrict__ slots,  // (B,K)
                                      const typename Acc<T>::type* __restrict__ kp_sums,  // (B,K,sums_per_keypoint)
                                      T* __restrict__ g_kps,    // (B,K,2) or null
                                      T* __restrict__ g_jacs,   // (B,K,2,2) or null
                                      T* __restrict__ g_kpd,    // (B,K,2) or null
                                      T* __restrict__ g_jacd) { // (B,K,2,2) or null
  using A = typename Acc<T>::type;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  A kps[2], jacs[4] = {0, 0, 0, 0}, kpd[2], jacd[4] = {0, 0, 0, 0};
  motion::keypoint_grads_from_sums(slots[i].params, kp_sums + i * sums_per_keypoint, has_heat, variance, kps, jacs,
                                   kpd, jacd);
  for (int e = 0; e < 2; ++e) {
    if (g_kps) g_kps[i * 2 + e] = from_acc<T, A>(kps[e]);
    if (g_kpd) g_kpd[i * 2 + e] = from_acc<T, A>(kpd[e]);
  }
  for (int e = 0; e < 4; ++e) {
    if (g_jacs) g_jacs[i * 4 + e] = from_acc<T, A>(jacs[e]);
    if (g_jacd) g_jacd[i * 4 + e] = from_acc<T, A>(jacd[e]);
  }
}

// Softmax statistics (max, sum of exp) of one pixel's K+1 logits.
template <typename T, typename A>
__device__ __forceinline__ void softmax_stats(const T* logits_px, int64_t stride_k, int64_t count, A& top, A& total) {
  top = to_acc<A>(logits_px[0]);
  for (int64_t k = 1; k < count; ++k) top = fmax(top, to_acc<A>(logits_px[k * stride_k]));
  total = 0;
  for (int64_t k = 0; k < count; ++k) total += motion::exp_t(to_acc<A>(logits_px[k * stride_k]) - top);
}

// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void dense_forward_kernel(MotionGeometry g,
                                     const T* __restrict__ logits,  // (B,K+1,H,W), any strides
                                     const KeypointSlot<typename Acc<T>::type>* __restrict__ slots,  // (B,K)
                                     T* __restrict__ deformation,   // contiguous (B,H,W,2)
                                     T* __restrict__ mask) {        // contiguous (B,K+1,H,W)
  using A = typename Acc<T>::type;
  const int64_t HW = g.height * g.width, K = g.keypoints;
  const int64_t pixels = g.batch * HW;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / HW, pix = i % HW, y = pix / g.width, x = pix % g.width;
    const A zx = motion::grid_coordinate<A>(x, g.width), zy = motion::grid_coordinate<A>(y, g.height);
    const T* l = logits + b * g.in_stride[0] + y * g.in_stride[2] + x * g.in_stride[3];
    A top, total;
    softmax_stats<T, A>(l, g.in_stride[1], K + 1, top, total);
    A dx = 0, dy = 0;
    for (int64_t k = 0; k <= K; ++k) {
      const A m = motion::exp_t(to_acc<A>(l[k * g.in_stride[1]]) - top) / total;
      mask[(b * (K + 1) + k) * HW + pix] = from_acc<T, A>(m);
      A mx, my;
      motion_at(slots + b * K, k, zx, zy, mx, my);
      dx += m * mx;
      dy += m * my;
    }
    deformation[2 * i] = from_acc<T, A>(dx);
    deformation[2 * i + 1] = from_acc<T, A>(dy);
  }
}

// Grid: (pixel blocks, B), as for the sparse backward.
// occupancy plan: 256 threads/block, 3 blocks/SM, <= 80 registers/thread
template <typename T>
__global__ void dense_backward_kernel(MotionGeometry g,
                                      const T* __restrict__ grad_def,   // (B,H,W,2), any strides
                                      const T* __restrict__ grad_mask,  // (B,K+1,H,W), any strides
                                      const T* __restrict__ logits,     // (B,K+1,H,W), any strides
                                      const KeypointSlot<typename Acc<T>::type>* __restrict__ slots,  // (B,K)
                                      T* __restrict__ grad_logits,      // contiguous (B,K+1,H,W) or null
                                      typename Acc<T>::type* __restrict__ kp_sums) {  // zeroed (B,K,6) or null
  using A = typename Acc<T>::type;
  __shared__ A shared[kWarps * motion::kDenseSums];
  const int64_t HW = g.height * g.width, K = g.keypoints;
  const int64_t b = blockIdx.y;
  const int64_t pix = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const bool active = pix < HW;
  const int64_t y = active ? pix / g.width : 0, x = active ? pix % g.width : 0;
  const A zx = motion::grid_coordinate<A>(x, g.width), zy = motion::grid_coordinate<A>(y, g.height);
  const KeypointSlot<A>* slots_b = slots + b * K;
  const T* l = logits + b * g.in_stride[0] + y * g.in_stride[2] + x * g.in_stride[3];
  const T* gm = grad_mask + b * g.grad_stride[0] + y * g.grad_stride[2] + x * g.grad_stride[3];
  const T* gd = grad_def + b * g.gdef_stride[0] + y * g.gdef_stride[1] + x * g.gdef_stride[2];
  A top = 0, total = 1, gdx = 0, gdy = 0;
  if (active) {
    softmax_stats<T, A>(l, g.in_stride[1], K + 1, top, total);
    gdx = to_acc<A>(gd[0]);
    gdy = to_acc<A>(gd[g.gdef_stride[3]]);
  }
  if (grad_logits && active) {
    A wsum = 0;
    for (int64_t k = 0; k <= K; ++k) {
      const A m = motion::exp_t(to_acc<A>(l[k * g.in_stride[1]]) - top) / total;
      A mx, my;
      motion_at(slots_b, k, zx, zy, mx, my);
      wsum += m * (to_acc<A>(gm[k * g.grad_stride[1]]) + (gdx * mx + gdy * my));
    }
    for (int64_t k = 0; k <= K; ++k) {
      const A m = motion::exp_t(to_acc<A>(l[k * g.in_stride[1]]) - top) / total;
      A mx, my;
      motion_at(slots_b, k, zx, zy, mx, my);
      const A gmk = to_acc<A>(gm[k * g.grad_stride[1]]) + (gdx * mx + gdy * my);
      grad_logits[(b * (K + 1) + k) * HW + pix] = from_acc<T, A>(motion::softmax_grad(m, gmk, wsum));
    }
  }
  if (kp_sums) {
    for (int64_t k = 1; k <= K; ++k) {
      A sums[motion::kDenseSums] = {0, 0, 0, 0, 0, 0};
      if (active) {
        const A m = motion::exp_t(to_acc<A>(l[k * g.in_stride[1]]) - top) / total;
        motion::accumulate_affine_grad(sums, m * gdx, m * gdy, zx, zy);
      }
      block_sum_atomic(sums, kp_sums + (b * K + k - 1) * motion::kDenseSums, shared);
    }
  }
}

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
int setup(const MotionGeometry& g, const void* kps, const void* jacs, const void* kpd, const void* jacd,
          void* workspace, cudaStream_t s) {
  using A = typename Acc<T>::type;
  keypoint_setup_kernel<T><<<blocks_for(g.batch * g.keypoints), kThreads, 0, s>>>(
      g, static_cast<const T*>(kps), static_cast<const T*>(jacs), static_cast<const T*>(kpd),
      static_cast<const T*>(jacd), static_cast<KeypointSlot<A>*>(workspace));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int keypoint_grads(const MotionGeometry& g, int sums_per_keypoint, bool has_heat, double variance,
                   const void* workspace, const void* kp_sums, void* g_kps, void* g_jacs, void* g_kpd,
                   void* g_jacd, cudaStream_t s) {
  using A = typename Acc<T>::type;
  const int64_t count = g.batch * g.keypoints;
  keypoint_grads_kernel<T><<<blocks_for(count), kThreads, 0, s>>>(
      count, sums_per_keypoint, has_heat, static_cast<A>(variance), static_cast<const KeypointSlot<A>*>(workspace),
      static_cast<const A*>(kp_sums), static_cast<T*>(g_kps), static_cast<T*>(g_jacs), static_cast<T*>(g_kpd),
      static_cast<T*>(g_jacd));
  return static_cast<int>(cudaGetLastError());
}

// Blocks per image for the (pixel blocks, B) backward grids; gridDim.y is limited to 65535.
bool fits_2d_grid(const MotionGeometry& g) { return g.batch <= 65535; }

template <typename T>
int sparse_forward(const MotionGeometry& g, double variance, const void* src, const void* kps, const void* jacs,
                   const void* kpd, const void* jacd, void* out, void* workspace, cudaStream_t s) {
  using A = typename Acc<T>::type;
  int err = setup<T>(g, kps, jacs, kpd, jacd, workspace, s);
  if (err) return err;
  sparse_forward_kernel<T><<<blocks_for(g.batch * g.height * g.width), kThreads, 0, s>>>(
      g, static_cast<A>(variance), static_cast<const T*>(src), static_cast<const KeypointSlot<A>*>(workspace),
      static_cast<T*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int sparse_backward(const MotionGeometry& g, double variance, const void* grad, const void* src, const void* kps,
                    const void* jacs, const void* kpd, const void* jacd, void* grad_src, void* kp_sums,
                    void* g_kps, void* g_jacs, void* g_kpd, void* g_jacd, void* workspace, cudaStream_t s) {
  using A = typename Acc<T>::type;
  if (!fits_2d_grid(g)) return static_cast<int>(cudaErrorInvalidConfiguration);
  const bool want_kp = g_kps || g_jacs || g_kpd || g_jacd;
  if (want_kp && !kp_sums) return static_cast<int>(cudaErrorInvalidValue);
  int err = setup<T>(g, kps, jacs, kpd, jacd, workspace, s);
  if (err) return err;
  const dim3 grid(static_cast<unsigned>((g.height * g.width + kThreads - 1) / kThreads), static_cast<unsigned>(g.batch));
  sparse_backward_kernel<T><<<grid, kThreads, 0, s>>>(
      g, static_cast<A>(variance), static_cast<const T*>(grad), static_cast<const T*>(src),
      static_cast<const KeypointSlot<A>*>(workspace), static_cast<A*>(grad_src),
      want_kp ? static_cast<A*>(kp_sums) : nullptr);
  err = static_cast<int>(cudaGetLastError());
  if (err || !want_kp) return err;
  return keypoint_grads<T>(g, motion::kSparseSums, true, variance, workspace, kp_sums, g_kps, g_jacs, g_kpd, g_jacd,
                           s);
}

template <typename T>
int dense_forward(const MotionGeometry& g, const void* logits, const void* kps, const void* jacs, const void* kpd,
                  const void* jacd, void* deformation, void* mask, void* workspace, cudaStream_t s) {
  using A = typename Acc<T>::type;
  int err = setup<T>(g, kps, jacs, kpd, jacd, workspace, s);
  if (err) return err;
  dense_forward_kernel<T><<<blocks_for(g.batch * g.height * g.width), kThreads, 0, s>>>(
      g, static_cast<const T*>(logits), static_cast<const KeypointSlot<A>*>(workspace), static_cast<T*>(deformation),
      static_cast<T*>(mask));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int dense_backward(const MotionGeometry& g, const void* grad_def, const void* grad_mask, const void* logits,
                   const void* kps, const void* jacs, const void* kpd, const void* jacd, void* grad_logits,
                   void* kp_sums, void* g_kps, void* g_jacs, void* g_kpd, void* g_jacd, void* workspace,
                   cudaStream_t s) {
  using A = typename Acc<T>::type;
  if (!fits_2d_grid(g)) return static_cast<int>(cudaErrorInvalidConfiguration);
  const bool want_kp = g_kps || g_jacs || g_kpd || g_jacd;
  if (want_kp && !kp_sums) return static_cast<int>(cudaErrorInvalidValue);
  int err = setup<T>(g, kps, jacs, kpd, jacd, workspace, s);
  if (err) return err;
  const dim3 grid(static_cast<unsigned>((g.height * g.width + kThreads - 1) / kThreads), static_cast<unsigned>(g.batch));
  dense_backward_kernel<T><<<grid, kThreads, 0, s>>>(
      g, static_cast<const T*>(grad_def), static_cast<const T*>(grad_mask), static_cast<const T*>(logits),
      static_cast<const KeypointSlot<A>*>(workspace), static_cast<T*>(grad_logits),
      want_kp ? static_cast<A*>(kp_sums) : nullptr);
  err = static_cast<int>(cudaGetLastError());
  if (err || !want_kp) return err;
  return keypoint_grads<T>(g, motion::kDenseSums, false, 1.0, workspace, kp_sums, g_kps, g_jacs, g_kpd, g_jacd, s);
}

}  // namespace

#define DAGAN_MOTION_DISPATCH(dtype, CALL)                                  \
  switch (dtype) {                                                          \
    case kDaganFloat32: { using T = float; return CALL; }                   \
    case kDaganFloat64: { using T = double; return CALL; }                  \
    case kDaganFloat16: { using T = __half; return CALL; }                  \
    case kDaganBFloat16: { using T = __nv_bfloat16; return CALL; }          \
    default: return static_cast<int>(cudaErrorInvalidValue);                \
  }

extern "C" size_t dagan_fast_motion_workspace_bytes(int dtype, int64_t batch, int64_t keypoints) {
  const size_t slot = dtype == kDaganFloat64 ? sizeof(KeypointSlot<double>) : sizeof(KeypointSlot<float>);
  const int64_t count = batch * keypoints;
  return slot * static_cast<size_t>(count > 0 ? count : 1);
}

extern "C" int dagan_fast_sparse_motion_forward_cuda(int dtype, const MotionGeometry* geometry, double variance,
                                                     const void* source, const void* kp_source,
                                                     const void* jac_source, const void* kp_driving,
                                                     const void* jac_driving, void* out, void* workspace, int device,
                                                     void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  DAGAN_MOTION_DISPATCH(dtype, sparse_forward<T>(*geometry, variance, source, kp_source, jac_source, kp_driving,
                                                 jac_driving, out, workspace, s))
}

extern "C" int dagan_fast_sparse_motion_backward_cuda(int dtype, const MotionGeometry* geometry, double variance,
                                                      const void* grad, const void* source, const void* kp_source,
                                                      const void* jac_source, const void* kp_driving,
                                                      const void* jac_driving, void* grad_source_acc, void* kp_sums,
                                                      void* grad_kps, void* grad_jacs, void* grad_kpd,
                                                      void* grad_jacd, void* workspace, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  DAGAN_MOTION_DISPATCH(dtype, sparse_backward<T>(*geometry, variance, grad, source, kp_source, jac_source,
                                                  kp_driving, jac_driving, grad_source_acc, kp_sums, grad_kps,
                                                  grad_jacs, grad_kpd, grad_jacd, workspace, s))
}

extern "C" int dagan_fast_dense_motion_forward_cuda(int dtype, const MotionGeometry* geometry,
                                                    const void* mask_logits, const void* kp_source,
                                                    const void* jac_source, const void* kp_driving,
                                                    const void* jac_driving, void* deformation, void* mask,
                                                    void* workspace, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  DAGAN_MOTION_DISPATCH(dtype, dense_forward<T>(*geometry, mask_logits, kp_source, jac_source, kp_driving,
                                                jac_driving, deformation, mask, workspace, s))
}

extern "C" int dagan_fast_dense_motion_backward_cuda(int dtype, const MotionGeometry* geometry,
                                                     const void* grad_deformation, const void* grad_mask,
                                                     const void* mask_logits, const void* kp_source,
                                                     const void* jac_source, const void* kp_driving,
                                                     const void* jac_driving, void* grad_logits, void* kp_sums,
                                                     void* grad_kps, void* grad_jacs, void* grad_kpd,
                                                     void* grad_jacd, void* workspace, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  DAGAN_MOTION_DISPATCH(dtype, dense_backward<T>(*geometry, grad_deformation, grad_mask, mask_logits, kp_source,
                                                 jac_source, kp_driving, jac_driving, grad_logits, kp_sums, grad_kps,
                                                 grad_jacs, grad_kpd, grad_jacd, workspace, s))
}
