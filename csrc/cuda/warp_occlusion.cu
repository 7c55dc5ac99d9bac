// CUDA kernels of dagan_fast::warp_occlusion, taps from common/warp_math.h (the same code the CPU
// kernel runs). Torch-free: compiled by nvcc alone.
//
// Kernels, by input layout:
//  * planar inputs (NCHW, sliced views): a thread per output pixel looping over channels, so a warp
//    reads and writes 32 neighbouring pixels of one plane per channel.
//  * channels_last inputs (C >= 16): a block per 32-pixel tile; a warp's lanes run over contiguous
//    channels of one tap (128-byte coalesced reads), and a shared-memory transpose turns the
//    results into pixel-contiguous rows of the (B,C,Ho,Wo) output / grad_output.
//  * input gradient: atomics into a float/double accumulation buffer. Lanes of a warp that hit the
//    same input pixel are found once per tap (__match_any_sync; the destinations do not depend on
//    the channel) and their contributions summed in shared memory by the lowest lane, so
//    upsampling-like grids issue one atomic per input pixel and warp instead of up to 32.
//  * deterministic mode (torch.use_deterministic_algorithms): no atomics. The 4 * B*Ho*Wo taps are
//    stably radix-sorted by destination (CUB); each (destination, channel) is then summed by one
//    thread in output-pixel order, so every run gives the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

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

constexpr int kThreads = 256;  // multiple of 32: the pixel loops below are warp-uniform
constexpr int kTilePixels = 32;
constexpr int kTileRows = kThreads / kTilePixels;

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

// ------------------------------------------------------------------------------- forward
// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void warp_forward_kernel(WarpGeometry g, const T* __restrict__ input,  // (B,C,Hi,Wi), in_stride
                                    const T* __restrict__ grid,                   // (B,Ho,Wo,2), grid_stride
                                    const T* __restrict__ occ,                    // (B,1,Ho,Wo) or null
                                    T* __restrict__ out) {                        // (B,C,Ho,Wo), out_stride
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

// Taps of the 32 pixels of a tile, computed once by the first warp and shared by the block.
template <typename A>
struct TileTaps {
  BilinearTaps<A> taps[kTilePixels];
  A occlusion[kTilePixels];
  int64_t batch[kTilePixels], out_offset[kTilePixels];  // out_offset: y * out_stride[2] + x * out_stride[3]
  int64_t pixel[kTilePixels];                           // flattened (b, y, x) or -1 past the end
};

template <typename T, typename A>
__device__ void load_tile_taps(TileTaps<A>& s, const WarpGeometry& g, const T* grid, const T* occ, int64_t first) {
  const int p = threadIdx.x + threadIdx.y * blockDim.x;
  if (p < kTilePixels) {
    const int64_t i = first + p, pixels = g.batch * g.out_h * g.out_w;
    if (i < pixels) {
      const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, b = i / (g.out_w * g.out_h);
      s.taps[p] = pixel_taps<T, A>(g, grid, b, y, x, g.in_stride[2], g.in_stride[3]);
      s.occlusion[p] = occlusion_at<T, A>(g, occ, b, y, x);
      s.batch[p] = b;
      s.out_offset[p] = y * g.out_stride[2] + x * g.out_stride[3];
      s.pixel[p] = i;
    } else {
      s.pixel[p] = -1;
    }
  }
}

// channels_last input: block (32, 8) per tile of 32 output pixels; see the file comment.
// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void warp_forward_cl_kernel(WarpGeometry g, const T* __restrict__ input,  // (B,C,Hi,Wi), in_stride[1] == 1
                                       const T* __restrict__ grid,                   // (B,Ho,Wo,2)
                                       const T* __restrict__ occ,                    // (B,1,Ho,Wo) or null
                                       T* __restrict__ out) {                        // (B,C,Ho,Wo)
  using A = typename Acc<T>::type;
  __shared__ TileTaps<A> s;
  __shared__ A values[kTilePixels][kTilePixels + 1];  // [channel][pixel], padded against bank conflicts
  const int64_t first = int64_t(blockIdx.x) * kTilePixels;
  load_tile_taps<T, A>(s, g, grid, occ, first);
  __syncthreads();
  const int lane = threadIdx.x, row = threadIdx.y;
  for (int64_t c0 = 0; c0 < g.channels; c0 += kTilePixels) {
    const int64_t c = c0 + lane;
    for (int p = row; p < kTilePixels; p += kTileRows) {
      A value = A(0);
      if (s.pixel[p] >= 0 && c < g.channels) {
        A v[4];
        tap_values<T, A>(s.taps[p], input + s.batch[p] * g.in_stride[0] + c * g.in_stride[1], v);
        value = dagan_fast::warp::bilinear_value(s.taps[p], v[0], v[1], v[2], v[3]) * s.occlusion[p];
      }
      values[lane][p] = value;
    }
    __syncthreads();
    for (int cl = row; cl < kTilePixels; cl += kTileRows) {
      if (s.pixel[lane] >= 0 && c0 + cl < g.channels) {
        out[s.batch[lane] * g.out_stride[0] + (c0 + cl) * g.out_stride[1] + s.out_offset[lane]] =
            from_acc<T, A>(values[cl][lane]);
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------- backward
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) { atomicAdd(p, v); }

// Planar layouts: a thread per output pixel. Grid and occlusion gradients are per-thread sums
// over channels (no atomics); the input gradient uses warp-aggregated atomics unless grad_in is
// null (deterministic mode computes it separately).
// occupancy plan: 256 threads/block, 2 blocks/SM, <= 128 registers/thread
template <typename T>
__global__ void warp_backward_kernel(WarpGeometry g, const T* __restrict__ grad_out,  // (B,C,Ho,Wo), out_stride
                                     const T* __restrict__ input,                     // (B,C,Hi,Wi), in_stride
                                     const T* __restrict__ grid,                      // (B,Ho,Wo,2)
                                     const T* __restrict__ occ,                       // (B,1,Ho,Wo) or null
                                     typename Acc<T>::type* __restrict__ grad_in,     // acc buffer, grad_in_stride, or null
                                     T* __restrict__ grad_grid,                       // contiguous (B,Ho,Wo,2) or null
                                     T* __restrict__ grad_occ) {                      // contiguous (B,1,Ho,Wo) or null
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads];
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  const A sx = dagan_fast::warp::grid_coord_scale<A>(g.in_w), sy = dagan_fast::warp::grid_coord_scale<A>(g.in_h);
  const int lane = threadIdx.x & 31;
  A* warp_shared = shared + (threadIdx.x & ~31);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // The loop bound is warp-uniform (blockDim.x is a multiple of 32), so every lane reaches the
  // warp-wide intrinsics; lanes past the end just carry invalid taps.
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) + (threadIdx.x & ~31); base < pixels; base += stride) {
    const int64_t i = base + lane;
    const bool active = i < pixels;
    const int64_t ii = active ? i : pixels - 1;
    const int64_t x = ii % g.out_w, y = (ii / g.out_w) % g.out_h, b = ii / (g.out_w * g.out_h);
    const auto t = pixel_taps<T, A>(g, grid, b, y, x, g.in_stride[2], g.in_stride[3]);
    const A o = occlusion_at<T, A>(g, occ, b, y, x);
    const T* in_b = input + b * g.in_stride[0];
    const T* go = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
    // Destinations in the accumulation buffer, and the lanes of this warp that share each of them.
    const auto tc = pixel_taps<T, A>(g, grid, b, y, x, g.grad_in_stride[2], g.grad_in_stride[3]);
    unsigned peers[4];
    bool leader[4], aggregate = false;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool valid = active && tc.valid[k];
      const long long key = valid ? static_cast<long long>(b * g.grad_in_stride[0] + tc.offset[k]) : -1LL;
      peers[k] = __match_any_sync(0xffffffffu, key);
      leader[k] = valid && (__ffs(peers[k]) - 1) == lane;
      aggregate = aggregate || (valid && __popc(peers[k]) > 1);
    }
    aggregate = __any_sync(0xffffffffu, aggregate) != 0;
    A gix = 0, giy = 0, gocc = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      const A go_c = active ? to_acc<A>(go[c * g.out_stride[1]]) : A(0);
      if (grad_grid || grad_occ) {
        A v[4];
        tap_values<T, A>(t, in_b + c * g.in_stride[1], v);
        gocc += go_c * dagan_fast::warp::bilinear_value(t, v[0], v[1], v[2], v[3]);
        dagan_fast::warp::accumulate_coord_grad(t, v[0], v[1], v[2], v[3], go_c * o, gix, giy);
      }
      if (grad_in) {
        A* gi = grad_in + b * g.grad_in_stride[0] + c * g.grad_in_stride[1];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const A contrib = tc.weight[k] * go_c * o;
          if (!aggregate) {
            if (active && tc.valid[k]) atomic_add(gi + tc.offset[k], contrib);
            continue;
          }
          warp_shared[lane] = contrib;
          __syncwarp();
          if (leader[k]) {
            A sum = 0;
            for (unsigned m = peers[k]; m != 0; m &= m - 1) sum += warp_shared[__ffs(m) - 1];
            atomic_add(gi + tc.offset[k], sum);
          }
          __syncwarp();
        }
      }
    }
    if (active) {
      if (grad_grid) {
        grad_grid[2 * i] = from_acc<T, A>(gix * sx);
        grad_grid[2 * i + 1] = from_acc<T, A>(giy * sy);
      }
      if (grad_occ) grad_occ[i] = from_acc<T, A>(gocc);
    }
  }
}

// channels_last input: the mirror of warp_forward_cl_kernel. grad_output rows are staged through
// shared memory, lanes run over channels, and the per-pixel channel sums are reduced across the
// warp in a fixed butterfly order (deterministic). Input-gradient atomics hit 32 contiguous
// channels per instruction, or are left to the deterministic pass when grad_in is null.
// occupancy plan: 256 threads/block, 3 blocks/SM, <= 80 registers/thread (fp64: 72 on sm_80)
template <typename T>
__global__ void warp_backward_cl_kernel(WarpGeometry g, const T* __restrict__ grad_out,  // (B,C,Ho,Wo)
                                        const T* __restrict__ input,                     // (B,C,Hi,Wi), in_stride[1] == 1
                                        const T* __restrict__ grid,                      // (B,Ho,Wo,2)
                                        const T* __restrict__ occ,                       // (B,1,Ho,Wo) or null
                                        typename Acc<T>::type* __restrict__ grad_in,     // acc buffer or null
                                        T* __restrict__ grad_grid,                       // contiguous or null
                                        T* __restrict__ grad_occ) {                      // contiguous or null
  using A = typename Acc<T>::type;
  constexpr int kPerRow = kTilePixels / kTileRows;  // pixels per warp
  __shared__ TileTaps<A> s;
  __shared__ A staged[kTilePixels][kTilePixels + 1];  // grad_output [channel][pixel]
  const int64_t first = int64_t(blockIdx.x) * kTilePixels;
  load_tile_taps<T, A>(s, g, grid, occ, first);
  __syncthreads();
  const int lane = threadIdx.x, row = threadIdx.y;
  A gix[kPerRow], giy[kPerRow], gocc[kPerRow];
#pragma unroll
  for (int j = 0; j < kPerRow; ++j) gix[j] = giy[j] = gocc[j] = A(0);
  for (int64_t c0 = 0; c0 < g.channels; c0 += kTilePixels) {
    for (int cl = row; cl < kTilePixels; cl += kTileRows) {
      const bool ok = s.pixel[lane] >= 0 && c0 + cl < g.channels;
      staged[cl][lane] = ok ? to_acc<A>(grad_out[s.batch[lane] * g.out_stride[0] + (c0 + cl) * g.out_stride[1] +
                                                 s.out_offset[lane]])
                            : A(0);
    }
    __syncthreads();
    const int64_t c = c0 + lane;
#pragma unroll
    for (int j = 0; j < kPerRow; ++j) {
      const int p = row + j * kTileRows;
      if (s.pixel[p] < 0 || c >= g.channels) continue;
      const BilinearTaps<A>& t = s.taps[p];
      const A gv = staged[lane][p];
      A v[4];
      tap_values<T, A>(t, input + s.batch[p] * g.in_stride[0] + c * g.in_stride[1], v);
      gocc[j] += gv * dagan_fast::warp::bilinear_value(t, v[0], v[1], v[2], v[3]);
      const A gs = gv * s.occlusion[p];
      dagan_fast::warp::accumulate_coord_grad(t, v[0], v[1], v[2], v[3], gs, gix[j], giy[j]);
      if (grad_in) {
        // Tap (y, x) from the input offsets is not recoverable for every stride, so recompute the
        // buffer offsets from the clamped coordinates (same floor as the taps).
        const int64_t x0 = dagan_fast::warp::floor_to_int(t.ix), y0 = dagan_fast::warp::floor_to_int(t.iy);
        A* gi = grad_in + s.batch[p] * g.grad_in_stride[0] + c * g.grad_in_stride[1];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!t.valid[k]) continue;
          const int64_t yy = y0 + (k >> 1), xx = x0 + (k & 1);
          atomic_add(gi + yy * g.grad_in_stride[2] + xx * g.grad_in_stride[3], t.weight[k] * gs);
        }
      }
    }
    __syncthreads();
  }
  const A sx = dagan_fast::warp::grid_coord_scale<A>(g.in_w), sy = dagan_fast::warp::grid_coord_scale<A>(g.in_h);
#pragma unroll
  for (int j = 0; j < kPerRow; ++j) {
    for (int d = 16; d > 0; d >>= 1) {
      gix[j] += __shfl_xor_sync(0xffffffffu, gix[j], d);
      giy[j] += __shfl_xor_sync(0xffffffffu, giy[j], d);
      gocc[j] += __shfl_xor_sync(0xffffffffu, gocc[j], d);
    }
    const int p = row + j * kTileRows;
    if (lane == 0 && s.pixel[p] >= 0) {
      const int64_t i = s.pixel[p];
      if (grad_grid) {
        grad_grid[2 * i] = from_acc<T, A>(gix[j] * sx);
        grad_grid[2 * i + 1] = from_acc<T, A>(giy[j] * sy);
      }
      if (grad_occ) grad_occ[i] = from_acc<T, A>(gocc[j]);
    }
  }
}

// ------------------------------------------------------------------------------- deterministic input gradient
// Entry e = 4 * pixel + tap. Key: destination (b, y, x) flattened, or `sentinel` for invalid taps.
// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void tap_keys_kernel(WarpGeometry g, const T* __restrict__ grid,  // (B,Ho,Wo,2)
                                unsigned long long* __restrict__ keys,      // (4 * B*Ho*Wo,)
                                unsigned long long* __restrict__ values,    // (4 * B*Ho*Wo,)
                                unsigned long long sentinel) {
  using A = typename Acc<T>::type;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, b = i / (g.out_w * g.out_h);
    const auto t = pixel_taps<T, A>(g, grid, b, y, x, g.in_w, 1);  // offsets = y * Wi + x
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      keys[4 * i + k] = t.valid[k] ? static_cast<unsigned long long>(b * g.in_h * g.in_w + t.offset[k]) : sentinel;
      values[4 * i + k] = static_cast<unsigned long long>(4 * i + k);
    }
  }
}

// One thread per (sorted entry j, channel): the first entry of each destination sums the run of
// entries with its key, in output-pixel order (the sort is stable), and stores the total.
// occupancy plan: 256 threads/block, 4 blocks/SM, <= 64 registers/thread
template <typename T>
__global__ void gather_input_grad_kernel(WarpGeometry g, const T* __restrict__ grad_out,  // (B,C,Ho,Wo)
                                         const T* __restrict__ grid,                      // (B,Ho,Wo,2)
                                         const T* __restrict__ occ,                       // (B,1,Ho,Wo) or null
                                         const unsigned long long* __restrict__ keys,     // sorted (E,)
                                         const unsigned long long* __restrict__ values,   // entries (E,)
                                         int64_t entries, unsigned long long sentinel,
                                         typename Acc<T>::type* __restrict__ grad_in) {   // acc buffer
  using A = typename Acc<T>::type;
  const int64_t c = blockIdx.y;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < entries; j += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long key = keys[j];
    if (key == sentinel || (j > 0 && keys[j - 1] == key)) continue;
    A sum = 0;
    for (int64_t e = j; e < entries && keys[e] == key; ++e) {
      const int64_t entry = static_cast<int64_t>(values[e]), i = entry / 4;
      const int k = static_cast<int>(entry % 4);
      const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, b = i / (g.out_w * g.out_h);
      const auto t = pixel_taps<T, A>(g, grid, b, y, x, g.in_w, 1);
      const A go = to_acc<A>(grad_out[b * g.out_stride[0] + c * g.out_stride[1] + y * g.out_stride[2] +
                                      x * g.out_stride[3]]);
      // Selected, not indexed: a runtime index into the taps struct would put it in local memory.
      const A w = k == 0 ? t.weight[0] : k == 1 ? t.weight[1] : k == 2 ? t.weight[2] : t.weight[3];
      sum += w * (go * occlusion_at<T, A>(g, occ, b, y, x));
    }
    const int64_t plane = g.in_h * g.in_w;
    const int64_t b = static_cast<int64_t>(key) / plane, rest = static_cast<int64_t>(key) % plane;
    grad_in[b * g.grad_in_stride[0] + c * g.grad_in_stride[1] + (rest / g.in_w) * g.grad_in_stride[2] +
            (rest % g.in_w) * g.grad_in_stride[3]] = sum;
  }
}

int blocks_for(int64_t work, int per_block = kThreads) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

bool channels_last(const WarpGeometry& g) { return g.in_stride[1] == 1 && g.channels >= 16; }

// Sort workspace: keys and values in and out, then CUB's own temporary storage.
struct SortPlan {
  int64_t entries = 0;
  int end_bit = 1;
  size_t cub_bytes = 0;
  size_t array_bytes() const { return ((static_cast<size_t>(entries) * 8 + 255) / 256) * 256; }
  size_t total() const { return 4 * array_bytes() + cub_bytes; }
};

int sort_plan(const WarpGeometry& g, SortPlan& plan) {
  plan.entries = 4 * g.batch * g.out_h * g.out_w;
  const unsigned long long sentinel = static_cast<unsigned long long>(g.batch * g.in_h * g.in_w);
  plan.end_bit = 1;
  while (plan.end_bit < 64 && (sentinel >> plan.end_bit) != 0) ++plan.end_bit;
  return static_cast<int>(cub::DeviceRadixSort::SortPairs(
      nullptr, plan.cub_bytes, static_cast<const unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr),
      static_cast<const unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr), plan.entries, 0,
      plan.end_bit));
}

template <typename T>
int launch_forward(const WarpGeometry& g, const void* input, const void* grid, const void* occ, void* out,
                   cudaStream_t stream) {
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  if (channels_last(g)) {
    const int64_t tiles = (pixels + kTilePixels - 1) / kTilePixels;
    if (tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    warp_forward_cl_kernel<T><<<static_cast<unsigned>(tiles), dim3(kTilePixels, kTileRows), 0, stream>>>(
        g, static_cast<const T*>(input), static_cast<const T*>(grid), static_cast<const T*>(occ), static_cast<T*>(out));
  } else {
    warp_forward_kernel<T><<<blocks_for(pixels), kThreads, 0, stream>>>(
        g, static_cast<const T*>(input), static_cast<const T*>(grid), static_cast<const T*>(occ), static_cast<T*>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const WarpGeometry& g, const void* grad_out, const void* input, const void* grid, const void* occ,
                    void* grad_in, void* grad_grid, void* grad_occ, bool deterministic, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  A* atomic_target = deterministic ? nullptr : static_cast<A*>(grad_in);
  if (grad_grid || grad_occ || atomic_target) {
    if (channels_last(g)) {
      const int64_t tiles = (pixels + kTilePixels - 1) / kTilePixels;
      if (tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
      warp_backward_cl_kernel<T><<<static_cast<unsigned>(tiles), dim3(kTilePixels, kTileRows), 0, stream>>>(
          g, static_cast<const T*>(grad_out), static_cast<const T*>(input), static_cast<const T*>(grid),
          static_cast<const T*>(occ), atomic_target, static_cast<T*>(grad_grid), static_cast<T*>(grad_occ));
    } else {
      warp_backward_kernel<T><<<blocks_for(pixels), kThreads, 0, stream>>>(
          g, static_cast<const T*>(grad_out), static_cast<const T*>(input), static_cast<const T*>(grid),
          static_cast<const T*>(occ), atomic_target, static_cast<T*>(grad_grid), static_cast<T*>(grad_occ));
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (!deterministic || grad_in == nullptr) return static_cast<int>(cudaSuccess);

  SortPlan plan;
  int err = sort_plan(g, plan);
  if (err != 0) return err;
  if (workspace == nullptr || workspace_bytes < plan.total()) return static_cast<int>(cudaErrorInvalidValue);
  if (g.channels > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* keys_in = reinterpret_cast<unsigned long long*>(base);
  auto* keys_out = reinterpret_cast<unsigned long long*>(base + plan.array_bytes());
  auto* values_in = reinterpret_cast<unsigned long long*>(base + 2 * plan.array_bytes());
  auto* values_out = reinterpret_cast<unsigned long long*>(base + 3 * plan.array_bytes());
  void* cub_temp = base + 4 * plan.array_bytes();
  const unsigned long long sentinel = static_cast<unsigned long long>(g.batch * g.in_h * g.in_w);
  tap_keys_kernel<T><<<blocks_for(pixels), kThreads, 0, stream>>>(g, static_cast<const T*>(grid), keys_in, values_in,
                                                                  sentinel);
  size_t cub_bytes = plan.cub_bytes;
  err = static_cast<int>(cub::DeviceRadixSort::SortPairs(cub_temp, cub_bytes, keys_in, keys_out, values_in, values_out,
                                                         plan.entries, 0, plan.end_bit, stream));
  if (err != 0) return err;
  const dim3 blocks(static_cast<unsigned>(blocks_for(plan.entries)), static_cast<unsigned>(g.channels));
  gather_input_grad_kernel<T><<<blocks, kThreads, 0, stream>>>(
      g, static_cast<const T*>(grad_out), static_cast<const T*>(grid), static_cast<const T*>(occ), keys_out, values_out,
      plan.entries, sentinel, static_cast<A*>(grad_in));
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

extern "C" int dagan_fast_warp_backward_workspace_cuda(const WarpGeometry* geometry, int deterministic,
                                                       unsigned long long* bytes) {
  *bytes = 0;
  if (!deterministic || geometry->batch * geometry->out_h * geometry->out_w == 0) return 0;
  SortPlan plan;
  const int err = sort_plan(*geometry, plan);
  if (err == 0) *bytes = plan.total();
  return err;
}

extern "C" int dagan_fast_warp_backward_cuda(int dtype, const WarpGeometry* geometry, const void* grad_output,
                                             const void* input, const void* grid, const void* occlusion,
                                             void* grad_input_acc, void* grad_grid, void* grad_occlusion,
                                             int deterministic, void* workspace, unsigned long long workspace_bytes,
                                             int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool det = deterministic != 0;
  const size_t ws = static_cast<size_t>(workspace_bytes);
  switch (dtype) {
    case kDaganFloat32:
      return launch_backward<float>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                    grad_occlusion, det, workspace, ws, s);
    case kDaganFloat64:
      return launch_backward<double>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                     grad_occlusion, det, workspace, ws, s);
    case kDaganFloat16:
      return launch_backward<__half>(*geometry, grad_output, input, grid, occlusion, grad_input_acc, grad_grid,
                                     grad_occlusion, det, workspace, ws, s);
    case kDaganBFloat16:
      return launch_backward<__nv_bfloat16>(*geometry, grad_output, input, grid, occlusion, grad_input_acc,
                                            grad_grid, grad_occlusion, det, workspace, ws, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
