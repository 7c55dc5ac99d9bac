// Which vector code paths dagan_fast's own CPU kernels may use: the analogue of ATen's
// ATEN_CPU_CAPABILITY for our kernels (ATen's own kernels keep following ATEN_CPU_CAPABILITY).
//
// DAGAN_FAST_CPU_CAPABILITY=default|avx2|avx512 picks the highest level our kernels use; when it is
// unset, ATEN_CPU_CAPABILITY is honoured the same way, so one setting forces both libraries. The level
// is capped at what this CPU offers (like ATen: asking for avx512 on an AVX2-only CPU gives avx2) and
// is read once per process. An unknown DAGAN_FAST_CPU_CAPABILITY value is an error naming it; an
// unknown ATEN_CPU_CAPABILITY value (e.g. "zvector", meant for ATen alone) is ignored.
//
// "avx2" needs AVX2; "avx512" needs AVX-512 F, BW, VL and DQ (ATen's AVX512 level). Within avx512,
// float32 <-> bfloat16 conversions use AVX512-BF16 instructions where the CPU has them and plain
// AVX-512F integer shifts otherwise; DAGAN_FAST_CPU_AVX512BF16=0 forces the shifts (a test hook).
#pragma once
#include <string>

namespace dagan_fast {
namespace cpu {

enum class Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The level in use (read once; see above). Throws c10::Error for a bad DAGAN_FAST_CPU_CAPABILITY.
Capability capability();

// The highest level this CPU supports, whatever the environment says.
Capability hardware_capability();

// "default", "avx2" or "avx512".
const char* capability_name(Capability c);

// Whether the avx512 paths convert float32 -> bfloat16 with AVX512-BF16 (vcvtneps2bf16). Those
// instructions round to nearest even like c10::BFloat16 but flush float32 denormals to zero; the
// shift fallback matches c10::BFloat16 bit for bit.
bool avx512_bf16_native();

// "avx512" or "avx512+bf16" style description for build/run reports: the level and its bf16 mode.
std::string capability_description();

}  // namespace cpu
}  // namespace dagan_fast
