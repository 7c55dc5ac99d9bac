// Flash-attention forward on the GPU, torch-free (ops_attention.cpp calls the extern "C" launcher).
//
// Tensor-core path (float16/bfloat16, Dqk in {16,32,64,128,256}): one CTA of 4 warps owns 64 query
// rows and one 64-wide slice of the value features (grid.y walks the slices, so any Dv works; each
// slice recomputes S = Q K^T, which costs Dqk/(Dqk+64) extra at most). Per key block, each warp
// computes its 16 x BN scores with nvcuda::wmma 16x16x16 fragments (fp32 accumulation), applies the
// online softmax of common/online_softmax.h in fp32 (a lane pair per row), rounds P to the input type
// and accumulates O += P V with wmma into an fp32 tile in shared memory (wmma's fragment layout is
// opaque, so rows are rescaled in shared memory, not in registers). Out-of-range keys, queries and
// value columns are loaded as zeros and masked (-inf scores, unstored rows/columns).
//
// SIMT path (float32, float64, and float16/bfloat16 with other Dqk): one CTA per query row, one thread
// per key of a 128-key block, block-wide max/sum reductions; simple and exact rather than fast.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>

#include "../common/online_softmax.h"
#include "attention_launchers.h"

namespace dagan_fast {
namespace attention {
namespace {

using namespace nvcuda;

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// 1 / x correctly rounded: the value softmax_inv_sum computes (IEEE division of 1 by x), through the
// reciprocal intrinsics, so that ptxas does not call the division slow-path subroutine (the call
// saves registers to a stack frame: spills).
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return __drcp_rn(x); }

// ------------------------------------------------------------------ tensor-core kernel
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA: 16 per warp
constexpr int kDvTile = 64;           // value features per CTA (grid.y slices Dv)
// Row paddings (elements) that break shared-memory bank conflicts while keeping wmma's rules: ldm a
// multiple of 8 (16-bit types) or 4 (float), fragment pointers 32-byte aligned.
constexpr int kPadHalf = 8;
constexpr int kPadFloat = 4;

// Key block per iteration, chosen so the shared memory stays under the 99 KiB opt-in limit of
// sm_86/sm_89 (sm_80/90 allow more): 87 KiB at Dqk 256, 86 KiB at 128, 70 KiB at 64.
template <int DQK>
struct WmmaTile {
  static constexpr int kBlockN = DQK >= 256 ? 32 : 64;
  static constexpr int kLdq = DQK + kPadHalf;        // q_s, k_s rows
  static constexpr int kLdv = kDvTile + kPadHalf;    // v_s rows
  static constexpr int kLdp = kBlockN + kPadHalf;    // p_s rows
  static constexpr int kLds = kBlockN + kPadFloat;   // s_s rows
  static constexpr int kLdo = kDvTile + kPadFloat;   // o_s rows
  static constexpr size_t kHalfElems = size_t(kBlockM) * kLdq + size_t(kBlockN) * kLdq + size_t(kBlockN) * kLdv +
                                       size_t(kBlockM) * kLdp;
  static constexpr size_t kFloatElems = size_t(kBlockM) * kLds + size_t(kBlockM) * kLdo;
  static constexpr size_t kSmemBytes = kHalfElems * 2 + kFloatElems * 4;
  static_assert(DQK % 16 == 0 && kBlockN % 16 == 0 && kDvTile % 16 == 0, "wmma tiles are 16x16x16");
  static_assert((kHalfElems * 2) % 128 == 0, "the float regions must stay 128-byte aligned");
};

// occupancy plan: 128 threads/block, 2 blocks/SM, <= 128 registers/thread (shared memory, up to 87 KiB a
// block by WmmaTile<DQK>::kSmemBytes, holds sm_90 to 2 blocks/SM). The launch bounds cap registers at
// 128 (4 blocks' worth, so registers never limit it): without a minimum ptxas picked ~72 registers and
// spilled on sm_80 for Dqk 128.
template <typename T, int DQK>
__global__ void __launch_bounds__(kThreads, 4)
    attention_fwd_wmma_kernel(const T* __restrict__ q,  // pointer, (BH, Nq, DQK)
                              const T* __restrict__ k,  // pointer, (BH, Nk, DQK)
                              const T* __restrict__ v,  // pointer, (BH, Nk, Dv)
                              T* __restrict__ out,      // pointer, (BH, Nq, Dv)
                              float* __restrict__ lse,  // pointer, (BH, Nq)
                              AttentionDims d, int64_t query_blocks, float scale) {
  using Tile = WmmaTile<DQK>;
  constexpr int BN = Tile::kBlockN, LDQ = Tile::kLdq, LDV = Tile::kLdv, LDP = Tile::kLdp, LDS = Tile::kLds,
                LDO = Tile::kLdo;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);           // (kBlockM, LDQ)
  T* k_s = q_s + kBlockM * LDQ;                       // (BN, LDQ)
  T* v_s = k_s + BN * LDQ;                            // (BN, LDV)
  T* p_s = v_s + BN * LDV;                            // (kBlockM, LDP)
  float* s_s = reinterpret_cast<float*>(p_s + kBlockM * LDP);  // (kBlockM, LDS)
  float* o_s = s_s + kBlockM * LDS;                   // (kBlockM, LDO)

  const int64_t bh = blockIdx.x / query_blocks;
  const int64_t i0 = (blockIdx.x % query_blocks) * kBlockM;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kDvTile;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const T zero = from_acc<T>(0.0f);

  for (int idx = tid; idx < kBlockM * DQK; idx += kThreads) {
    const int r = idx / DQK, c = idx % DQK;
    const int64_t row = i0 + r;
    q_s[r * LDQ + c] = row < d.nq ? q[(bh * d.nq + row) * DQK + c] : zero;
  }
  for (int idx = tid; idx < kBlockM * kDvTile; idx += kThreads) o_s[(idx / kDvTile) * LDO + idx % kDvTile] = 0.0f;

  // A lane pair owns one of the warp's 16 rows; both lanes keep identical copies of its state.
  const int local_row = warp * 16 + lane / 2;
  const int parity = lane & 1;
  SoftmaxState<float> state = softmax_init<float>();
  float* s_row = s_s + local_row * LDS;
  T* p_row = p_s + local_row * LDP;
  float* o_row = o_s + local_row * LDO;
  __syncthreads();

  for (int64_t j0 = 0; j0 < d.nk; j0 += BN) {
    for (int idx = tid; idx < BN * DQK; idx += kThreads) {
      const int r = idx / DQK, c = idx % DQK;
      const int64_t key = j0 + r;
      k_s[r * LDQ + c] = key < d.nk ? k[(bh * d.nk + key) * DQK + c] : zero;
    }
    for (int idx = tid; idx < BN * kDvTile; idx += kThreads) {
      const int r = idx / kDvTile, c = idx % kDvTile;
      const int64_t key = j0 + r, col = c0 + c;
      v_s[r * LDV + c] = (key < d.nk && col < d.dv) ? v[(bh * d.nk + key) * d.dv + col] : zero;
    }
    __syncthreads();

    // S (16 x BN) = Q_w K^T: K stored row-major (key, feature) is K^T in column-major.
    for (int n = 0; n < BN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DQK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, q_s + warp * 16 * LDQ + kk * 16, LDQ);
        wmma::load_matrix_sync(b, k_s + n * 16 * LDQ + kk * 16, LDQ);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_s + warp * 16 * LDS + n * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    const int valid = d.nk - j0 < BN ? static_cast<int>(d.nk - j0) : BN;
    float block_max = neg_infinity<float>();
    for (int c = parity; c < valid; c += 2) block_max = fmaxf(block_max, s_row[c] * scale);
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    const float factor = softmax_rescale(state, block_max);
    float block_sum = 0.0f;
    for (int c = parity; c < BN; c += 2) {
      const float p = c < valid ? softmax_prob(state, s_row[c] * scale) : 0.0f;
      p_row[c] = from_acc<T>(p);
      block_sum += p;
    }
    block_sum += __shfl_xor_sync(0xffffffffu, block_sum, 1);
    state.sum += block_sum;
    for (int c = parity; c < kDvTile; c += 2) o_row[c] *= factor;
    __syncwarp();

    // O_w (16 x kDvTile) += P_w (16 x BN) V (BN x kDvTile)
    for (int n = 0; n < kDvTile / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_s + warp * 16 * LDO + n * 16, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_s + warp * 16 * LDP + kk * 16, LDP);
        wmma::load_matrix_sync(b, v_s + kk * 16 * LDV + n * 16, LDV);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o_s + warp * 16 * LDO + n * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncthreads();  // k_s / v_s are overwritten by the next block
  }

  // Each warp writes its 16 rows, 32 consecutive columns per step (coalesced); a row's 1/l comes
  // from the lane pair that owns it.
  const float inv = reciprocal(state.sum);  // = softmax_inv_sum(state)
  for (int idx = lane; idx < 16 * kDvTile; idx += 32) {
    const int r = idx / kDvTile, c = idx % kDvTile;
    const float row_inv = __shfl_sync(0xffffffffu, inv, 2 * r);
    const int64_t row = i0 + warp * 16 + r, col = c0 + c;
    if (row < d.nq && col < d.dv) out[(bh * d.nq + row) * d.dv + col] = from_acc<T>(o_s[(warp * 16 + r) * LDO + c] * row_inv);
  }
  const int64_t my_row = i0 + local_row;
  if (blockIdx.y == 0 && parity == 0 && my_row < d.nq) lse[bh * d.nq + my_row] = softmax_lse(state);
}

template <typename T, int DQK>
cudaError_t launch_wmma(const AttentionDims& d, const void* q, const void* k, const void* v, void* out, void* lse,
                        float scale, int device, cudaStream_t stream) {
  using Tile = WmmaTile<DQK>;
  int max_smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (Tile::kSmemBytes > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;
  auto kernel = attention_fwd_wmma_kernel<T, DQK>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tile::kSmemBytes));
  if (err != cudaSuccess) return err;
  const int64_t query_blocks = (d.nq + kBlockM - 1) / kBlockM;
  const int64_t slices = (d.dv + kDvTile - 1) / kDvTile;
  if (query_blocks * d.bh > INT32_MAX || slices > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(query_blocks * d.bh), static_cast<unsigned>(slices));
  kernel<<<grid, kThreads, Tile::kSmemBytes, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                       static_cast<const T*>(v), static_cast<T*>(out),
                                                       static_cast<float*>(lse), d, query_blocks, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wmma_dispatch(const AttentionDims& d, const void* q, const void* k, const void* v, void* out,
                                 void* lse, float scale, int device, cudaStream_t stream) {
  switch (d.dqk) {
    case 16: return launch_wmma<T, 16>(d, q, k, v, out, lse, scale, device, stream);
    case 32: return launch_wmma<T, 32>(d, q, k, v, out, lse, scale, device, stream);
    case 64: return launch_wmma<T, 64>(d, q, k, v, out, lse, scale, device, stream);
    case 128: return launch_wmma<T, 128>(d, q, k, v, out, lse, scale, device, stream);
    case 256: return launch_wmma<T, 256>(d, q, k, v, out, lse, scale, device, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------ SIMT kernel

constexpr int kSimtThreads = 128;  // also the keys per block: one key per thread
constexpr int kSimtMaxFeatures = 4096;

// Block-wide reduction with a fixed combination order; every thread gets the result. `red` holds
// one value per warp; the trailing barrier lets the next call reuse it.
template <typename A, bool kMax>
__device__ A block_reduce(A value, A* red) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = kMax ? (other > value ? other : value) : value + other;
  }
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = value;
  __syncthreads();
  A result = red[0];
  for (int w = 1; w < kSimtThreads / 32; ++w) result = kMax ? (red[w] > result ? red[w] : result) : result + red[w];
  __syncthreads();
  return result;
}

// occupancy plan: 128 threads/block, 8 blocks/SM, <= 64 registers/thread
template <typename T, typename A>
__global__ void __launch_bounds__(kSimtThreads, 8)
    attention_fwd_simt_kernel(const T* __restrict__ q,  // pointer, (BH, Nq, Dqk)
                              const T* __restrict__ k,  // pointer, (BH, Nk, Dqk)
                              const T* __restrict__ v,  // pointer, (BH, Nk, Dv)
                              T* __restrict__ out,      // pointer, (BH, Nq, Dv)
                              A* __restrict__ lse,      // pointer, (BH, Nq)
                              AttentionDims d, A scale) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  A* q_s = reinterpret_cast<A*>(smem_raw);  // (Dqk): this query row
  A* acc_s = q_s + d.dqk;                   // (Dv): unnormalised output row
  A* p_s = acc_s + d.dv;                    // (kSimtThreads): this key block's probabilities
  __shared__ A red[kSimtThreads / 32];

  const int64_t row = blockIdx.x;  // flattened (bh, query)
  const int64_t bh = row / d.nq;
  const int tid = threadIdx.x;
  for (int64_t c = tid; c < d.dqk; c += kSimtThreads) q_s[c] = to_acc<A>(q[row * d.dqk + c]);
  for (int64_t c = tid; c < d.dv; c += kSimtThreads) acc_s[c] = A(0);
  __syncthreads();

  SoftmaxState<A> state = softmax_init<A>();
  for (int64_t j0 = 0; j0 < d.nk; j0 += kSimtThreads) {
    const int64_t key = j0 + tid;
    A score = neg_infinity<A>();
    if (key < d.nk) {
      const T* kr = k + (bh * d.nk + key) * d.dqk;
      A dot = A(0);
      for (int64_t c = 0; c < d.dqk; ++c) dot += q_s[c] * to_acc<A>(kr[c]);
      score = dot * scale;
    }
    const A factor = softmax_rescale(state, block_reduce<A, true>(score, red));
    const A p = key < d.nk ? softmax_prob(state, score) : A(0);
    p_s[tid] = p;
    state.sum += block_reduce<A, false>(p, red);  // its barriers also publish p_s
    const int valid = d.nk - j0 < kSimtThreads ? static_cast<int>(d.nk - j0) : kSimtThreads;
    for (int64_t c = tid; c < d.dv; c += kSimtThreads) {
      A a = acc_s[c] * factor;
      const T* vc = v + (bh * d.nk + j0) * d.dv + c;
      for (int j = 0; j < valid; ++j) a += p_s[j] * to_acc<A>(vc[j * d.dv]);
      acc_s[c] = a;
    }
    __syncthreads();  // p_s is rewritten by the next block
  }
  const A inv = reciprocal(state.sum);  // = softmax_inv_sum(state), without a division subroutine call
  for (int64_t c = tid; c < d.dv; c += kSimtThreads) out[row * d.dv + c] = from_acc<T>(acc_s[c] * inv);
  if (tid == 0) lse[row] = softmax_lse(state);
}

template <typename T>
cudaError_t launch_simt(const AttentionDims& d, const void* q, const void* k, const void* v, void* out, void* lse,
                        double scale, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (d.dqk + d.dv > kSimtMaxFeatures) return cudaErrorInvalidValue;
  if (d.bh * d.nq > INT32_MAX) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(d.dqk + d.dv + kSimtThreads) * sizeof(A);  // <= 33 KiB: no opt-in
  attention_fwd_simt_kernel<T, A><<<static_cast<unsigned>(d.bh * d.nq), kSimtThreads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out),
      static_cast<A*>(lse), d, static_cast<A>(scale));
  return cudaGetLastError();
}

bool wmma_head_dim(int64_t dqk) { return dqk == 16 || dqk == 32 || dqk == 64 || dqk == 128 || dqk == 256; }

}  // namespace
}  // namespace attention
}  // namespace dagan_fast

extern "C" int dagan_fast_attention_simt_max_features(void) { return dagan_fast::attention::kSimtMaxFeatures; }

extern "C" int dagan_fast_attention_forward_cuda(int dtype, const dagan_fast::attention::AttentionDims* dims,
                                                 const void* q, const void* k, const void* v, void* out, void* lse,
                                                 double scale, int device, void* stream) {
  using namespace dagan_fast::attention;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const AttentionDims& d = *dims;
  if (d.bh * d.nq == 0 || d.dv == 0) return static_cast<int>(cudaSuccess);
  if (d.nk < 1 || d.dqk < 1 || d.dv < 1) return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  const float scale_f = static_cast<float>(scale);
  switch (dtype) {
    case kDaganFloat16:
      return static_cast<int>(wmma_head_dim(d.dqk) ? launch_wmma_dispatch<__half>(d, q, k, v, out, lse, scale_f, device, s)
                                                   : launch_simt<__half>(d, q, k, v, out, lse, scale, s));
    case kDaganBFloat16:
      return static_cast<int>(wmma_head_dim(d.dqk)
                                  ? launch_wmma_dispatch<__nv_bfloat16>(d, q, k, v, out, lse, scale_f, device, s)
                                  : launch_simt<__nv_bfloat16>(d, q, k, v, out, lse, scale, s));
    case kDaganFloat32: return static_cast<int>(launch_simt<float>(d, q, k, v, out, lse, scale, s));
    case kDaganFloat64: return static_cast<int>(launch_simt<double>(d, q, k, v, out, lse, scale, s));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
