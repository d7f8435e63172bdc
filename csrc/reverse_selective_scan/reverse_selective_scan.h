// reverse_selective_scan: parameters, per-step math shared by the CPU and CUDA kernels, launchers.
// No torch headers: the torch layer (reverse_selective_scan_torch.cpp) fills ScanParams.
#pragma once

#include <cmath>
#include <cstdint>

#include "r2lm_common.h"

namespace r2lm {

// Token-major tensors: element (b, t, d) of u is u[b * u_batch_stride + t * u_seq_stride + d].
// B/C: element (b, t, n) at B[b * B_batch_stride + t * B_seq_stride + n]. Last dims have unit stride.
struct ScanParams {
  int64_t batch, seqlen, dim, d_state;
  DType dtype;        // dtype of u, delta, z, B, C, out (and du, ddelta, dz, dB, dC in the backward)
  bool delta_softplus;

  const void* u; int64_t u_batch_stride, u_seq_stride;
  const void* delta; int64_t delta_batch_stride, delta_seq_stride;
  const void* B; int64_t B_batch_stride, B_seq_stride;
  const void* C; int64_t C_batch_stride, C_seq_stride;
  const void* z; int64_t z_batch_stride, z_seq_stride;              // may be null
  // A, D, delta_bias (and dA, dD, ddelta_bias) are fp32, or fp64 when dtype is kFloat64.
  const void* A; int64_t A_dim_stride;                              // (dim, d_state)
  const void* D;                                                    // (dim,) may be null
  const void* delta_bias;                                           // (dim,) may be null
  const int32_t* seq_idx; int64_t seq_idx_batch_stride;             // (batch, seqlen) may be null; unit stride in t

  void* out; int64_t out_batch_stride, out_seq_stride;              // (batch, seqlen, dim), written

  // Backward only: dout in, gradients out (dA, dD, ddelta_bias reduced deterministically).
  const void* dout; int64_t dout_batch_stride, dout_seq_stride;
  void* du; void* ddelta; void* dB; void* dC; void* dz;             // contiguous, same shapes as inputs
  void* dA; void* dD; void* ddelta_bias;                            // dD / ddelta_bias may be null
  void* workspace;                                                  // backend-specific scratch (may be null)
  bool compact_workspace;  // CUDA: the workspace is laid out for the compact backward (set with its size)
};

// The per-step math, in one place for both backends.
template <typename T>
R2LM_HD T scan_softplus(T x) {
  // log1p(exp(x)), exact to rounding for large x as in torch.nn.functional.softplus (threshold 20).
  return x > T(20) ? x : log1p_same_type(exp_same_type(x));
}

template <typename T>
R2LM_HD T scan_sigmoid(T x) { return T(1) / (T(1) + exp_same_type(-x)); }

template <typename T>
R2LM_HD T scan_silu(T x) { return x * scan_sigmoid(x); }

// Effective step size dt = softplus(delta + bias) (or delta + bias), and d dt / d delta.
template <typename T>
R2LM_HD T scan_dt(T delta, T bias, bool softplus) {
  T x = delta + bias;
  return softplus ? scan_softplus(x) : x;
}
template <typename T>
R2LM_HD T scan_dt_grad(T delta, T bias, bool softplus) {
  T x = delta + bias;
  return softplus ? (x > T(20) ? T(1) : scan_sigmoid(x)) : T(1);
}

// d silu(z) / dz.
template <typename T>
R2LM_HD T scan_silu_grad(T z) {
  T s = scan_sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// Adjoint of one step of the recurrence, h_t = exp(dt * a) * h_{t+1} + dt * b * u, for one (channel, state)
// pair. g = dL/dh_t; h_next = the state the step started from (h_{t+1}, zero after a reset); decay =
// exp(dt * a). Adds this pair's contributions to ddt, da, db and du; the adjoint carried on to h_{t+1} is
// decay * g.
template <typename T>
R2LM_HD void scan_step_bwd(T g, T h_next, T dt, T a, T b, T u, T decay, T& ddt, T& da, T& db, T& du) {
  T g_decay_h = g * decay * h_next;
  ddt += g_decay_h * a + g * b * u;
  da += g_decay_h * dt;
  db += g * dt * u;
  du += g * dt * b;
}

// CPU kernels (reverse_selective_scan_cpu.cpp).
void reverse_selective_scan_fwd_cpu(const ScanParams& p);
void reverse_selective_scan_bwd_cpu(const ScanParams& p);

#ifdef R2LM_WITH_CUDA
// CUDA kernels (reverse_selective_scan_cuda.cu), launched on `stream` (a cudaStream_t). Workspace bytes
// the backward needs are reported by reverse_selective_scan_bwd_workspace_cuda, which also picks the
// backward's configuration (p.compact_workspace) for reverse_selective_scan_bwd_cuda.
void reverse_selective_scan_fwd_cuda(const ScanParams& p, void* stream);
int64_t reverse_selective_scan_bwd_workspace_cuda(ScanParams& p);
void reverse_selective_scan_bwd_cuda(const ScanParams& p, void* stream);
#endif

}  // namespace r2lm
