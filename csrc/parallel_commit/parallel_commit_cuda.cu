// parallel_commit on CUDA: two launches on the caller's stream, no host synchronisation.
//
// Phase 1 (row_stats_kernel): one CTA per (row, split) streams its share of the logits once with 16-byte
//   loads and writes the piece's CommitRowStats to the workspace. Rows that are not masked, or belong to
//   an inactive sequence, exit before reading any logits. Rows are split across several CTAs only when
//   there are too few rows to fill the GPU.
// Phase 2 (select_kernel): one CTA per sequence merges each row's pieces in split order (deterministic),
//   finalises candidate and score, ranks the eligible positions by (confidence desc, position asc),
//   commits the first `quota` of them and counts the masks left.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "parallel_commit/parallel_commit.h"

namespace r2lm {
namespace {

constexpr int kThreads = 256;                // phase-1 CTA size
constexpr int kUnroll = 4;                   // 16-byte loads in flight per thread
constexpr int64_t kMinSplitElements = 8192;  // a split below this is not worth its CTA
constexpr int64_t kMaxSplits = 64;

template <typename T> struct Vec;  // a 16-byte load as kN compute-type values
template <> struct Vec<float> {
  static constexpr int kN = 4;
  __device__ static void unpack(uint4 v, float (&x)[kN]) {
    x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y); x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
  }
  __device__ static float one(const float* p) { return *p; }
};
template <> struct Vec<double> {
  static constexpr int kN = 2;
  __device__ static void unpack(uint4 v, double (&x)[kN]) {
    x[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
    x[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
  }
  __device__ static double one(const double* p) { return *p; }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void unpack(uint4 v, float (&x)[kN]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ static float one(const __nv_bfloat16* p) { return __bfloat162float(*p); }
};
template <> struct Vec<__half> {
  static constexpr int kN = 8;
  __device__ static void unpack(uint4 v, float (&x)[kN]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      __half2 h;
      memcpy(&h, &w[k], 4);
      const float2 f = __half22float2(h);
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  }
  __device__ static float one(const __half* p) { return __half2float(*p); }
};

// e^d for the softmax sums: one MUFU op in fp32 (relative error ~2^-22, independent of --use_fast_math).
__device__ __forceinline__ float exp_sum_term(float d) { return sfu_exp2(d * 1.4426950408889634f); }
__device__ __forceinline__ double exp_sum_term(double d) { return exp(d); }

struct RowContext {
  CommitScore score;
  int32_t mask;          // the mask token's index
  uint32_t row_key;      // sampling: the RNG key of this row
};

// The running max grew: rare after the first few vectors, kept out of line (fewer live registers in
// the streaming loop).
// Takes and returns values (not a reference to s): a reference into a non-inlined call would force
// the whole running state into local memory.
template <typename acc_t>
struct SumPair { acc_t sum, xsum; };
template <typename acc_t>
__device__ __noinline__ SumPair<acc_t> rescaled(acc_t sum, acc_t xsum, acc_t old_max, acc_t new_max) {
  commit_rescale(sum, xsum, old_max, new_max);
  return {sum, xsum};
}

// Folds logits x[0, N) at token indices base.. into s. mask_lane: the lane holding the mask token, or -1.
// Processing order within a thread is increasing in index, so strict comparisons keep the lowest
// index among equal picks.
template <bool kSample, int N, typename acc_t>
__device__ __forceinline__ void absorb(CommitRowStats<acc_t>& s, const acc_t (&x)[N], int32_t base, int mask_lane,
                                       const RowContext& ctx, acc_t temperature) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t xc[N];  // the candidates' logits: the mask token excluded
#pragma unroll
  for (int j = 0; j < N; ++j) xc[j] = j == mask_lane ? ninf : x[j];
  acc_t vmax = x[0], cmax = xc[0];  // the same chain when no mask lane: computed once
#pragma unroll
  for (int j = 1; j < N; ++j) {
    vmax = fmax(vmax, x[j]);  // fmax ignores NaN: a NaN shows up as a NaN sum instead
    cmax = fmax(cmax, xc[j]);
  }
  if constexpr (!kSample) {
    if (cmax > s.pick) {
      int first = N - 1;
#pragma unroll
      for (int j = N - 1; j >= 0; --j) first = xc[j] == cmax ? j : first;
      s.pick = s.pick_logit = cmax;
      s.pick_index = base + first;
    }
  } else {
    const acc_t bound = static_cast<acc_t>(kCommitGumbelBound);
    if (commit_div(cmax, temperature) + bound >= s.pick) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (!(xc[j] > ninf)) continue;
        const acc_t scaled = commit_div(xc[j], temperature);
        if (scaled + bound < s.pick) continue;  // its noise cannot lift it to the lead
        const acc_t pick = scaled + commit_gumbel_noise<acc_t>(ctx.row_key, uint32_t(base + j));
        if (pick > s.pick) {
          s.pick = pick;
          s.pick_logit = xc[j];
          s.pick_index = base + j;
        }
      }
    }
  }
  if (ctx.score == CommitScore::kMargin && cmax > s.top2) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t lo = fmin(s.top1, xc[j]);
      s.top1 = fmax(s.top1, xc[j]);
      s.top2 = fmax(s.top2, lo);
    }
  }
  if (vmax > s.max) {
    const SumPair<acc_t> r = rescaled(s.sum, s.xsum, s.max, vmax);
    s.sum = r.sum;
    s.xsum = r.xsum;
    s.max = vmax;
  }
  const acc_t off = commit_exp_offset(s.max);
  acc_t sum = 0;
  if (ctx.score == CommitScore::kNegEntropy) {
    acc_t xsum = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const acc_t d = x[j] - off;
      const acc_t e = exp_sum_term(d);
      sum += e;
      xsum += commit_entropy_term(e, d);
    }
    s.xsum += xsum;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) sum += exp_sum_term(x[j] - off);
  }
  s.sum += sum;
}

template <typename acc_t>
__device__ __forceinline__ CommitRowStats<acc_t> shfl_xor(const CommitRowStats<acc_t>& s, int lane_mask) {
  CommitRowStats<acc_t> o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, lane_mask);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
  o.xsum = __shfl_xor_sync(0xffffffffu, s.xsum, lane_mask);
  o.top1 = __shfl_xor_sync(0xffffffffu, s.top1, lane_mask);
  o.top2 = __shfl_xor_sync(0xffffffffu, s.top2, lane_mask);
  o.pick = __shfl_xor_sync(0xffffffffu, s.pick, lane_mask);
  o.pick_logit = __shfl_xor_sync(0xffffffffu, s.pick_logit, lane_mask);
  o.pick_index = __shfl_xor_sync(0xffffffffu, s.pick_index, lane_mask);
  return o;
}

__device__ __forceinline__ bool row_is_masked(const CommitParams& p, int64_t b, int64_t i) {
  return (p.active == nullptr || p.active[b * p.active_stride]) &&
         p.tokens[b * p.tokens_batch_stride + i * p.tokens_pos_stride] == p.mask_token_id;
}

template <typename T, bool kSample>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const CommitParams p) {
  using acc_t = typename std::conditional<sizeof(T) == 8, double, float>::type;
  using V = Vec<T>;
  constexpr int N = V::kN;
  const int64_t piece = blockIdx.x;
  const int64_t row = piece / p.splits, split = piece % p.splits;
  const int64_t b = row / p.block, i = row % p.block;
  if (!row_is_masked(p, b, i)) return;  // uniform across the CTA; the row's logits are never read

  RowContext ctx;
  ctx.score = p.score;
  ctx.mask = static_cast<int32_t>(p.mask_token_id);
  ctx.row_key = 0;
  if (kSample) {
    const uint64_t step = p.step_tensor ? static_cast<uint64_t>(*p.step_tensor) : p.step;
    ctx.row_key = commit_row_key(p.seed, step, uint32_t(b), uint32_t(i));
  }
  const acc_t temperature = static_cast<acc_t>(p.temperature);

  // This split's token range, in whole vectors so that aligned rows stay aligned.
  const int64_t chunk = ((p.vocab + p.splits - 1) / p.splits + N - 1) / N * N;
  const int64_t v0 = split * chunk < p.vocab ? split * chunk : p.vocab;
  const int64_t v1 = v0 + chunk < p.vocab ? v0 + chunk : p.vocab;
  const T* logits = static_cast<const T*>(p.logits) + b * p.logits_batch_stride + i * p.logits_pos_stride;

  // Unaligned head (rows cut from a wider tensor), 16-byte body, tail.
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(logits + v0) % 16) / sizeof(T);
  const int64_t head = misalign == 0 ? 0 : (N - misalign < v1 - v0 ? N - misalign : v1 - v0);
  const int64_t body = v0 + head;
  const int64_t n_vec = (v1 - body) / N;
  const int64_t tail = body + n_vec * N;

  CommitRowStats<acc_t> s = commit_stats_empty<acc_t>();
  const int tid = threadIdx.x;
  auto absorb_one = [&](int64_t v) {
    const acc_t x[1] = {static_cast<acc_t>(V::one(logits + v))};
    absorb<kSample>(s, x, int32_t(v), v == ctx.mask ? 0 : -1, ctx, temperature);
  };
  if (tid < head) absorb_one(v0 + tid);
  const uint4* vec = reinterpret_cast<const uint4*>(logits + body);
  for (int64_t k0 = tid; k0 < n_vec; k0 += int64_t(kThreads) * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (k0 + u * kThreads < n_vec) raw[u] = __ldcs(vec + k0 + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kThreads;
      if (k >= n_vec) break;
      acc_t x[N];
      V::unpack(raw[u], x);
      const int32_t base = static_cast<int32_t>(body + k * N);
      if (ctx.mask >= base && ctx.mask < base + N)
        absorb<kSample>(s, x, base, ctx.mask - base, ctx, temperature);
      else
        absorb<kSample>(s, x, base, -1, ctx, temperature);
    }
  }
  if (tail + tid < v1) absorb_one(tail + tid);

  // CTA reduction: warps by shuffles, then warp results merged in warp order by thread 0.
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) s = commit_stats_merge(s, shfl_xor(s, lane_mask));
  __shared__ CommitRowStats<acc_t> warp_stats[kThreads / 32];
  if (tid % 32 == 0) warp_stats[tid / 32] = s;
  __syncthreads();
  if (tid == 0) {
    CommitRowStats<acc_t> total = warp_stats[0];
    for (int w = 1; w < kThreads / 32; ++w) total = commit_stats_merge(total, warp_stats[w]);
    static_cast<CommitRowStats<acc_t>*>(p.workspace)[piece] = total;
  }
}

// Up to kMaxBlock = 1024 threads per CTA: the bound caps registers at 64 per thread, without which a
// large block could fail to launch ("too many resources requested").
template <typename acc_t>
__global__ void __launch_bounds__(1024) select_kernel(const CommitParams p) {
  extern __shared__ unsigned char shared[];
  float* conf = reinterpret_cast<float*>(shared);                   // (block,)
  bool* eligible = reinterpret_cast<bool*>(conf + p.block);         // (block,)
  const int64_t b = blockIdx.x, i = threadIdx.x;
  const bool in_block = i < p.block;
  CommitChoice c{-1, -std::numeric_limits<float>::infinity()};
  if (in_block && row_is_masked(p, b, i)) {
    const auto* pieces = static_cast<const CommitRowStats<acc_t>*>(p.workspace) + (b * p.block + i) * p.splits;
    CommitRowStats<acc_t> s = pieces[0];
    for (int64_t k = 1; k < p.splits; ++k) s = commit_stats_merge(s, pieces[k]);
    c = commit_finalize(s, p.score, p.vocab);
  }
  const bool is_eligible = c.candidate >= 0;
  if (in_block) {
    conf[i] = c.confidence;
    eligible[i] = is_eligible;
  }
  const int n_eligible = __syncthreads_count(is_eligible);           // also publishes conf / eligible
  const int n_pass = __syncthreads_count(is_eligible && c.confidence >= p.threshold);
  const int64_t quota = commit_quota(n_pass, n_eligible, p.min_per_step, p.max_per_step);
  bool take = false;
  if (is_eligible && quota > 0) {
    int64_t rank = 0;
    for (int64_t j = 0; j < p.block; ++j) rank += eligible[j] && commit_outranks(conf[j], j, c.confidence, i);
    take = rank < quota;
  }
  bool still_masked = false;
  if (in_block) {
    int64_t& token = p.tokens[b * p.tokens_batch_stride + i * p.tokens_pos_stride];
    if (take) token = c.candidate;
    still_masked = token == p.mask_token_id;
    p.committed[b * p.block + i] = take;
    p.confidence[b * p.block + i] = c.confidence;
  }
  const int n_masked = __syncthreads_count(still_masked);
  if (i == 0) p.n_masked[b] = n_masked;
}

template <typename T>
void launch(const CommitParams& p, cudaStream_t stream) {
  using acc_t = typename std::conditional<sizeof(T) == 8, double, float>::type;
  const int64_t pieces = p.batch * p.block * p.splits;
  if (p.temperature > 0)
    row_stats_kernel<T, true><<<pieces, kThreads, 0, stream>>>(p);
  else
    row_stats_kernel<T, false><<<pieces, kThreads, 0, stream>>>(p);
  const int threads = static_cast<int>((p.block + 31) / 32 * 32);
  const size_t shared = p.block * (sizeof(float) + sizeof(bool));
  select_kernel<acc_t><<<p.batch, threads, shared, stream>>>(p);
}

}  // namespace

int64_t parallel_commit_cuda_splits(const CommitParams& p, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // clear it: a split count of 1 is always valid
    return 1;
  }
  const int64_t rows = p.batch * p.block;
  const int64_t wanted = (4 * int64_t(sms) + rows - 1) / rows;  // ~4 CTAs per SM
  int64_t cap = p.vocab / kMinSplitElements;
  cap = cap < kMaxSplits ? cap : kMaxSplits;
  const int64_t splits = wanted < cap ? wanted : cap;
  return splits > 1 ? splits : 1;
}

int64_t parallel_commit_cuda_workspace_bytes(const CommitParams& p) {
  const int64_t stats = p.dtype == DType::kFloat64 ? sizeof(CommitRowStats<double>) : sizeof(CommitRowStats<float>);
  return p.batch * p.block * p.splits * stats;
}

const char* parallel_commit_cuda(const CommitParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.batch <= 0 || p.block <= 0) return nullptr;  // nothing to do (the torch layer returns earlier)
  if (p.block > 1024) return "block size above 1024 (one CTA ranks a whole block)";
  if (p.splits < 1 || p.batch * p.block * p.splits > 2147483647 || p.batch > 2147483647)
    return "batch * block * splits exceeds the grid limit 2^31 - 1";
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, s); break;
    case DType::kFloat64: launch<double>(p, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(p, s); break;
    case DType::kFloat16: launch<__half>(p, s); break;
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace r2lm
