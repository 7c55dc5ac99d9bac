// The dagan_fast op library's identity: build_info() says which kernel families were compiled.
// Each op family registers its schemas and kernels in its own csrc/ops_<family>.cpp
// (TORCH_LIBRARY_FRAGMENT), so op families stay independent.
#include <torch/library.h>

#include <string>

#ifndef DAGAN_FAST_CUDA_ARCHS
#define DAGAN_FAST_CUDA_ARCHS ""
#endif

namespace dagan_fast {
namespace {

std::string build_info() {
#ifdef DAGAN_FAST_WITH_CUDA
  return std::string("cpu;cuda:") + DAGAN_FAST_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace
}  // namespace dagan_fast

TORCH_LIBRARY_FRAGMENT(dagan_fast, m) { m.def("build_info() -> str"); }

TORCH_LIBRARY_IMPL(dagan_fast, CompositeExplicitAutograd, m) {
  m.impl("build_info", &dagan_fast::build_info);
}
