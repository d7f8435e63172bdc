// parallel_commit: parameters, the per-row statistics and selection math shared by the CPU and CUDA
// kernels, the counter-based RNG, launchers. No torch headers: parallel_commit_torch.cpp fills CommitParams.
//
// One pass over each logits row accumulates CommitRowStats (online softmax max / sum-exp / sum of
// e^(x-max)(x-max) for the entropy, the two largest non-mask logits for the margin, and the candidate:
// argmax, or Gumbel-max pick). Partial statistics of pieces of a row merge associatively, so a row may
// be split across threads or CTAs and combined in a fixed order (deterministic).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "r2lm_common.h"

#if defined(__CUDACC__)
// The precise libdevice logarithm, called by name so that --use_fast_math (which turns logf into the
// approximate __logf, wrong by up to 2^-22 absolute near 1) cannot change the Gumbel noise.
extern "C" __device__ float __nv_logf(float);
#endif

namespace r2lm {

enum class CommitScore : int { kProb = 0, kMargin = 1, kNegEntropy = 2 };

// logits (batch, block, vocab): element (b, i, v) at logits[b * logits_batch_stride + i * logits_pos_stride + v].
// Outputs committed / confidence are contiguous (batch, block), n_masked (batch,).
struct CommitParams {
  int64_t batch, block, vocab;
  DType dtype;                                     // of the logits
  const void* logits; int64_t logits_batch_stride, logits_pos_stride;
  int64_t* tokens; int64_t tokens_batch_stride, tokens_pos_stride;   // read, then updated in place
  const bool* active; int64_t active_stride;       // (batch,), may be null (all active)
  const int64_t* step_tensor;                      // one element on the logits' device, may be null
  uint64_t seed, step;                             // step is used when step_tensor is null
  int64_t mask_token_id;
  float threshold;
  int64_t min_per_step, max_per_step;              // max_per_step 0: no upper limit
  double temperature;                              // 0: greedy
  CommitScore score;
  bool* committed; float* confidence; int32_t* n_masked;
  void* workspace; int64_t splits;                 // CUDA: CommitRowStats per (row, split)
};

// --- counter-based RNG (mirrors r2lm_kernels.reference.gumbel_uniform bit for bit) ----------------

// lowbias32, in place, on any unsigned 32-bit lane type: uint32_t here, an eight-lane vector in the CPU
// kernel (by reference, so no vector crosses a call boundary by value).
template <typename U>
R2LM_HD void commit_hash32_in_place(U& x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
}

R2LM_HD uint32_t commit_hash32(uint32_t x) {  // lowbias32
  commit_hash32_in_place(x);
  return x;
}

// The per-row part of the key: H(seed_lo + H(seed_hi + H(step_lo + H(step_hi + H(b + H(position)))))).
R2LM_HD uint32_t commit_row_key(uint64_t seed, uint64_t step, uint32_t batch_index, uint32_t position) {
  uint32_t row = commit_hash32(position);
  row = commit_hash32(batch_index + row);
  row = commit_hash32(static_cast<uint32_t>(step >> 32) + row);
  row = commit_hash32(static_cast<uint32_t>(step) + row);
  row = commit_hash32(static_cast<uint32_t>(seed >> 32) + row);
  row = commit_hash32(static_cast<uint32_t>(seed) + row);
  return row;
}

// u = (k + 1/2) / 2^24 with k the top 24 bits of H(row ^ H(v)). In fp32, k + 1/2 rounds to nearest
// even, so k = 2^24 - 1 would give u = 1 and an infinite Gumbel noise: the value is capped at the largest
// float below 1, as the reference does.
template <typename acc_t>
R2LM_HD acc_t commit_uniform(uint32_t row_key, uint32_t vocab_index) {
  const uint32_t k = commit_hash32(row_key ^ commit_hash32(vocab_index)) >> 8;
  if constexpr (sizeof(acc_t) == 8) {
    return (static_cast<double>(k) + 0.5) * (1.0 / 16777216.0);
  } else {
    const float u = (static_cast<float>(k) + 0.5f) * (1.0f / 16777216.0f);
    return u < 0x1.fffffep-1f ? u : 0x1.fffffep-1f;
  }
}

template <typename acc_t>
R2LM_HD acc_t commit_log(acc_t x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) return __nv_logf(x);
  else return log(x);
#else
  return std::log(x);
#endif
}

// x / temperature rounded as IEEE division (fast-math builds would approximate a plain fp32 '/').
template <typename acc_t>
R2LM_HD acc_t commit_div(acc_t x, acc_t y) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) return __fdiv_rn(x, y);
#endif
  return x / y;
}

// The Gumbel noise -log(-log(u)) of one token, in the compute precision: its pick is x / T + noise.
template <typename acc_t>
R2LM_HD acc_t commit_gumbel_noise(uint32_t row_key, uint32_t vocab_index) {
  return -commit_log(-commit_log(commit_uniform<acc_t>(row_key, vocab_index)));
}

// Upper bound of the Gumbel noise -log(-log(u)) over every u commit_uniform returns (16.64 in fp32,
// 17.33 in fp64): a logit with x / T + bound below the best pick so far cannot win, and its noise is
// never computed.
constexpr double kCommitGumbelBound = 18.0;

// --- per-row statistics ---------------------------------------------------------------------------

template <typename acc_t>
struct CommitRowStats {
  acc_t max;         // largest logit of the row (mask token included; NaN ignored)
  acc_t sum;         // sum of e^(x - max); NaN once the row held a NaN or +inf logit
  acc_t xsum;        // sum of e^(x - max) (x - max), for the entropy
  acc_t top1, top2;  // the two largest non-mask logits (counted with multiplicity), for the margin
  acc_t pick;        // the candidate's pick value (its logit, or logit / T + Gumbel noise)
  acc_t pick_logit;  // the candidate's logit
  int32_t pick_index;  // -1 while no non-mask token has a pick above -inf
};

template <typename acc_t>
R2LM_HD CommitRowStats<acc_t> commit_stats_empty() {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  return {ninf, acc_t(0), acc_t(0), ninf, ninf, ninf, ninf, -1};
}

// The offset exponentials are taken against: the max, or 0 while every logit seen is -inf (so that
// e^(-inf - offset) is 0, not NaN).
template <typename acc_t>
R2LM_HD acc_t commit_exp_offset(acc_t max) {
  return max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max;
}

// One logit's entropy term e^d d, with d = x - max <= 0 and e = e^d: 0 wherever e is 0, also where d is
// -inf (a -inf logit, or x - max overflowing for logits further apart than the float range) and e * d
// would be 0 * -inf = NaN.
template <typename acc_t>
R2LM_HD acc_t commit_entropy_term(acc_t e, acc_t d) {
  return e == acc_t(0) ? acc_t(0) : e * d;
}

// Re-expresses sum and xsum, accumulated against old_max, against new_max >= old_max.
template <typename acc_t>
R2LM_HD void commit_rescale(acc_t& sum, acc_t& xsum, acc_t old_max, acc_t new_max) {
  // Nothing but -inf (or NaN) accumulated yet: sum and xsum are 0 (or NaN) and stay so.
  const bool empty = old_max == -std::numeric_limits<acc_t>::infinity();
  const acc_t shift = empty ? acc_t(0) : old_max - new_max;
  const acc_t scale = empty ? acc_t(0) : exp_same_type(shift);
  // sum e^(x - new_max) (x - new_max) = scale (xsum + sum shift); shift may be -inf where scale is 0.
  xsum = commit_entropy_term(scale, xsum + sum * shift);
  sum = sum * scale;  // keeps a NaN
}

// Whether candidate (pick_b, index_b) beats (pick_a, index_a): larger pick, ties to the lower token.
template <typename acc_t>
R2LM_HD bool commit_pick_beats(acc_t pick_b, int32_t index_b, acc_t pick_a, int32_t index_a) {
  return pick_b > pick_a || (pick_b == pick_a && index_b >= 0 && (index_a < 0 || index_b < index_a));
}

// a, b: statistics of two disjoint pieces of one row. The result does not depend on the order.
template <typename acc_t>
R2LM_HD CommitRowStats<acc_t> commit_stats_merge(CommitRowStats<acc_t> a, const CommitRowStats<acc_t>& b) {
  const acc_t m = a.max > b.max ? a.max : b.max;
  acc_t bsum = b.sum, bxsum = b.xsum;
  commit_rescale(a.sum, a.xsum, a.max, m);
  commit_rescale(bsum, bxsum, b.max, m);
  a.max = m;
  a.sum += bsum;
  a.xsum += bxsum;
  const acc_t lo1 = a.top1 < b.top1 ? a.top1 : b.top1;
  const acc_t hi2 = a.top2 > b.top2 ? a.top2 : b.top2;
  a.top1 = a.top1 > b.top1 ? a.top1 : b.top1;
  a.top2 = lo1 > hi2 ? lo1 : hi2;
  if (commit_pick_beats(b.pick, b.pick_index, a.pick, a.pick_index)) {
    a.pick = b.pick;
    a.pick_logit = b.pick_logit;
    a.pick_index = b.pick_index;
  }
  return a;
}

// The candidate of a row (-1: the row may not be committed: a NaN or +inf logit, or no non-mask token
// with a finite pick) and its score, in fp32.
struct CommitChoice {
  int32_t candidate;
  float confidence;
};

template <typename acc_t>
R2LM_HD CommitChoice commit_finalize(const CommitRowStats<acc_t>& s, CommitScore score, int64_t vocab) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (s.sum != s.sum || s.pick_index < 0) return {-1, ninf};
  const acc_t off = s.max;  // finite here: some non-mask logit is finite and none is +inf
  acc_t conf;
  if (score == CommitScore::kProb) {
    conf = exp_same_type(s.pick_logit - off) / s.sum;
  } else if (score == CommitScore::kMargin) {
    // Fewer than two non-mask tokens: the runner-up probability is -inf (as topk over the masked
    // probabilities has it), so the margin is +inf.
    if (vocab < 3) return {s.pick_index, std::numeric_limits<float>::infinity()};
    conf = (exp_same_type(s.top1 - off) - exp_same_type(s.top2 - off)) / s.sum;
  } else {
    // sum p log p with p = e^(x - max) / sum: xsum / sum - log(sum).
    conf = s.xsum / s.sum - commit_log(s.sum);
  }
  return {s.pick_index, static_cast<float>(conf)};
}

// --- per-sequence selection ------------------------------------------------------------------------

// Whether position j (confidence cj) is preferred to position i: higher confidence, ties to the lower
// position.
R2LM_HD bool commit_outranks(float cj, int64_t j, float ci, int64_t i) { return cj > ci || (cj == ci && j < i); }

// How many eligible positions a sequence commits: every one that passes the threshold, at least
// min_per_step (while any is left), at most max_per_step (when > 0). The committed positions are the
// first that many in rank order, since those passing the threshold rank above those that do not.
R2LM_HD int64_t commit_quota(int64_t n_pass, int64_t n_eligible, int64_t min_per_step, int64_t max_per_step) {
  int64_t n = n_pass > min_per_step ? n_pass : min_per_step;
  if (n > n_eligible) n = n_eligible;
  if (max_per_step > 0 && n > max_per_step) n = max_per_step;
  return n;
}

// CPU kernel (parallel_commit_cpu.cpp).
void parallel_commit_cpu(const CommitParams& p);

#ifdef R2LM_WITH_CUDA
// CUDA kernels (parallel_commit_cuda.cu), launched on `stream` (a cudaStream_t). The torch layer asks
// for the split count and workspace size, allocates the workspace and sets p.splits / p.workspace.
// Returns nullptr on success, else a description of the launch error.
int64_t parallel_commit_cuda_splits(const CommitParams& p, int device);
int64_t parallel_commit_cuda_workspace_bytes(const CommitParams& p);
const char* parallel_commit_cuda(const CommitParams& p, void* stream);
#endif

}  // namespace r2lm
