// reverse_selective_scan on the CPU: forward and backward, no torch headers.
//
// Work is split into blocks of consecutive channels of one sequence, one vector's lanes each. Token-major
// tensors keep a block's channels contiguous, so a block's step is GCC vector arithmetic over its lanes
// (the state is d_state such vectors), with exp, softplus and SiLU evaluated branch-free on whole vectors.
// Blocks are independent, so OpenMP runs them in parallel; the per-block functions are compiled once per
// vector width (cpu_vector.h: 64 bytes for AVX-512, 32 for AVX2, 16 otherwise) and picked per call. The
// float, d_state 16 forward (the model's shape) has its own AVX-512 intrinsics kernel,
// forward_f32_n16_avx512, used at the 64-byte width.
//
// The backward recomputes a block's states right to left into a per-thread buffer, then runs the
// adjoint left to right. dB and dC sum over channels, dA, dD and ddelta_bias over the batch: each goes
// through partial sums (per channel partition, per sequence) that are reduced afterwards in a fixed
// order, so the gradients are bitwise reproducible whatever the thread count.
#include "reverse_selective_scan/reverse_selective_scan.h"
#include "cpu_half.h"
#include "cpu_parallel.h"
#include "cpu_vector.h"

#include <algorithm>
#include <bit>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The vector helpers are always inlined, so the vector-passing ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define R2LM_INLINE inline __attribute__((always_inline))
#define R2LM_INLINE_LAMBDA __attribute__((always_inline))

namespace r2lm {
namespace {

constexpr int64_t kMaxPartitions = 8;  // channel partitions per sequence for the backward's dB/dC sums

// A block's channels are the lanes of one vector of kBytes bytes (cpu_vector.h: the per-block functions
// are compiled for 64, 32 and 16 bytes, e.g. 16, 8 or 4 float channels).
template <typename Acc, int kBytes>
using Vec = typename CpuVector<Acc, kBytes>::type;
template <typename V>
using Elem = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V>
constexpr int64_t kLanesOf = int64_t(sizeof(V) / sizeof(Elem<V>));

// 64-byte aligned storage of lane vectors (std::vector would drop the over-alignment the AVX-512 code
// relies on).
template <typename V>
class VecBuffer {
 public:
  VecBuffer() = default;
  VecBuffer(const VecBuffer&) = delete;
  VecBuffer& operator=(const VecBuffer&) = delete;
  ~VecBuffer() { std::free(data_); }
  void resize(int64_t n) {
    if (data_ && n == size_) return;
    std::free(data_);
    data_ = static_cast<V*>(std::aligned_alloc(64, (std::max<int64_t>(n, 1) * sizeof(V) + 63) / 64 * 64));
    if (!data_) throw std::bad_alloc();
    size_ = n;
  }
  V* data() { return data_; }
  V* begin() { return data_; }
  V* end() { return data_ + size_; }
  V& operator[](int64_t i) { return data_[i]; }
  const V& operator[](int64_t i) const { return data_[i]; }

 private:
  V* data_ = nullptr;
  int64_t size_ = 0;
};

template <typename V>
R2LM_INLINE V load_vec(const Elem<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
R2LM_INLINE V splat(Elem<V> x) { return V{} + x; }

// The lower and upper halves of a vector.
template <typename V>
R2LM_INLINE auto half_lo(V v) {
  typename CpuVector<Elem<V>, sizeof(V) / 2>::type h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}
template <typename V>
R2LM_INLINE auto half_hi(V v) {
  typename CpuVector<Elem<V>, sizeof(V) / 2>::type h;
  std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof(h), sizeof(h));
  return h;
}

// Sum of the lanes in a fixed (tree) order: halves added until one lane is left.
template <typename V>
R2LM_INLINE Elem<V> lane_sum(V v) {
  if constexpr (kLanesOf<V> == 2) return v[0] + v[1];
  else return lane_sum(half_lo(v) + half_hi(v));
}
// Whether any lane of a comparison mask is set.
template <typename M>
R2LM_INLINE bool any_lane(M m) {
  if constexpr (kLanesOf<M> == 2) return (m[0] | m[1]) != 0;
  else return any_lane(half_lo(m) | half_hi(m));
}

template <typename V>
constexpr bool kDoubleLanes = std::is_same_v<Elem<V>, double>;

// log1p(e) of float vectors F (GCC vector types, __m512 included) for e in [0, 1]:
// 2 atanh(e / (2 + e)) summed as a series (|s| <= 1/3, 8 terms: < 1e-9 relative).
template <typename F>
R2LM_INLINE F log1p_of_small(F e) {
  const F s = e / (2.0f + e), s2 = s * s;
  F series = F{} + 1.0f / 15.0f;
  for (float k : {13.0f, 11.0f, 9.0f, 7.0f, 5.0f, 3.0f, 1.0f}) series = series * s2 + 1.0f / k;
  return 2.0f * s * series;
}
// softplus as in torch (x past 20 passes through): for float lanes max(x, 0) + log1p(exp(-|x|)); double
// lanes use the shared scalar math lane by lane.
template <typename V>
R2LM_INLINE V lane_softplus(V x) {
  if constexpr (kDoubleLanes<V>) {
    return map_lanes(x, [](double v) { return scan_softplus(v); });
  } else {
    const V neg_abs = x < 0.0f ? x : -x;
    const V result = (x > 0.0f ? x : splat<V>(0.0f)) + log1p_of_small(vec_exp2_upto127(times_log2e(neg_abs)));
    return x > 20.0f ? x : result;
  }
}
template <typename V>
R2LM_INLINE V lane_sigmoid(V x) {
  if constexpr (kDoubleLanes<V>) {
    return map_lanes(x, [](double v) { return scan_sigmoid(v); });
  } else {
    return 1.0f / (1.0f + vec_exp(-x));
  }
}

// d softplus(x) / dx = sigmoid(x), exactly 1 where softplus passes x through.
template <typename V>
R2LM_INLINE V lane_softplus_grad(V x) { return x > Elem<V>(20) ? splat<V>(1) : lane_sigmoid(x); }

// Whether whole fp16 rows of float vectors V convert by F16C (cpu_half.h): kernels compiled for 32 or 64
// bytes, whose entry points are `flatten`ed so that the conversions inline.
template <typename V, typename T>
constexpr bool kF16cRows =
#ifdef R2LM_X86_VECTOR_TARGETS
    std::is_same_v<T, Half16> && sizeof(V) >= 32;
#else
    false;
#endif

// Lanes [0, width) of a row, converted; the padding lanes read as 0. Whole rows convert in loops of a
// fixed count, which GCC vectorises (16-bit storage), or by F16C.
template <typename V, typename T>
R2LM_INLINE V load_row(const T* row, int64_t width) {
  constexpr int64_t kLanes = kLanesOf<V>;
  alignas(64) Elem<V> tmp[kLanes] = {};
  if (width == kLanes) {
    if constexpr (std::is_same_v<T, Elem<V>>) return load_vec<V>(row);
#ifdef R2LM_X86_VECTOR_TARGETS
    if constexpr (kF16cRows<V, T>) return half_lanes_to_float<V>(&row->bits);
#endif
    for (int64_t j = 0; j < kLanes; ++j) tmp[j] = to_compute(row[j]);
  } else {
    for (int64_t j = 0; j < width; ++j) tmp[j] = to_compute(row[j]);
  }
  return load_vec<V>(tmp);
}
template <typename V, typename T>
R2LM_INLINE void store_row(T* row, V v, int64_t width) {
  constexpr int64_t kLanes = kLanesOf<V>;
  if (width == kLanes) {
    if constexpr (std::is_same_v<T, Elem<V>>) {
      std::memcpy(row, &v, sizeof(v));
#ifdef R2LM_X86_VECTOR_TARGETS
    } else if constexpr (kF16cRows<V, T>) {
      float_lanes_to_half(v, &row->bits);
#endif
    } else {
      alignas(64) Elem<V> tmp[kLanes];
      std::memcpy(tmp, &v, sizeof(v));
      for (int64_t j = 0; j < kLanes; ++j) row[j] = to_storage<T>(tmp[j]);
    }
    return;
  }
  for (int64_t j = 0; j < width; ++j) row[j] = to_storage<T>(v[j]);
}

template <typename T>
const T* row_ptr(const void* base, int64_t batch_stride, int64_t seq_stride, int64_t b, int64_t t, int64_t d0) {
  return static_cast<const T*>(base) + b * batch_stride + t * seq_stride + d0;
}

// Consecutive tokens' rows are a sequence stride apart (2 KB at dim 512, fp32), too far for the hardware
// prefetchers, so the token loops prefetch the block's rows kPrefetchTokens tokens ahead: token t's inputs
// (delta, u, z; dout in the backward) and, for writing, its outputs.
constexpr int64_t kPrefetchTokens = 16;
template <typename T>
R2LM_INLINE void prefetch_inputs(const ScanParams& p, int64_t b, int64_t t, int64_t d0, bool with_dout) {
  __builtin_prefetch(row_ptr<T>(p.delta, p.delta_batch_stride, p.delta_seq_stride, b, t, d0));
  __builtin_prefetch(row_ptr<T>(p.u, p.u_batch_stride, p.u_seq_stride, b, t, d0));
  if (p.z) __builtin_prefetch(row_ptr<T>(p.z, p.z_batch_stride, p.z_seq_stride, b, t, d0));
  if (with_dout) __builtin_prefetch(row_ptr<T>(p.dout, p.dout_batch_stride, p.dout_seq_stride, b, t, d0));
}
template <typename T>
R2LM_INLINE void prefetch_output(void* base, int64_t offset) {
  __builtin_prefetch(static_cast<T*>(base) + offset, 1);
}

// The element type the kernels read B and C as: 16-bit B and C are converted to float once per call
// (with_float_states), not once per channel block and state.
template <typename T>
using StateRow = std::conditional_t<std::is_same_v<T, Half16> || std::is_same_v<T, BFloat16Bits>, float, T>;

// Runs run(q) with q = p, where 16-bit B and C are replaced by float copies (batch, seqlen, d_state).
template <typename T, typename Run>
void with_float_states(const ScanParams& p, Run&& run) {
  if constexpr (std::is_same_v<StateRow<T>, T>) {
    run(p);
  } else {
    const int64_t L = p.seqlen, N = p.d_state;
    std::vector<float> states(2 * p.batch * L * N);
    float* B = states.data();
    float* C = B + p.batch * L * N;
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < p.batch * L; ++bt) {
      const int64_t b = bt / L, t = bt % L;
      const T* B_row = row_ptr<T>(p.B, p.B_batch_stride, p.B_seq_stride, b, t, 0);
      const T* C_row = row_ptr<T>(p.C, p.C_batch_stride, p.C_seq_stride, b, t, 0);
      for (int64_t n = 0; n < N; ++n) B[bt * N + n] = to_compute(B_row[n]);
      for (int64_t n = 0; n < N; ++n) C[bt * N + n] = to_compute(C_row[n]);
    }
    ScanParams q = p;
    q.B = B, q.B_batch_stride = L * N, q.B_seq_stride = N;
    q.C = C, q.C_batch_stride = L * N, q.C_seq_stride = N;
    run(q);
  }
}

// Whether the state carries from t + 1 into t (false at the sequence end and at segment boundaries).
inline bool carries(const ScanParams& p, int64_t b, int64_t t) {
  if (t + 1 >= p.seqlen) return false;
  if (!p.seq_idx) return true;
  const int32_t* s = p.seq_idx + b * p.seq_idx_batch_stride;
  return s[t] == s[t + 1];
}

// A block of channels [d0, d0 + width) of sequence b, with its per-channel constants (padding lanes
// are zero, and so are their dt * u and hence their state and gradients).
template <typename Acc, int kBytes>
struct Block {
  using V = Vec<Acc, kBytes>;
  static constexpr int64_t kLanes = kLanesOf<V>;  // channels per block
  int64_t b, d0, width;
  VecBuffer<V> A, A_log2e;  // (d_state) vectors over the lanes; A * log2(e) turns exp into exp2
  V D, bias;
  bool A_nonpos;  // every A <= 0: with dt >= 0 (softplus) the decay arguments dt * A are <= 0
  V A_log2e_min;  // per lane, the smallest A_log2e over the states

  void load(const ScanParams& p, int64_t b_, int64_t d0_) {
    b = b_; d0 = d0_; width = std::min(kLanes, p.dim - d0);
    A_nonpos = true;
    A_log2e_min = splat<V>(std::numeric_limits<Acc>::infinity());
    alignas(64) Acc tmp[kLanes];
    A.resize(p.d_state);
    A_log2e.resize(p.d_state);
    for (int64_t n = 0; n < p.d_state; ++n) {
      for (int64_t j = 0; j < kLanes; ++j)
        tmp[j] = j < width ? static_cast<const Acc*>(p.A)[(d0 + j) * p.A_dim_stride + n] : Acc(0);
      A[n] = load_vec<V>(tmp);
      for (int64_t j = 0; j < kLanes; ++j) A_nonpos = A_nonpos && tmp[j] <= Acc(0);
      // Rounded once from double: a float product would carry log2(e)'s own rounding into every decay.
      for (int64_t j = 0; j < kLanes; ++j) tmp[j] = Acc(double(tmp[j]) * 1.44269504088896340736);
      A_log2e[n] = load_vec<V>(tmp);
      for (int64_t j = 0; j < kLanes; ++j) A_log2e_min[j] = std::min(A_log2e_min[j], tmp[j]);
    }
    D = load_row<V>(p.D ? static_cast<const Acc*>(p.D) + d0 : nullptr, p.D ? width : 0);
    bias = load_row<V>(p.delta_bias ? static_cast<const Acc*>(p.delta_bias) + d0 : nullptr, p.delta_bias ? width : 0);
  }
};

// delta + bias of the block at time t.
template <typename T, typename Acc, int kBytes>
R2LM_INLINE Vec<Acc, kBytes> load_dt_input(const ScanParams& p, const Block<Acc, kBytes>& k, int64_t t) {
  return load_row<Vec<Acc, kBytes>>(row_ptr<T>(p.delta, p.delta_batch_stride, p.delta_seq_stride, k.b, t, k.d0), k.width) + k.bias;
}

// One token's inputs to the state update, shared by the forward paths and the backward: the step size
// dt = softplus(delta + bias) (or delta + bias), u, and the B and C rows.
template <typename T, typename V>
struct TokenInputs {
  V dt, u;
  const StateRow<T>* B_row;
  const StateRow<T>* C_row;
};

template <typename T, typename Acc, int kBytes>
R2LM_INLINE TokenInputs<T, Vec<Acc, kBytes>> load_token_inputs(const ScanParams& p, const Block<Acc, kBytes>& k,
                                                               int64_t t) {
  const Vec<Acc, kBytes> x = load_dt_input<T>(p, k, t);
  return {p.delta_softplus ? lane_softplus(x) : x,
          load_row<Vec<Acc, kBytes>>(row_ptr<T>(p.u, p.u_batch_stride, p.u_seq_stride, k.b, t, k.d0), k.width),
          row_ptr<StateRow<T>>(p.B, p.B_batch_stride, p.B_seq_stride, k.b, t, 0),
          row_ptr<StateRow<T>>(p.C, p.C_batch_stride, p.C_seq_stride, k.b, t, 0)};
}

// The forward of a float block with d_state == kN: the state stays in registers. Writes p.out, or with
// `kept` (as block_forward's `states`, slot L zero) keeps every h_t in slot t and y_t . C_t in ys. kNonpos:
// the decay arguments are known to be <= 0 (softplus dt, A <= 0). Same arithmetic, in the same order, as
// block_forward, software-pipelined: a token's step size and gate are computed two tokens ahead and, with 32
// vector registers (kBytes 64), its decays one token ahead (inside the previous token's state loop), so that
// their long dependency chains overlap other tokens' work instead of stalling the state updates. With 16
// registers the decays ahead would spill (AVX2, fp32: 8.0 -> 9.0 ms).
template <typename T, int kN, bool kNonpos, int kBytes>
R2LM_INLINE void block_forward_fixed(const ScanParams& p, const Block<float, kBytes>& k, Vec<float, kBytes>* kept,
                                     Vec<float, kBytes>* ys) {
  using V = Vec<float, kBytes>;
  const int64_t L = p.seqlen;
  constexpr bool kDecaysAhead = kBytes == 64;
  V h[kN], a[kN], decay[kN];
  for (int n = 0; n < kN; ++n) { h[n] = V{}; a[n] = k.A_log2e[n]; }
  const int32_t* seq = p.seq_idx ? p.seq_idx + k.b * p.seq_idx_batch_stride : nullptr;
  // Step size and gate of token max(t, 0): the lookahead past token 0 computes values that go unused.
  auto step_size = [&](int64_t t) R2LM_INLINE_LAMBDA {
    const V x = load_dt_input<T>(p, k, std::max<int64_t>(t, 0));
    return p.delta_softplus ? lane_softplus(x) : x;
  };
  auto gate_of = [&](int64_t t) R2LM_INLINE_LAMBDA {
    if (!p.z || kept) return splat<V>(1.0f);
    const V z = load_row<V>(row_ptr<T>(p.z, p.z_batch_stride, p.z_seq_stride, k.b, std::max<int64_t>(t, 0), k.d0),
                            k.width);
    return z * lane_sigmoid(z);
  };
  // One token's state updates; the decays computed are those of step size dt_exp: the next token's with
  // kDecaysAhead (this token's then come from `decay`), else this token's. kExp 0: general exp2,
  // 1: arguments <= 0, 2: arguments in [-126, 0] (no clamp).
  auto states = [&](auto kExp, V dt_exp, V dt_u, const StateRow<T>* B, const StateRow<T>* C) R2LM_INLINE_LAMBDA {
    V y{};
#pragma GCC unroll 16
    for (int n = 0; n < kN; ++n) {
      V e;
      if constexpr (kExp.value == 0) e = vec_exp2(dt_exp * a[n]);
      else e = vec_exp2_upto127<kExp.value == 1>(dt_exp * a[n]);
      V d = e;
      if constexpr (kDecaysAhead) d = decay[n], decay[n] = e;
      h[n] = d * h[n] + dt_u * B[n];
      y += h[n] * C[n];
    }
    return y;
  };
  // Which exp form the decays of step size dt take: dt * A >= dt * min(A) per lane, so when that is >= -126
  // in every lane no argument needs the clamp.
  auto exp_form = [&](V dt) R2LM_INLINE_LAMBDA {
    if constexpr (!kNonpos) return 0;
    else return any_lane(dt * k.A_log2e_min < -126.0f) ? 1 : 2;
  };
  V dt = step_size(L - 1), dt1 = step_size(L - 2);
  V gate = gate_of(L - 1), gate1 = gate_of(L - 2);
  if constexpr (kDecaysAhead)
    for (int n = 0; n < kN; ++n) decay[n] = vec_exp2(dt * a[n]);
  for (int64_t t = L - 1; t >= 0; --t) {
    const bool carry = t + 1 < L && (!seq || seq[t] == seq[t + 1]);
    if (!carry) {
      for (int n = 0; n < kN; ++n) h[n] = V{};
    }
    const int64_t ahead = std::max<int64_t>(t - kPrefetchTokens, 0);
    prefetch_inputs<T>(p, k.b, ahead, k.d0, false);
    if (!kept) prefetch_output<T>(p.out, k.b * p.out_batch_stride + ahead * p.out_seq_stride + k.d0);
    const V dt2 = step_size(t - 2), gate2 = gate_of(t - 2);
    const V u = load_row<V>(row_ptr<T>(p.u, p.u_batch_stride, p.u_seq_stride, k.b, t, k.d0), k.width);
    const V dt_u = dt * u;
    const StateRow<T>* B = row_ptr<StateRow<T>>(p.B, p.B_batch_stride, p.B_seq_stride, k.b, t, 0);
    const StateRow<T>* C = row_ptr<StateRow<T>>(p.C, p.C_batch_stride, p.C_seq_stride, k.b, t, 0);
    const V dt_exp = kDecaysAhead ? dt1 : dt;
    V y;
    switch (exp_form(dt_exp)) {
      case 2: y = states(std::integral_constant<int, 2>{}, dt_exp, dt_u, B, C); break;
      case 1: y = states(std::integral_constant<int, 1>{}, dt_exp, dt_u, B, C); break;
      default: y = states(std::integral_constant<int, 0>{}, dt_exp, dt_u, B, C); break;
    }
    if (kept) {
      for (int n = 0; n < kN; ++n) kept[t * kN + n] = h[n];
      ys[t] = y;
    } else {
      const V out = (y + k.D * u) * gate;
      store_row(static_cast<T*>(p.out) + k.b * p.out_batch_stride + t * p.out_seq_stride + k.d0, out, k.width);
    }
    dt = dt1, dt1 = dt2;
    gate = gate1, gate1 = gate2;
  }
}

// Runs the block right to left. With `states` (L + 1 slots of d_state vectors, the last one zero)
// every h_t is kept in slot t and y_t . C_t (before the D skip) in ys; otherwise `states` is one slot
// holding the running state and the gated output is written to p.out.
template <typename T, typename Acc, int kBytes>
R2LM_INLINE void block_forward(const ScanParams& p, const Block<Acc, kBytes>& k, Vec<Acc, kBytes>* states,
                               Vec<Acc, kBytes>* ys, bool keep_states) {
  using V = Vec<Acc, kBytes>;
  const int64_t L = p.seqlen, N = p.d_state;
  if (keep_states) std::fill(states + L * N, states + (L + 1) * N, V{});
  if constexpr (std::is_same_v<Acc, float>) {
    if (N == 16) {
      V* kept = keep_states ? states : nullptr;
      if (p.delta_softplus && k.A_nonpos) return block_forward_fixed<T, 16, true, kBytes>(p, k, kept, ys);
      return block_forward_fixed<T, 16, false, kBytes>(p, k, kept, ys);
    }
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const bool carry = carries(p, k.b, t);
    // h_t in place of the running state, or in slot t from h_{t+1} (slot L, zero, where the state resets).
    V* h = keep_states ? states + t * N : states;
    const V* h_prev = keep_states ? states + (carry ? t + 1 : L) * N : states;
    if (!keep_states && !carry) std::fill(h, h + N, V{});
    prefetch_inputs<T>(p, k.b, std::max<int64_t>(t - kPrefetchTokens, 0), k.d0, false);
    const auto [dt, u, B_row, C_row] = load_token_inputs<T>(p, k, t);
    const V dt_u = dt * u;
    V y{};
    for (int64_t n = 0; n < N; ++n) {
      h[n] = vec_exp2(dt * k.A_log2e[n]) * h_prev[n] + dt_u * Acc(to_compute(B_row[n]));
      y += h[n] * Acc(to_compute(C_row[n]));
    }
    if (keep_states) {
      ys[t] = y;
      continue;
    }
    V out = y + k.D * u;
    if (p.z) {
      const V z = load_row<V>(row_ptr<T>(p.z, p.z_batch_stride, p.z_seq_stride, k.b, t, k.d0), k.width);
      out *= z * lane_sigmoid(z);
    }
    store_row(static_cast<T*>(p.out) + k.b * p.out_batch_stride + t * p.out_seq_stride + k.d0, out, k.width);
  }
}

// Per-thread buffers of the backward.
template <typename V>
struct BwdScratch {
  VecBuffer<V> states, ys, g, dA;
  void init(int64_t L, int64_t N) {
    states.resize((L + 1) * N); ys.resize(L); g.resize(N); dA.resize(N);
  }
};

// The block's backward: recompute its states, then the adjoint left to right. g holds dL/dh_t; it
// reaches h_{t+1} as exp(dt_t A) g where the state carries (h_t depends on h_{t+1} only then).
// Adds the block's dB, dC sums to dB_acc, dC_acc (L, d_state) and writes its dA, dD, ddelta_bias.
template <typename T, typename Acc, int kBytes>
R2LM_INLINE void block_backward(const ScanParams& p, const Block<Acc, kBytes>& k, BwdScratch<Vec<Acc, kBytes>>& w,
                                Acc* dB_acc, Acc* dC_acc, Acc* dA_out, Acc* dD_out, Acc* dbias_out) {
  using V = Vec<Acc, kBytes>;
  const int64_t L = p.seqlen, N = p.d_state, dim = p.dim;
  block_forward<T, Acc>(p, k, w.states.data(), w.ys.data(), true);
  std::fill(w.g.begin(), w.g.end(), V{});
  std::fill(w.dA.begin(), w.dA.end(), V{});
  V dD{}, dbias{};
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = (k.b * L + t) * dim + k.d0;  // gradients of (batch, seqlen, dim) tensors are contiguous
    const int64_t ahead = std::min<int64_t>(t + kPrefetchTokens, L - 1);
    prefetch_inputs<T>(p, k.b, ahead, k.d0, true);
    prefetch_output<T>(p.du, row + (ahead - t) * dim);
    prefetch_output<T>(p.ddelta, row + (ahead - t) * dim);
    if (p.z) prefetch_output<T>(p.dz, row + (ahead - t) * dim);
    const V x = load_dt_input<T>(p, k, t);
    const V dt = p.delta_softplus ? lane_softplus(x) : x;
    const V u = load_row<V>(row_ptr<T>(p.u, p.u_batch_stride, p.u_seq_stride, k.b, t, k.d0), k.width);
    V dy = load_row<V>(row_ptr<T>(p.dout, p.dout_batch_stride, p.dout_seq_stride, k.b, t, k.d0), k.width);
    if (p.z) {
      const V z = load_row<V>(row_ptr<T>(p.z, p.z_batch_stride, p.z_seq_stride, k.b, t, k.d0), k.width);
      const V sig = lane_sigmoid(z), y = w.ys[t] + k.D * u;
      store_row(static_cast<T*>(p.dz) + row, dy * y * sig * (Acc(1) + z * (Acc(1) - sig)), k.width);
      dy *= z * sig;
    }
    dD += dy * u;
    V du = dy * k.D, ddt{};
    const bool carry = carries(p, k.b, t);
    const V* h = w.states.data() + t * N;
    const V* h_next = w.states.data() + (carry ? t + 1 : L) * N;
    const StateRow<T>* B_row = row_ptr<StateRow<T>>(p.B, p.B_batch_stride, p.B_seq_stride, k.b, t, 0);
    const StateRow<T>* C_row = row_ptr<StateRow<T>>(p.C, p.C_batch_stride, p.C_seq_stride, k.b, t, 0);
    for (int64_t n = 0; n < N; ++n) {
      const V g = w.g[n] + dy * Acc(to_compute(C_row[n]));
      const V decay = vec_exp2(dt * k.A_log2e[n]);
      V db{};
      scan_step_bwd(g, h_next[n], dt, k.A[n], splat<V>(to_compute(B_row[n])), u, decay, ddt, w.dA[n], db, du);
      w.g[n] = carry ? decay * g : V{};  // a select: a product with 0 would carry a NaN into the next segment
      dB_acc[t * N + n] += lane_sum(db);
      dC_acc[t * N + n] += lane_sum(dy * h[n]);
    }
    const V ddelta = ddt * (p.delta_softplus ? lane_softplus_grad(x) : splat<V>(1));
    dbias += ddelta;
    store_row(static_cast<T*>(p.du) + row, du, k.width);
    store_row(static_cast<T*>(p.ddelta) + row, ddelta, k.width);
  }
  for (int64_t j = 0; j < k.width; ++j) {
    for (int64_t n = 0; n < N; ++n) dA_out[(k.d0 + j) * N + n] = w.dA[n][j];
    dD_out[k.d0 + j] = dD[j];
    dbias_out[k.d0 + j] = dbias[j];
  }
}

// The per-block functions of one element type and vector width, each compiled for its instruction set
// (called inside the OpenMP regions: an outlined region itself is compiled for the baseline target) and
// flattened, so that the F16C row conversions inline.
template <typename T, int kBytes>
struct BlockFns;
#define R2LM_SCAN_BLOCK_FNS(suffix, target, bytes, T, Acc)                                                    \
  target __attribute__((flatten)) void forward_##suffix(const ScanParams& p, const Block<Acc, bytes>& k,        \
                                                        Vec<Acc, bytes>* h) {                                  \
    block_forward<T, Acc>(p, k, h, nullptr, false);                                                            \
  }                                                                                                            \
  target __attribute__((flatten)) void backward_##suffix(const ScanParams& p, const Block<Acc, bytes>& k,       \
                                                         BwdScratch<Vec<Acc, bytes>>& w, Acc* dB_acc,          \
                                                         Acc* dC_acc, Acc* dA, Acc* dD, Acc* dbias) {          \
    block_backward<T, Acc>(p, k, w, dB_acc, dC_acc, dA, dD, dbias);                                            \
  }                                                                                                            \
  template <>                                                                                                  \
  struct BlockFns<T, bytes> {                                                                                  \
    static constexpr auto forward = &forward_##suffix;                                                         \
    static constexpr auto backward = &backward_##suffix;                                                       \
  };
#define R2LM_SCAN_BLOCK_FNS_AT(bytes, target)                                                                 \
  R2LM_SCAN_BLOCK_FNS(f32_v##bytes, target, bytes, float, float)                                               \
  R2LM_SCAN_BLOCK_FNS(f64_v##bytes, target, bytes, double, double)                                             \
  R2LM_SCAN_BLOCK_FNS(f16_v##bytes, target, bytes, Half16, float)                                                \
  R2LM_SCAN_BLOCK_FNS(bf16_v##bytes, target, bytes, BFloat16Bits, float)
R2LM_FOR_EACH_VECTOR_WIDTH(R2LM_SCAN_BLOCK_FNS_AT)
#undef R2LM_SCAN_BLOCK_FNS_AT
#undef R2LM_SCAN_BLOCK_FNS

#if defined(__x86_64__)
// The float, d_state 16 forward in AVX-512 intrinsics, chosen at run time where the CPU has AVX-512 (the
// generic path above stays for other machines and dtypes; the backward always uses it). The math of
// block_forward_fixed, but with the exponent applied by vscalefps, subnormals flushed instead of clamped,
// SiLU as one division, and the loop software-pipelined: a token's step size and gate are computed two
// tokens ahead and its decays one token ahead, so that their long dependency chains overlap other
// tokens' work instead of stalling the state updates (the loop is then bound by its vector-op count,
// 13 per state and token).
#define R2LM_AVX512 __attribute__((target("avx512f,avx512dq,fma")))
#define R2LM_AVX512_INLINE R2LM_AVX512 inline __attribute__((always_inline))
// Full-mask forms of the intrinsics: GCC 12's unmasked ones trip -Wmaybe-uninitialized.
constexpr __mmask16 kAll = 0xffff;

// 2^x: r = x - round(x) in [-1/2, 1/2] (one vreduceps, exact), 2^r by the shared polynomial, times 2^j
// (j = x - r, exact) by vscalefps, which overflows to inf and underflows without a clamp.
R2LM_AVX512_INLINE __m512 avx512_exp2(__m512 x) {
  const __m512 r = _mm512_maskz_reduce_ps(kAll, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_scalef_ps(kAll, exp2_fraction<__m512>(r), x - r);
}
// As vec_exp.
R2LM_AVX512_INLINE __m512 avx512_exp(__m512 x) {
  return avx512_exp2(times_log2e(x));
}
// As lane_softplus.
R2LM_AVX512_INLINE __m512 avx512_softplus(__m512 x) {
  const __m512 result = _mm512_maskz_max_ps(kAll, x, _mm512_setzero_ps()) +
                        log1p_of_small(avx512_exp(-_mm512_abs_ps(x)));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ), result, x);
}
// SiLU as x / (1 + e^-x): one division and no multiply.
R2LM_AVX512_INLINE __m512 avx512_silu(__m512 x) { return x / (1.0f + avx512_exp(-x)); }

// Step size and SiLU gate of one token, from its delta and z rows (z_row unused without the gate).
template <bool kSoftplus, bool kGate>
R2LM_AVX512_INLINE void avx512_token(const float* delta_row, const float* z_row, __mmask16 lanes, __m512 bias,
                                     __m512& dt, __m512& gate) {
  const __m512 x = _mm512_maskz_loadu_ps(lanes, delta_row) + bias;
  dt = kSoftplus ? avx512_softplus(x) : x;
  if constexpr (kGate) gate = avx512_silu(_mm512_maskz_loadu_ps(lanes, z_row));
}

// One token's state updates, h <- decay h + dt u B, with this token's decays read from `decay` and the
// next token's (step size dt_next) written there; returns y = h . C.
R2LM_AVX512_INLINE __m512 avx512_step(__m512 (&h)[16], __m512 (&decay)[16], const __m512* a, __m512 dt_next,
                                      __m512 dt_u, const float* B_row, const float* C_row) {
  __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();  // two sums: half the dependency chain
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) {
    const __m512 d = decay[n];
    decay[n] = avx512_exp2(dt_next * a[n]);
    h[n] = d * h[n] + dt_u * B_row[n];
    if (n % 2) y1 += h[n] * C_row[n];
    else y0 += h[n] * C_row[n];
  }
  return y0 + y1;
}

// The block's forward, written to p.out (seqlen >= 1).
template <bool kSoftplus, bool kGate>
R2LM_AVX512 void forward_f32_n16_avx512(const ScanParams& p, const Block<float, 64>& k) {
  constexpr int kN = 16;
  const int64_t L = p.seqlen;
  const __mmask16 lanes = __mmask16((1u << k.width) - 1);
  auto row0 = [&](const void* base, int64_t batch_stride) R2LM_INLINE_LAMBDA {
    return static_cast<const float*>(base) + k.b * batch_stride + k.d0;
  };
  const float* u = row0(p.u, p.u_batch_stride);
  const float* delta = row0(p.delta, p.delta_batch_stride);
  const float* z = kGate ? row0(p.z, p.z_batch_stride) : nullptr;
  const float* B = static_cast<const float*>(p.B) + k.b * p.B_batch_stride;
  const float* C = static_cast<const float*>(p.C) + k.b * p.C_batch_stride;
  float* out = static_cast<float*>(p.out) + k.b * p.out_batch_stride + k.d0;
  const int64_t u_stride = p.u_seq_stride, delta_stride = p.delta_seq_stride, z_stride = kGate ? p.z_seq_stride : 0;
  const int64_t B_stride = p.B_seq_stride, C_stride = p.C_seq_stride, out_stride = p.out_seq_stride;
  const int32_t* seq = p.seq_idx ? p.seq_idx + k.b * p.seq_idx_batch_stride : nullptr;
  const __m512* a = reinterpret_cast<const __m512*>(&k.A_log2e[0]);
  const __m512 bias = k.bias, D = k.D;
  // Token max(t, 0): the lookahead past token 0 computes values that go unused.
  auto token = [&](int64_t t, __m512& dt, __m512& gate) R2LM_AVX512 R2LM_INLINE_LAMBDA {
    t = std::max<int64_t>(t, 0);
    avx512_token<kSoftplus, kGate>(delta + t * delta_stride, z + t * z_stride, lanes, bias, dt, gate);
  };

  // Decays below 2^-126 would be subnormal, and subnormal arithmetic takes microcode assists: flush
  // subnormals to zero while the block runs (the generic path clamps such decays to 2^-126 instead).
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);
  __m512 h[kN], decay[kN];
  __m512 dt, dt1, dt2, gate, gate1, gate2;  // 1, 2: the next tokens, t - 1 and t - 2
  gate = gate1 = gate2 = _mm512_set1_ps(1.0f);
  token(L - 1, dt, gate);
  token(L - 2, dt1, gate1);
  for (int n = 0; n < kN; ++n) {
    h[n] = _mm512_setzero_ps();
    decay[n] = avx512_exp2(dt * a[n]);
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const bool carry = t + 1 < L && (!seq || seq[t] == seq[t + 1]);
    if (!carry) {
      for (int n = 0; n < kN; ++n) h[n] = _mm512_setzero_ps();
    }
    const int64_t ahead = std::max<int64_t>(t - kPrefetchTokens, 0);
    _mm_prefetch(reinterpret_cast<const char*>(delta + ahead * delta_stride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(u + ahead * u_stride), _MM_HINT_T0);
    if constexpr (kGate) _mm_prefetch(reinterpret_cast<const char*>(z + ahead * z_stride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(out + ahead * out_stride), _MM_HINT_ET0);
    token(t - 2, dt2, gate2);
    const __m512 u_t = _mm512_maskz_loadu_ps(lanes, u + t * u_stride);
    const __m512 y = avx512_step(h, decay, a, dt1, dt * u_t, B + t * B_stride, C + t * C_stride);
    _mm512_mask_storeu_ps(out + t * out_stride, lanes, (y + D * u_t) * gate);
    dt = dt1; dt1 = dt2;
    gate = gate1; gate1 = gate2;
  }
  _mm_setcsr(csr);
}

// Whether forward() takes forward_f32_n16_avx512: the CPU has AVX-512 and R2LM_SCAN_CPU_GENERIC is not
// "1" (the tests set it to cover the generic path on AVX-512 machines too).
bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return has && !env_is_one("R2LM_SCAN_CPU_GENERIC");
}
#endif

template <typename T, typename Acc, int kBytes>
void forward(const ScanParams& p) {
  using Blk = Block<Acc, kBytes>;
  const int64_t n_blocks = (p.dim + Blk::kLanes - 1) / Blk::kLanes;
#if defined(__x86_64__)
  const bool avx512 = std::is_same_v<T, float> && kBytes == 64 && p.d_state == 16 && use_avx512();
#else
  constexpr bool avx512 = false;
#endif
  ParallelErrors errors;  // the per-thread buffers allocate inside the region
#pragma omp parallel
  {
    Blk k;
    VecBuffer<Vec<Acc, kBytes>> h;
    errors.capture([&] { h.resize(p.d_state); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.batch * n_blocks; ++item) {
      errors.capture([&] {
        k.load(p, item / n_blocks, (item % n_blocks) * Blk::kLanes);
#if defined(__x86_64__)
        if constexpr (std::is_same_v<T, float> && kBytes == 64) {
          if (avx512) {
            if (p.delta_softplus) {
              p.z ? forward_f32_n16_avx512<true, true>(p, k) : forward_f32_n16_avx512<true, false>(p, k);
            } else {
              p.z ? forward_f32_n16_avx512<false, true>(p, k) : forward_f32_n16_avx512<false, false>(p, k);
            }
            return;
          }
        }
#endif
        BlockFns<T, kBytes>::forward(p, k, h.data());
      });
    }
  }
  errors.rethrow();
}

template <typename T, typename Acc, int kBytes>
void backward(const ScanParams& p) {
  using Blk = Block<Acc, kBytes>;
  const int64_t L = p.seqlen, N = p.d_state, dim = p.dim;
  const int64_t n_blocks = (dim + Blk::kLanes - 1) / Blk::kLanes;
  const int64_t n_parts = std::min(n_blocks, kMaxPartitions);
  // Partial sums: dB and dC per (sequence, partition of the blocks); dA, dD, ddelta_bias per sequence.
  std::vector<Acc> part_dB(p.batch * n_parts * L * N, Acc(0)), part_dC(p.batch * n_parts * L * N, Acc(0));
  std::vector<Acc> part_dA(p.batch * dim * N), part_dD(p.batch * dim), part_dbias(p.batch * dim);

  ParallelErrors errors;  // the per-thread buffers allocate inside the region
#pragma omp parallel
  {
    Blk k;
    BwdScratch<Vec<Acc, kBytes>> w;
    errors.capture([&] { w.init(L, N); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.batch * n_parts; ++item) {
      errors.capture([&] {
        const int64_t b = item / n_parts, part = item % n_parts;
        Acc* dB_acc = part_dB.data() + item * L * N;
        Acc* dC_acc = part_dC.data() + item * L * N;
        for (int64_t blk = part * n_blocks / n_parts; blk < (part + 1) * n_blocks / n_parts; ++blk) {
          k.load(p, b, blk * Blk::kLanes);
          BlockFns<T, kBytes>::backward(p, k, w, dB_acc, dC_acc, part_dA.data() + b * dim * N,
                                        part_dD.data() + b * dim, part_dbias.data() + b * dim);
        }
      });
    }
  }
  errors.rethrow();

#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < p.batch * L; ++bt) {
    const int64_t b = bt / L, t = bt % L;
    for (int64_t n = 0; n < N; ++n) {
      Acc db = 0, dc = 0;
      for (int64_t part = 0; part < n_parts; ++part) {
        db += part_dB[((b * n_parts + part) * L + t) * N + n];
        dc += part_dC[((b * n_parts + part) * L + t) * N + n];
      }
      static_cast<T*>(p.dB)[bt * N + n] = to_storage<T>(db);
      static_cast<T*>(p.dC)[bt * N + n] = to_storage<T>(dc);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t n = 0; n < N; ++n) {
      Acc sum = 0;
      for (int64_t b = 0; b < p.batch; ++b) sum += part_dA[(b * dim + d) * N + n];
      static_cast<Acc*>(p.dA)[d * N + n] = sum;
    }
    Acc dD = 0, dbias = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      dD += part_dD[b * dim + d];
      dbias += part_dbias[b * dim + d];
    }
    if (p.dD) static_cast<Acc*>(p.dD)[d] = dD;
    if (p.ddelta_bias) static_cast<Acc*>(p.ddelta_bias)[d] = dbias;
  }
}

template <bool kBackward, typename T, typename Acc, int kBytes>
void run_typed(const ScanParams& p) {
  with_float_states<T>(p, [](const ScanParams& q) {
    kBackward ? backward<T, Acc, kBytes>(q) : forward<T, Acc, kBytes>(q);
  });
}

template <bool kBackward, int kBytes>
void run_at(const ScanParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_typed<kBackward, float, float, kBytes>(p);
    case DType::kFloat64: return run_typed<kBackward, double, double, kBytes>(p);
    case DType::kFloat16: return run_typed<kBackward, Half16, float, kBytes>(p);
    case DType::kBFloat16: return run_typed<kBackward, BFloat16Bits, float, kBytes>(p);
  }
}

template <bool kBackward>
void run(const ScanParams& p) {
  if (p.batch == 0 || p.seqlen == 0 || p.dim == 0) return;  // the torch layer zeroes the parameter gradients
  with_cpu_vector_width([&](auto width) { run_at<kBackward, decltype(width)::value>(p); });
}

}  // namespace

void reverse_selective_scan_fwd_cpu(const ScanParams& p) { run<false>(p); }
void reverse_selective_scan_bwd_cpu(const ScanParams& p) { run<true>(p); }

}  // namespace r2lm
