// parallel_commit on the CPU: OpenMP over rows; each row is streamed once in L1-sized chunks whose
// inner loops (conversion, max, finiteness check, exponentials) vectorise. The row loop is compiled once
// per vector width (cpu_vector.h) and picked per call.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_half.h"
#include "cpu_parallel.h"
#include "cpu_vector.h"
#include "parallel_commit/parallel_commit.h"

namespace r2lm {
namespace {

constexpr int64_t kChunk = 2048;  // logits converted to the compute type per step (L1-resident)

// Float, int and unsigned lanes of one vector of kBytes. They never cross a non-inlined call boundary,
// so the vector argument-passing ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <int kBytes>
struct Lanes {
  using F = typename CpuVector<float, kBytes>::type;
  using I = typename CpuVector<int32_t, kBytes>::type;
  using U = typename CpuVector<uint32_t, kBytes>::type;
  static constexpr int count = kBytes / 4;
};
template <typename F>
using IntLanes = typename CpuVector<int32_t, sizeof(F)>::type;
constexpr int kMaxLanes = 16;  // chunks are padded to whole lanes of the widest vector

#define R2LM_INLINE inline __attribute__((always_inline))

template <typename F>
R2LM_INLINE F splat(float v) { return F{} + v; }

template <typename F>
R2LM_INLINE F load_lanes(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// e^x for x <= 0 in fp32 (Cody-Waite reduction, degree-6 polynomial, ~1 ulp); 0 for x below -87 (off by
// at most 1.6e-38), so that a one-hot softmax has an entropy of exactly 0, as in the reference, and ties
// with the others.
template <typename F>
R2LM_INLINE F exp_nonpositive(const F& x_in) {
  const auto cut = x_in < splat<F>(-87.0f);
  const F x = cut ? splat<F>(-87.0f) : x_in;
  const F round_magic = splat<F>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const F n = (x * 1.44269504088896341f + round_magic) - round_magic;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F poly = splat<F>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const F y = poly * r * r + r + 1.0f;
  const IntLanes<F> scale_bits = (__builtin_convertvector(n, IntLanes<F>) + 127) << 23;
  return cut ? splat<F>(0.0f) : y * __builtin_bit_cast(F, scale_bits);
}

// Max of buf[0, n) (n a multiple of kMaxLanes); returns whether a NaN or +inf is among them.
template <int kBytes>
R2LM_INLINE bool chunk_max(const float* buf, int64_t n, float& max_out) {
  using L = Lanes<kBytes>;
  typename L::F vmax = splat<typename L::F>(-std::numeric_limits<float>::infinity());
  typename L::I finite_or_ninf = typename L::I{} - 1;
  for (int64_t j = 0; j < n; j += L::count) {
    const typename L::F x = load_lanes<typename L::F>(buf + j);
    vmax = x > vmax ? x : vmax;
    finite_or_ninf &= x < splat<typename L::F>(std::numeric_limits<float>::infinity());
  }
  float m = vmax[0];
  bool bad = false;
  for (int l = 0; l < L::count; ++l) {
    m = std::max(m, vmax[l]);
    bad |= finite_or_ninf[l] == 0;
  }
  max_out = m;
  return bad;
}

// Sum of e^(x - off) and (want_xsum) of e^(x - off) (x - off) over buf[0, n), off >= every x.
template <int kBytes>
R2LM_INLINE void chunk_sums(const float* buf, int64_t n, float off, bool want_xsum, float& sum, float& xsum) {
  using L = Lanes<kBytes>;
  using F = typename L::F;
  F vsum = splat<F>(0.0f), vxsum = splat<F>(0.0f);
  if (want_xsum) {
    for (int64_t j = 0; j < n; j += L::count) {
      const F d = load_lanes<F>(buf + j) - off;
      const F e = exp_nonpositive(d);
      vsum += e;
      vxsum += e * (d < splat<F>(-87.0f) ? splat<F>(-87.0f) : d);  // -inf logits: e = 0, and 0 * -inf is NaN
    }
  } else {
    for (int64_t j = 0; j < n; j += L::count) vsum += exp_nonpositive(load_lanes<F>(buf + j) - off);
  }
  sum = xsum = 0.0f;
  for (int l = 0; l < L::count; ++l) {
    sum += vsum[l];
    xsum += vxsum[l];
  }
}

template <typename U>
R2LM_INLINE U hash_lanes(const U& key) {  // commit_hash32 on every lane
  U x = key;
  commit_hash32_in_place(x);
  return x;
}

// Natural log of positive normal floats (Cephes-style: mantissa in [sqrt(1/2), sqrt(2)), degree-9
// polynomial; within ~1 ulp, like the libm logf the reference's torch.log stands in for).
template <typename F>
R2LM_INLINE F log_positive(const F& x) {
  using I = IntLanes<F>;
  const I bits = __builtin_bit_cast(I, x);
  I e = ((bits >> 23) & 0xff) - 126;
  F m = __builtin_bit_cast(F, (bits & 0x807fffff) | 0x3f000000);  // [0.5, 1)
  const I small = m < splat<F>(0.707106781186547524f);
  e += small;  // small lanes are -1: one power of two less
  m = small ? m + m - 1.0f : m - 1.0f;
  const F z = m * m;
  F y = splat<F>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const F ef = __builtin_convertvector(e, F);
  y += ef * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// Gumbel-max picks x / T - log(-log(u)) of buf[0, n) (tokens base..), n a multiple of kMaxLanes; -inf
// logits (the set-aside mask token among them) give -inf.
template <int kBytes>
R2LM_INLINE void chunk_gumbel_picks(const float* buf, int64_t n, float temperature, uint32_t row_key,
                                    uint32_t base, float* picks) {
  using L = Lanes<kBytes>;
  using F = typename L::F;
  typename L::U lane;
  for (int l = 0; l < L::count; ++l) lane[l] = uint32_t(l);
  for (int64_t j = 0; j < n; j += L::count) {
    const typename L::U k = hash_lanes(row_key ^ hash_lanes(base + static_cast<uint32_t>(j) + lane)) >> 8;
    F u = (__builtin_convertvector(__builtin_bit_cast(typename L::I, k), F) + 0.5f) * (1.0f / 16777216.0f);
    u = u < splat<F>(0x1.fffffep-1f) ? u : splat<F>(0x1.fffffep-1f);
    const F noise = -log_positive(-log_positive(u));
    const F pick = load_lanes<F>(buf + j) / temperature + noise;
    std::memcpy(picks + j, &pick, sizeof(pick));
  }
}

// The fp64 path (tests against the fp64 reference): plain loops (kBytes unused).
template <int kBytes>
R2LM_INLINE bool chunk_max(const double* buf, int64_t n, double& max_out) {
  double m = -std::numeric_limits<double>::infinity();
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    m = std::max(m, buf[j]);
    bad |= !(buf[j] < std::numeric_limits<double>::infinity());
  }
  max_out = m;
  return bad;
}

template <int kBytes>
R2LM_INLINE void chunk_sums(const double* buf, int64_t n, double off, bool want_xsum, double& sum, double& xsum) {
  sum = xsum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = buf[j] - off, e = std::exp(d);
    sum += e;
    if (want_xsum) xsum += commit_entropy_term(e, d);
  }
}

// Logits of one chunk in the compute type.
template <int kBytes>
R2LM_INLINE void convert_chunk(const uint16_t* src, int64_t n, bool is_bf16, float* dst) {
  if (is_bf16) {
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_bits_to_float(src[j]);
  } else {
    widen_row<kBytes>(reinterpret_cast<const Half16*>(src), n, dst);
  }
}

template <int kBytes, typename T, typename acc_t>
R2LM_INLINE void convert_chunk(const T* src, int64_t n, bool, acc_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

// One row: the statistics of every logit, streamed once. T is float, double, or uint16_t holding
// bf16 (is_bf16) or fp16 bits.
template <typename T, bool is_bf16, typename acc_t, int kBytes>
R2LM_INLINE CommitRowStats<acc_t> row_stats(const T* row, const CommitParams& p, bool sample, acc_t temperature,
                                            uint32_t row_key, acc_t* buf, acc_t* picks) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool want_xsum = p.score == CommitScore::kNegEntropy;
  const bool want_top2 = p.score == CommitScore::kMargin;
  const acc_t bound = static_cast<acc_t>(kCommitGumbelBound);
  CommitRowStats<acc_t> s = commit_stats_empty<acc_t>();
  for (int64_t c0 = 0; c0 < p.vocab; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p.vocab - c0);
    // Padded with -inf to whole lanes, which changes no statistic (exp_nonpositive gives 0 for them).
    const int64_t n_padded = (n + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
    convert_chunk<kBytes>(row + c0, n, is_bf16, buf);
    for (int64_t j = n; j < n_padded; ++j) buf[j] = ninf;
    // The mask token counts in the softmax but is never a candidate: set it aside.
    const int64_t mask_j = p.mask_token_id - c0;
    const bool has_mask = mask_j >= 0 && mask_j < n;
    acc_t mask_logit = ninf;
    if (has_mask) {
      mask_logit = buf[mask_j];
      buf[mask_j] = ninf;
    }
    acc_t cmax;
    const bool not_below_inf = chunk_max<kBytes>(buf, n_padded, cmax);
    if (not_below_inf || !(mask_logit < std::numeric_limits<acc_t>::infinity())) {
      s.sum = std::numeric_limits<acc_t>::quiet_NaN();  // the row may not be committed: stop reading it
      return s;
    }
    // Candidate.
    if (!sample) {
      if (cmax > s.pick) {
        int64_t j = 0;
        while (buf[j] != cmax) ++j;
        s.pick = s.pick_logit = cmax;
        s.pick_index = static_cast<int32_t>(c0 + j);
      }
    } else if (cmax > ninf && commit_div(cmax, temperature) + bound >= s.pick) {
      // (Chunks whose largest logit cannot beat the lead even with the largest noise are skipped.)
      if constexpr (std::is_same_v<acc_t, float>) {
        chunk_gumbel_picks<kBytes>(buf, n_padded, temperature, row_key, uint32_t(c0), picks);
        float best;
        chunk_max<kBytes>(picks, n_padded, best);
        if (best > s.pick) {
          int64_t j = 0;
          while (picks[j] != best) ++j;
          s.pick = best;
          s.pick_logit = buf[j];
          s.pick_index = static_cast<int32_t>(c0 + j);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          if (buf[j] == ninf) continue;
          const acc_t pick = commit_div(buf[j], temperature) + commit_gumbel_noise<acc_t>(row_key, uint32_t(c0 + j));
          if (pick > s.pick) {
            s.pick = pick;
            s.pick_logit = buf[j];
            s.pick_index = static_cast<int32_t>(c0 + j);
          }
        }
      }
    }
    if (want_top2 && cmax > s.top2) {
      for (int64_t j = 0; j < n; ++j) {
        if (buf[j] > s.top1) {
          s.top2 = s.top1;
          s.top1 = buf[j];
        } else if (buf[j] > s.top2) {
          s.top2 = buf[j];
        }
      }
    }
    // Softmax sums against the running max.
    const acc_t new_max = std::max(s.max, std::max(cmax, mask_logit));
    commit_rescale(s.sum, s.xsum, s.max, new_max);
    s.max = new_max;
    const acc_t off = commit_exp_offset(new_max);
    acc_t sum, xsum;
    chunk_sums<kBytes>(buf, n_padded, off, want_xsum, sum, xsum);
    if (has_mask && mask_logit > ninf) {
      const acc_t d = mask_logit - off;
      const acc_t e = exp_same_type(d);
      sum += e;
      xsum += commit_entropy_term(e, d);
    }
    s.sum += sum;
    s.xsum += xsum;
  }
  return s;
}

// row_stats per storage type and vector width, each compiled for its instruction set (called inside the
// OpenMP region: the outlined region itself is compiled for the baseline target).
template <typename T, bool is_bf16, int kBytes>
struct RowStatsAt;
#define R2LM_COMMIT_ROW_STATS(suffix, bytes, target, T, is_bf16, acc_t)                                       \
  target CommitRowStats<acc_t> row_stats_##suffix##_v##bytes(const T* row, const CommitParams& p, bool sample, \
                                                            acc_t temperature, uint32_t row_key, acc_t* buf,  \
                                                            acc_t* picks) {                                    \
    return row_stats<T, is_bf16, acc_t, bytes>(row, p, sample, temperature, row_key, buf, picks);             \
  }                                                                                                            \
  template <>                                                                                                  \
  struct RowStatsAt<T, is_bf16, bytes> {                                                                       \
    static constexpr auto fn = &row_stats_##suffix##_v##bytes;                                                 \
  };
#define R2LM_COMMIT_ROW_STATS_AT(bytes, target)                                                              \
  R2LM_COMMIT_ROW_STATS(f32, bytes, target, float, false, float)                                              \
  R2LM_COMMIT_ROW_STATS(f64, bytes, target, double, false, double)                                            \
  R2LM_COMMIT_ROW_STATS(bf16, bytes, target, uint16_t, true, float)                                           \
  R2LM_COMMIT_ROW_STATS(f16, bytes, target, uint16_t, false, float)
R2LM_FOR_EACH_VECTOR_WIDTH(R2LM_COMMIT_ROW_STATS_AT)
#undef R2LM_COMMIT_ROW_STATS_AT
#undef R2LM_COMMIT_ROW_STATS

template <typename T, bool is_bf16, typename acc_t>
void run(const CommitParams& p) {
  const auto row_stats_fn =
      with_cpu_vector_width([](auto width) { return RowStatsAt<T, is_bf16, decltype(width)::value>::fn; });
  const int64_t rows = p.batch * p.block;
  const uint64_t step = p.step_tensor ? static_cast<uint64_t>(*p.step_tensor) : p.step;
  const bool sample = p.temperature > 0;
  const acc_t temperature = static_cast<acc_t>(p.temperature);
  std::vector<CommitChoice> choice(rows, CommitChoice{-1, -std::numeric_limits<float>::infinity()});
  auto is_masked = [&](int64_t b, int64_t i) {
    return (!p.active || p.active[b * p.active_stride]) &&
           p.tokens[b * p.tokens_batch_stride + i * p.tokens_pos_stride] == p.mask_token_id;
  };

  ParallelErrors errors;  // the per-thread buffers allocate inside the region
#pragma omp parallel
  {
    std::vector<acc_t> buf, picks;
    errors.capture([&] {
      buf.resize(kChunk);
      picks.resize(kChunk);
    });
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.block, i = r % p.block;
      if (!is_masked(b, i)) continue;  // its logits are never read
      errors.capture([&] {
        const T* row = static_cast<const T*>(p.logits) + b * p.logits_batch_stride + i * p.logits_pos_stride;
        const uint32_t key = sample ? commit_row_key(p.seed, step, uint32_t(b), uint32_t(i)) : 0u;
        choice[r] = commit_finalize(row_stats_fn(row, p, sample, temperature, key, buf.data(), picks.data()),
                                    p.score, p.vocab);
      });
    }
  }
  errors.rethrow();

  // Selection, per sequence.
#pragma omp parallel for schedule(static) if (p.batch * p.block > 4096)
  for (int64_t b = 0; b < p.batch; ++b) {
    const CommitChoice* c = choice.data() + b * p.block;
    int64_t n_eligible = 0, n_pass = 0;
    for (int64_t i = 0; i < p.block; ++i) {
      if (c[i].candidate < 0) continue;
      ++n_eligible;
      n_pass += c[i].confidence >= p.threshold;
    }
    const int64_t quota = commit_quota(n_pass, n_eligible, p.min_per_step, p.max_per_step);
    int32_t n_masked = 0;
    for (int64_t i = 0; i < p.block; ++i) {
      bool take = false;
      if (c[i].candidate >= 0) {
        int64_t rank = 0;
        for (int64_t j = 0; j < p.block && rank < quota; ++j)
          rank += c[j].candidate >= 0 && commit_outranks(c[j].confidence, j, c[i].confidence, i);
        take = rank < quota;
      }
      int64_t& token = p.tokens[b * p.tokens_batch_stride + i * p.tokens_pos_stride];
      if (take) token = c[i].candidate;
      n_masked += token == p.mask_token_id;
      p.committed[b * p.block + i] = take;
      p.confidence[b * p.block + i] = c[i].confidence;
    }
    p.n_masked[b] = n_masked;
  }
}

}  // namespace

void parallel_commit_cpu(const CommitParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run<float, false, float>(p);
    case DType::kFloat64: return run<double, false, double>(p);
    case DType::kBFloat16: return run<uint16_t, true, float>(p);
    case DType::kFloat16: return run<uint16_t, false, float>(p);
  }
}

}  // namespace r2lm
