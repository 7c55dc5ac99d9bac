// CUDA kernels of dagan_fast::warp_occlusion: one thread per output pixel, taps from common/warp_math.h
// (the same code the CPU kernel runs). Torch-free: compiled by nvcc alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/warp_math.h"
#include "warp_launchers.h"

namespace {

using dagan_fast::warp::BilinearTaps;
using dagan_fast::warp::WarpGeometry;

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

template <typename T, typename A>
__device__ __forceinline__ BilinearTaps<A> pixel_taps(const WarpGeometry& g, const T* grid, int64_t b, int64_t y,
                                                      int64_t x, int64_t stride_h, int64_t stride_w) {
  const T* gp = grid + b * g.grid_stride[0] + y * g.grid_stride[1] + x * g.grid_stride[2];
  return dagan_fast::warp::bilinear_taps<A>(to_acc<A>(gp[0]), to_acc<A>(gp[g.grid_stride[3]]), g.in_h, g.in_w,
                                            stride_h, stride_w);
}

template <typename T, typename A>
__device__ __forceinline__ A occlusion_at(const WarpGeometry& g, const T* occ, int64_t b, int64_t y, int64_t x) {
  return occ ? to_acc<A>(occ[b * g.occ_stride[0] + y * g.occ_stride[2] + x * g.occ_stride[3]]) : A(1);
}

template <typename T, typename A>
__device__ __forceinline__ void tap_values(const BilinearTaps<A>& t, const T* plane, A v[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = t.valid[i] ? to_acc<A>(plane[t.offset[i]]) : A(0);
}

template <typename T>
__global__ void warp_forward_kernel(WarpGeometry g, const T* __restrict__ input, const T* __restrict__ grid,
                                    const T* __restrict__ occ, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, b = i / (g.out_w * g.out_h);
    const auto t = pixel_taps<T, A>(g, grid, b, y, x, g.in_stride[2], g.in_stride[3]);
    const A o = occlusion_at<T, A>(g, occ, b, y, x);
    const T* in_b = input + b * g.in_stride[0];
    T* out_p = out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
    for (int64_t c = 0; c < g.channels; ++c) {
      A v[4];
      tap_values<T, A>(t, in_b + c * g.in_stride[1], v);
      out_p[c * g.out_stride[1]] = from_acc<T, A>(dagan_fast::warp::bilinear_value(t, v[0], v[1], v[2], v[3]) * o);
    }
  }
}

template <typename T>
__global__ void warp_backward_kernel(WarpGeometry g, const T* __restrict__ grad_out, const T* __restrict__ input,
                                     const T* __restrict__ grid, const T* __restrict__ occ,
                                     typename Acc<T>::type* __restrict__ grad_in, T* __restrict__ grad_grid,
                                     T* __restrict__ grad_occ) {
  using A = typename Acc<T>::type;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  const A sx = dagan_fast::warp::grid_coord_scale<A>(g.in_w), sy = dagan_fast::warp::grid_coord_scale<A>(g.in_h);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, b = i / (g.out_w * g.out_h);
    const auto t = pixel_taps<T, A>(g, grid, b, y, x, g.in_stride[2], g.in_stride[3]);
    const A o = occlusion_at<T, A>(g, occ, b, y, x);
    const T* in_b = input + b * g.in_stride[0];
    const T* go = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
    const int64_t plane = g.in_h * g.in_w;
    // Tap offsets for the contiguous accumulation buffer.
    const auto tc = pixel_taps<T, A>(g, grid, b, y, x, g.in_w, 1);
    A gix = 0, giy = 0, gocc = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      const A go_c = to_acc<A>(go[c * g.out_stride[1]]);
      if (grad_grid || grad_occ) {
        A v[4];
        tap_values<T, A>(t, in_b + c * g.in_stride[1], v);
        gocc += go_c * dagan_fast::warp::bilinear_value(t, v[0], v[1], v[2], v[3]);
        dagan_fast::warp::accumulate_coord_grad(t, v[0], v[1], v[2], v[3], go_c * o, gix, giy);
      }
      if (grad_in) {
        A* gi = grad_in + (b * g.channels + c) * plane;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (tc.valid[k]) atomicAdd(gi + tc.offset[k], tc.weight[k] * go_c * o);
        }
      }
    }
    if (grad_grid) {
      grad_grid[2 * i] = from_acc<T, A>(gix * sx);
      grad_grid[2 * i + 1] = from_acc<T, A>(giy * sy);
    }
    if (grad_occ) grad_occ[i] = from_acc<T, A>(gocc);
  }
}

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
int launch_forward(const WarpGeometry& g, const void* input, const void* grid, const void* occ, void* out,
                   cudaStream_t stream) {
  warp_forward_kernel<T><<<blocks_for(g.batch * g.out_h * g.out_w), kThreads, 0, stream>>>(
      g, static_cast<const T*>(input), static_cast<const T*>(grid), static_cast<const T*>(occ), static_cast<T*>(out));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const WarpGeometry& g, const void* grad_out, const void* input, const void* grid, const void* occ,
                    void* grad_in, void* grad_grid, void* grad_occ, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  warp_backward_kernel<T><<<blocks_for(g.batch * g.out_h * g.out_w), kThreads, 0, stream>>>(
      g, static_cast<const T*>(grad_out), static_cast<const T*>(input), static_cast<const T*>(grid),
      static_cast<const T*>(occ), static_cast<A*>(grad_in), static_cast<T*>(grad_grid), static_cast<T*>(grad_occ));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dagan_fast_warp_forward_cuda(int dtype, const WarpGeometry* geometry, const void* input,
                                            const void* grid, const void* occlusion, void* out, int device,
                                            void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kDaganFloat32: return launch_forward<float>(*geometry, input, grid, occlusion, out, s);
    case kDaganFloat64: return launch_forward<double>(*geometry, input, grid, occlusion, out, s);
    case kDaganFloat16: return launch_forward<__half>(*geometry, input, grid, occlusion, out, s);
    case kDaganBFloat16: return launch_forward<__nv_bfloat16>(*geometry, input, grid, occlusion, out, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int dagan_fast_warp_backward_cuda(int dtype, const WarpGeometry* geometry, const void* grad_output,
                                             const void* input, const void* grid, const void* occlusion,
                                             void* grad_input_acc, void* grad_grid, void* grad_occlusion, int device,
                                             void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kDaganFloat32:
      return launch_backward<float>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                    grad_occlusion, s);
    case kDaganFloat64:
      return launch_backward<double>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                     grad_occlusion, s);
    case kDaganFloat16:
      return launch_backward<__half>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                     grad_occlusion, s);
    case kDaganBFloat16:
      return launch_backward<__nv_bfloat16>(*geometry, grad_output, input, grid, occlusion, grad_input_acc,
                                            grad_grid, grad_occlusion, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
