// 16-bit float storage for the CPU kernels (the CUDA kernels use __half / __nv_bfloat16): the bit-pattern
// types the torch layers hand over, and their conversions to and from float, rounding to nearest even.
// Branch-free (selects written as masks: GCC does not if-convert ternaries for AVX2), so that loops
// converting whole rows vectorise at every vector width. Exhaustively equal to the compiler's _Float16
// conversions (float -> half over all 2^32 inputs, NaNs as quiet NaNs of the same sign).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace r2lm {

struct Half16 { uint16_t bits; };
struct BFloat16Bits { uint16_t bits; };

namespace half_detail {
inline float as_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline uint32_t as_bits(float x) {
  uint32_t out;
  std::memcpy(&out, &x, 4);
  return out;
}
inline uint32_t mask_if(bool c) { return 0u - uint32_t(c); }
}  // namespace half_detail

// The half's exponent and mantissa move into float position and the exponent is rebiased (15 -> 127);
// Inf/NaN get the rest of the bias; zeros and subnormals (m * 2^-24) come out exactly as
// (1 + m / 1024) * 2^-14 - 2^-14.
inline float half_bits_to_float(uint16_t h) {
  using namespace half_detail;
  const uint32_t magnitude = uint32_t(h & 0x7fff) << 13, exp = magnitude & 0x0f800000u;
  const uint32_t special = mask_if(exp == 0x0f800000u), tiny = mask_if(exp == 0);
  const uint32_t bits = magnitude + (112u << 23) + ((112u << 23) & special);
  const uint32_t small = as_bits(as_float(bits + (1u << 23)) - as_float(113u << 23));
  return as_float((small & tiny) | (bits & ~tiny) | uint32_t(h & 0x8000) << 16);
}

// Normal halves: the rebased float bits rounded at bit 13. Below 2^-14 (subnormal halves and zero): adding
// 0.5 leaves |x| rounded to a multiple of 2^-24 (the float spacing on [0.5, 1)), whose count is the half's
// bits. From 65520 up: Inf; NaN stays a quiet NaN.
inline uint16_t float_to_half_bits(float x) {
  using namespace half_detail;
  const uint32_t bits = as_bits(x), sign = (bits >> 16) & 0x8000u, a = bits & 0x7fffffffu;
  const uint32_t rebased = a - (112u << 23);
  const uint32_t normal = (rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13;
  const uint32_t subnormal = as_bits(as_float(a) + 0.5f) - as_bits(0.5f);
  const uint32_t is_small = mask_if(a < 0x38800000u), is_inf = mask_if(a >= 0x477ff000u),
                 is_nan = mask_if(a > 0x7f800000u);
  uint32_t h = (subnormal & is_small) | (normal & ~is_small);
  h = (0x7c00u & is_inf) | (h & ~is_inf);
  h = (0x7e00u & is_nan) | (h & ~is_nan);
  return uint16_t(sign | h);
}

#if defined(__x86_64__)
// 8 fp16 values <-> 8 floats by F16C (x86-64-v3 and up; float -> half rounds to nearest even, as
// float_to_half_bits, and keeps NaN payloads). Plain `inline` with that target: they inline into kernels
// compiled for x86-64-v3 / v4 whose entry points are `flatten`ed (an always_inline call from a template
// compiled for the baseline target would not build).
typedef float Float8 __attribute__((vector_size(32)));
__attribute__((target("arch=x86-64-v3"))) inline Float8 half8_to_float(const uint16_t* src) {
  return Float8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
__attribute__((target("arch=x86-64-v3"))) inline void float8_to_half(Float8 v, uint16_t* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT));
}

// A float vector F of 8 or 16 lanes from / to fp16 bits, by F16C: for kernels compiled for vectors of 32 or
// 64 bytes (cpu_vector.h), under the conditions above.
template <typename F>
inline F half_lanes_to_float(const uint16_t* src) {
  static_assert(sizeof(F) == 32 || sizeof(F) == 64, "8 or 16 float lanes");
  if constexpr (sizeof(F) == 32) {
    return half8_to_float(src);
  } else {
    const Float8 lo = half8_to_float(src), hi = half8_to_float(src + 8);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
}
template <typename F>
inline void float_lanes_to_half(F v, uint16_t* dst) {
  static_assert(sizeof(F) == 32 || sizeof(F) == 64, "8 or 16 float lanes");
  if constexpr (sizeof(F) == 32) {
    float8_to_half(v, dst);
  } else {
    float8_to_half(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), dst);
    float8_to_half(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), dst + 8);
  }
}
#endif

// Rows of n fp16 values to float and back by F16C, 8 values per instruction, which beats the vectorised bit
// arithmetic above (widen_row / narrow_row call them per row in kernels compiled for 32 or 64 bytes, so
// the callers need no `flatten`).
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v3"))) inline void half_row_to_float_f16c(const uint16_t* src, int64_t n,
                                                                            float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const Float8 v = half8_to_float(src + j);
    std::memcpy(dst + j, &v, sizeof(v));
  }
  for (; j < n; ++j) dst[j] = half_bits_to_float(src[j]);
}
__attribute__((target("arch=x86-64-v3"))) inline void float_row_to_half_f16c(const float* src, int64_t n,
                                                                            uint16_t* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Float8 v;
    std::memcpy(&v, src + j, sizeof(v));
    float8_to_half(v, dst + j);
  }
  for (; j < n; ++j) dst[j] = float_to_half_bits(src[j]);
}
#endif
inline float bf16_bits_to_float(uint16_t h) { return half_detail::as_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16_bits(float x) {
  using namespace half_detail;
  const uint32_t bits = as_bits(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16, quiet_nan = (bits >> 16) | 0x40u;
  const uint32_t is_nan = mask_if((bits & 0x7fffffffu) > 0x7f800000u);
  return uint16_t((quiet_nan & is_nan) | (rounded & ~is_nan));
}

// Storage elements as compute values: 16-bit floats widen to float, float and double pass through.
inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(Half16 x) { return half_bits_to_float(x.bits); }
inline float to_compute(BFloat16Bits x) { return bf16_bits_to_float(x.bits); }

// A compute value (float or double) stored as T; 16-bit floats round to nearest even (from a double, through
// float first).
template <typename T, typename X>
inline T to_storage(X x) {
  if constexpr (std::is_same_v<T, Half16>) return Half16{float_to_half_bits(float(x))};
  else if constexpr (std::is_same_v<T, BFloat16Bits>) return BFloat16Bits{float_to_bf16_bits(float(x))};
  else return T(x);
}

// A row of n storage elements to compute values C and back, in a kernel compiled for vectors of kBytes
// (cpu_vector.h): fp16 rows by F16C from 32 bytes on (x86-64-v3 and up), the others element by element.
template <int kBytes, typename T, typename C>
inline void widen_row(const T* src, int64_t n, C* dst) {
#if defined(__x86_64__)
  if constexpr (kBytes >= 32 && std::is_same_v<T, Half16> && std::is_same_v<C, float>) {
    half_row_to_float_f16c(&src->bits, n, dst);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = C(to_compute(src[i]));
}
template <int kBytes, typename T, typename C>
inline void narrow_row(const C* src, int64_t n, T* dst) {
#if defined(__x86_64__)
  if constexpr (kBytes >= 32 && std::is_same_v<T, Half16> && std::is_same_v<C, float>) {
    float_row_to_half_f16c(src, n, &dst->bits);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = to_storage<T>(src[i]);
}

}  // namespace r2lm
