// Vector width of the portable CPU kernels (GCC vector types), chosen at run time.
//
// GCC keeps a vector type wider than the target's registers in memory: under AVX2 a 64-byte vector is
// assembled through the stack (every scalar broadcast is 16 stores), which made a 64-byte kernel ~30x
// slower than the same kernel at 32 bytes. So each portable kernel is compiled once per width, with its
// register blocking sized for that instruction set: 64 bytes for x86-64-v4 (AVX-512, 32 registers), 32
// for x86-64-v3 (AVX2 + FMA, 16 registers), 16 elsewhere (SSE2, NEON).
#pragma once

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R2LM_X86_VECTOR_TARGETS 1
#define R2LM_TARGET_X86_64_V4 __attribute__((target("arch=x86-64-v4")))
#define R2LM_TARGET_X86_64_V3 __attribute__((target("arch=x86-64-v3")))
#endif

namespace r2lm {

// The widest width the CPU runs (64, 32 or 16 bytes). R2LM_CPU_VECTOR_BYTES (64, 32 or 16) caps it; it is
// read per call so that the tests can cover every width on one machine.
inline int cpu_vector_bytes() {
  int bytes = 16;
#ifdef R2LM_X86_VECTOR_TARGETS
  static const int widest = __builtin_cpu_supports("x86-64-v4") ? 64 : __builtin_cpu_supports("x86-64-v3") ? 32 : 16;
  bytes = widest;
#endif
  if (const char* cap = std::getenv("R2LM_CPU_VECTOR_BYTES")) {
    const int c = std::atoi(cap);
    if (c == 16 || c == 32 || c == 64) bytes = std::min(bytes, c);
  }
  return bytes;
}

}  // namespace r2lm
