// Shared by the CPU and CUDA kernels; no torch headers here (kernels take raw pointers and strides).
#pragma once

#if defined(__CUDACC__)
#define R2LM_HD __host__ __device__ __forceinline__
#else
#define R2LM_HD inline
#endif

#include <cstdint>

namespace r2lm {

// Element dtypes a kernel is instantiated for; the torch layer maps ScalarType onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace r2lm
