// Vector width of the portable CPU kernels (GCC vector types), chosen at run time.
//
// GCC keeps a vector type wider than the target's registers in memory: under AVX2 a 64-byte vector is
// assembled through the stack (every scalar broadcast is 16 stores), which made a 64-byte kernel ~30x
// slower than the same kernel at 32 bytes. So each portable kernel is compiled once per width, with its
// register blocking sized for that instruction set: 64 bytes for x86-64-v4 (AVX-512, 32 registers), 32
// for x86-64-v3 (AVX2 + FMA, 16 registers), 16 elsewhere (SSE2, NEON).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "r2lm_common.h"

// R2LM_FOR_EACH_VECTOR_WIDTH(M) expands M(bytes, target attribute) for every width compiled here; a
// kernel's per-width entry points are defined by it, and with_cpu_vector_width picks one per call.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R2LM_X86_VECTOR_TARGETS 1
#define R2LM_FOR_EACH_VECTOR_WIDTH(M) \
  M(64, __attribute__((target("arch=x86-64-v4")))) M(32, __attribute__((target("arch=x86-64-v3")))) M(16, )
#else
#define R2LM_FOR_EACH_VECTOR_WIDTH(M) M(16, )
#endif

namespace r2lm {

// The widest width the CPU runs (64, 32 or 16 bytes). R2LM_CPU_VECTOR_BYTES (64, 32 or 16; empty: unset)
// caps it; it is read per call (outside parallel regions) so that the tests can cover every width on one
// machine. Another value throws rather than quietly running the widest kernels.
inline int cpu_vector_bytes() {
  int bytes = 16;
#ifdef R2LM_X86_VECTOR_TARGETS
  static const int widest = __builtin_cpu_supports("x86-64-v4") ? 64 : __builtin_cpu_supports("x86-64-v3") ? 32 : 16;
  bytes = widest;
#endif
  if (const char* cap = std::getenv("R2LM_CPU_VECTOR_BYTES"); cap && *cap) {
    const std::string text = cap;
    if (text != "16" && text != "32" && text != "64")
      throw std::invalid_argument("R2LM_CPU_VECTOR_BYTES must be 64, 32 or 16 (or unset), got '" + text + "'");
    bytes = std::min(bytes, std::stoi(text));
  }
  return bytes;
}

// f(std::integral_constant<int, W>{}) for the width W that cpu_vector_bytes() picks.
template <typename F>
decltype(auto) with_cpu_vector_width(F&& f) {
#ifdef R2LM_X86_VECTOR_TARGETS
  switch (cpu_vector_bytes()) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 32: return f(std::integral_constant<int, 32>{});
  }
#endif
  return f(std::integral_constant<int, 16>{});
}

// A GCC vector of kBytes bytes of T (a class member: GCC ignores vector_size on a dependent alias).
template <typename T, int kBytes>
struct CpuVector {
  typedef T type __attribute__((vector_size(kBytes)));
};

// x log2(e) for float vectors, log2(e) split in two floats so that its rounding does not bias large
// arguments (e^x = 2^(x log2(e)) in every float exp of the CPU kernels).
template <typename F>
inline F times_log2e(F x) { return x * 1.44269502162933349609375f + x * 1.925963033500011079e-08f; }

// f of every lane of a vector, one lane at a time (the double-vector paths, which match the fp64 references).
template <typename V, typename F>
inline __attribute__((always_inline)) V map_lanes(V x, F&& f) {
  for (int i = 0; i < int(sizeof(V) / sizeof(x[0])); ++i) x[i] = f(x[i]);
  return x;
}

// 2^x of a float vector for x <= 127 (or NaN), branch-free: x = j + r with j an integer and |r| <= 1/2,
// 2^r by the shared exp2_fraction, 2^j added to the exponent field. kClampLow: inputs below -126 read as
// -126 (results 2^-126, as good as 0 for a decay factor or a sigmoid); false where the caller knows
// x >= -126 or handles it. Vector selects, so loops of these vectorise on any target (a scalar clamp
// becomes control flow that AVX2 / SSE code cannot vectorise).
template <bool kClampLow = true, typename V>
inline __attribute__((always_inline)) V vec_exp2_upto127(V x) {
  using UInt = typename CpuVector<uint32_t, sizeof(V)>::type;
  if constexpr (kClampLow) x = x < -126.0f ? V{} - 126.0f : x;
  const V shifted = x + 12582912.0f;  // 1.5 * 2^23: rounds x to the integer j in the low bits
  const V r = x - (shifted - 12582912.0f);
  const V poly = exp2_fraction(r);
  // (bits(shifted) - 0x4B400000) << 23 is bits(shifted) << 23 modulo 2^32 (0x4B400000 << 23 wraps to 0).
  return std::bit_cast<V>(std::bit_cast<UInt>(poly) + (std::bit_cast<UInt>(shifted) << 23));
}

// 2^x of a float vector for any x: as vec_exp2_upto127, and +inf from 128 on. Double vectors (the tests'
// precision) take std::exp2 lane by lane.
template <typename V>
inline __attribute__((always_inline)) V vec_exp2(V x) {
  if constexpr (sizeof(x[0]) == sizeof(double)) {
    return map_lanes(x, [](double v) { return std::exp2(v); });
  } else {
    const V result = vec_exp2_upto127(x > 127.0f ? V{} + 127.0f : x);
    return x >= 128.0f ? V{} + __builtin_inff() : result;
  }
}
// e^x of a float or double vector.
template <typename V>
inline __attribute__((always_inline)) V vec_exp(V x) {
  if constexpr (sizeof(x[0]) == sizeof(double)) {
    return map_lanes(x, [](double v) { return std::exp(v); });
  } else {
    return vec_exp2(times_log2e(x));
  }
}

}  // namespace r2lm
