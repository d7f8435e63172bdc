// Shared by the CPU and CUDA kernels; no torch headers here (kernels take raw pointers and strides).
#pragma once

#if defined(__CUDACC__)
#define R2LM_HD __host__ __device__ __forceinline__
#else
#define R2LM_HD inline
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace r2lm {

// exp and log1p in the argument's own precision on host and device. In host code that sees the CUDA
// headers (the warp emulator) an unqualified exp of a float takes the double function, which would hide
// the overflow and underflow of the float math a GPU does.
template <typename T>
R2LM_HD T exp_same_type(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}
template <typename T>
R2LM_HD T log1p_same_type(T x) {
#if defined(__CUDA_ARCH__)
  return log1p(x);
#else
  return std::log1p(x);
#endif
}

// 2^x in one special-function-unit instruction on the GPU: relative error ~2^-22, and results below 2^-126
// flush to zero (exp2f spends a compare and two multiplies per call on subnormal results). The host (the
// warp emulator) computes exp2 in float.
R2LM_HD float sfu_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// Element dtypes a kernel is instantiated for; the torch layer maps ScalarType onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// 2^r for |r| <= 1/2 on the FMA pipes: a degree-6 polynomial whose constant term is exactly 1 and linear
// term ln(2) (rounded to float), so 2^0 = 1 exactly and decays near 1 carry no bias that a long
// recurrence would accumulate; the other coefficients minimise the maximum relative error (truncation
// < 4e-9, float coefficients included; see reverse_selective_scan/NOTES.md). F is float, or a float vector
// (the CPU scan's lanes).
template <typename F>
R2LM_HD F exp2_fraction(F r) {
  F p = r * 1.5324316e-04f + 1.3390959e-03f;
  p = p * r + 9.618518e-03f;
  p = p * r + 5.5503596e-02f;
  p = p * r + 2.4022648e-01f;
  p = p * r + 6.931472e-01f;
  return p * r + 1.0f;
}

// 2^x evaluated with FMA-pipe arithmetic only (no special-function unit), relative error < 1e-7 on
// [-126, 127]; inputs are clamped to that range, so results below 2^-126 read as 2^-126 and above 2^127
// as 2^127. Branch-free, so CPU loops calling it vectorise (reverse_conv1d's SiLU); the CUDA scan forward
// computes part of its exponentials with it so the special-function unit stops being the bottleneck at
// d_state 16.
R2LM_HD float exp2_poly(float x) {
  x = x < -126.f ? -126.f : (x > 127.f ? 127.f : x);
  // Adding 1.5 * 2^23 rounds x to an integer j held in the low mantissa bits; r = x - j is in [-0.5, 0.5].
  const float shifted = x + 12582912.f;
  const float j = shifted - 12582912.f;
  const float r = x - j;
  // Measured max relative error 9.1e-8 over [-126, 127], with or without FMA (reverse_selective_scan/NOTES.md).
  float p = exp2_fraction(r);
  // Scale by 2^j: add j to the exponent field (the clamp keeps the result's exponent field in [0, 254]).
  // Unsigned: a NaN x passes the clamp, and its bits would overflow signed arithmetic. Its result is then
  // NaN on the host but FLT_MAX where NaN arithmetic gives the canonical NaN (GPUs); the scan, its one user,
  // takes it for one state in eight, and the other seven (sfu_exp2) turn the output NaN as the reference's.
  uint32_t shifted_bits, p_bits;
  __builtin_memcpy(&shifted_bits, &shifted, 4);
  __builtin_memcpy(&p_bits, &p, 4);
  p_bits += (shifted_bits - 0x4B400000u) << 23;
  __builtin_memcpy(&p, &p_bits, 4);
  return p;
}

// Whether the environment variable `name` is "1" (the switches that pick a kernel, e.g. a CPU op's portable
// one; read per call, so that the tests can cover every kernel on one machine). Host code only.
inline bool env_is_one(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '1' && value[1] == '\0';
}

}  // namespace r2lm
