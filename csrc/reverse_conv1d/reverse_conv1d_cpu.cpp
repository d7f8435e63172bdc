// reverse_conv1d CPU kernels. One task per (batch row, block of channels) walks the sequence once,
// keeping the last `width` converted rows in a ring so every element of x (and dy) is read once; the
// inner loops run over contiguous channels and vectorise.
#include <algorithm>
#include <vector>

#include "reverse_conv1d/reverse_conv1d.h"

namespace r2lm {
namespace {

constexpr int64_t kChannelBlock = 64;

template <typename C>
C load_param(const void* ptr, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return C(static_cast<const float*>(ptr)[i]);
    case DType::kFloat64: return C(static_cast<const double*>(ptr)[i]);
    case DType::kBFloat16: return C(conv_to_float(static_cast<const ConvBFloat16*>(ptr)[i]));
    case DType::kFloat16: return C(conv_to_float(static_cast<const ConvHalf*>(ptr)[i]));
  }
  return C(0);
}

void store_param(void* ptr, int64_t i, DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(ptr)[i] = float(v); break;
    case DType::kFloat64: static_cast<double*>(ptr)[i] = v; break;
    case DType::kBFloat16: static_cast<ConvBFloat16*>(ptr)[i] = conv_from_float<ConvBFloat16>(v); break;
    case DType::kFloat16: static_cast<ConvHalf*>(ptr)[i] = conv_from_float<ConvHalf>(v); break;
  }
}

// One channel block's view of the sequence of batch row b: weights transposed to [tap][channel],
// bias, segment ids and a ring of the last `width` rows of x converted to the compute type C.
template <typename T, typename C>
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

  int32_t segment(int64_t t) const { return seg && t >= 0 && t < p.seqlen ? seg[t * p.seq_idx_seq_stride] : 0; }

  void load_row(int64_t r) {
    C* dst = xring[r % width];
    const T* src = x + r * p.x_seq_stride;
    for (int64_t c = 0; c < nd; ++c) dst[c] = C(conv_to_float(src[c]));
  }

  // Rows t .. t + width - 1 must be in the ring. Writes the pre-activation of row t into pre.
  void preactivation(int64_t t, C* pre) const {
    for (int64_t c = 0; c < nd; ++c) pre[c] = bias[c];
    const int32_t seg_t = segment(t);
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(t, k, p.seqlen, seg_t, segment(t + k))) continue;
      const C* row = xring[(t + k) % width];
      for (int64_t c = 0; c < nd; ++c) pre[c] += w[k][c] * row[c];
    }
  }
};

template <typename T, typename C>
void fwd_block(const ConvParams& p, int64_t b, int64_t d0) {
  BlockContext<T, C> ctx(p, b, d0);
  const int width = p.width;
  T* y = static_cast<T*>(p.y) + b * p.y_batch_stride + d0;
  C pre[kChannelBlock];
  for (int64_t r = 0; r < std::min<int64_t>(width - 1, p.seqlen); ++r) ctx.load_row(r);
  for (int64_t t = 0; t < p.seqlen; ++t) {
    if (t + width - 1 < p.seqlen) ctx.load_row(t + width - 1);
    ctx.preactivation(t, pre);
    T* out = y + t * p.y_seq_stride;
    for (int64_t c = 0; c < ctx.nd; ++c) out[c] = conv_from_float<T>(conv_activate(pre[c], p.silu));
  }
}

// Walks s = 0 .. seqlen-1: g[s] needs x[s .. s+width-1]; dx[s] needs g[s-width+1 .. s], kept in a ring.
// dweight / dbias partials of this (b, channel block) go to partial_dw[k][d] / partial_db[d] (fp64).
template <typename T, typename C>
void bwd_block(const ConvParams& p, int64_t b, int64_t d0, double* partial_dw, double* partial_db) {
  BlockContext<T, C> ctx(p, b, d0);
  const int width = p.width;
  const int64_t nd = ctx.nd;
  const T* dy = static_cast<const T*>(p.dy) + b * p.dy_batch_stride + d0;
  T* dx = static_cast<T*>(p.dx) + b * p.dx_batch_stride + d0;
  C pre[kChannelBlock], gring[kConvMaxWidth][kChannelBlock];
  double dw[kConvMaxWidth][kChannelBlock] = {}, db[kChannelBlock] = {};
  for (int64_t r = 0; r < std::min<int64_t>(width - 1, p.seqlen); ++r) ctx.load_row(r);
  for (int64_t s = 0; s < p.seqlen; ++s) {
    if (s + width - 1 < p.seqlen) ctx.load_row(s + width - 1);
    const T* dy_row = dy + s * p.dy_seq_stride;
    C* g = gring[s % width];
    if (p.silu) {
      ctx.preactivation(s, pre);
      for (int64_t c = 0; c < nd; ++c) g[c] = conv_pre_grad(pre[c], C(conv_to_float(dy_row[c])), true);
    } else {
      for (int64_t c = 0; c < nd; ++c) g[c] = C(conv_to_float(dy_row[c]));
    }
    const int32_t seg_s = ctx.segment(s);
    for (int64_t c = 0; c < nd; ++c) db[c] += g[c];
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(s, k, p.seqlen, seg_s, ctx.segment(s + k))) continue;
      const C* row = ctx.xring[(s + k) % width];
      for (int64_t c = 0; c < nd; ++c) dw[k][c] += double(g[c] * row[c]);
    }
    C acc[kChannelBlock] = {};
    for (int k = 0; k < width; ++k) {
      if (!conv_tap_live(s - k, k, p.seqlen, ctx.segment(s - k), seg_s)) continue;
      const C* g_row = gring[(s - k) % width];
      for (int64_t c = 0; c < nd; ++c) acc[c] += ctx.w[k][c] * g_row[c];
    }
    T* out = dx + s * p.dx_seq_stride;
    for (int64_t c = 0; c < nd; ++c) out[c] = conv_from_float<T>(acc[c]);
  }
  for (int k = 0; k < width; ++k)
    for (int64_t c = 0; c < nd; ++c) partial_dw[k * p.dim + d0 + c] = dw[k][c];
  for (int64_t c = 0; c < nd; ++c) partial_db[d0 + c] = db[c];
}

template <typename T, typename C>
void fwd(const ConvParams& p) {
  const int64_t blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < p.batch * blocks; ++task)
    fwd_block<T, C>(p, task / blocks, (task % blocks) * kChannelBlock);
}

template <typename T, typename C>
void bwd(const ConvParams& p) {
  const int64_t blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
  // Per batch row partials, summed over batch in a fixed order below: the result does not depend on
  // the thread count or schedule.
  std::vector<double> partial_dw(p.batch * p.width * p.dim), partial_db(p.batch * p.dim);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < p.batch * blocks; ++task) {
    const int64_t b = task / blocks;
    bwd_block<T, C>(p, b, (task % blocks) * kChannelBlock, partial_dw.data() + b * p.width * p.dim,
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
    case DType::kBFloat16: return fwd<ConvBFloat16, float>(p);
    case DType::kFloat16: return fwd<ConvHalf, float>(p);
  }
}

void reverse_conv1d_bwd_cpu(const ConvParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd<float, float>(p);
    case DType::kFloat64: return bwd<double, double>(p);
    case DType::kBFloat16: return bwd<ConvBFloat16, float>(p);
    case DType::kFloat16: return bwd<ConvHalf, float>(p);
  }
}

}  // namespace r2lm
