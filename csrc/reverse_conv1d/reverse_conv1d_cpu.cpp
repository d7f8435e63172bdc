// reverse_conv1d CPU kernels. One task per (batch row, block of channels) walks the sequence once,
// keeping the last `width` converted rows in a ring so every element of x (and dy) is read once; the
// inner loops run over contiguous channels and vectorise, the SiLU math on explicit vectors (conv_exp of
// a vector is branch-free). The per-block functions are compiled once per vector width (cpu_vector.h) and
// picked per call.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_half.h"
#include "cpu_vector.h"
#include "reverse_conv1d/reverse_conv1d.h"

#define R2LM_INLINE inline __attribute__((always_inline))

namespace r2lm {
namespace {

constexpr int64_t kChannelBlock = 64;

template <typename C>
C load_param(const void* ptr, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return C(static_cast<const float*>(ptr)[i]);
    case DType::kFloat64: return C(static_cast<const double*>(ptr)[i]);
    case DType::kBFloat16: return C(to_compute(static_cast<const BFloat16Bits*>(ptr)[i]));
    case DType::kFloat16: return C(to_compute(static_cast<const Half16*>(ptr)[i]));
  }
  return C(0);
}

void store_param(void* ptr, int64_t i, DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(ptr)[i] = float(v); break;
    case DType::kFloat64: static_cast<double*>(ptr)[i] = v; break;
    case DType::kBFloat16: static_cast<BFloat16Bits*>(ptr)[i] = to_storage<BFloat16Bits>(v); break;
    case DType::kFloat16: static_cast<Half16*>(ptr)[i] = to_storage<Half16>(v); break;
  }
}

// A channel block's rows are a sequence stride apart (2 KB at dim 512, fp32), which the hardware prefetchers
// do not follow: the token loops prefetch the rows they will read and write kPrefetchRows tokens ahead.
constexpr int64_t kPrefetchRows = 8;
template <bool kWrite = false, typename T>
R2LM_INLINE void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(bytes + off, kWrite);
}

// One channel block's view of the sequence of batch row b: weights transposed to [tap][channel],
// bias, segment ids and a ring of the last `width` rows of x converted to the compute type C.
template <typename T, typename C, int kBytes>
struct BlockContext {
  const ConvParams& p;
  int64_t b, d0, nd;
  int width;
  C w[kConvMaxWidth][kChannelBlock];
  C bias[kChannelBlock];
  C xring[kConvMaxWidth][kChannelBlock];  // row r lives in xring[r % width]
  const T* x;
  const int32_t* seg;

  BlockContext(const ConvParams& p_, int64_t b_, int64_t d0_)
      : p(p_), b(b_), d0(d0_), nd(std::min(kChannelBlock, p_.dim - d0_)), width(p_.width) {
    for (int k = 0; k < width; ++k)
      for (int64_t c = 0; c < nd; ++c)
        w[k][c] = load_param<C>(p.weight, (d0 + c) * p.weight_dim_stride + k * p.weight_tap_stride, p.weight_dtype);
    for (int64_t c = 0; c < nd; ++c)
      bias[c] = p.bias ? load_param<C>(p.bias, (d0 + c) * p.bias_stride, p.bias_dtype) : C(0);
    x = static_cast<const T*>(p.x) + b * p.x_batch_stride + d0;
    seg = p.seq_idx ? p.seq_idx + b * p.seq_idx_batch_stride : nullptr;
  }

  R2LM_INLINE int32_t segment(int64_t t) const {
    return seg && t >= 0 && t < p.seqlen ? seg[t * p.seq_idx_seq_stride] : 0;
  }

  // Ring slot of row r + k, given r's slot (no division per tap).
  R2LM_INLINE int slot_after(int slot, int k) const { return slot + k < width ? slot + k : slot + k - width; }

  // Prefetches row r of x where it exists (see kPrefetchRows).
  R2LM_INLINE void prefetch_x_row(int64_t r) const {
    if (r < p.seqlen) prefetch_row(x + r * p.x_seq_stride, nd);
  }

  R2LM_INLINE void load_row(int64_t r) {
    widen_row<kBytes>(x + r * p.x_seq_stride, nd, xring[r % width]);
  }

  // Rows t .. t + width - 1 must be in the ring. Writes the pre-activation of row t into pre.
  R2LM_INLINE void preactivation(int64_t t, C* pre) const {
    for (int64_t c = 0; c < nd; ++c) pre[c] = bias[c];
    const int32_t seg_t = segment(t);
    const int slot = int(t % width);
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(t, k, p.seqlen, seg_t, segment(t + k))) break;
      const C* row = xring[slot_after(slot, k)];
      for (int64_t c = 0; c < nd; ++c) pre[c] += w[k][c] * row[c];
    }
  }
};

// f(v, i) on the float vectors of kBytes in [0, n) of a row, then f(v, i) one element at a time for the rest
// (and for fp64 rows): v is the row's vector or element at index i.
template <int kBytes, typename C, typename F>
R2LM_INLINE void for_row_vectors(const C* row, int64_t n, F&& f) {
  int64_t c = 0;
  if constexpr (std::is_same_v<C, float>) {
    using V = typename CpuVector<float, kBytes>::type;
    constexpr int64_t kLanes = kBytes / sizeof(float);
    for (; c + kLanes <= n; c += kLanes) {
      V v;
      std::memcpy(&v, row + c, sizeof(V));
      f(v, c);
    }
  }
  for (; c < n; ++c) f(row[c], c);
}

// Stores v at row + i (a vector or one element).
template <typename C, typename V>
R2LM_INLINE void store_at(C* row, int64_t i, const V& v) { std::memcpy(row + i, &v, sizeof(V)); }

template <typename T, typename C, int kBytes>
R2LM_INLINE void fwd_block(const ConvParams& p, int64_t b, int64_t d0) {
  BlockContext<T, C, kBytes> ctx(p, b, d0);
  const int width = p.width;
  T* y = static_cast<T*>(p.y) + b * p.y_batch_stride + d0;
  C pre[kChannelBlock];
  for (int64_t r = 0; r < std::min<int64_t>(width - 1, p.seqlen); ++r) ctx.load_row(r);
  for (int64_t t = 0; t < p.seqlen; ++t) {
    ctx.prefetch_x_row(t + width - 1 + kPrefetchRows);
    if (t + kPrefetchRows < p.seqlen) prefetch_row<true>(y + (t + kPrefetchRows) * p.y_seq_stride, ctx.nd);
    if (t + width - 1 < p.seqlen) ctx.load_row(t + width - 1);
    ctx.preactivation(t, pre);
    T* out = y + t * p.y_seq_stride;
    if (p.silu) for_row_vectors<kBytes>(pre, ctx.nd, [&](auto v, int64_t i) { store_at(pre, i, conv_activate(v, true)); });
    narrow_row<kBytes>(pre, ctx.nd, out);
  }
}

// dweight / dbias sums of a block run in C (fp32 for every storage type but fp64) over kGradChunkRows rows,
// then go into fp64 sums: fp32 vectors in the per-row loop, fp64 accuracy over long sequences.
constexpr int64_t kGradChunkRows = 32;

// Walks s = 0 .. seqlen-1: g[s] needs x[s .. s+width-1]; dx[s] needs g[s-width+1 .. s], kept in a ring.
// dweight / dbias partials of this (b, channel block) go to partial_dw[k][d] / partial_db[d] (fp64).
template <typename T, typename C, int kBytes>
R2LM_INLINE void bwd_block(const ConvParams& p, int64_t b, int64_t d0, double* partial_dw, double* partial_db) {
  BlockContext<T, C, kBytes> ctx(p, b, d0);
  const int width = p.width;
  const int64_t nd = ctx.nd;
  const T* dy = static_cast<const T*>(p.dy) + b * p.dy_batch_stride + d0;
  T* dx = static_cast<T*>(p.dx) + b * p.dx_batch_stride + d0;
  C pre[kChannelBlock], gring[kConvMaxWidth][kChannelBlock];
  C dw_chunk[kConvMaxWidth][kChannelBlock] = {}, db_chunk[kChannelBlock] = {};
  double dw[kConvMaxWidth][kChannelBlock] = {}, db[kChannelBlock] = {};
  const auto flush_chunk = [&] {
    for (int k = 0; k < width; ++k)
      for (int64_t c = 0; c < nd; ++c) dw[k][c] += double(dw_chunk[k][c]), dw_chunk[k][c] = C(0);
    for (int64_t c = 0; c < nd; ++c) db[c] += double(db_chunk[c]), db_chunk[c] = C(0);
  };
  for (int64_t r = 0; r < std::min<int64_t>(width - 1, p.seqlen); ++r) ctx.load_row(r);
  for (int64_t s = 0; s < p.seqlen; ++s) {
    ctx.prefetch_x_row(s + width - 1 + kPrefetchRows);
    if (s + kPrefetchRows < p.seqlen) {
      prefetch_row(dy + (s + kPrefetchRows) * p.dy_seq_stride, nd);
      prefetch_row<true>(dx + (s + kPrefetchRows) * p.dx_seq_stride, nd);
    }
    if (s + width - 1 < p.seqlen) ctx.load_row(s + width - 1);
    const T* dy_row = dy + s * p.dy_seq_stride;
    const int slot = int(s % width);
    C* g = gring[slot];
    widen_row<kBytes>(dy_row, nd, g);
    if (p.silu) {
      ctx.preactivation(s, pre);
      for_row_vectors<kBytes>(pre, nd, [&](auto v, int64_t i) {
        decltype(v) dy_v;
        std::memcpy(&dy_v, g + i, sizeof(v));
        store_at(g, i, conv_pre_grad(v, dy_v, true));
      });
    }
    const int32_t seg_s = ctx.segment(s);
    for (int64_t c = 0; c < nd; ++c) db_chunk[c] += g[c];
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(s, k, p.seqlen, seg_s, ctx.segment(s + k))) break;
      const C* row = ctx.xring[ctx.slot_after(slot, k)];
      for (int64_t c = 0; c < nd; ++c) dw_chunk[k][c] += g[c] * row[c];
    }
    if (s % kGradChunkRows == kGradChunkRows - 1) flush_chunk();
    C acc[kChannelBlock] = {};
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(s - k, k, p.seqlen, ctx.segment(s - k), seg_s)) break;
      const C* g_row = gring[slot >= k ? slot - k : slot - k + width];
      for (int64_t c = 0; c < nd; ++c) acc[c] += ctx.w[k][c] * g_row[c];
    }
    T* out = dx + s * p.dx_seq_stride;
    narrow_row<kBytes>(acc, nd, out);
  }
  flush_chunk();
  for (int k = 0; k < width; ++k)
    for (int64_t c = 0; c < nd; ++c) partial_dw[k * p.dim + d0 + c] = dw[k][c];
  for (int64_t c = 0; c < nd; ++c) partial_db[d0 + c] = db[c];
}

// The per-block functions of one storage type, each compiled for its vector width's instruction set
// (called inside the OpenMP regions: an outlined region itself is compiled for the baseline target).
template <typename T>
struct BlockFns {
  void (*fwd)(const ConvParams&, int64_t, int64_t);
  void (*bwd)(const ConvParams&, int64_t, int64_t, double*, double*);
};
template <typename T, int kBytes>
struct BlockFnsAt;
#define R2LM_CONV_BLOCK_FNS(suffix, target, bytes, T, C)                                                     \
  target void fwd_block_##suffix(const ConvParams& p, int64_t b, int64_t d0) {                               \
    fwd_block<T, C, bytes>(p, b, d0);                                                                         \
  }                                                                                                           \
  target void bwd_block_##suffix(const ConvParams& p, int64_t b, int64_t d0, double* dw, double* db) {       \
    bwd_block<T, C, bytes>(p, b, d0, dw, db);                                                                 \
  }                                                                                                           \
  template <>                                                                                                 \
  struct BlockFnsAt<T, bytes> {                                                                               \
    static constexpr BlockFns<T> fns{&fwd_block_##suffix, &bwd_block_##suffix};                              \
  };
#define R2LM_CONV_BLOCK_FNS_AT(bytes, target)                                                                \
  R2LM_CONV_BLOCK_FNS(f32_v##bytes, target, bytes, float, float)                                              \
  R2LM_CONV_BLOCK_FNS(f64_v##bytes, target, bytes, double, double)                                            \
  R2LM_CONV_BLOCK_FNS(bf16_v##bytes, target, bytes, BFloat16Bits, float)                                      \
  R2LM_CONV_BLOCK_FNS(f16_v##bytes, target, bytes, Half16, float)
R2LM_FOR_EACH_VECTOR_WIDTH(R2LM_CONV_BLOCK_FNS_AT)
#undef R2LM_CONV_BLOCK_FNS_AT
#undef R2LM_CONV_BLOCK_FNS

template <typename T>
BlockFns<T> block_fns() {
  return with_cpu_vector_width([](auto width) { return BlockFnsAt<T, decltype(width)::value>::fns; });
}

template <typename T, typename C>
void fwd(const ConvParams& p) {
  const int64_t blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
  const auto block = block_fns<T>().fwd;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < p.batch * blocks; ++task) block(p, task / blocks, (task % blocks) * kChannelBlock);
}

template <typename T, typename C>
void bwd(const ConvParams& p) {
  const int64_t blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
  // Per batch row partials, summed over batch in a fixed order below: the result does not depend on
  // the thread count or schedule.
  std::vector<double> partial_dw(p.batch * p.width * p.dim), partial_db(p.batch * p.dim);
  const auto block = block_fns<T>().bwd;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < p.batch * blocks; ++task) {
    const int64_t b = task / blocks;
    block(p, b, (task % blocks) * kChannelBlock, partial_dw.data() + b * p.width * p.dim,
                    partial_db.data() + b * p.dim);
  }
#pragma omp parallel for schedule(static)
  for (int64_t d = 0; d < p.dim; ++d) {
    for (int k = 0; k < p.width; ++k) {
      double sum = 0;
      for (int64_t b = 0; b < p.batch; ++b) sum += partial_dw[(b * p.width + k) * p.dim + d];
      store_param(p.dweight, d * p.dweight_dim_stride + k * p.dweight_tap_stride, p.weight_dtype, sum);
    }
    if (p.dbias) {
      double sum = 0;
      for (int64_t b = 0; b < p.batch; ++b) sum += partial_db[b * p.dim + d];
      store_param(p.dbias, d * p.dbias_stride, p.bias_dtype, sum);
    }
  }
}

}  // namespace

void reverse_conv1d_fwd_cpu(const ConvParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd<float, float>(p);
    case DType::kFloat64: return fwd<double, double>(p);
    case DType::kBFloat16: return fwd<BFloat16Bits, float>(p);
    case DType::kFloat16: return fwd<Half16, float>(p);
  }
}

void reverse_conv1d_bwd_cpu(const ConvParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd<float, float>(p);
    case DType::kFloat64: return bwd<double, double>(p);
    case DType::kBFloat16: return bwd<BFloat16Bits, float>(p);
    case DType::kFloat16: return bwd<Half16, float>(p);
  }
}

}  // namespace r2lm
