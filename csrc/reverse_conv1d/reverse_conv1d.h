// reverse_conv1d: parameters, per-element math shared by the CPU and CUDA kernels, launchers.
// No torch headers: the torch layer (reverse_conv1d_torch.cpp) fills ConvParams.
//
//   pre[b, t, d] = bias[d] + sum_{k < width, tap_live(t, k)} weight[d, k] * x[b, t + k, d]
//   y = silu(pre) if silu else pre
// where tap (t, k) is live iff t + k < seqlen and seq_idx[b, t .. t + k] are all equal (one segment).
// Backward, with g = dy * silu'(pre) (or dy):
//   dx[s] = sum_{k, tap_live(s - k, k)} weight[k] * g[s - k]
//   dweight[d, k] = sum_{b, t, tap_live(t, k)} g[t] * x[t + k],   dbias[d] = sum_{b, t} g[t]
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "r2lm_common.h"
#ifndef __CUDACC__
#include <utility>

#include "cpu_vector.h"
#endif

namespace r2lm {

// Largest supported filter width (the torch layer rejects wider filters by name).
constexpr int kConvMaxWidth = 8;

// Token-major tensors: element (b, t, d) of x is x[b * x_batch_stride + t * x_seq_stride + d] (unit
// stride in d). weight/bias/dweight/dbias take any strides. Computation is fp32 (fp64 for fp64 x).
struct ConvParams {
  int64_t batch, seqlen, dim;
  int width;
  DType dtype;         // x, y, dy, dx
  DType weight_dtype;  // weight and dweight: dtype or float32
  DType bias_dtype;    // bias and dbias: dtype or float32
  bool silu;

  const void* x; int64_t x_batch_stride, x_seq_stride;
  const void* weight; int64_t weight_dim_stride, weight_tap_stride;   // (dim, width)
  const void* bias; int64_t bias_stride;                              // (dim,) may be null
  const int32_t* seq_idx; int64_t seq_idx_batch_stride, seq_idx_seq_stride;  // (batch, seqlen) may be null

  void* y; int64_t y_batch_stride, y_seq_stride;                      // forward output

  // Backward: dy in; dx, dweight, dbias (may be null) out.
  const void* dy; int64_t dy_batch_stride, dy_seq_stride;
  void* dx; int64_t dx_batch_stride, dx_seq_stride;
  void* dweight; int64_t dweight_dim_stride, dweight_tap_stride;
  void* dbias; int64_t dbias_stride;
  void* workspace;  // CUDA backward: fp32 per-block partials of dweight/dbias (see *_workspace_cuda)
};

// --- per-element math, the same code on both backends -------------------------------------------

R2LM_HD float conv_exp(float v) {
#ifdef __CUDA_ARCH__
  return __expf(v);
#else
  return std::exp(v);
#endif
}
R2LM_HD double conv_exp(double v) { return exp(v); }
#ifndef __CUDACC__
// e^v of a GCC float vector: the CPU kernel runs the SiLU math below on whole vectors, where a loop of
// scalar std::exp would stay scalar (3x slower).
template <typename V, typename = decltype(std::declval<V>()[0])>
inline V conv_exp(V v) { return vec_exp(v); }
#endif

// The math below is written with plain 1 (not T(1)) so that T may be a float vector too.
template <typename T>
R2LM_HD T conv_sigmoid(T v) { return 1 / (1 + conv_exp(-v)); }

template <typename T>
R2LM_HD T conv_activate(T pre, bool silu) { return silu ? pre * conv_sigmoid(pre) : pre; }

// dL/dpre from dL/dy: silu'(v) = s * (1 + v * (1 - s)) with s = sigmoid(v).
template <typename T>
R2LM_HD T conv_pre_grad(T pre, T dy, bool silu) {
  if (!silu) return dy;
  T s = conv_sigmoid(pre);
  return dy * s * (1 + pre * (1 - s));
}

// Whether x[t + k] feeds output t, given that x[t + k - 1] does (or k = 0): inside the sequence and in t's
// segment. `seg_t` / `seg_tk` are seq_idx at t and t + k (any equal values when there are no segments).
// A segment is a run of equal seq_idx (where the scan resets too), so the kernels walk the taps in
// increasing k and stop at the first dead one: a later position with t's value lies in another segment.
R2LM_HD bool conv_tap_live(int64_t t, int k, int64_t seqlen, int32_t seg_t, int32_t seg_tk) {
  return t >= 0 && t + k < seqlen && seg_t == seg_tk;
}

// CPU kernels (reverse_conv1d_cpu.cpp).
void reverse_conv1d_fwd_cpu(const ConvParams& p);
void reverse_conv1d_bwd_cpu(const ConvParams& p);

#ifdef R2LM_WITH_CUDA
// CUDA kernels (reverse_conv1d_cuda.cu), launched on `stream` (a cudaStream_t). They return nullptr on
// success, else a static description of the launch error. The backward needs
// reverse_conv1d_bwd_workspace_cuda(p) bytes of device scratch in p.workspace.
const char* reverse_conv1d_fwd_cuda(const ConvParams& p, void* stream);
int64_t reverse_conv1d_bwd_workspace_cuda(const ConvParams& p);
const char* reverse_conv1d_bwd_cuda(const ConvParams& p, void* stream);
#endif

}  // namespace r2lm
