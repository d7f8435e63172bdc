// cache_attention CPU kernels: FlashAttention-style tiles with an online softmax.
//
// One work item = (batch, kv head, tile of up to kRowTile rows), rows being the q_len x group queries
// that share the kv head, so every key/value tile is loaded (and converted) once for all of them; that
// reuse is what a per-head attention with repeated KV cannot get. Two kernels:
// * FMA: scores and the P.V update use GCC vector types with register blocking over rows, compiled once
//   per vector width (cpu_vector.h: 64 bytes for AVX-512, 32 for AVX2, 16 otherwise), picked per call.
// * AMX (Linux x86 CPUs with AMX-BF16, fp32 / fp16 / bf16, >= 16 rows per kv head): both matmuls on the
//   tile unit with fp32 accuracy (operands split into three bf16 parts), a work item spanning up to 8
//   kv heads, software-pipelined so that the tile unit and the vector units work side by side.
//   R2LM_ATTENTION_CPU_GENERIC=1 forces the FMA kernel.
#include "cache_attention/cache_attention.h"
#include "cpu_half.h"
#include "cpu_parallel.h"
#include "cpu_vector.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define R2LM_ATTENTION_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// The 64-byte vector helpers are always inlined, so the vector-passing ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace r2lm {
namespace {

constexpr int kKeyTile = 64;   // keys per tile (FMA kernel; the AMX kernel's is amx::kKeys)
// Up to kFmaSharedRows query rows per kv head, an FMA work item takes kFmaGroupHeads kv heads and reads
// each key tile head after head: whole token rows of a token-major cache instead of 512 B of every 4 KB
// (plain decode, batch 8, cache 4096, 32 / 8 heads, fp32: 21.7 -> 16.9 ms). The heads' rows then stay
// small (~16 KB each at head_dim 128) beside the shared tile; with more rows per head the 8 heads' state
// (64 KB each at 64 rows) would crowd a small L2, where one head per item is safer.
constexpr int kFmaSharedRows = 16;
constexpr int kFmaGroupHeads = 8;
constexpr int kRowTile = 64;   // rows per work item
constexpr int kRowBlock = 6;   // rows per P . V micro-kernel
// Scratch rows are padded by 16 elements (a cache line of fp32 or of the AMX path's 32-bit words): rows at a
// power-of-two stride would share a few L1 sets, so that a micro-kernel's column of rows (or a tile's 16
// rows) evicts itself.
constexpr int kPad = 16;

// A vector of kBytes bytes (cpu_vector.h: the FMA kernel is compiled for 64, 32 and 16; the AMX path
// uses 64).
template <typename Acc, int kBytes = 64>
struct Vec : CpuVector<Acc, kBytes> {
  static constexpr int lanes = kBytes / sizeof(Acc);
};

// Register blocking of the FMA micro-kernels per vector width. AVX-512 (32 registers): scores in 8 keys x
// 2 row vectors of accumulators, P . V in 6 rows x 4 vectors of columns (+ 4 value vectors). AVX2 and SSE
// (16 registers): 4 keys x 2 row vectors, and 6 rows x 2 vectors (+ 2).
template <int kBytes>
struct Blocking {
  static constexpr int key_group = kBytes == 64 ? 8 : 4;  // keys per score micro-kernel (tiles are padded to a multiple)
  static constexpr int col_vecs = kBytes == 64 ? 4 : 2;   // value column vectors per P . V micro-kernel
};

// Value columns per P . V micro-kernel: Blocking's col_vecs vectors, or the whole head when narrower.
template <typename Acc, int D, int kBytes>
constexpr int kColVecs = std::min(D / Vec<Acc, kBytes>::lanes, Blocking<kBytes>::col_vecs);

// 64-byte cache lines per key / value row.
template <typename T, int D>
constexpr int kRowLines = (D * int(sizeof(T)) + 63) / 64;

template <typename V>
inline __attribute__((always_inline)) V load_vec(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline __attribute__((always_inline)) void store_vec(void* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }


// e^x for the softmax (x <= kRescaleMargin, or -inf): the shared vec_exp arithmetic, and
// exactly 0 below 2^-126, so that masked keys and a fresh row's correction (exp(-inf)) vanish.
template <typename V>
inline __attribute__((always_inline)) V softmax_exp(V x) {
  if constexpr (sizeof(x[0]) == sizeof(double)) {
    return vec_exp(x);
  } else {
    const V t = times_log2e(x);
    return t < -126.0f ? V{} : vec_exp2_upto127<false>(t);
  }
}

// One kv head's rows in the FMA kernel, Acc-typed and 64-byte aligned. Queries are stored transposed so
// that scores are computed as key-major rows of row vectors: every key element is one broadcast, and the
// softmax statistics of all rows update as whole vectors.
template <typename Acc, int D>
struct RowState {
  alignas(64) Acc qt[D][kRowTile + kPad];  // scaled queries, transposed
  alignas(64) Acc o[kRowTile][D + kPad];   // unnormalised output accumulators
  alignas(64) Acc row_max[kRowTile], row_sum[kRowTile], correction[kRowTile];
  int64_t row_query[kRowTile];            // query position i of each row
};

// Per-thread scratch of the FMA kernel: the rows of a work item's kv heads, and one tile shared by them.
template <typename Acc, int D>
struct Scratch {
  std::vector<RowState<Acc, D>> heads;
  alignas(64) Acc st[kKeyTile][kRowTile + kPad];  // scores, then probabilities, key-major
  alignas(64) Acc k[kKeyTile][D + kPad];          // key / value tiles, converted; keys that do not exist are 0
  alignas(64) Acc v[kKeyTile][D + kPad];
  const char* next_rows[2 * kKeyTile];    // key (even) and value (odd) rows of the next tile, to prefetch
};

template <typename T>
inline const T* elem(const void* base, int64_t offset) { return static_cast<const T*>(base) + offset; }

// Walks the next tile's cache lines, prefetching them (into L2) a few at a time. Consecutive keys of a
// token-major cache are a page apart, which the hardware prefetchers do not follow. A prefetch holds a
// fill buffer until its line arrives, and with the buffers full the core stalls, so the kernels call
// step() at a fixed cadence that spreads a tile's lines over its compute. A local of the kernel: the
// cursor stays in a register.
template <typename T, int D>
struct PrefetchCursor {
  const char* const* rows;  // the tile's key (even) and value (odd) rows
  int next, lines;
  inline __attribute__((always_inline)) void step() {
    if (next < lines) {
      __builtin_prefetch(rows[next / kRowLines<T, D>] + next % kRowLines<T, D> * 64, 0, 2);
      ++next;
    }
  }
};

// st[n][rows] = K[n] . Qt for keys [0, n_keys) (a multiple of kKeyGroup) and the kRowVecs row vectors
// from row vector c0. kKeyGroup keys x kRowVecs row vectors of accumulators: every query vector loaded
// feeds kKeyGroup FMAs, and the group's slice of qt (16 KB in fp32) stays in L1 across the key groups.
template <typename T, typename Acc, int D, int kBytes, int kRowVecs>
inline __attribute__((always_inline)) void score_rows(Scratch<Acc, D>& w, const RowState<Acc, D>& h,
                                                      PrefetchCursor<T, D>& prefetch, int c0, int n_keys) {
  using V = typename Vec<Acc, kBytes>::type;
  constexpr int L = Vec<Acc, kBytes>::lanes;
  constexpr int kKeyGroup = Blocking<kBytes>::key_group;
  for (int n0 = 0; n0 < n_keys; n0 += kKeyGroup) {
    const Acc* kr[kKeyGroup];
    for (int kk = 0; kk < kKeyGroup; ++kk) kr[kk] = w.k[n0 + kk];
    V acc[kKeyGroup][kRowVecs] = {};
    for (int d = 0; d < D; ++d) {
      if (d % 8 == 0) prefetch.step();
      V qv[kRowVecs];
      for (int c = 0; c < kRowVecs; ++c) qv[c] = load_vec<V>(&h.qt[d][(c0 + c) * L]);
      for (int kk = 0; kk < kKeyGroup; ++kk) {
        const Acc kd = kr[kk][d];
        for (int c = 0; c < kRowVecs; ++c) acc[kk][c] += kd * qv[c];
      }
    }
    for (int kk = 0; kk < kKeyGroup; ++kk)
      for (int c = 0; c < kRowVecs; ++c) store_vec(&w.st[n0 + kk][(c0 + c) * L], acc[kk][c]);
  }
}

// O[r0, r0 + kRows) x columns [col0, col0 + kColVecs vectors) = O * correction + P . V over the tile's
// keys: each loaded value vector feeds kRows FMAs, and the value columns (16 KB per 64 keys in fp32)
// stay in L1 across the row blocks.
template <typename T, typename Acc, int D, int kBytes, int kRows>
inline __attribute__((always_inline)) void update_rows(const Scratch<Acc, D>& w, RowState<Acc, D>& h,
                                                       PrefetchCursor<T, D>& prefetch, int r0, int col0, int n_keys) {
  using V = typename Vec<Acc, kBytes>::type;
  constexpr int L = Vec<Acc, kBytes>::lanes;
  constexpr int kCols = kColVecs<Acc, D, kBytes>;
  V acc[kRows][kCols];
  for (int m = 0; m < kRows; ++m)
    for (int c = 0; c < kCols; ++c)
      acc[m][c] = load_vec<V>(&h.o[r0 + m][col0 + c * L]) * h.correction[r0 + m];
  for (int n = 0; n < n_keys; ++n) {
    if (n % 2 == 0) prefetch.step();
    V vv[kCols];
    for (int c = 0; c < kCols; ++c) vv[c] = load_vec<V>(&w.v[n][col0 + c * L]);
    for (int m = 0; m < kRows; ++m) {
      const Acc pm = w.st[n][r0 + m];
      for (int c = 0; c < kCols; ++c) acc[m][c] += pm * vv[c];
    }
  }
  for (int m = 0; m < kRows; ++m)
    for (int c = 0; c < kCols; ++c) store_vec(&h.o[r0 + m][col0 + c * L], acc[m][c]);
}

// The key and value rows of key position `key` of (b, kvh): the cache below len, the block's k / v
// above; left untouched when the cache slot has no valid page.
template <typename T>
inline void key_value_rows(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t len, int64_t key,
                           const T*& ks, const T*& vs) {
  if (key >= len) {
    const int64_t j = key - len;
    ks = elem<T>(p.k, b * p.k_batch_stride + j * p.k_seq_stride + kvh * p.k_head_stride);
    vs = elem<T>(p.v, b * p.v_batch_stride + j * p.v_seq_stride + kvh * p.v_head_stride);
    return;
  }
  int64_t page, slot;
  if (!attn_cache_slot(p, b, key, page, slot)) return;
  ks = elem<T>(p.k_cache, page * p.k_cache_page_stride + slot * p.k_cache_slot_stride + kvh * p.k_cache_head_stride);
  vs = elem<T>(p.v_cache, page * p.v_cache_page_stride + slot * p.v_cache_slot_stride + kvh * p.v_cache_head_stride);
}

// A row keeps its reference maximum until a tile's scores exceed it by more than this (natural log):
// probabilities then stay below e^8 (sums stay far from fp32 overflow) and the output accumulators need
// rescaling only when a row's maximum jumps, typically once per row, at its first tile.
constexpr float kRescaleMargin = 8.0f;

// Masks the scores st[0, nt)[rows] of the key tile at k0 (only tiles that reach the block need it), then
// turns them into unnormalised probabilities exp(s - m) on whole row vectors (no horizontal reductions),
// m being each row's reference maximum (row_max, moved up to the tile's maximum when that exceeds it by
// more than kRescaleMargin). row_sum is updated and correction holds exp(old m - new m), for rescaling the
// output accumulators; returns whether any row's correction differs from 1. tick() is called every few
// keys, softmax_ticks(nt) times per row vector: the AMX path issues tile products there.
constexpr int softmax_ticks(int nt) { return nt / 32 + nt / 4; }
template <typename Acc, int kBytes, size_t kStride, typename Tick>
inline __attribute__((always_inline)) bool online_softmax(const CacheAttnParams& p, int64_t len, int64_t k0, int nt,
                                                          int row_vecs, Acc (*st)[kStride], const int64_t* row_query,
                                                          Acc* row_max, Acc* row_sum, Acc* correction_out,
                                                          Tick&& tick) {
  using V = typename Vec<Acc, kBytes>::type;
  constexpr int L = Vec<Acc, kBytes>::lanes;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int padded = row_vecs * L;
  if (k0 + nt > len)
    for (int n = 0; n < nt; ++n)
      if (k0 + n >= len)
        for (int r = 0; r < padded; ++r)
          if (!attn_visible(k0 + n, row_query[r], len, p.q_len, p.causal)) st[n][r] = neg_inf;
  bool rescaled = false;
  for (int c = 0; c < row_vecs; ++c) {
    const V old_max = load_vec<V>(&row_max[c * L]);
    V tile_max = old_max;
    for (int n = 0; n < nt; ++n) {
      const V s = load_vec<V>(&st[n][c * L]);
      tile_max = s > tile_max ? s : tile_max;
      if (n % 32 == 31) tick();
    }
    // -inf + margin stays -inf: a row that had seen nothing takes the tile's maximum.
    const auto keep = tile_max <= old_max + Acc(kRescaleMargin);
    const V new_max = keep ? old_max : tile_max;
    const V base = new_max == neg_inf ? V{} : new_max;  // nothing visible yet: p = 0, no NaN
    const V one = V{} + Acc(1);
    const V correction = keep ? one : softmax_exp(old_max - base);  // exp(-inf) = 0 for a fresh row
    V sum{};
    for (int n = 0; n < nt; ++n) {
      const V e = softmax_exp(load_vec<V>(&st[n][c * L]) - base);
      store_vec(&st[n][c * L], e);
      sum += e;
      if (n % 4 == 3) tick();
    }
    store_vec(&row_sum[c * L], load_vec<V>(&row_sum[c * L]) * correction + sum);
    store_vec(&row_max[c * L], new_max);
    store_vec(&correction_out[c * L], correction);
    for (int l = 0; l < L; ++l) rescaled |= correction[l] != Acc(1);
  }
  return rescaled;
}

// Lists the rows of the key tile at `next` (up to kKeyTile keys below n_keys) in w.next_rows and
// returns a cursor over their lines.
template <typename T, int D, typename W>
inline PrefetchCursor<T, D> plan_prefetch(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t len, int64_t next,
                                          int64_t n_keys, W& w) {
  const int count = int(std::clamp<int64_t>(n_keys - next, 0, kKeyTile));
  for (int n = 0; n < count; ++n) {
    const T* next_k = reinterpret_cast<const T*>(&w);  // the scratch stands in for a missing page
    const T* next_v = next_k;
    key_value_rows(p, b, kvh, len, next + n, next_k, next_v);
    w.next_rows[2 * n] = reinterpret_cast<const char*>(next_k);
    w.next_rows[2 * n + 1] = reinterpret_cast<const char*>(next_v);
  }
  return {w.next_rows, 0, 2 * count * kRowLines<T, D>};
}

// Loads rows [row0, row0 + rows) of (b, kvh) into qt as scaled, transposed queries (padding rows up to
// `padded` are 0 and repeat the last row's query position) and resets w's output and softmax state.
// Returns the number of keys to visit: those past the last one visible to these rows are skipped.
template <typename T, int D, typename Acc, size_t kStride, typename W>
inline int64_t start_rows(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t row0, int64_t rows, int padded,
                          int64_t len, Acc (*qt)[kStride], W& w) {
  int64_t last_query = 0;
  for (int r = 0; r < padded; ++r) {
    const bool real = r < rows;
    const int64_t row = row0 + (real ? r : rows - 1);
    const int64_t i = row / p.group, h = kvh * p.group + row % p.group;
    w.row_query[r] = i;
    last_query = std::max(last_query, i);
    const T* src = elem<T>(p.q, b * p.q_batch_stride + i * p.q_seq_stride + h * p.q_head_stride);
    for (int d = 0; d < D; ++d) qt[d][r] = real ? Acc(to_compute(src[d])) * Acc(p.scale) : Acc(0);
    for (int d = 0; d < D; ++d) w.o[r][d] = Acc(0);
    w.row_max[r] = -std::numeric_limits<Acc>::infinity();
    w.row_sum[r] = Acc(0);
  }
  return len + (p.causal ? last_query + 1 : p.q_len);
}

// Normalises and stores the output rows and their log-sum-exp.
template <typename T, int D, typename W>
inline void finish_rows(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t row0, int64_t rows, const W& w) {
  using Acc = std::remove_cv_t<std::remove_reference_t<decltype(w.row_max[0])>>;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r, i = row / p.group, h = kvh * p.group + row % p.group;
    const Acc inv = Acc(1) / w.row_sum[r];
    T* dst = static_cast<T*>(p.out) + ((b * p.q_len + i) * p.n_heads + h) * D;
    for (int d = 0; d < D; ++d) dst[d] = to_storage<T>(w.o[r][d] * inv);
    p.lse[(b * p.n_heads + h) * p.q_len + i] = float(w.row_max[r] + std::log(w.row_sum[r]));
  }
}

// Attention for rows [row0, row0 + rows) of kv heads [kvh0, kvh0 + n_group) of batch b. Heads are the
// inner loop: each key tile is read head after head, so a multi-head item reads whole token rows of a
// token-major cache within a tile.
template <typename T, typename Acc, int D, int kBytes>
inline __attribute__((always_inline)) void attend_rows(const CacheAttnParams& p, int64_t b, int64_t kvh0,
                                                       int n_group, int64_t row0, int64_t rows, Scratch<Acc, D>& w) {
  constexpr int L = Vec<Acc, kBytes>::lanes;
  constexpr int kKeyGroup = Blocking<kBytes>::key_group;
  const int64_t len = attn_cache_len(p, b);
  const int row_vecs = int((rows + L - 1) / L);
  if (int(w.heads.size()) < n_group) w.heads.resize(n_group);
  int64_t n_keys = 0;
  for (int g = 0; g < n_group; ++g)
    n_keys = start_rows<T, D>(p, b, kvh0 + g, row0, rows, row_vecs * L, len, w.heads[g].qt, w.heads[g]);

  for (int64_t k0 = 0; k0 < n_keys; k0 += kKeyTile) {
    const int nt = int(std::min<int64_t>(kKeyTile, n_keys - k0));
    const int nt_padded = (nt + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
    for (int g = 0; g < n_group; ++g) {
      RowState<Acc, D>& h = w.heads[g];
      const int64_t kvh = kvh0 + g;
      for (int n = 0; n < nt_padded; ++n) {
        const T* ks = nullptr;
        const T* vs = nullptr;
        if (n < nt) key_value_rows(p, b, kvh, len, k0 + n, ks, vs);
        // Copied even when no conversion is needed: consecutive keys of a token-major cache are a whole
        // token's heads apart (4 KB in the benchmark shape), so the rows in place would all map to the
        // same few L1 sets and be refetched by every row block.
        if (ks) {
          widen_row<kBytes>(ks, D, w.k[n]);
          widen_row<kBytes>(vs, D, w.v[n]);
        } else {
          for (int d = 0; d < D; ++d) w.k[n][d] = w.v[n][d] = Acc(0);
        }
      }
      // The next (tile, head) of the loop.
      PrefetchCursor<T, D> prefetch =
          g + 1 < n_group ? plan_prefetch<T, D>(p, b, kvh + 1, len, k0, n_keys, w)
                          : plan_prefetch<T, D>(p, b, kvh0, len, k0 + kKeyTile, n_keys, w);

      for (int c0 = 0; c0 < row_vecs; c0 += 2) {
        if (c0 + 1 < row_vecs) score_rows<T, Acc, D, kBytes, 2>(w, h, prefetch, c0, nt_padded);
        else score_rows<T, Acc, D, kBytes, 1>(w, h, prefetch, c0, nt_padded);
      }

      online_softmax<Acc, kBytes>(p, len, k0, nt, row_vecs, w.st, h.row_query, h.row_max, h.row_sum, h.correction,
                                  [] {});

      // O = O * correction + P . V in blocks of kRowBlock rows x kColVecs vectors of columns.
      for (int col0 = 0; col0 < D; col0 += kColVecs<Acc, D, kBytes> * L)
        for (int r0 = 0; r0 < int(rows); r0 += kRowBlock) {
          switch (std::min<int>(kRowBlock, int(rows) - r0)) {
            case 1: update_rows<T, Acc, D, kBytes, 1>(w, h, prefetch, r0, col0, nt); break;
            case 2: update_rows<T, Acc, D, kBytes, 2>(w, h, prefetch, r0, col0, nt); break;
            case 3: update_rows<T, Acc, D, kBytes, 3>(w, h, prefetch, r0, col0, nt); break;
            case 4: update_rows<T, Acc, D, kBytes, 4>(w, h, prefetch, r0, col0, nt); break;
            case 5: update_rows<T, Acc, D, kBytes, 5>(w, h, prefetch, r0, col0, nt); break;
            default: update_rows<T, Acc, D, kBytes, kRowBlock>(w, h, prefetch, r0, col0, nt);
          }
        }
    }
  }

  for (int g = 0; g < n_group; ++g) finish_rows<T, D>(p, b, kvh0 + g, row0, rows, w.heads[g]);
}

template <typename Acc, int D>
using AttendFn = void (*)(const CacheAttnParams&, int64_t, int64_t, int, int64_t, int64_t, Scratch<Acc, D>&);

// The FMA kernel's entry points: one non-template function per storage type, head_dim and vector width
// (cpu_vector.h), each compiled for its instruction set (called inside the OpenMP region: the outlined
// region itself is compiled for the baseline target); FmaAttend<T, D, bytes>::fn names it.
template <typename T, int D, int kBytes>
struct FmaAttend;
#define R2LM_FMA_ATTEND(suffix, bytes, target, T, Acc, D)                                                   \
  target void attend_##suffix##_v##bytes(const CacheAttnParams& p, int64_t b, int64_t kvh0, int n_group,    \
                                         int64_t row0, int64_t rows, Scratch<Acc, D>& w) {                  \
    attend_rows<T, Acc, D, bytes>(p, b, kvh0, n_group, row0, rows, w);                                     \
  }                                                                                                        \
  template <>                                                                                              \
  struct FmaAttend<T, D, bytes> {                                                                          \
    static constexpr AttendFn<Acc, D> fn = &attend_##suffix##_v##bytes;                                     \
  };
#define R2LM_FMA_ATTEND_AT(bytes, target)                                                                  \
  R2LM_FMA_ATTEND(f32_64, bytes, target, float, float, 64)                                                 \
  R2LM_FMA_ATTEND(f32_128, bytes, target, float, float, 128)                                               \
  R2LM_FMA_ATTEND(f16_64, bytes, target, Half16, float, 64)                                                \
  R2LM_FMA_ATTEND(f16_128, bytes, target, Half16, float, 128)                                              \
  R2LM_FMA_ATTEND(bf16_64, bytes, target, BFloat16Bits, float, 64)                                         \
  R2LM_FMA_ATTEND(bf16_128, bytes, target, BFloat16Bits, float, 128)                                       \
  R2LM_FMA_ATTEND(f64_64, bytes, target, double, double, 64)                                               \
  R2LM_FMA_ATTEND(f64_128, bytes, target, double, double, 128)
R2LM_FOR_EACH_VECTOR_WIDTH(R2LM_FMA_ATTEND_AT)
#undef R2LM_FMA_ATTEND_AT
#undef R2LM_FMA_ATTEND

#ifdef R2LM_ATTENTION_AMX
// AMX path (x86 CPUs with AMX-BF16: Sapphire Rapids and later). Both matmuls of a tile run on the tile unit,
// which multiplies bf16 pairs into fp32 sums at ~15x the FMA rate. fp32 accuracy comes from splitting every
// operand exactly into three bf16 parts, x = x0 + x1 + x2 (8 significant bits each), and summing the six part
// products a_i b_j with i + j <= 2: the three left out are below 2^-24 of the product, the size of fp32
// rounding; half-precision inputs need fewer parts (see Parts). The tile unit reads parts below 2^-126 as 0
// and flushes tiny products: inputs below about 2^-110 lose accuracy, and below about 2^-120 (fp32 subnormals
// included) they are effectively 0 - far outside what attention sees. Scores are computed key-major (S^T = K
// Q^T, so the key tile is used as stored and the softmax runs on row vectors as in the FMA path); P . V then
// needs P row-major, one transpose per tile (16 x 16 blocks). The work is software-pipelined across heads so
// that the tile unit and the vector units run side by side (see attend_rows).
namespace amx {

#define R2LM_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")))

// The part products a_i b_j of a matmul, ordered so that each product changes only one operand from the
// last (the other's tiles stay loaded).
struct ProductList {
  int count;
  int a[6], b[6];
};

// How many bf16 parts each operand is split into, and which part products a matmul sums, by input dtype. A
// cache row (keys, values) needs the parts that hold it exactly: 1 for bf16, 2 for fp16 (11 significant bits),
// 3 for fp32 (24). The computed operands (scaled queries, probabilities) get 3 parts for fp32 inputs and 2 for
// half inputs (16 bits: truncation shrinks them by less than 2^-16), and the products kept are those with i +
// j <= 2 for fp32 (the terms left out are below 2^-24 of the product) and i + j <= 1 for half inputs (below
// 2^-16): far under the rounding of a half-precision output (2^-11 for fp16). Scores: A = keys, B = queries; P
// . V: A = probabilities, B = values.
template <typename T>
struct Parts;
template <>
struct Parts<float> {
  static constexpr int stored = 3, computed = 3;
  static constexpr ProductList scores{6, {0, 0, 1, 1, 0, 2}, {2, 1, 1, 0, 0, 0}};  // 14 tile loads a step, not 24
  static constexpr ProductList values = scores;
};
template <>
struct Parts<Half16> {
  static constexpr int stored = 2, computed = 2;
  static constexpr ProductList scores{3, {0, 0, 1}, {1, 0, 0}};
  static constexpr ProductList values = scores;
};
template <>
struct Parts<BFloat16Bits> {
  static constexpr int stored = 1, computed = 2;
  static constexpr ProductList scores{2, {0, 0}, {0, 1}};
  static constexpr ProductList values{2, {0, 1}, {0, 0}};
};

// Keys per tile. The tile products stream their operands from L2, so the heads' state must stay in it:
// 32 keys keep it at ~215 KB per head at head_dim 128 (queries' parts 61 KB, double-buffered key and
// value parts 61 + 55 KB, output 37 KB), 1.7 MB for kGroupHeads heads.
constexpr int kKeys = 32;
// kv heads per work item: a tile is then read as whole token rows of the cache (heads side by side), in
// order, which the hardware prefetchers follow (4-head items, reading half rows, measured ~1 ms slower;
// software prefetch slower still).
constexpr int kGroupHeads = 8;

using VF = Vec<float>::type;
using VU = uint32_t __attribute__((vector_size(64)));

// The first kParts bf16 parts of 16 pairs of floats (lo[l], hi[l]), each pair packed in one 32-bit word
// (lo in the low half), the element order of tile rows: a tile row's 32-bit word k multiplies word k of
// the other operand's row pairwise. Which elements are paired is free as long as both operands pair them
// alike; pairing element l of one 16-float vector with element l of another costs a shift and a
// bitwise select per part. Truncation makes every remainder exact: x - x0 keeps the low 16
// significant bits, and x1 the top 8 of those.
template <int kParts>
inline __attribute__((always_inline)) void split_pairs(VF lo, VF hi, VU part[kParts]) {
  const VU high = VU{} + 0xFFFF0000u;
  for (int i = 0; i < kParts; ++i) {
    part[i] = ((VU)lo >> 16) | ((VU)hi & high);
    lo -= (VF)((VU)lo & high);
    hi -= (VF)((VU)hi & high);
  }
}

// 16 elements of a cache row as floats.
template <typename T>
R2LM_AMX_TARGET inline __attribute__((always_inline)) VF load_floats(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return load_vec<VF>(src);
  } else {
    using VH = uint16_t __attribute__((vector_size(32)));
    const VH bits = load_vec<VH>(src);
    if constexpr (std::is_same_v<T, Half16>) return (VF)_mm512_maskz_cvtph_ps(0xFFFF, (__m256i)bits);
    else return (VF)(__builtin_convertvector(bits, VU) << 16);  // bf16: the top half of a float
  }
}

// Stands in for keys past the tile's end and for missing pages (all-zero bits are +0 in every dtype).
template <typename T, int D>
alignas(64) constexpr T kZeroRow[D] = {};

// Transposes a 16 x 16 block of floats held as 16 row vectors: 4 rounds of two-source shuffles (unpack
// pairs, then 2 x 2 blocks within 128-bit lanes, then 128-bit lanes twice).
inline __attribute__((always_inline)) void transpose16(VF rows[16]) {
  using VI = int32_t __attribute__((vector_size(64)));
  const VI unpack_lo = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29};
  const VI unpack_hi = unpack_lo + 2;
  const VI pairs_lo = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const VI pairs_hi = pairs_lo + 2;
  const VI lanes_even = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const VI lanes_odd = lanes_even + 4;
  VF t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = __builtin_shuffle(rows[i], rows[i + 1], unpack_lo);
    t[i + 1] = __builtin_shuffle(rows[i], rows[i + 1], unpack_hi);
  }
  // u[4g + c]: in each 128-bit lane, column c of that lane's 4 columns, rows 4g .. 4g + 3.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = __builtin_shuffle(t[4 * g], t[4 * g + 2], pairs_lo);
    u[4 * g + 1] = __builtin_shuffle(t[4 * g], t[4 * g + 2], pairs_hi);
    u[4 * g + 2] = __builtin_shuffle(t[4 * g + 1], t[4 * g + 3], pairs_lo);
    u[4 * g + 3] = __builtin_shuffle(t[4 * g + 1], t[4 * g + 3], pairs_hi);
  }
  // Column 4 * lane + c gathers lane `lane` of u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const VF even01 = __builtin_shuffle(u[c], u[4 + c], lanes_even);
    const VF odd01 = __builtin_shuffle(u[c], u[4 + c], lanes_odd);
    const VF even23 = __builtin_shuffle(u[8 + c], u[12 + c], lanes_even);
    const VF odd23 = __builtin_shuffle(u[8 + c], u[12 + c], lanes_odd);
    rows[c] = __builtin_shuffle(even01, even23, lanes_even);
    rows[8 + c] = __builtin_shuffle(even01, even23, lanes_odd);
    rows[4 + c] = __builtin_shuffle(odd01, odd23, lanes_even);
    rows[12 + c] = __builtin_shuffle(odd01, odd23, lanes_odd);
  }
}

// One kv head's state in the AMX path. The key / value parts are double-buffered by tile parity: the
// next tile's parts are split while this tile's are still being multiplied.
template <int D>
struct HeadState {
  alignas(64) uint32_t qv[3][D / 2][kRowTile + kPad];  // the scaled queries' parts, dims d, d + 16 paired (B tiles)
  alignas(64) uint32_t kp[2][3][kKeys][D / 2 + kPad];   // key tile parts, dims d, d + 16 paired (A tiles)
  alignas(64) uint32_t vv[2][3][kKeys / 2][D + kPad];   // value tile parts, keys n, n + 16 paired (B tiles)
  alignas(64) float o[kRowTile][D + kPad];              // unnormalised output accumulators
  alignas(64) float row_max[kRowTile], row_sum[kRowTile], correction[kRowTile];
  int64_t row_query[kRowTile];
};

// Per-thread scratch of the AMX path: the heads of a work item, and what the heads in flight need.
template <int D>
struct Scratch {
  std::vector<HeadState<D>> heads;
  alignas(64) float qt[D][kRowTile];                       // a head's scaled queries, transposed, while split
  alignas(64) float st[2][kKeys][kRowTile];                // scores, then probabilities, key-major: two steps
  alignas(64) uint32_t pp[3][kRowTile][kKeys / 2 + kPad];  // probability parts, keys n, n + 16 paired (A tiles)
};

// Palette 1, tiles 0-3 accumulators, 4-5 A, 6-7 B: all 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// One matmul on the tile unit, C (+)= the sum of the part products A_i B_j in kList, issued one part product
// at a time so that vector work can run between them: m_tiles x n_tiles output tiles of 16 x 16 floats, walked
// in blocks of up to 2 x 2 (tile (m, c) of a block is accumulator 2m + c; all 8 tile registers), k_steps steps
// of 32 bf16 of the inner dimension, steps outer so that a step's tiles of all parts stay in L1 while the part
// products reuse them. Addresses in bytes: A tile (part i, row tile m, step s) at a + i a_part + 16 m a_stride
// + 64 s; B tile (part j, column tile n, step s) at b + j b_part + 16 s b_stride + 64 n; C tile (m, n) at c +
// 16 m c_stride + 64 n. A job with m_tiles = 0 is empty.
template <ProductList kList>
struct TileJob {
  const char* a = nullptr;
  int64_t a_part = 0, a_stride = 0;
  const char* b = nullptr;
  int64_t b_part = 0, b_stride = 0;
  char* c = nullptr;
  int64_t c_stride = 0;
  bool accumulate = false;  // a block starts from C as stored (else from 0)
  int m_tiles = 0, n_tiles = 0, k_steps = 0;
  // The next product: block origin (in tiles), and k-step * kList.count + product within the block. One
  // int: two adjacent ones were tested for zero with one 8-byte load, which cannot forward from the two
  // 4-byte stores just made and so waited for every older store, the last block's tile stores included.
  int bm = 0, bn = 0, position = 0;

  bool done() const { return bm >= m_tiles; }
  int products() const { return (m_tiles + 1) / 2 * ((n_tiles + 1) / 2) * k_steps * kList.count; }

  R2LM_AMX_TARGET inline __attribute__((always_inline)) void issue() {
    const bool two_m = bm + 1 < m_tiles, two_n = bn + 1 < n_tiles;
    const int step = position / kList.count, product = position % kList.count;
    char* c0 = c + 16 * bm * c_stride + 64 * bn;
    if (position == 0) {
      if (accumulate) {
        _tile_loadd(0, c0, c_stride);
        if (two_n) _tile_loadd(1, c0 + 64, c_stride);
        if (two_m) _tile_loadd(2, c0 + 16 * c_stride, c_stride);
        if (two_m && two_n) _tile_loadd(3, c0 + 16 * c_stride + 64, c_stride);
      } else {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      }
    }
    const char* a0 = a + kList.a[product] * a_part + 16 * bm * a_stride + 64 * step;
    const char* b0 = b + kList.b[product] * b_part + 16 * step * b_stride + 64 * bn;
    const bool new_a = product == 0 || kList.a[product] != kList.a[product - 1];
    const bool new_b = product == 0 || kList.b[product] != kList.b[product - 1];
    if (new_a) _tile_loadd(4, a0, a_stride);
    if (new_b) _tile_loadd(6, b0, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (two_m) {
      if (new_a) _tile_loadd(5, a0 + 16 * a_stride, a_stride);
      _tile_dpbf16ps(2, 5, 6);
    }
    if (two_n) {
      if (new_b) _tile_loadd(7, b0 + 64, b_stride);
      _tile_dpbf16ps(1, 4, 7);
      if (two_m) _tile_dpbf16ps(3, 5, 7);
    }
    if (++position < k_steps * kList.count) return;
    position = 0;
    _tile_stored(0, c0, c_stride);
    if (two_n) _tile_stored(1, c0 + 64, c_stride);
    if (two_m) _tile_stored(2, c0 + 16 * c_stride, c_stride);
    if (two_m && two_n) _tile_stored(3, c0 + 16 * c_stride + 64, c_stride);
    bn += 2;
    if (bn >= n_tiles) bn = 0, bm += 2;
  }
};

// Runs a tile job alongside vector work. The tile unit and the vector units work in parallel (a product
// blocks one of the two vector ports while it runs), but the core only overlaps what sits close together
// in the instruction stream, so the vector work ticks (calls the pacer) every ~60-100 vector
// instructions and each tick issues the products due by then: `ticks` ticks are expected for the whole
// job. finish() issues what is left once the vector work is done. operator() is not always_inline: the
// shared online_softmax, compiled for the baseline target, calls it; the AMX entry points are flattened,
// which inlines it there.
template <typename Job>
struct Pacer {
  Job& job;
  const int64_t products, ticks;
  int64_t credit = 0;

  Pacer(Job& job, int64_t ticks) : job(job), products(job.products()), ticks(std::max<int64_t>(ticks, 1)) {
    // The tile loads read operands that earlier phases stored with plain stores: the tile intrinsics'
    // asm declares no memory operands, so a compiler barrier keeps those stores ahead of them.
    __asm__ volatile("" ::: "memory");
  }
  R2LM_AMX_TARGET inline void operator()() {
    for (credit += products; credit >= ticks && !job.done(); credit -= ticks) job.issue();
  }
  R2LM_AMX_TARGET inline __attribute__((always_inline)) void finish() {
    while (!job.done()) job.issue();
    __asm__ volatile("" ::: "memory");  // the tile stores before the plain loads that follow
  }
};

// S^T = K . Q^T of one head for the key tile in buffer `buf`, into st (key-major).
template <typename T, int D>
TileJob<Parts<T>::scores> score_job(HeadState<D>& h, int buf, float (*st)[kRowTile], int row_tiles) {
  TileJob<Parts<T>::scores> job;
  job.a = reinterpret_cast<const char*>(h.kp[buf]);
  job.a_part = sizeof(h.kp[buf][0]);
  job.a_stride = sizeof(h.kp[buf][0][0]);
  job.b = reinterpret_cast<const char*>(h.qv);
  job.b_part = sizeof(h.qv[0]);
  job.b_stride = sizeof(h.qv[0][0]);
  job.c = reinterpret_cast<char*>(st);
  job.c_stride = sizeof(st[0]);
  job.m_tiles = kKeys / 16;
  job.n_tiles = row_tiles;
  job.k_steps = D / 32;
  return job;
}

// O += P . V of one head for the value tile in buffer `buf` (P's parts in w.pp). Accumulating in place
// (O's tiles loaded at each block's start) measured faster than storing P . V for the vector units to add.
template <typename T, int D>
TileJob<Parts<T>::values> value_job(HeadState<D>& h, int buf, Scratch<D>& w, int row_tiles) {
  TileJob<Parts<T>::values> job;
  job.a = reinterpret_cast<const char*>(w.pp);
  job.a_part = sizeof(w.pp[0]);
  job.a_stride = sizeof(w.pp[0][0]);
  job.b = reinterpret_cast<const char*>(h.vv[buf]);
  job.b_part = sizeof(h.vv[buf][0]);
  job.b_stride = sizeof(h.vv[buf][0][0]);
  job.c = reinterpret_cast<char*>(h.o);
  job.c_stride = sizeof(h.o[0]);
  job.accumulate = true;
  job.m_tiles = row_tiles;
  job.n_tiles = D / 16;
  job.k_steps = kKeys / 32;
  return job;
}

// Ticks per key pair and head of split_key_pairs.
constexpr int kSplitTicks = 4;

// Splits the key / value rows of the key pairs [pair0, pair1) of the tile at k0 (nt keys) for heads
// [kvh0, kvh0 + n_group) into buffer `buf` of the heads' parts; keys past the tile's end (and missing
// pages) are 0. Pair q is keys n = q / 16 * 32 + q % 16 and n + 16 (value rows pair them, as the
// probabilities do); key rows pair dims d and d + 16 of each 32-dim step (the queries do the same). Token
// by token, all heads: in a token-major cache that reads whole token rows in order, which the hardware
// prefetchers follow.
template <typename T, int D, typename Tick>
R2LM_AMX_TARGET inline __attribute__((always_inline)) void split_key_pairs(const CacheAttnParams& p, int64_t b,
                                                                           int64_t kvh0, int n_group, int64_t len,
                                                                           int64_t k0, int nt, int pair0, int pair1,
                                                                           int buf, HeadState<D>* heads,
                                                                           Tick&& tick) {
  constexpr int L = Vec<float>::lanes;
  constexpr int kParts = Parts<T>::stored;
  for (int q = pair0; q < pair1; ++q) {
    const int n = q / 16 * 32 + q % 16;
    for (int g = 0; g < n_group; ++g) {
      HeadState<D>& h = heads[g];
      const T* krow[2];
      const T* vrow[2];
      for (int e = 0; e < 2; ++e) {
        krow[e] = vrow[e] = nullptr;
        if (n + 16 * e < nt) key_value_rows(p, b, kvh0 + g, len, k0 + n + 16 * e, krow[e], vrow[e]);
        if (!krow[e]) krow[e] = vrow[e] = kZeroRow<T, D>;
      }
      VU part[kParts];
      for (int e = 0; e < 2; ++e) {
        for (int d = 0; d < D; d += 32) {
          split_pairs<kParts>(load_floats(&krow[e][d]), load_floats(&krow[e][d + 16]), part);
          for (int i = 0; i < kParts; ++i) store_vec(&h.kp[buf][i][n + 16 * e][d / 2], part[i]);
        }
        tick();
      }
      for (int d = 0; d < D; d += L) {
        split_pairs<kParts>(load_floats(&vrow[0][d]), load_floats(&vrow[1][d]), part);
        for (int i = 0; i < kParts; ++i) store_vec(&h.vv[buf][i][n / 32 * 16 + n % 32][d], part[i]);
        if (d % (D / 2) == D / 2 - L) tick();
      }
    }
  }
}

// Ticks per row tile of softmax_and_split for a whole tile: the softmax's, then 6 per 32 keys for the
// transpose and split.
constexpr int kProbabilityTicks = softmax_ticks(kKeys) + kKeys / 32 * 6;

// Online softmax of one head over the key tile at k0 (scores in st), then P row-major (keys past the
// tile's end have probability 0) split into w.pp.
template <typename T, int D, typename Tick>
R2LM_AMX_TARGET inline __attribute__((always_inline)) void softmax_and_split(const CacheAttnParams& p, int64_t len,
                                                                             int64_t k0, int nt, int row_tiles,
                                                                             float (*st)[kRowTile], HeadState<D>& h,
                                                                             Scratch<D>& w, Tick&& tick) {
  constexpr int L = Vec<float>::lanes;
  constexpr int kParts = Parts<T>::computed;
  const bool rescale =
      online_softmax<float, 64>(p, len, k0, nt, row_tiles, st, h.row_query, h.row_max, h.row_sum, h.correction, tick);
  for (int n = nt; n < kKeys; ++n)
    for (int r = 0; r < row_tiles * 16; ++r) st[n][r] = 0.0f;
  for (int rt = 0; rt < row_tiles; ++rt)
    for (int kt = 0; kt < kKeys / 16; kt += 2) {
      VF block[2][16];  // key tiles kt and kt + 1, transposed: row i holds its 16 keys for row rt * 16 + i
      for (int half = 0; half < 2; ++half) {
        for (int i = 0; i < 16; ++i) block[half][i] = load_vec<VF>(&st[(kt + half) * 16 + i][rt * 16]);
        transpose16(block[half]);
        tick();
      }
      for (int i = 0; i < 16; ++i) {
        VU part[kParts];
        split_pairs<kParts>(block[0][i], block[1][i], part);
        for (int j = 0; j < kParts; ++j) store_vec(&w.pp[j][rt * 16 + i][kt * 8], part[j]);
        if (i % 4 == 3) tick();
      }
    }
  if (rescale && k0 > 0)  // at the first tile O is still 0
    for (int r = 0; r < row_tiles * 16; ++r)
      for (int d = 0; d < D; d += L) store_vec(&h.o[r][d], load_vec<VF>(&h.o[r][d]) * h.correction[r]);
}

// Attention for rows [row0, row0 + rows) of kv heads [kvh0, kvh0 + n_group) of batch b, software-
// pipelined so that the tile unit and the vector units work side by side. Per key tile and head g:
//   phase A: softmax and P split of head g  ||  scores of head g + 1 (of the next tile's first head
//            after the last one);
//   phase B: split of a slice of the next tile's keys / values (token rows, all heads; n_group - 1
//            slices so the next tile is complete before its first head's scores)  ||  P . V of head g.
// With one head per item (MQA, or groups shrunk for small batches) phase B splits the whole next tile and
// each tile's scores run alone at its start.
template <typename T, int D>
R2LM_AMX_TARGET inline __attribute__((always_inline)) void attend_rows(const CacheAttnParams& p, int64_t b,
                                                                       int64_t kvh0, int n_group, int64_t row0,
                                                                       int64_t rows, Scratch<D>& w) {
  constexpr int L = Vec<float>::lanes;
  constexpr int kPairs = kKeys / 2;
  const int64_t len = attn_cache_len(p, b);
  const int row_tiles = int((rows + 15) / 16);  // 16-row tiles; also the softmax's row vectors
  if (int(w.heads.size()) < n_group) w.heads.resize(n_group);
  HeadState<D>* heads = w.heads.data();
  int64_t n_keys = 0;
  for (int g = 0; g < n_group; ++g) {
    HeadState<D>& h = heads[g];
    n_keys = start_rows<T, D>(p, b, kvh0 + g, row0, rows, row_tiles * L, len, w.qt, h);
    // Dims d and d + 16 of each 32-dim step are paired, as in the key rows.
    for (int j = 0; j < D / 2; ++j)
      for (int c = 0; c < row_tiles; ++c) {
        const int d = j / 16 * 32 + j % 16;
        VU part[Parts<T>::computed];
        split_pairs<Parts<T>::computed>(load_vec<VF>(&w.qt[d][c * L]), load_vec<VF>(&w.qt[d + 16][c * L]), part);
        for (int i = 0; i < Parts<T>::computed; ++i) store_vec(&h.qv[i][j][c * L], part[i]);
      }
  }
  const auto tile_keys = [&](int64_t k0) { return int(std::min<int64_t>(kKeys, n_keys - k0)); };
  static const TileConfig config;
  __asm__ volatile("" ::: "memory");
  _tile_loadconfig(&config);
  split_key_pairs<T, D>(p, b, kvh0, n_group, len, 0, tile_keys(0), 0, kPairs, 0, heads, [] {});
  int64_t u = 0;  // (tile, head) steps so far: step u's scores go to st[u % 2]
  for (int64_t k0 = 0; k0 < n_keys; k0 += kKeys) {
    const int buf = int(k0 / kKeys % 2), nt = tile_keys(k0);
    const bool last = k0 + kKeys >= n_keys;
    if (k0 == 0 || n_group == 1) {  // otherwise issued alongside the previous tile's last softmax
      auto scores = score_job<T>(heads[0], buf, w.st[u % 2], row_tiles);
      Pacer(scores, 0).finish();
    }
    for (int g = 0; g < n_group; ++g, ++u) {
      TileJob<Parts<T>::scores> scores;
      if (g + 1 < n_group) scores = score_job<T>(heads[g + 1], buf, w.st[(u + 1) % 2], row_tiles);
      else if (!last && n_group > 1) scores = score_job<T>(heads[0], 1 - buf, w.st[(u + 1) % 2], row_tiles);
      Pacer phase_a(scores, int64_t(row_tiles) * kProbabilityTicks);
      softmax_and_split<T>(p, len, k0, nt, row_tiles, w.st[u % 2], heads[g], w, phase_a);
      phase_a.finish();

      int pair0 = 0, pair1 = 0;
      if (!last && n_group == 1) pair1 = kPairs;
      else if (!last && g + 1 < n_group) pair0 = kPairs * g / (n_group - 1), pair1 = kPairs * (g + 1) / (n_group - 1);
      auto values = value_job<T>(heads[g], buf, w, row_tiles);
      Pacer phase_b(values, int64_t(pair1 - pair0) * n_group * kSplitTicks);
      split_key_pairs<T, D>(p, b, kvh0, n_group, len, k0 + kKeys, last ? 0 : tile_keys(k0 + kKeys), pair0, pair1,
                            1 - buf, heads, phase_b);
      phase_b.finish();
    }
  }
  _tile_release();
  for (int g = 0; g < n_group; ++g) finish_rows<T, D>(p, b, kvh0 + g, row0, rows, heads[g]);
}

// Flattened so that the pacer's ticks inside the shared online_softmax are inlined too; AmxAttend<T, D>::fn
// names the entry point.
template <typename T, int D>
struct AmxAttend;
#define R2LM_ATTEND_ROWS_AMX(suffix, T, D)                                                                   \
  R2LM_AMX_TARGET __attribute__((flatten)) void attend_##suffix(const CacheAttnParams& p, int64_t b,        \
                                                                int64_t kvh0, int n_group, int64_t row0,    \
                                                                int64_t rows, Scratch<D>& w) {              \
    attend_rows<T, D>(p, b, kvh0, n_group, row0, rows, w);                                                   \
  }                                                                                                          \
  template <>                                                                                                \
  struct AmxAttend<T, D> {                                                                                   \
    static constexpr auto fn = &attend_##suffix;                                                             \
  };
R2LM_ATTEND_ROWS_AMX(f32_64, float, 64)
R2LM_ATTEND_ROWS_AMX(f32_128, float, 128)
R2LM_ATTEND_ROWS_AMX(f16_64, Half16, 64)
R2LM_ATTEND_ROWS_AMX(f16_128, Half16, 128)
R2LM_ATTEND_ROWS_AMX(bf16_64, BFloat16Bits, 64)
R2LM_ATTEND_ROWS_AMX(bf16_128, BFloat16Bits, 128)
#undef R2LM_ATTEND_ROWS_AMX
#undef R2LM_AMX_TARGET

// True where the CPU has AMX-BF16 and AVX-512BW and Linux grants the tile state (asked once per process),
// unless R2LM_ATTENTION_CPU_GENERIC is "1" (the tests use it to cover the FMA path too).
bool usable() {
  static const bool granted = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx = (edx >> 22 & 1) && (edx >> 24 & 1);  // AMX-BF16, AMX-TILE
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (!amx || !avx512) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted && !env_is_one("R2LM_ATTENTION_CPU_GENERIC");
}

}  // namespace amx
#endif

// The calling thread's scratch of type W, kept between calls: the AMX scratch is ~1.8 MB, and fresh
// memory on every call would be faulted in (and zeroed by the OS) again each time.
template <typename W>
W& thread_scratch() {
  static thread_local std::unique_ptr<W> scratch(new W());
  return *scratch;
}

// Every (batch, group of up to max_group kv heads, row tile) in parallel, groups shrunk while there
// are fewer work items than threads; each thread owns one scratch.
template <typename W>
void attend_all(const CacheAttnParams& p,
                void (*attend)(const CacheAttnParams&, int64_t, int64_t, int, int64_t, int64_t, W&), int max_group) {
  const int64_t rows = p.q_len * p.group;
  const int64_t row_tiles = (rows + kRowTile - 1) / kRowTile;
#ifdef _OPENMP
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  int64_t group = std::min<int64_t>(max_group, p.n_kv_heads);
  while (group > 1 && p.batch * row_tiles * ((p.n_kv_heads + group - 1) / group) < threads) group = (group + 1) / 2;
  const int64_t groups = (p.n_kv_heads + group - 1) / group;
  const int64_t items = p.batch * groups * row_tiles;
  ParallelErrors errors;  // the scratch allocates inside the region
#pragma omp parallel
  {
    W* scratch = nullptr;
    errors.capture([&] { scratch = &thread_scratch<W>(); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      errors.capture([&] {
        const int64_t tile = item % row_tiles, bg = item / row_tiles;
        const int64_t row0 = tile * kRowTile, kvh0 = bg % groups * group;
        attend(p, bg / groups, kvh0, int(std::min<int64_t>(group, p.n_kv_heads - kvh0)), row0,
               std::min<int64_t>(kRowTile, rows - row0), *scratch);
      });
    }
  }
  errors.rethrow();
}

// Stores the block's k/v at cache slots [len, len + q_len); slots without a valid page are skipped.
template <typename T>
void write_block_kv(const CacheAttnParams& p) {
  const int64_t d = p.head_dim;
#pragma omp parallel for collapse(2) if (p.batch * p.q_len * p.n_kv_heads * d > 65536)
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.q_len; ++i) {
      int64_t page, slot;
      if (!attn_cache_slot(p, b, attn_cache_len(p, b) + i, page, slot)) continue;
      const int64_t ko = page * p.k_cache_page_stride + slot * p.k_cache_slot_stride;
      const int64_t vo = page * p.v_cache_page_stride + slot * p.v_cache_slot_stride;
      for (int64_t h = 0; h < p.n_kv_heads; ++h) {
        std::memcpy(static_cast<T*>(p.k_cache) + ko + h * p.k_cache_head_stride,
                    elem<T>(p.k, b * p.k_batch_stride + i * p.k_seq_stride + h * p.k_head_stride), d * sizeof(T));
        std::memcpy(static_cast<T*>(p.v_cache) + vo + h * p.v_cache_head_stride,
                    elem<T>(p.v, b * p.v_batch_stride + i * p.v_seq_stride + h * p.v_head_stride), d * sizeof(T));
      }
    }
}

}  // namespace

void cache_attention_cpu(const CacheAttnParams& p, bool write_kv) {
  // f(T{}, head_dim as an integral_constant) for the call's storage type T (fp16 / bf16 as bit patterns).
  const auto with_type_and_dim = [&p](auto&& f) {
    const auto at_dim = [&p, &f](auto type) {
      if (p.head_dim == 64) f(type, std::integral_constant<int, 64>{});
      else f(type, std::integral_constant<int, 128>{});
    };
    switch (p.dtype) {
      case DType::kFloat32: at_dim(float{}); break;
      case DType::kFloat16: at_dim(Half16{}); break;
      case DType::kBFloat16: at_dim(BFloat16Bits{}); break;
      case DType::kFloat64: at_dim(double{}); break;
    }
  };
  cpu_vector_bytes();  // a bad R2LM_CPU_VECTOR_BYTES raises on the tile unit's path too, which ignores it
  bool attended = false;
#ifdef R2LM_ATTENTION_AMX
  // Below one 16-row tile per kv head (plain decode) the tile unit computes padding rows; for fp32, where
  // it sums six part products, the FMA path is then as fast up to caches of ~64 MB and within ~10% beyond.
  // Half-precision inputs take the tile unit at every size (plain decode, batch 8, cache 4096, 32 / 8 heads:
  // bf16 11.7 ms on the FMA path, 7.5 on the tile unit).
  const bool half = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  if (p.dtype != DType::kFloat64 && (half || p.q_len * p.group >= 16) && amx::usable()) {
    with_type_and_dim([&](auto type, auto dim) {
      using T = decltype(type);
      if constexpr (!std::is_same_v<T, double>) attend_all(p, amx::AmxAttend<T, dim.value>::fn, amx::kGroupHeads);
    });
    attended = true;
  }
#endif
  if (!attended) with_cpu_vector_width([&](auto width) {
    const int group = p.q_len * p.group <= kFmaSharedRows ? kFmaGroupHeads : 1;
    with_type_and_dim([&](auto type, auto dim) {
      attend_all(p, FmaAttend<decltype(type), dim.value, width.value>::fn, group);
    });
  });
  if (write_kv) with_type_and_dim([&](auto type, auto) { write_block_kv<decltype(type)>(p); });
}

}  // namespace r2lm
