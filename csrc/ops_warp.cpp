// dagan_fast::warp_occlusion_fwd/_bwd: schemas, the C++ CPU kernels and (when nvcc built them) the
// CUDA kernels behind the CUDA dispatch key.
#include <torch/library.h>
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>

#include "cpu/warp_occlusion.h"
#include "cuda_host.h"
#include "op_support.h"
#include "warp_checks.h"
#ifdef DAGAN_FAST_WITH_CUDA
#include "cuda/warp_launchers.h"
#endif

namespace dagan_fast {
namespace {

#ifdef DAGAN_FAST_WITH_CUDA
warp::WarpGeometry geometry(const at::Tensor& input, const at::Tensor& grid, const c10::optional<at::Tensor>& occ,
                            const at::Tensor& out) {
  warp::WarpGeometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_h = grid.size(1);
  g.out_w = grid.size(2);
  for (int i = 0; i < 4; ++i) {
    g.in_stride[i] = input.stride(i);
    g.grid_stride[i] = grid.stride(i);
    g.occ_stride[i] = occ.has_value() ? occ->stride(i) : 0;
    g.out_stride[i] = out.stride(i);
    g.grad_in_stride[i] = 0;
  }
  return g;
}

at::Tensor warp_forward_cuda(const at::Tensor& input, const at::Tensor& grid, const c10::optional<at::Tensor>& occ) {
  check_warp_args(input, grid, occ, "cuda");
  c10::DeviceGuard guard(input.device());
  auto out = at::empty({input.size(0), input.size(1), grid.size(1), grid.size(2)}, input.options());
  if (out.numel() == 0) return out;
  poison(out);
  const auto g = geometry(input, grid, occ, out);
  check_cuda(dagan_fast_warp_forward_cuda(dtype_code(input), &g, input.const_data_ptr(), grid.const_data_ptr(),
                                          occ.has_value() ? occ->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                          input.device().index(), current_stream(input.device())),
             "warp_occlusion forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> warp_backward_cuda(const at::Tensor& grad_output,
                                                                  const at::Tensor& input, const at::Tensor& grid,
                                                                  const c10::optional<at::Tensor>& occ,
                                                                  std::array<bool, 3> mask) {
  check_warp_args(input, grid, occ, "cuda");
  check_warp_grad_output(grad_output, input, grid);
  c10::DeviceGuard guard(input.device());
  const bool want_occ = mask[2] && occ.has_value();
  const int64_t B = input.size(0), Ho = grid.size(1), Wo = grid.size(2);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The accumulation buffer follows the input's layout, so channels_last atomics hit contiguous
  // channels.
  at::Tensor grad_acc = mask[0] ? at::zeros(input.sizes(), input.options().dtype(acc_type).memory_format(
                                                               input.suggest_memory_format()))
                                : at::Tensor();
  at::Tensor grad_grid = mask[1] ? at::zeros({B, Ho, Wo, 2}, grid.options()) : at::empty({0}, grid.options());
  at::Tensor grad_occ = want_occ ? at::zeros({B, 1, Ho, Wo}, grid.options()) : at::empty({0}, grid.options());
  if (grad_output.numel() > 0) {
    poison(grad_grid);
    poison(grad_occ);
    auto g = geometry(input, grid, occ, grad_output);
    if (mask[0]) {
      for (int i = 0; i < 4; ++i) g.grad_in_stride[i] = grad_acc.stride(i);
    }
    // torch.use_deterministic_algorithms(True): the input gradient is gathered, not atomically added.
    const int deterministic = mask[0] && at::globalContext().deterministicAlgorithms() ? 1 : 0;
    unsigned long long workspace_bytes = 0;
    check_cuda(dagan_fast_warp_backward_workspace_cuda(&g, deterministic, &workspace_bytes),
               "warp_occlusion backward workspace");
    at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, input.options().dtype(at::kByte));
    check_cuda(dagan_fast_warp_backward_cuda(
                   dtype_code(input), &g, grad_output.const_data_ptr(), input.const_data_ptr(), grid.const_data_ptr(),
                   occ.has_value() ? occ->const_data_ptr() : nullptr, mask[0] ? grad_acc.mutable_data_ptr() : nullptr,
                   mask[1] ? grad_grid.mutable_data_ptr() : nullptr, want_occ ? grad_occ.mutable_data_ptr() : nullptr,
                   deterministic, workspace_bytes ? workspace.mutable_data_ptr() : nullptr, workspace_bytes,
                   input.device().index(), current_stream(input.device())),
               "warp_occlusion backward");
  }
  // Returned contiguous (as the fake kernel and the CPU kernel promise): a no-op for planar inputs.
  at::Tensor grad_input = !mask[0] ? at::empty({0}, input.options())
                                   : grad_acc.to(input.scalar_type(), /*non_blocking=*/false, /*copy=*/false,
                                                 at::MemoryFormat::Contiguous);
  return {grad_input, grad_grid, grad_occ};
}
#endif

}  // namespace
}  // namespace dagan_fast

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) {
  m.def("warp_occlusion_fwd(Tensor input, Tensor grid, Tensor? occlusion) -> Tensor");
  m.def(
      "warp_occlusion_bwd(Tensor grad_output, Tensor input, Tensor grid, Tensor? occlusion, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dagan_fast, CPU, m) {
  m.impl("warp_occlusion_fwd", &dagan_fast::cpu::warp_occlusion_forward);
  m.impl("warp_occlusion_bwd", &dagan_fast::cpu::warp_occlusion_backward);
}

#ifdef DAGAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dagan_fast, CUDA, m) {
  m.impl("warp_occlusion_fwd", &dagan_fast::warp_forward_cuda);
  m.impl("warp_occlusion_bwd", &dagan_fast::warp_backward_cuda);
}
#endif
