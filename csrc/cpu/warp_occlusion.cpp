// CPU kernels of dagan_fast::warp_occlusion_fwd / _bwd: grid_sample(bilinear, zeros,
// align_corners=False) times an optional occlusion map; any input strides, deterministic.
//
// Layout of the work: output pixels are processed in row tiles of kTile pixels. The taps of a tile
// (offsets, weights, validity, occlusion) are computed once, then every channel runs a tight loop
// over the tile: contiguous output writes and, for NCHW and channels_last inputs alike, input cache
// lines that stay in L1 from one channel to the next.
#include "warp_occlusion.h"

#include <algorithm>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../common/warp_math.h"

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
