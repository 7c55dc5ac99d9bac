// Shared by every compiled op family: the debug poisoning of fresh outputs. Each family's argument
// checks live beside it (warp_checks.h, motion_checks.h, and in ops_attention.cpp).
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <ATen/core/Tensor.h>

namespace dagan_fast {

// With DAGAN_FAST_POISON=1, freshly allocated outputs are filled with NaN before the kernel runs,
// so a test can prove that every element was written. Read at each call (tests toggle it).
inline bool poison_outputs() {
  const char* v = std::getenv("DAGAN_FAST_POISON");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}

inline void poison(at::Tensor& t) {
  if (t.defined() && t.numel() > 0 && poison_outputs()) t.fill_(NAN);
}

}  // namespace dagan_fast
