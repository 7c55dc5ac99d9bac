// Run-time choice of our CPU kernels' vector paths (see capability.h), and the
// dagan_fast::cpu_capability() op that reports it to Python.
#include "capability.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace dagan_fast {
namespace cpu {
namespace {

bool env_is_zero(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// Parses a level name (case-insensitive); returns false for anything else.
bool parse_level(const char* text, Capability& out) {
  std::string s(text);
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s == "default") {
    out = Capability::kDefault;
  } else if (s == "avx2") {
    out = Capability::kAVX2;
  } else if (s == "avx512") {
    out = Capability::kAVX512;
  } else {
    return false;
  }
  return true;
}

Capability read_capability() {
  const Capability hw = hardware_capability();
  Capability want = hw;
  const char* ours = std::getenv("DAGAN_FAST_CPU_CAPABILITY");
  const char* aten = std::getenv("ATEN_CPU_CAPABILITY");
  if (ours != nullptr && *ours != '\0') {
    TORCH_CHECK(parse_level(ours, want), "DAGAN_FAST_CPU_CAPABILITY must be default, avx2 or avx512, got '", ours,
                "'");
  } else if (aten != nullptr && *aten != '\0') {
    if (!parse_level(aten, want)) want = hw;  // a value only ATen knows: not ours to judge
  }
  return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
}

}  // namespace

Capability hardware_capability() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Capability hw = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Capability::kAVX512;
    }
    return __builtin_cpu_supports("avx2") ? Capability::kAVX2 : Capability::kDefault;
  }();
  return hw;
#else
  return Capability::kDefault;
#endif
}

Capability capability() {
  static const Capability level = read_capability();
  return level;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAVX2: return "avx2";
    case Capability::kAVX512: return "avx512";
    default: return "default";
  }
}

bool avx512_bf16_native() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool native = __builtin_cpu_supports("avx512bf16") && !env_is_zero("DAGAN_FAST_CPU_AVX512BF16");
  return native;
#else
  return false;
#endif
}

std::string capability_description() {
  const Capability c = capability();
  std::string s = capability_name(c);
  if (c == Capability::kAVX512 && avx512_bf16_native()) s += "+bf16";
  return s;
}

}  // namespace cpu
}  // namespace dagan_fast

// cpu_capability() -> "default" | "avx2" | "avx512" | "avx512+bf16": the vector level our CPU
// kernels use in this process (DAGAN_FAST_CPU_CAPABILITY / ATEN_CPU_CAPABILITY, capped by the CPU).
TORCH_LIBRARY_FRAGMENT(dagan_fast, m) { m.def("cpu_capability() -> str"); }

TORCH_LIBRARY_IMPL(dagan_fast, CompositeExplicitAutograd, m) {
  m.impl("cpu_capability", [] { return dagan_fast::cpu::capability_description(); });
}
