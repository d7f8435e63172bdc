// cache_attention CPU kernel: FlashAttention-style tiles with an online softmax.
//
// One work item = (batch, kv head, tile of up to kRowTile rows), rows being the q_len x group queries
// that share the kv head, so every key/value tile is loaded (and converted) once for all of them; that
// reuse is what a per-head attention with repeated KV cannot get. Scores and the P.V update use GCC
// vector types (one 64-byte vector = 16 floats or 8 doubles) with register blocking over rows; the
// hot function is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include "cache_attention/cache_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

// The 64-byte vector helpers are always inlined, so the vector-passing ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace r2lm {
namespace {

constexpr int kKeyTile = 64;   // keys per tile
constexpr int kRowTile = 64;   // rows per work item
constexpr int kKeyGroup = 8;   // keys per score micro-kernel (tiles are padded to a multiple)
constexpr int kRowBlock = 6;   // rows per P . V micro-kernel: 6 x 4 accumulator vectors + 4 value vectors

template <typename Acc>
struct Vec {
  typedef Acc type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(Acc);
};

// Value columns per P . V micro-kernel: 4 vectors (64 floats), or the whole head when narrower.
template <typename Acc, int D>
constexpr int kColVecs = D / Vec<Acc>::lanes < 4 ? D / Vec<Acc>::lanes : 4;

// 64-byte cache lines per key / value row.
template <typename T, int D>
constexpr int kRowLines = (D * int(sizeof(T)) + 63) / 64;

template <typename V>
inline V load_vec(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void store_vec(void* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }

// Storage element -> accumulator conversions (fp16 / bf16 are passed as raw 16-bit patterns).
template <typename Acc> inline Acc to_acc(float x) { return Acc(x); }
template <typename Acc> inline Acc to_acc(double x) { return Acc(x); }
template <typename Acc> inline Acc to_acc(Half16 x) { return Acc(half_bits_to_float(x.bits)); }
template <typename Acc> inline Acc to_acc(BFloat16Bits x) { return Acc(bf16_bits_to_float(x.bits)); }
template <typename T> inline T from_acc(float x);
template <> inline float from_acc<float>(float x) { return x; }
template <> inline Half16 from_acc<Half16>(float x) { return Half16{float_to_half_bits(x)}; }
template <> inline BFloat16Bits from_acc<BFloat16Bits>(float x) { return BFloat16Bits{float_to_bf16_bits(x)}; }
template <typename T> inline T from_acc(double x) { return T(x); }

// exp on a float vector for arguments <= 0: 2^t = 2^round(t) * 2^f with |f| <= 1/2 and a degree-7
// Taylor polynomial (within a few float ulps); -inf and arguments below about -88 give exactly 0, NaN
// stays NaN. Vectorises where std::exp would not.
inline __attribute__((always_inline)) Vec<float>::type exp_vec(Vec<float>::type x) {
  using V = Vec<float>::type;
  using VI = int32_t __attribute__((vector_size(64)));
  V t = x * 1.4426950408889634f;
  t = t < -127.0f ? V{} - 127.0f : t;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  V r = (t + magic) - magic;
  V f = (t - r) * 0.6931471805599453f;
  V poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 +
           f * (1.0f / 720 + f * (1.0f / 5040)))))));
  VI bits = (__builtin_convertvector(r, VI) + 127) << 23;
  return poly * (V)bits;
}
inline __attribute__((always_inline)) Vec<double>::type exp_vec(Vec<double>::type x) {
  for (int i = 0; i < Vec<double>::lanes; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Per-thread scratch, Acc-typed and 64-byte aligned. Queries are stored transposed so that scores are
// computed as key-major rows of row vectors: every key element is one broadcast, and the softmax
// statistics of all rows update as whole vectors.
template <typename Acc, int D>
struct Scratch {
  alignas(64) Acc qt[D][kRowTile];        // scaled queries, transposed
  alignas(64) Acc o[kRowTile][D];         // unnormalised output accumulators
  alignas(64) Acc st[kKeyTile][kRowTile]; // scores, then probabilities, key-major
  alignas(64) Acc k[kKeyTile][D];         // key / value tiles, converted; keys that do not exist are 0
  alignas(64) Acc v[kKeyTile][D];
  alignas(64) Acc row_max[kRowTile], row_sum[kRowTile], correction[kRowTile];
  int64_t row_query[kRowTile];            // query position i of each row
  const char* next_rows[2 * kKeyTile];    // key (even) and value (odd) rows of the next tile, to prefetch
  int prefetch_cursor, prefetch_lines;    // next_rows' cache lines: the next one to prefetch, how many
};

template <typename T>
inline const T* elem(const void* base, int64_t offset) { return static_cast<const T*>(base) + offset; }

// Prefetches (into L2) the next of the next tile's cache lines, if any are left. Consecutive keys of a
// token-major cache are a page apart, which the hardware prefetchers do not follow. A prefetch holds a
// fill buffer until its line arrives, and with the buffers full the core stalls, so the score and P . V
// kernels call this at a fixed cadence (every 48-64 FMAs) that spreads a tile's lines over its compute.
template <typename T, typename Acc, int D>
inline __attribute__((always_inline)) void prefetch_step(Scratch<Acc, D>& w) {
  if (w.prefetch_cursor < w.prefetch_lines) {
    const int line = w.prefetch_cursor++;
    __builtin_prefetch(w.next_rows[line / kRowLines<T, D>] + line % kRowLines<T, D> * 64, 0, 2);
  }
}

// st[n][rows] = K[n] . Qt for keys [0, n_keys) (a multiple of kKeyGroup) and the kRowVecs row vectors
// from row vector c0. kKeyGroup keys x kRowVecs row vectors of accumulators: every query vector loaded
// feeds kKeyGroup FMAs, and the group's slice of qt (16 KB in fp32) stays in L1 across the key groups.
template <typename T, typename Acc, int D, int kRowVecs>
inline __attribute__((always_inline)) void score_rows(Scratch<Acc, D>& w, int c0, int n_keys) {
  using V = typename Vec<Acc>::type;
  constexpr int L = Vec<Acc>::lanes;
  for (int n0 = 0; n0 < n_keys; n0 += kKeyGroup) {
    const Acc* kr[kKeyGroup];
    for (int kk = 0; kk < kKeyGroup; ++kk) kr[kk] = w.k[n0 + kk];
    V acc[kKeyGroup][kRowVecs] = {};
    for (int d = 0; d < D; ++d) {
      if (d % 4 == 0) prefetch_step<T>(w);
      V qv[kRowVecs];
      for (int c = 0; c < kRowVecs; ++c) qv[c] = load_vec<V>(&w.qt[d][(c0 + c) * L]);
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
template <typename T, typename Acc, int D, int kRows>
inline __attribute__((always_inline)) void update_rows(Scratch<Acc, D>& w, int r0, int col0, int n_keys) {
  using V = typename Vec<Acc>::type;
  constexpr int L = Vec<Acc>::lanes;
  V acc[kRows][kColVecs<Acc, D>];
  for (int m = 0; m < kRows; ++m)
    for (int c = 0; c < kColVecs<Acc, D>; ++c)
      acc[m][c] = load_vec<V>(&w.o[r0 + m][col0 + c * L]) * w.correction[r0 + m];
  for (int n = 0; n < n_keys; ++n) {
    if (n % 2 == 0) prefetch_step<T>(w);
    V vv[kColVecs<Acc, D>];
    for (int c = 0; c < kColVecs<Acc, D>; ++c) vv[c] = load_vec<V>(&w.v[n][col0 + c * L]);
    for (int m = 0; m < kRows; ++m) {
      const Acc pm = w.st[n][r0 + m];
      for (int c = 0; c < kColVecs<Acc, D>; ++c) acc[m][c] += pm * vv[c];
    }
  }
  for (int m = 0; m < kRows; ++m)
    for (int c = 0; c < kColVecs<Acc, D>; ++c) store_vec(&w.o[r0 + m][col0 + c * L], acc[m][c]);
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

// Attention for rows [row0, row0 + rows) of (b, kvh).
template <typename T, typename Acc, int D>
inline __attribute__((always_inline)) void attend_rows(const CacheAttnParams& p, int64_t b, int64_t kvh,
                                                       int64_t row0, int64_t rows, Scratch<Acc, D>& w) {
  using V = typename Vec<Acc>::type;
  constexpr int L = Vec<Acc>::lanes;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t len = attn_cache_len(p, b);
  const int row_vecs = int((rows + L - 1) / L);
  const int padded = row_vecs * L;

  int64_t last_query = 0;
  for (int r = 0; r < padded; ++r) {
    const bool real = r < rows;
    const int64_t row = row0 + (real ? r : rows - 1);
    const int64_t i = row / p.group, h = kvh * p.group + row % p.group;
    w.row_query[r] = i;
    last_query = std::max(last_query, i);
    const T* src = elem<T>(p.q, b * p.q_batch_stride + i * p.q_seq_stride + h * p.q_head_stride);
    for (int d = 0; d < D; ++d) w.qt[d][r] = real ? to_acc<Acc>(src[d]) * Acc(p.scale) : Acc(0);
    for (int d = 0; d < D; ++d) w.o[r][d] = Acc(0);
    w.row_max[r] = neg_inf;
    w.row_sum[r] = Acc(0);
  }
  // Keys past the last visible one for these rows are skipped entirely.
  const int64_t n_keys = len + (p.causal ? last_query + 1 : p.q_len);

  for (int64_t k0 = 0; k0 < n_keys; k0 += kKeyTile) {
    const int nt = int(std::min<int64_t>(kKeyTile, n_keys - k0));
    const int nt_padded = (nt + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
    for (int n = 0; n < nt_padded; ++n) {
      const T* ks = nullptr;
      const T* vs = nullptr;
      if (n < nt) key_value_rows(p, b, kvh, len, k0 + n, ks, vs);
      // Copied even when no conversion is needed: consecutive keys of a token-major cache are a whole
      // token's heads apart (4 KB in the benchmark shape), so the rows in place would all map to the
      // same few L1 sets and be refetched by every row block.
      if (ks) {
        for (int d = 0; d < D; ++d) w.k[n][d] = to_acc<Acc>(ks[d]);
        for (int d = 0; d < D; ++d) w.v[n][d] = to_acc<Acc>(vs[d]);
      } else {
        for (int d = 0; d < D; ++d) w.k[n][d] = w.v[n][d] = Acc(0);
      }
      // The next tile's rows, prefetched while this one is computed.
      if (k0 + kKeyTile + n < n_keys) {
        const T* next_k = reinterpret_cast<const T*>(w.k[0]);  // scratch stands in for a missing page
        const T* next_v = next_k;
        key_value_rows(p, b, kvh, len, k0 + kKeyTile + n, next_k, next_v);
        w.next_rows[2 * n] = reinterpret_cast<const char*>(next_k);
        w.next_rows[2 * n + 1] = reinterpret_cast<const char*>(next_v);
      }
    }
    w.prefetch_cursor = 0;
    w.prefetch_lines = 2 * int(std::clamp<int64_t>(n_keys - k0 - kKeyTile, 0, nt_padded)) * kRowLines<T, D>;

    for (int c0 = 0; c0 < row_vecs; c0 += 2) {
      if (c0 + 1 < row_vecs) score_rows<T, Acc, D, 2>(w, c0, nt_padded);
      else score_rows<T, Acc, D, 1>(w, c0, nt_padded);
    }

    // Mask (only tiles that reach the block need it), then the online softmax on whole row vectors.
    if (k0 + nt > len)
      for (int n = 0; n < nt; ++n)
        if (k0 + n >= len)
          for (int r = 0; r < padded; ++r)
            if (!attn_visible(k0 + n, w.row_query[r], len, p.q_len, p.causal)) w.st[n][r] = neg_inf;
    for (int c = 0; c < row_vecs; ++c) {
      V tile_max = load_vec<V>(&w.row_max[c * L]);
      for (int n = 0; n < nt; ++n) {
        const V s = load_vec<V>(&w.st[n][c * L]);
        tile_max = s > tile_max ? s : tile_max;
      }
      const V old_max = load_vec<V>(&w.row_max[c * L]);
      const V base = tile_max == neg_inf ? V{} : tile_max;  // nothing visible yet: p = 0, no NaN
      const V correction = exp_vec(old_max - base);         // exp(-inf) = 0 for a fresh row
      V sum{};
      for (int n = 0; n < nt; ++n) {
        const V e = exp_vec(load_vec<V>(&w.st[n][c * L]) - base);
        store_vec(&w.st[n][c * L], e);
        sum += e;
      }
      store_vec(&w.row_sum[c * L], load_vec<V>(&w.row_sum[c * L]) * correction + sum);
      store_vec(&w.row_max[c * L], tile_max);
      store_vec(&w.correction[c * L], correction);
    }

    // O = O * correction + P . V in blocks of kRowBlock rows x kColVecs vectors of columns.
    for (int col0 = 0; col0 < D; col0 += kColVecs<Acc, D> * L)
      for (int r0 = 0; r0 < int(rows); r0 += kRowBlock) {
        switch (std::min<int>(kRowBlock, int(rows) - r0)) {
          case 1: update_rows<T, Acc, D, 1>(w, r0, col0, nt); break;
          case 2: update_rows<T, Acc, D, 2>(w, r0, col0, nt); break;
          case 3: update_rows<T, Acc, D, 3>(w, r0, col0, nt); break;
          case 4: update_rows<T, Acc, D, 4>(w, r0, col0, nt); break;
          case 5: update_rows<T, Acc, D, 5>(w, r0, col0, nt); break;
          default: update_rows<T, Acc, D, kRowBlock>(w, r0, col0, nt);
        }
      }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r, i = row / p.group, h = kvh * p.group + row % p.group;
    const Acc inv = Acc(1) / w.row_sum[r];
    T* dst = static_cast<T*>(p.out) + ((b * p.q_len + i) * p.n_heads + h) * D;
    for (int d = 0; d < D; ++d) dst[d] = from_acc<T>(w.o[r][d] * inv);
    p.lse[(b * p.n_heads + h) * p.q_len + i] = float(w.row_max[r] + std::log(w.row_sum[r]));
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R2LM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define R2LM_CPU_CLONES
#endif

// One non-template function per instantiation, each cloned per instruction set (the clones must sit
// inside the OpenMP region: the outlined region itself is compiled for the baseline target).
#define R2LM_ATTEND_ROWS(name, T, Acc, D)                                                                  \
  R2LM_CPU_CLONES void name(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t row0, int64_t rows, \
                            Scratch<Acc, D>& w) {                                                          \
    attend_rows<T, Acc, D>(p, b, kvh, row0, rows, w);                                                      \
  }
R2LM_ATTEND_ROWS(attend_f32_64, float, float, 64)
R2LM_ATTEND_ROWS(attend_f32_128, float, float, 128)
R2LM_ATTEND_ROWS(attend_f16_64, Half16, float, 64)
R2LM_ATTEND_ROWS(attend_f16_128, Half16, float, 128)
R2LM_ATTEND_ROWS(attend_bf16_64, BFloat16Bits, float, 64)
R2LM_ATTEND_ROWS(attend_bf16_128, BFloat16Bits, float, 128)
R2LM_ATTEND_ROWS(attend_f64_64, double, double, 64)
R2LM_ATTEND_ROWS(attend_f64_128, double, double, 128)
#undef R2LM_ATTEND_ROWS

// Every (batch, kv head, row tile) in parallel; each thread owns one scratch.
template <typename Acc, int D>
void attend_all(const CacheAttnParams& p,
                void (*attend)(const CacheAttnParams&, int64_t, int64_t, int64_t, int64_t, Scratch<Acc, D>&)) {
  const int64_t rows = p.q_len * p.group;
  const int64_t row_tiles = (rows + kRowTile - 1) / kRowTile;
  const int64_t items = p.batch * p.n_kv_heads * row_tiles;
#pragma omp parallel
  {
    std::vector<Scratch<Acc, D>> scratch(1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t tile = item % row_tiles, bh = item / row_tiles;
      const int64_t row0 = tile * kRowTile;
      attend(p, bh / p.n_kv_heads, bh % p.n_kv_heads, row0, std::min<int64_t>(kRowTile, rows - row0), scratch[0]);
    }
  }
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
  const bool d64 = p.head_dim == 64;
  switch (p.dtype) {
    case DType::kFloat32: d64 ? attend_all(p, attend_f32_64) : attend_all(p, attend_f32_128); break;
    case DType::kFloat16: d64 ? attend_all(p, attend_f16_64) : attend_all(p, attend_f16_128); break;
    case DType::kBFloat16: d64 ? attend_all(p, attend_bf16_64) : attend_all(p, attend_bf16_128); break;
    case DType::kFloat64: d64 ? attend_all(p, attend_f64_64) : attend_all(p, attend_f64_128); break;
  }
  if (!write_kv) return;
  switch (p.dtype) {
    case DType::kFloat32: write_block_kv<float>(p); break;
    case DType::kFloat64: write_block_kv<double>(p); break;
    default: write_block_kv<uint16_t>(p); break;
  }
}

}  // namespace r2lm
