// reverse_selective_scan on CUDA: forward and a deterministic, recompute-based backward. No torch headers.
//
// Parallelisation: one thread per (sequence, channel) keeps that channel's d_state states in registers
// and walks the whole sequence; a block holds consecutive channels of one sequence, so every per-token
// load or store of u, delta, z, out (token-major) is a coalesced run of consecutive channels, and the
// per-token B[t], C[t] rows (shared by all channels) are staged in shared memory and read as broadcasts.
//
// Forward: right to left over chunks of kChunk tokens; the next chunk's inputs are loaded into registers
// while the current one is computed, so about kChunk tokens of loads are in flight per thread. At
// d_state 16 the special-function unit (16 exp2 per SM per clock) would be slower than memory, so one
// exponential in eight runs on the FMA pipes (exp2_poly).
//
// Backward (three kernels, no float atomics, bitwise reproducible):
//  1. scan_fwd_kernel<kStates=true> reruns the forward recurrence and stores the state h_t at every
//     superchunk boundary (t a multiple of kSuper) in the workspace.
//  2. scan_bwd_kernel walks superchunks left to right carrying the adjoint dL/dh. Per superchunk it
//     recomputes the states right to left from the stored boundary, keeping one state per subchunk
//     (kSub tokens) in shared memory; per subchunk it recomputes the per-token decayed right states
//     (decay_t * h_{t+1}) and decays into shared memory, then runs the adjoint left to right. dA, dD, ddelta_bias accumulate per thread;
//     dB, dC (sums over channels) reduce within the warp by a shuffle reduce-scatter, across warps in
//     shared memory, and land as per-block partial sums in the workspace.
//  3. scan_reduce_bc_kernel / scan_reduce_params_kernel sum the partials in a fixed order.
// The backward's shared memory (108.8-166.0 kB) exceeds the 99 KB per block of GPUs of compute capability
// 8.6 / 8.9: there a compact configuration runs (one warp per block, shorter superchunks and subchunks).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "reverse_selective_scan/reverse_selective_scan.h"

namespace r2lm {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
// A * log2(e) rounded once (product in double), exactly as the CPU kernel's A_log2e: a float log2(e)
// would round twice and bias large |dt * A| arguments by up to 1.3e-8 relative.
__device__ __forceinline__ float mul_log2e(float a) { return float(double(a) * 1.4426950408889634); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// K per-token values of one channel held in registers; 2-byte types are packed two to a register so
// a prefetched chunk costs half the registers.
template <typename T, int K>
struct TokenRegs {
  static constexpr bool kPacked = sizeof(T) == 2;
  static_assert(!kPacked || K % 2 == 0, "pairs of tokens");
  uint32_t w[kPacked ? K / 2 : K];

  __device__ __forceinline__ void load(int i, const T* ptr, bool ok) {
    if constexpr (kPacked) {
      const uint32_t bits = ok ? *reinterpret_cast<const uint16_t*>(ptr) : 0u;
      w[i / 2] = (i % 2 == 0) ? bits : (w[i / 2] | (bits << 16));
    } else {
      w[i] = ok ? __float_as_uint(*reinterpret_cast<const float*>(ptr)) : 0u;
    }
  }
  __device__ __forceinline__ float get(int i) const {
    if constexpr (!kPacked) {
      return __uint_as_float(w[i]);
    } else {
      const unsigned short bits = static_cast<unsigned short>(w[i / 2] >> (16 * (i % 2)));
      if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
      else return __uint_as_float(uint32_t(bits) << 16);  // bfloat16 is the top half of a float
    }
  }
};

// Per padded state count N (d_state rounded up to 16, 32 or 64): threads per block, tokens per chunk.
template <int N>
struct FwdConfig {
  static constexpr int kThreads = 128;
  static constexpr int kChunk = N == 16 ? 16 : (N == 32 ? 8 : 4);  // keeps registers within budget
};
template <int N, bool kCompact = false>
struct BwdConfig {
  static constexpr int kThreads = N == 16 && !kCompact ? 64 : 32;
  // Tokens between stored states, and tokens whose per-token states sit in shared memory; compact: at most
  // 87.1 kB of shared memory per block.
  static constexpr int kSuper = kCompact ? (N == 16 ? 64 : (N == 32 ? 32 : 8)) : (N == 64 ? 32 : 64);
  static constexpr int kSub = kCompact ? (N == 16 ? 8 : (N == 32 ? 4 : 2)) : (N == 64 ? 4 : 8);
  static constexpr int kSubs = kSuper / kSub;
  static constexpr int kWarps = kThreads / 32;
  static constexpr bool kParamsInSmem = N > 16;     // A and the dA accumulators (registers otherwise)
  static_assert(kSuper % FwdConfig<N>::kChunk == 0, "forward chunks must tile superchunks");
  static_assert(N % 4 == 0 && kThreads % 32 == 0, "float4 rows, whole warps");

  // Shared memory in floats: subchunk states, per-token states and decays, B and C rows, dB/dC warp
  // partials, A and dA accumulators when kept there, then kSuper + 1 seq_idx values.
  static constexpr int kSubStates = kSubs * N * kThreads;
  static constexpr int kTokenStates = kSub * N * kThreads;
  static constexpr int kRows = kSuper * N;
  static constexpr int kRed = kWarps * kSub * N;
  static constexpr int kParams = kParamsInSmem ? N * kThreads : 0;
  static constexpr int kFloats = kSubStates + 2 * kTokenStates + 2 * kRows + 2 * kRed + 2 * kParams;
  static constexpr size_t kSmemBytes = sizeof(float) * kFloats + sizeof(int) * (kSuper + 1);
  static_assert(!kCompact || kSmemBytes <= 99 * 1024, "the compact configuration fits 99 KB");
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Workspace layout of the backward, in floats (offsets computed identically by size and use).
struct BwdWorkspace {
  int64_t n_super, n_blocks;
  int64_t states, part_bc, part_a, part_d, part_bias, total;
  __host__ __device__ BwdWorkspace(const ScanParams& p, int n, int threads, int super) {
    n_super = ceil_div(p.seqlen, super);
    n_blocks = ceil_div(p.dim, threads);
    states = 0;                                                     // [batch][n_super][n][dim]
    part_bc = states + p.batch * n_super * n * p.dim;               // [2][batch][n_blocks][seqlen][n]
    part_a = part_bc + 2 * p.batch * n_blocks * p.seqlen * n;       // [batch][n][dim]
    part_d = part_a + p.batch * n * p.dim;                          // [batch][dim]
    part_bias = part_d + p.batch * p.dim;                           // [batch][dim]
    total = part_bias + p.batch * p.dim;
  }
};

// Whether the state carries from token t + 1 into token t (no reset at t).
__device__ __forceinline__ bool carries(const int* s_seq, int i, int64_t t, int64_t seqlen, bool has_seq) {
  return t + 1 < seqlen && (!has_seq || s_seq[i] == s_seq[i + 1]);
}

__device__ __forceinline__ float4 row4(const float* row, int q) {
  return reinterpret_cast<const float4*>(row)[q];
}

// Forward, or (kStates) the state pass of the backward configured by kCompact. Grid (ceil(dim / kThreads),
// batch).
template <typename T, int N, bool kStates, bool kCompact = false>
__global__ void __launch_bounds__(FwdConfig<N>::kThreads) scan_fwd_kernel(const ScanParams p) {
  constexpr int kThreads = FwdConfig<N>::kThreads, kChunk = FwdConfig<N>::kChunk;
  constexpr int kSuper = BwdConfig<N, kCompact>::kSuper;
  constexpr int kRowValues = 2 * kChunk * N;  // B and C values of one chunk
  constexpr int kRowsPerThread = (kRowValues + kThreads - 1) / kThreads;
  static_assert(kChunk + 1 <= kThreads, "one seq_idx value per thread");
  __shared__ __align__(16) float s_rows[2][kChunk][N];  // [0] = B, [1] = C
  __shared__ int s_seq[kChunk + 1];

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t d = int64_t(blockIdx.x) * kThreads + tid;
  const bool active = d < p.dim;
  const int64_t L = p.seqlen;
  const int n_state = int(p.d_state);
  const bool has_seq = p.seq_idx != nullptr;
  const bool has_z = !kStates && p.z != nullptr;

  const T* u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d;
  const T* z = has_z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + d : nullptr;
  const T* Bg = static_cast<const T*>(p.B) + b * p.B_batch_stride;
  const T* Cg = static_cast<const T*>(p.C) + b * p.C_batch_stride;
  const int32_t* seq = has_seq ? p.seq_idx + b * p.seq_idx_batch_stride : nullptr;

  float a2[N];  // A * log2(e)
  const float* A = static_cast<const float*>(p.A) + d * p.A_dim_stride;
#pragma unroll
  for (int n = 0; n < N; ++n) a2[n] = (active && n < n_state) ? mul_log2e(A[n]) : 0.f;
  const float bias = (active && p.delta_bias) ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float skip = (active && p.D) ? static_cast<const float*>(p.D)[d] : 0.f;

  float h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) h[n] = 0.f;

  // Registers holding the chunk being prefetched.
  TokenRegs<T, kChunk> nu, ndl, nz;
  float nrow[kRowsPerThread];
  int nseq = 0;
  auto prefetch = [&](int64_t t0) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const int64_t t = t0 + i;
      const bool ok = active && t < L;
      nu.load(i, u + t * p.u_seq_stride, ok);
      ndl.load(i, delta + t * p.delta_seq_stride, ok);
      if (!kStates) nz.load(i, z + t * p.z_seq_stride, ok && has_z);
    }
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int e = tid + j * kThreads;
      const int which = e / (kChunk * N), i = (e / N) % kChunk, n = e % N;
      const int64_t t = t0 + i;
      float v = 0.f;
      if (e < kRowValues && t < L && n < n_state && (!kStates || which == 0))
        v = to_float(which == 0 ? Bg[t * p.B_seq_stride + n] : Cg[t * p.C_seq_stride + n]);
      nrow[j] = v;
    }
    if (has_seq && tid <= kChunk) nseq = t0 + tid < L ? seq[t0 + tid] : 0;
  };

  const int64_t n_chunks = ceil_div(L, kChunk);
  prefetch((n_chunks - 1) * kChunk);
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    __syncthreads();  // the previous chunk is done with the shared rows
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int e = tid + j * kThreads;
      if (e < kRowValues) (&s_rows[0][0][0])[e] = nrow[j];
    }
    if (has_seq && tid <= kChunk) s_seq[tid] = nseq;
    const TokenRegs<T, kChunk> cu = nu, cdl = ndl, cz = nz;
    __syncthreads();
    if (c > 0) prefetch(t0 - kChunk);

#pragma unroll
    for (int i = kChunk - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      if (t >= L) continue;  // uniform across the block
      if (!carries(s_seq, i, t, L, has_seq)) {
#pragma unroll
        for (int n = 0; n < N; ++n) h[n] = 0.f;
      }
      const float ut = cu.get(i);
      const float dt = scan_dt(cdl.get(i), bias, p.delta_softplus);
      const float dtu = dt * ut;
      float y = 0.f;
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 bq = row4(s_rows[0][i], q);
        const float bv[4] = {bq.x, bq.y, bq.z, bq.w};
        float cv[4] = {0.f, 0.f, 0.f, 0.f};
        if (!kStates) {
          const float4 cq = row4(s_rows[1][i], q);
          cv[0] = cq.x; cv[1] = cq.y; cv[2] = cq.z; cv[3] = cq.w;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int n = 4 * q + k;
          const float x = dt * a2[n];
          const float decay = (n % 8 == 7) ? exp2_poly(x) : sfu_exp2(x);
          h[n] = decay * h[n] + dtu * bv[k];
          if (!kStates) y += h[n] * cv[k];
        }
      }
      if (!kStates && active) {
        y += skip * ut;
        if (has_z) y *= scan_silu(cz.get(i));
        static_cast<T*>(p.out)[b * p.out_batch_stride + t * p.out_seq_stride + d] = from_float<T>(y);
      }
    }
    if (kStates && t0 > 0 && t0 % kSuper == 0 && active) {
      const int64_t n_super = ceil_div(L, kSuper);
      float* states = static_cast<float*>(p.workspace) + ((b * n_super + t0 / kSuper) * N) * p.dim + d;
#pragma unroll
      for (int n = 0; n < N; ++n) states[n * p.dim] = h[n];
    }
  }
}

// Warp reduce-scatter of v[0..kCount) over the 32 lanes: each level halves the values a lane keeps and
// adds its partner's other half. At the end lane l holds the warp sums of R = max(N / 32, 1) values,
// those of n = (l >> shift) * R + i with shift = log2(32 / N) for N < 32 (0 otherwise), i < R.
template <int kCount, int kOffset, int M>
__device__ __forceinline__ void reduce_scatter(float (&v)[M], int lane) {
  if constexpr (kOffset >= 1) {
    if constexpr (kCount > 1) {
      constexpr int kHalf = kCount / 2;
      const bool upper = lane & kOffset;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
      }
      reduce_scatter<kHalf, kOffset / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOffset);
      reduce_scatter<1, kOffset / 2>(v, lane);
    }
  }
}

template <int N>
struct ScatterLayout {
  static constexpr int kPerLane = N >= 32 ? N / 32 : 1;
  static constexpr int kShift = N >= 32 ? 0 : (N == 16 ? 1 : (N == 8 ? 2 : 3));
};

// Backward main pass. Grid (ceil(dim / kThreads), batch); dynamic shared memory Cfg::kSmemBytes.
template <typename T, int N, bool kCompact>
__global__ void __launch_bounds__(BwdConfig<N, kCompact>::kThreads) scan_bwd_kernel(const ScanParams p) {
  using Cfg = BwdConfig<N, kCompact>;
  constexpr int kThreads = Cfg::kThreads, kSuper = Cfg::kSuper, kSub = Cfg::kSub, kWarps = Cfg::kWarps;
  constexpr int kQ = N / 4;
  extern __shared__ float4 smem4[];
  // Per-thread arrays are [slot][q][thread] float4: consecutive threads touch consecutive 16 bytes.
  float4* s_sub = smem4;                                     // [kSubs][kQ][kThreads]
  float4* s_h = s_sub + Cfg::kSubStates / 4;                 // [kSub][kQ][kThreads] decay_t * h_{t+1}
  float4* s_decay = s_h + Cfg::kTokenStates / 4;             // [kSub][kQ][kThreads]
  float* s_B = reinterpret_cast<float*>(s_decay + Cfg::kTokenStates / 4);  // [kSuper][N]
  float* s_C = s_B + Cfg::kRows;                              // [kSuper][N]
  float* s_red = s_C + Cfg::kRows;                            // [2][kWarps][kSub][N]
  float4* s_params = reinterpret_cast<float4*>(s_red + 2 * Cfg::kRed);  // a2, dA sums: [2][kQ][kThreads]
  int* s_seq = reinterpret_cast<int*>(reinterpret_cast<float*>(s_params) + 2 * Cfg::kParams);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.y;
  const int64_t d = int64_t(blockIdx.x) * kThreads + tid;
  const bool active = d < p.dim;
  const int64_t L = p.seqlen;
  const int n_state = int(p.d_state);
  const bool has_seq = p.seq_idx != nullptr;
  const bool has_z = p.z != nullptr;
  const BwdWorkspace ws(p, N, kThreads, kSuper);
  float* const work = static_cast<float*>(p.workspace);

  const T* u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d;
  const T* z = has_z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + d : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + d;
  const T* Bg = static_cast<const T*>(p.B) + b * p.B_batch_stride;
  const T* Cg = static_cast<const T*>(p.C) + b * p.C_batch_stride;
  const int32_t* seq = has_seq ? p.seq_idx + b * p.seq_idx_batch_stride : nullptr;
  const int64_t grad_offset = (b * L) * p.dim + d;  // du, ddelta, dz are contiguous
  T* du = static_cast<T*>(p.du) + grad_offset;
  T* ddelta = static_cast<T*>(p.ddelta) + grad_offset;
  T* dz = has_z ? static_cast<T*>(p.dz) + grad_offset : nullptr;

  // a2 = A * log2(e) and the dA sums: registers, or this thread's slots in shared memory for large N.
  float a2_reg[N], dA_reg[N];  // unused (and optimised away) when kParamsInSmem
  float4* s_a2 = s_params;
  float4* s_dA = s_params + kQ * kThreads;
  const float* A = static_cast<const float*>(p.A) + d * p.A_dim_stride;
#pragma unroll
  for (int q = 0; q < kQ; ++q) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = (active && 4 * q + k < n_state) ? mul_log2e(A[4 * q + k]) : 0.f;
    if constexpr (Cfg::kParamsInSmem) {
      s_a2[q * kThreads + tid] = make_float4(v[0], v[1], v[2], v[3]);
      s_dA[q * kThreads + tid] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        a2_reg[4 * q + k] = v[k];
        dA_reg[4 * q + k] = 0.f;
      }
    }
  }
  auto load_a2 = [&](int q, float* v) {
    if constexpr (Cfg::kParamsInSmem) {
      const float4 x = s_a2[q * kThreads + tid];
      v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = a2_reg[4 * q + k];
    }
  };
  const float bias = (active && p.delta_bias) ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float skip = (active && p.D) ? static_cast<const float*>(p.D)[d] : 0.f;

  float carry[N];  // dL/dh_t flowing in from token t - 1 (already decayed and reset-masked)
#pragma unroll
  for (int n = 0; n < N; ++n) carry[n] = 0.f;
  float dD_sum = 0.f, dbias_sum = 0.f;

  const int64_t n_super = ws.n_super;
  for (int64_t sc = 0; sc < n_super; ++sc) {
    const int64_t T0 = sc * kSuper;
    const int n_subs = int(ceil_div(L - T0 < kSuper ? L - T0 : kSuper, kSub));
    __syncthreads();  // the previous superchunk is done with s_B, s_C, s_seq
    for (int e = tid; e < kSuper * N; e += kThreads) {
      const int r = e / N, n = e % N;
      const int64_t t = T0 + r;
      const bool ok = t < L && n < n_state;
      s_B[e] = ok ? to_float(Bg[t * p.B_seq_stride + n]) : 0.f;
      s_C[e] = ok ? to_float(Cg[t * p.C_seq_stride + n]) : 0.f;
    }
    if (has_seq)
      for (int r = tid; r <= kSuper; r += kThreads) s_seq[r] = T0 + r < L ? seq[T0 + r] : 0;

    // The state entering the superchunk from the right (zero past the end).
    float h[N];
    {
      const bool stored = sc + 1 < n_super && active;
      const float* st = work + ws.states + ((b * n_super + sc + 1) * N) * p.dim + d;
#pragma unroll
      for (int n = 0; n < N; ++n) h[n] = stored ? st[n * p.dim] : 0.f;
    }
    __syncthreads();

    // Recurrence over tokens [ts, ts + kSub) right to left from h (= h_{ts + kSub}); row r0 = ts - T0.
    // With kStore, per token the decayed right state decay_t * h_{t+1} and the decays go to s_h / s_decay,
    // outputs y (before the gate) to y_out. dA needs decay_t * h_{t+1} itself: taken as h_t minus the
    // token's input, it cancels to rounding noise once the decay is small (below ~1e-4).
    auto recompute = [&](int r0, float* hs, auto store_tag, float* y_out) {
      constexpr bool kStore = decltype(store_tag)::value;
      T lu[kSub], ldl[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        const int64_t t = T0 + r0 + i;
        const bool ok = active && t < L;
        lu[i] = ok ? u[t * p.u_seq_stride] : from_float<T>(0.f);
        ldl[i] = ok ? delta[t * p.delta_seq_stride] : from_float<T>(0.f);
      }
#pragma unroll
      for (int i = kSub - 1; i >= 0; --i) {
        const int r = r0 + i;
        const int64_t t = T0 + r;
        if (t >= L) continue;  // uniform
        const bool keep = carries(s_seq, r, t, L, has_seq);
        if (!keep) {  // zeroed, as in the forward: a decay of 0 times a NaN state would keep the NaN
#pragma unroll
          for (int n = 0; n < N; ++n) hs[n] = 0.f;
        }
        const float ut = to_float(lu[i]);
        const float dt = scan_dt(to_float(ldl[i]), bias, p.delta_softplus);
        const float dtu = dt * ut;
        float y = 0.f;
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          const float4 bq = row4(s_B + r * N, q);
          const float4 cq = row4(s_C + r * N, q);
          const float bv[4] = {bq.x, bq.y, bq.z, bq.w}, cv[4] = {cq.x, cq.y, cq.z, cq.w};
          float a2v[4];
          load_a2(q, a2v);
          float dec[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) dec[k] = keep ? sfu_exp2(dt * a2v[k]) : 0.f;
          if constexpr (kStore) {
            float* h4 = hs + 4 * q;
            s_h[(i * kQ + q) * kThreads + tid] =
                make_float4(dec[0] * h4[0], dec[1] * h4[1], dec[2] * h4[2], dec[3] * h4[3]);
            s_decay[(i * kQ + q) * kThreads + tid] = make_float4(dec[0], dec[1], dec[2], dec[3]);
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int n = 4 * q + k;
            hs[n] = dec[k] * hs[n] + dtu * bv[k];
            y += hs[n] * cv[k];
          }
        }
        if constexpr (kStore) y_out[i] = y + skip * ut;
      }
    };
    float y_unused[kSub];

    // Phase A: boundary states of the subchunks, right to left. Subchunk s covers rows
    // [s * kSub, (s + 1) * kSub) and starts (on the right) from s_sub[s] = h_{T0 + (s + 1) * kSub}.
#pragma unroll
    for (int q = 0; q < kQ; ++q)
      s_sub[((n_subs - 1) * kQ + q) * kThreads + tid] =
          make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
    for (int s = n_subs - 1; s >= 1; --s) {
      recompute(s * kSub, h, std::false_type{}, y_unused);
#pragma unroll
      for (int q = 0; q < kQ; ++q)
        s_sub[((s - 1) * kQ + q) * kThreads + tid] = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
    }

    // Phase B: per subchunk, per-token states into shared memory, then the adjoint left to right.
    for (int s = 0; s < n_subs; ++s) {
      const int r0 = s * kSub;
#pragma unroll
      for (int q = 0; q < kQ; ++q) {
        const float4 x = s_sub[(s * kQ + q) * kThreads + tid];
        h[4 * q] = x.x; h[4 * q + 1] = x.y; h[4 * q + 2] = x.z; h[4 * q + 3] = x.w;
      }
      float y[kSub];
      recompute(r0, h, std::true_type{}, y);

      T lu[kSub], ldl[kSub], ldo[kSub], lz[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        const int64_t t = T0 + r0 + i;
        const bool ok = active && t < L;
        lu[i] = ok ? u[t * p.u_seq_stride] : from_float<T>(0.f);
        ldl[i] = ok ? delta[t * p.delta_seq_stride] : from_float<T>(0.f);
        ldo[i] = ok ? dout[t * p.dout_seq_stride] : from_float<T>(0.f);
        lz[i] = (ok && has_z) ? z[t * p.z_seq_stride] : from_float<T>(0.f);
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        const int r = r0 + i;
        const int64_t t = T0 + r;
        if (t >= L) break;  // uniform
        const float ut = to_float(lu[i]), dlt = to_float(ldl[i]), go = to_float(ldo[i]);
        const float dt = scan_dt(dlt, bias, p.delta_softplus);
        const float dtu = dt * ut;
        float g = go, dzt = 0.f;
        if (has_z) {
          const float zt = to_float(lz[i]);
          g = go * scan_silu(zt);
          dzt = go * y[i] * scan_silu_grad(zt);
        }
        float aB = 0.f, a2w = 0.f;
        float v[N];  // dB contributions a * dt * u, then dC contributions g * h
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          const float4 bq = row4(s_B + r * N, q);
          const float4 cq = row4(s_C + r * N, q);
          const float4 hq = s_h[(i * kQ + q) * kThreads + tid];
          const float4 eq = s_decay[(i * kQ + q) * kThreads + tid];
          const float bv[4] = {bq.x, bq.y, bq.z, bq.w}, cv[4] = {cq.x, cq.y, cq.z, cq.w};
          const float hv[4] = {hq.x, hq.y, hq.z, hq.w}, ev[4] = {eq.x, eq.y, eq.z, eq.w};
          float a2v[4];
          load_a2(q, a2v);
          float4 dAq = make_float4(0.f, 0.f, 0.f, 0.f);
          if constexpr (Cfg::kParamsInSmem) dAq = s_dA[q * kThreads + tid];
          float dAv[4] = {dAq.x, dAq.y, dAq.z, dAq.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int n = 4 * q + k;
            const float adj = carry[n] + g * cv[k];       // dL/dh_t
            const float aw = adj * hv[k];                 // hv: decay * h_{t+1}
            aB += adj * bv[k];
            a2w += a2v[k] * aw;
            if constexpr (Cfg::kParamsInSmem) dAv[k] += dt * aw;
            else dA_reg[n] += dt * aw;
            v[n] = adj * dtu;
            carry[n] = ev[k] * adj;
          }
          if constexpr (Cfg::kParamsInSmem) s_dA[q * kThreads + tid] = make_float4(dAv[0], dAv[1], dAv[2], dAv[3]);
        }
        if (!carries(s_seq, r, t, L, has_seq)) {  // zeroed, not ev = 0 times adj: 0 * NaN would cross the reset
#pragma unroll
          for (int n = 0; n < N; ++n) carry[n] = 0.f;
        }
        const float ddt = ut * aB + kLn2 * a2w;
        const float ddelta_t = ddt * scan_dt_grad(dlt, bias, p.delta_softplus);
        dD_sum += g * ut;
        dbias_sum += ddelta_t;
        if (active) {
          du[t * p.dim] = from_float<T>(dt * aB + skip * g);
          ddelta[t * p.dim] = from_float<T>(ddelta_t);
          if (has_z) dz[t * p.dim] = from_float<T>(dzt);
        }

        // dB, then dC: warp sums into s_red.
        using Layout = ScatterLayout<N>;
        const bool writer = (lane & ((1 << Layout::kShift) - 1)) == 0;
        reduce_scatter<N, 16>(v, lane);
        if (writer) {
#pragma unroll
          for (int j = 0; j < Layout::kPerLane; ++j)
            s_red[((0 * kWarps + warp) * kSub + i) * N + (lane >> Layout::kShift) * Layout::kPerLane + j] = v[j];
        }
#pragma unroll
        for (int q = 0; q < kQ; ++q) {  // h_t = decay * h_{t+1} + dt * u * B
          const float4 hq = s_h[(i * kQ + q) * kThreads + tid];
          const float4 bq = row4(s_B + r * N, q);
          v[4 * q] = g * (hq.x + dtu * bq.x); v[4 * q + 1] = g * (hq.y + dtu * bq.y);
          v[4 * q + 2] = g * (hq.z + dtu * bq.z); v[4 * q + 3] = g * (hq.w + dtu * bq.w);
        }
        reduce_scatter<N, 16>(v, lane);
        if (writer) {
#pragma unroll
          for (int j = 0; j < Layout::kPerLane; ++j)
            s_red[((1 * kWarps + warp) * kSub + i) * N + (lane >> Layout::kShift) * Layout::kPerLane + j] = v[j];
        }
      }
      __syncthreads();
      // Block partials of dB, dC for this subchunk: warps summed in a fixed order.
      for (int e = tid; e < 2 * kSub * N; e += kThreads) {
        const int which = e / (kSub * N), i = (e / N) % kSub, n = e % N;
        const int64_t t = T0 + r0 + i;
        if (t >= L || n >= n_state) continue;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += s_red[((which * kWarps + w) * kSub + i) * N + n];
        work[ws.part_bc + (((which * p.batch + b) * ws.n_blocks + blockIdx.x) * L + t) * N + n] = sum;
      }
      __syncthreads();
    }
  }

  if (active) {
#pragma unroll
    for (int q = 0; q < kQ; ++q) {
      float4 x;
      if constexpr (Cfg::kParamsInSmem) {
        x = s_dA[q * kThreads + tid];
      } else {
        x = make_float4(dA_reg[4 * q], dA_reg[4 * q + 1], dA_reg[4 * q + 2], dA_reg[4 * q + 3]);
      }
      float* part = work + ws.part_a + (b * N + 4 * q) * p.dim + d;
      part[0] = x.x; part[p.dim] = x.y; part[2 * p.dim] = x.z; part[3 * p.dim] = x.w;
    }
    work[ws.part_d + b * p.dim + d] = dD_sum;
    work[ws.part_bias + b * p.dim + d] = dbias_sum;
  }
}

// dB, dC = sums of the block partials, in block order. One thread per (batch, token, state).
template <typename T, int N>
__global__ void scan_reduce_bc_kernel(const ScanParams p, int threads, int super) {
  const BwdWorkspace ws(p, N, threads, super);
  const int64_t total = p.batch * p.seqlen * p.d_state;
  const float* work = static_cast<const float*>(p.workspace);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e % p.d_state, t = (e / p.d_state) % p.seqlen, b = e / (p.d_state * p.seqlen);
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      float sum = 0.f;
      const float* part = work + ws.part_bc + ((which * p.batch + b) * ws.n_blocks * p.seqlen + t) * N + n;
      for (int64_t j = 0; j < ws.n_blocks; ++j) sum += part[j * p.seqlen * N];
      static_cast<T*>(which == 0 ? p.dB : p.dC)[e] = from_float<T>(sum);
    }
  }
}

// dA, dD, ddelta_bias = sums over the batch, in batch order. One thread per (channel, state).
template <int N>
__global__ void scan_reduce_params_kernel(const ScanParams p, int threads, int super) {
  const BwdWorkspace ws(p, N, threads, super);
  const int64_t total = p.dim * p.d_state;
  const float* work = static_cast<const float*>(p.workspace);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e % p.d_state, d = e / p.d_state;
    float sum = 0.f;
    for (int64_t b = 0; b < p.batch; ++b) sum += work[ws.part_a + (b * N + n) * p.dim + d];
    static_cast<float*>(p.dA)[e] = sum;
    if (n == 0) {
      float sum_d = 0.f, sum_bias = 0.f;
      for (int64_t b = 0; b < p.batch; ++b) {
        sum_d += work[ws.part_d + b * p.dim + d];
        sum_bias += work[ws.part_bias + b * p.dim + d];
      }
      if (p.dD) static_cast<float*>(p.dD)[d] = sum_d;
      if (p.ddelta_bias) static_cast<float*>(p.ddelta_bias)[d] = sum_bias;
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("reverse_selective_scan: CUDA launch of ") + what + " failed: " +
                             cudaGetErrorString(err));
}

void check_shape(const ScanParams& p) {
  if (p.d_state < 1 || p.d_state > 64)
    throw std::runtime_error("reverse_selective_scan: the CUDA kernel supports d_state in [1, 64], got " +
                             std::to_string(p.d_state));
  if (p.batch > 65535)
    throw std::runtime_error("reverse_selective_scan: the CUDA kernel supports batch <= 65535, got " +
                             std::to_string(p.batch));
}

// Whether the backward at N padded states runs its compact configuration: on GPUs with less shared memory
// per block than the full one needs, or when R2LM_SCAN_CUDA_COMPACT=1 (the tests use it on any GPU).
template <int N>
bool compact_backward() {
  if (env_is_one("R2LM_SCAN_CUDA_COMPACT")) return true;
  int device = 0, limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();  // the full configuration's opt-in then reports the failure
    return false;
  }
  return size_t(limit) < BwdConfig<N>::kSmemBytes;
}

int padded_state(int64_t d_state) { return d_state <= 16 ? 16 : (d_state <= 32 ? 32 : 64); }

// Calls f(T{}, std::integral_constant<int, N>{}) for the dtype and padded state count of p.
template <typename F>
void dispatch(const ScanParams& p, F&& f) {
  check_shape(p);
  auto with_state = [&](auto zero) {
    switch (padded_state(p.d_state)) {
      case 16: f(zero, std::integral_constant<int, 16>{}); break;
      case 32: f(zero, std::integral_constant<int, 32>{}); break;
      default: f(zero, std::integral_constant<int, 64>{}); break;
    }
  };
  switch (p.dtype) {
    case DType::kFloat32: with_state(float{}); break;
    case DType::kFloat16: with_state(__half{}); break;
    case DType::kBFloat16: with_state(__nv_bfloat16{}); break;
    default: throw std::runtime_error("reverse_selective_scan: the CUDA kernel supports float32, float16 and "
                                      "bfloat16 inputs");
  }
}

// The backward's kernels in the configuration kCompact (workspace laid out by the same configuration).
template <typename T, int N, bool kCompact>
void launch_backward(const ScanParams& p, cudaStream_t stream) {
  using Cfg = BwdConfig<N, kCompact>;
  if (p.seqlen > 0) {
    const dim3 fwd_grid(unsigned(ceil_div(p.dim, FwdConfig<N>::kThreads)), unsigned(p.batch));
    scan_fwd_kernel<T, N, true, kCompact><<<fwd_grid, FwdConfig<N>::kThreads, 0, stream>>>(p);
    check_launch("scan_fwd_kernel (states)");
  }
  // With no tokens the main kernel only writes the zero partials of dA, dD, ddelta_bias.
  const cudaError_t attr = cudaFuncSetAttribute(scan_bwd_kernel<T, N, kCompact>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::kSmemBytes));
  if (attr != cudaSuccess) {
    // The failed call's error is cleared, or the next op's launch check would report it again.
    (void)cudaGetLastError();
    throw std::runtime_error("reverse_selective_scan: the CUDA backward at d_state " + std::to_string(p.d_state) +
                             " could not opt in to " + std::to_string(Cfg::kSmemBytes) +
                             " bytes of shared memory per block: " + cudaGetErrorString(attr));
  }
  const dim3 grid(unsigned(ceil_div(p.dim, Cfg::kThreads)), unsigned(p.batch));
  scan_bwd_kernel<T, N, kCompact><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  check_launch("scan_bwd_kernel");
  if (p.seqlen > 0) {
    const int64_t bc = p.batch * p.seqlen * p.d_state;
    const unsigned bc_blocks = unsigned(std::min<int64_t>(ceil_div(bc, 256), 65535));
    scan_reduce_bc_kernel<T, N><<<bc_blocks, 256, 0, stream>>>(p, Cfg::kThreads, Cfg::kSuper);
    check_launch("scan_reduce_bc_kernel");
  }
  const int64_t params = p.dim * p.d_state;
  const unsigned param_blocks = unsigned(std::min<int64_t>(ceil_div(params, 256), 65535));
  scan_reduce_params_kernel<N><<<param_blocks, 256, 0, stream>>>(p, Cfg::kThreads, Cfg::kSuper);
  check_launch("scan_reduce_params_kernel");
}

}  // namespace

void reverse_selective_scan_fwd_cuda(const ScanParams& p, void* stream) {
  dispatch(p, [&](auto zero, auto n_tag) {
    using T = decltype(zero);
    constexpr int N = decltype(n_tag)::value;
    if (p.batch == 0 || p.seqlen == 0 || p.dim == 0) return;
    const dim3 grid(unsigned(ceil_div(p.dim, FwdConfig<N>::kThreads)), unsigned(p.batch));
    scan_fwd_kernel<T, N, false><<<grid, FwdConfig<N>::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    check_launch("scan_fwd_kernel");
  });
}

int64_t reverse_selective_scan_bwd_workspace_cuda(ScanParams& p) {
  int64_t bytes = 0;
  dispatch(p, [&](auto, auto n_tag) {
    constexpr int N = decltype(n_tag)::value;
    // Chosen once, here: the backward runs the configuration its workspace was laid out for.
    p.compact_workspace = compact_backward<N>();
    const auto size = [&](auto cfg) { return BwdWorkspace(p, N, cfg.kThreads, cfg.kSuper).total; };
    bytes = int64_t(sizeof(float)) * (p.compact_workspace ? size(BwdConfig<N, true>{}) : size(BwdConfig<N>{}));
  });
  return bytes;
}

void reverse_selective_scan_bwd_cuda(const ScanParams& p, void* stream_ptr) {
  dispatch(p, [&](auto zero, auto n_tag) {
    constexpr int N = decltype(n_tag)::value;
    if (p.batch == 0 || p.dim == 0) return;
    if (p.workspace == nullptr)
      throw std::runtime_error("reverse_selective_scan: the CUDA backward needs its workspace");
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    if (p.compact_workspace) launch_backward<decltype(zero), N, true>(p, stream);
    else launch_backward<decltype(zero), N, false>(p, stream);
  });
}

}  // namespace r2lm
