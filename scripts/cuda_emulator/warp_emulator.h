// Warp emulator: the library's CUDA kernels, translated to host C++ by translate.py, run on the CPU with one
// fiber per CUDA thread, so that the test suite exercises them on machines without a GPU. Collectives
// (__syncthreads, shuffles, ldmatrix, mma) switch fibers; warp collectives require every lane they name;
// shared memory starts as NaN in every CTA; cp.async copies land only at their wait_group, and a read of a
// copy in flight, or of another warp's copy with no __syncthreads since, aborts with the kernel's name.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

namespace emu {
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

void launch(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body, const char* name,
            const void* func);
unsigned char* dynamic_smem();
unsigned cvta_shared(const void* p);

void syncthreads();
int syncthreads_count(int pred);
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width);
template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shfl of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_xor_bits(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

void cp_async(unsigned dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix_x4(bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr);
enum class MmaType { kBf16, kF16 };
void mma_m16n8k16(MmaType t, float& c0, float& c1, float& c2, float& c3, unsigned a0, unsigned a1, unsigned a2,
                  unsigned a3, unsigned b0, unsigned b1);
}  // namespace emu

// Host stand-ins for device intrinsics used by the kernels.
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo);
  double d; std::memcpy(&d, &bits, 8); return d;
}
template <typename T> inline T __ldcs(const T* p) { return *p; }
// Device code's global min / max overloads.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx ::emu::g_thread_idx
#define blockIdx ::emu::g_block_idx
#define blockDim ::emu::g_block_dim
#define gridDim ::emu::g_grid_dim
#define __syncthreads() ::emu::syncthreads()
#define __syncthreads_count(p) ::emu::syncthreads_count(p)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__VA_ARGS__)
#define __cvta_generic_to_shared(p) ::emu::cvta_shared(p)

// The runtime's templated overload exists only under nvcc.
template <typename F>
cudaError_t cudaFuncSetAttribute(F* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
