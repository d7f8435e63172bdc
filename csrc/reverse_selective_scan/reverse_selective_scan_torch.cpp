// reverse_selective_scan: argument checks, output allocation and the CPU/CUDA registrations.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "reverse_selective_scan/reverse_selective_scan.h"
#include "torch_checks.h"

#ifdef R2LM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace r2lm {
namespace {

constexpr const char* kOp = "reverse_selective_scan";
constexpr int64_t kCudaMaxState = 64;  // the CUDA kernel keeps up to 64 states per channel in registers

// Checks every input and fills the forward part of ScanParams (everything but out and the backward).
ScanParams check_and_fill(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                          const at::Tensor& C, const std::optional<at::Tensor>& D,
                          const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                          bool delta_softplus, const std::optional<at::Tensor>& seq_idx) {
  const bool cuda = u.is_cuda();
  TORCH_CHECK(u.is_cpu() || cuda, kOp, ": u must be a CPU or CUDA tensor, got ", u.device());
  if (cuda)
    check_dtype(u, kOp, "u", {at::kFloat, at::kBFloat16, at::kHalf});
  else
    check_dtype(u, kOp, "u", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  TORCH_CHECK(u.dim() == 3, kOp, ": u must have shape (batch, seqlen, dim), got ", shape_str(u));
  const int64_t batch = u.size(0), seqlen = u.size(1), dim = u.size(2);
  // A, D and delta_bias are parameters: fp32, or fp64 alongside fp64 activations.
  const at::ScalarType param_dtype = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  TORCH_CHECK(A.dim() == 2, kOp, ": A must have shape (dim, d_state) = (", dim, ", *), got ", shape_str(A));
  const int64_t d_state = A.size(1);
  TORCH_CHECK(d_state >= 1, kOp, ": A must have d_state >= 1, got shape ", shape_str(A));
  TORCH_CHECK(!cuda || d_state <= kCudaMaxState, kOp, ": A has d_state ", d_state, "; the CUDA kernel supports up to ",
              kCudaMaxState);

  auto check_activation = [&](const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
    check_same_device(t, u, kOp, name);
    check_shape(t, kOp, name, shape);
    check_dtype(t, kOp, name, {u.scalar_type()});
    check_last_dim_contiguous(t, kOp, name);
  };
  auto check_param = [&](const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
    check_same_device(t, u, kOp, name);
    check_shape(t, kOp, name, shape);
    check_dtype(t, kOp, name, {param_dtype});
    check_last_dim_contiguous(t, kOp, name);
  };
  check_last_dim_contiguous(u, kOp, "u");
  check_activation(delta, "delta", {batch, seqlen, dim});
  check_param(A, "A", {dim, d_state});
  check_activation(B, "B", {batch, seqlen, d_state});
  check_activation(C, "C", {batch, seqlen, d_state});
  if (D) check_param(*D, "D", {dim});
  if (z) check_activation(*z, "z", {batch, seqlen, dim});
  if (delta_bias) check_param(*delta_bias, "delta_bias", {dim});
  if (seq_idx) {
    check_same_device(*seq_idx, u, kOp, "seq_idx");
    check_shape(*seq_idx, kOp, "seq_idx", {batch, seqlen});
    check_dtype(*seq_idx, kOp, "seq_idx", {at::kInt});
    check_last_dim_contiguous(*seq_idx, kOp, "seq_idx");
  }

  ScanParams p{};
  p.batch = batch; p.seqlen = seqlen; p.dim = dim; p.d_state = d_state;
  p.dtype = to_dtype(u.scalar_type());
  p.delta_softplus = delta_softplus;
  p.u = u.data_ptr(); p.u_batch_stride = u.stride(0); p.u_seq_stride = u.stride(1);
  p.delta = delta.data_ptr(); p.delta_batch_stride = delta.stride(0); p.delta_seq_stride = delta.stride(1);
  p.B = B.data_ptr(); p.B_batch_stride = B.stride(0); p.B_seq_stride = B.stride(1);
  p.C = C.data_ptr(); p.C_batch_stride = C.stride(0); p.C_seq_stride = C.stride(1);
  if (z) { p.z = z->data_ptr(); p.z_batch_stride = z->stride(0); p.z_seq_stride = z->stride(1); }
  p.A = A.data_ptr(); p.A_dim_stride = A.stride(0);
  p.D = D ? D->data_ptr() : nullptr;
  p.delta_bias = delta_bias ? delta_bias->data_ptr() : nullptr;
  if (seq_idx) { p.seq_idx = seq_idx->data_ptr<int32_t>(); p.seq_idx_batch_stride = seq_idx->stride(0); }
  return p;
}

at::Tensor alloc_out(const at::Tensor& u, ScanParams& p) {
  at::Tensor out = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = out.data_ptr(); p.out_batch_stride = out.stride(0); p.out_seq_stride = out.stride(1);
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks dout, allocates the gradients (contiguous; empty for absent optional inputs) and points p at them.
Grads alloc_grads(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& A, const at::Tensor& B,
                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& delta_bias, ScanParams& p) {
  check_same_device(dout, u, "reverse_selective_scan_backward", "dout");
  check_shape(dout, "reverse_selective_scan_backward", "dout", {p.batch, p.seqlen, p.dim});
  check_dtype(dout, "reverse_selective_scan_backward", "dout", {u.scalar_type()});
  check_last_dim_contiguous(dout, "reverse_selective_scan_backward", "dout");
  p.dout = dout.data_ptr(); p.dout_batch_stride = dout.stride(0); p.dout_seq_stride = dout.stride(1);

  const auto act = u.options().memory_format(at::MemoryFormat::Contiguous);
  const auto param = A.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor du = at::empty(u.sizes(), act), ddelta = at::empty(u.sizes(), act);
  at::Tensor dB = at::empty(B.sizes(), act), dC = at::empty(B.sizes(), act);
  at::Tensor dA = at::empty(A.sizes(), param);
  at::Tensor dD = D ? at::empty({p.dim}, param) : u.new_empty({0});
  at::Tensor dz = z ? at::empty(u.sizes(), act) : u.new_empty({0});
  at::Tensor ddelta_bias = delta_bias ? at::empty({p.dim}, param) : u.new_empty({0});
  p.du = du.data_ptr(); p.ddelta = ddelta.data_ptr(); p.dB = dB.data_ptr(); p.dC = dC.data_ptr();
  p.dA = dA.data_ptr();
  p.dD = D ? dD.data_ptr() : nullptr;
  p.dz = z ? dz.data_ptr() : nullptr;
  p.ddelta_bias = delta_bias ? ddelta_bias.data_ptr() : nullptr;
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias};
}

// With nothing to scan (no batch, tokens or channels) the kernels are not launched; the gradients of the
// inputs that may still hold elements (A, B and C, D, delta_bias: B and C when there are no channels)
// are then zero. Returns whether that was the case.
bool zero_grads_if_empty(const at::Tensor& u, Grads& grads) {
  if (u.numel() > 0) return false;
  std::get<2>(grads).zero_();
  std::get<3>(grads).zero_();
  std::get<4>(grads).zero_();
  std::get<5>(grads).zero_();
  std::get<7>(grads).zero_();
  return true;
}

at::Tensor scan_fwd_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                        const std::optional<at::Tensor>& seq_idx) {
  ScanParams p = check_and_fill(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx);
  at::Tensor out = alloc_out(u, p);
  use_torch_thread_count();
  if (out.numel() > 0) reverse_selective_scan_fwd_cpu(p);
  return out;
}

Grads scan_bwd_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                   bool delta_softplus, const std::optional<at::Tensor>& seq_idx) {
  ScanParams p = check_and_fill(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx);
  Grads grads = alloc_grads(dout, u, A, B, D, z, delta_bias, p);
  use_torch_thread_count();
  if (!zero_grads_if_empty(u, grads)) reverse_selective_scan_bwd_cpu(p);
  return grads;
}

#ifdef R2LM_WITH_CUDA
// The CUDA kernels put the sequences of the batch on gridDim.y.
void check_cuda_batch(const ScanParams& p) {
  TORCH_CHECK(p.batch <= 65535, kOp, ": u has batch ", p.batch, "; the CUDA kernels take at most 65535 sequences");
}

at::Tensor scan_fwd_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                         const std::optional<at::Tensor>& seq_idx) {
  ScanParams p = check_and_fill(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx);
  check_cuda_batch(p);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = alloc_out(u, p);
  if (out.numel() > 0) reverse_selective_scan_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}

Grads scan_bwd_cuda(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                    bool delta_softplus, const std::optional<at::Tensor>& seq_idx) {
  ScanParams p = check_and_fill(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx);
  check_cuda_batch(p);
  const c10::cuda::CUDAGuard guard(u.device());
  Grads grads = alloc_grads(dout, u, A, B, D, z, delta_bias, p);
  if (zero_grads_if_empty(u, grads)) return grads;
  const int64_t workspace_bytes = reverse_selective_scan_bwd_workspace_cuda(p);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({workspace_bytes}, u.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  reverse_selective_scan_bwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
  return grads;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(r2lm, CPU, m) {
  m.impl("reverse_selective_scan", &scan_fwd_cpu);
  m.impl("reverse_selective_scan_backward", &scan_bwd_cpu);
}

#ifdef R2LM_WITH_CUDA
TORCH_LIBRARY_IMPL(r2lm, CUDA, m) {
  m.impl("reverse_selective_scan", &scan_fwd_cuda);
  m.impl("reverse_selective_scan_backward", &scan_bwd_cuda);
}
#endif

}  // namespace r2lm
