// CPU kernels of dagan_fast::warp_occlusion_fwd / _bwd: grid_sample(bilinear, zeros,
// align_corners=False) times an optional occlusion map, any strides, deterministic.
#include "warp_occlusion.h"

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

using warp::BilinearTaps;
using warp::WarpGeometry;

template <typename scalar_t, typename acc_t>
struct PixelTaps {
  BilinearTaps<acc_t> taps;
  acc_t occlusion;
};

template <typename scalar_t, typename acc_t>
inline PixelTaps<scalar_t, acc_t> pixel_taps(const WarpGeometry& g, const scalar_t* grid,
                                             const scalar_t* occ, int64_t b, int64_t y, int64_t x,
                                             int64_t stride_h, int64_t stride_w) {
  const scalar_t* gp = grid + b * g.grid_stride[0] + y * g.grid_stride[1] + x * g.grid_stride[2];
  PixelTaps<scalar_t, acc_t> p;
  p.taps = warp::bilinear_taps<acc_t>(static_cast<acc_t>(gp[0]), static_cast<acc_t>(gp[g.grid_stride[3]]),
                                      g.in_h, g.in_w, stride_h, stride_w);
  p.occlusion = occ ? static_cast<acc_t>(occ[b * g.occ_stride[0] + y * g.occ_stride[2] + x * g.occ_stride[3]])
                    : acc_t(1);
  return p;
}

template <typename scalar_t, typename acc_t>
inline void tap_values(const BilinearTaps<acc_t>& t, const scalar_t* plane, acc_t v[4]) {
  for (int i = 0; i < 4; ++i) v[i] = t.valid[i] ? static_cast<acc_t>(plane[t.offset[i]]) : acc_t(0);
}

// Rows of the output at a time: enough work per task to hide scheduling cost at 64x64.
constexpr int64_t kGrainRows = 4;

template <typename scalar_t>
void forward_kernel(const WarpGeometry& g, const scalar_t* input, const scalar_t* grid,
                    const scalar_t* occ, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.batch * g.out_h, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.out_h, y = row % g.out_h;
      for (int64_t x = 0; x < g.out_w; ++x) {
        const auto p = pixel_taps<scalar_t, acc_t>(g, grid, occ, b, y, x, g.in_stride[2], g.in_stride[3]);
        const scalar_t* in_b = input + b * g.in_stride[0];
        scalar_t* out_p = out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
        for (int64_t c = 0; c < g.channels; ++c) {
          acc_t v[4];
          tap_values(p.taps, in_b + c * g.in_stride[1], v);
          const acc_t s = warp::bilinear_value(p.taps, v[0], v[1], v[2], v[3]);
          out_p[c * g.out_stride[1]] = static_cast<scalar_t>(s * p.occlusion);
        }
      }
    }
  });
}

// Pass 1 of the backward: per output pixel, the grid and occlusion gradients (a sum over channels).
template <typename scalar_t>
void grid_occlusion_grad_kernel(const WarpGeometry& g, const scalar_t* grad_out, const scalar_t* input,
                                const scalar_t* grid, const scalar_t* occ, scalar_t* grad_grid,
                                scalar_t* grad_occ) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sx = warp::grid_coord_scale<acc_t>(g.in_w), sy = warp::grid_coord_scale<acc_t>(g.in_h);
  at::parallel_for(0, g.batch * g.out_h, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.out_h, y = row % g.out_h;
      for (int64_t x = 0; x < g.out_w; ++x) {
        const auto p = pixel_taps<scalar_t, acc_t>(g, grid, occ, b, y, x, g.in_stride[2], g.in_stride[3]);
        const scalar_t* in_b = input + b * g.in_stride[0];
        const scalar_t* go = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
        acc_t gix = 0, giy = 0, gocc = 0;
        for (int64_t c = 0; c < g.channels; ++c) {
          acc_t v[4];
          tap_values(p.taps, in_b + c * g.in_stride[1], v);
          const acc_t go_c = static_cast<acc_t>(go[c * g.out_stride[1]]);
          gocc += go_c * warp::bilinear_value(p.taps, v[0], v[1], v[2], v[3]);
          warp::accumulate_coord_grad(p.taps, v[0], v[1], v[2], v[3], go_c * p.occlusion, gix, giy);
        }
        const int64_t pix = (b * g.out_h + y) * g.out_w + x;  // outputs are contiguous
        if (grad_grid) {
          grad_grid[2 * pix] = static_cast<scalar_t>(gix * sx);
          grad_grid[2 * pix + 1] = static_cast<scalar_t>(giy * sy);
        }
        if (grad_occ) grad_occ[pix] = static_cast<scalar_t>(gocc);
      }
    }
  });
}

// Pass 2: the input gradient. Each task owns whole (b, channel-block) planes of grad_input, so the
// scatter needs no atomics and the summation order is fixed: bitwise deterministic.
template <typename scalar_t, typename acc_t>
void input_grad_kernel(const WarpGeometry& g, const scalar_t* grad_out, const scalar_t* grid,
                       const scalar_t* occ, acc_t* grad_in /* contiguous (B,C,Hi,Wi) */) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks_per_batch =
      std::max<int64_t>(1, std::min<int64_t>(g.channels, (threads * 4 + g.batch - 1) / std::max<int64_t>(g.batch, 1)));
  const int64_t block_c = (g.channels + blocks_per_batch - 1) / blocks_per_batch;
  const int64_t plane = g.in_h * g.in_w;
  at::parallel_for(0, g.batch * blocks_per_batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks_per_batch;
      const int64_t c0 = (task % blocks_per_batch) * block_c;
      const int64_t c1 = std::min(g.channels, c0 + block_c);
      if (c0 >= c1) continue;
      for (int64_t y = 0; y < g.out_h; ++y) {
        for (int64_t x = 0; x < g.out_w; ++x) {
          const auto p = pixel_taps<scalar_t, acc_t>(g, grid, occ, b, y, x, g.in_w, 1);  // grad_in strides
          const scalar_t* go = grad_out + b * g.out_stride[0] + y * g.out_stride[2] + x * g.out_stride[3];
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t gs = static_cast<acc_t>(go[c * g.out_stride[1]]) * p.occlusion;
            acc_t* gi = grad_in + (b * g.channels + c) * plane;
            for (int i = 0; i < 4; ++i) {
              if (p.taps.valid[i]) gi[p.taps.offset[i]] += p.taps.weight[i] * gs;
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
