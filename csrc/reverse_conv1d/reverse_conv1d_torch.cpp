// reverse_conv1d torch layer: argument checks, output allocation, ConvParams, backend registration.
//
// dtypes: x (and y, dy, dx) float32 / bfloat16 / float16, plus float64 on CPU (gradcheck). weight and
// bias each in x's dtype or float32 (fp32 parameters with half-precision activations is the usual
// mixed-precision setup); dweight / dbias come back in the dtype of weight / bias. Arithmetic is fp32
// (fp64 for fp64 x), rounded once on output.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#ifdef R2LM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>
#include <tuple>

#include "reverse_conv1d/reverse_conv1d.h"
#include "torch_checks.h"

namespace r2lm {
namespace {

constexpr const char* kOp = "reverse_conv1d";

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& seq_idx) {
  TORCH_CHECK(x.dim() == 3, kOp, ": x must have shape (batch, seqlen, dim), got ", shape_str(x));
  if (x.is_cuda())
    check_dtype(x, kOp, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  else
    check_dtype(x, kOp, "x", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_last_dim_contiguous(x, kOp, "x");
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2);

  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim, kOp, ": weight must have shape (dim, width) = (", dim,
              ", width), got ", shape_str(weight));
  TORCH_CHECK(weight.size(1) >= 1 && weight.size(1) <= kConvMaxWidth, kOp,
              ": weight width (its size(1)) must be in [1, ", kConvMaxWidth, "], got ", weight.size(1));
  check_dtype(weight, kOp, "weight", {x.scalar_type(), at::kFloat});
  check_same_device(weight, x, kOp, "weight");
  if (bias) {
    check_shape(*bias, kOp, "bias", {dim});
    check_dtype(*bias, kOp, "bias", {x.scalar_type(), at::kFloat});
    check_same_device(*bias, x, kOp, "bias");
  }
  if (seq_idx) {
    check_shape(*seq_idx, kOp, "seq_idx", {batch, seqlen});
    check_dtype(*seq_idx, kOp, "seq_idx", {at::kInt});
    check_same_device(*seq_idx, x, kOp, "seq_idx");
  }
}

ConvParams make_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& seq_idx, bool silu) {
  ConvParams p{};
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.dim = x.size(2);
  p.width = static_cast<int>(weight.size(1));
  p.dtype = to_dtype(x.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_seq_stride = x.stride(1);
  p.weight = weight.data_ptr();
  p.weight_dim_stride = weight.stride(0);
  p.weight_tap_stride = weight.stride(1);
  if (bias) {
    p.bias = bias->data_ptr();
    p.bias_dtype = to_dtype(bias->scalar_type());
    p.bias_stride = bias->stride(0);
  }
  if (seq_idx) {
    p.seq_idx = seq_idx->data_ptr<int32_t>();
    p.seq_idx_batch_stride = seq_idx->stride(0);
    p.seq_idx_seq_stride = seq_idx->stride(1);
  }
  return p;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& seq_idx, bool silu) {
  check_inputs(x, weight, bias, seq_idx);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  ConvParams p = make_params(x, weight, bias, seq_idx, silu);
  p.y = y.data_ptr();
  p.y_batch_stride = y.stride(0);
  p.y_seq_stride = y.stride(1);
#ifdef R2LM_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    const char* error = reverse_conv1d_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, kOp, ": CUDA kernel launch failed: ", error);
    return y;
  }
#endif
  use_torch_thread_count();
  reverse_conv1d_fwd_cpu(p);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& seq_idx, bool silu) {
  check_inputs(x, weight, bias, seq_idx);
  check_shape(dy, "reverse_conv1d_backward", "dy", {x.size(0), x.size(1), x.size(2)});
  check_dtype(dy, "reverse_conv1d_backward", "dy", {x.scalar_type()});
  check_same_device(dy, x, "reverse_conv1d_backward", "dy");
  check_last_dim_contiguous(dy, "reverse_conv1d_backward", "dy");

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = bias ? at::empty_like(*bias) : at::empty({0}, x.options());
  if (x.numel() == 0) {  // no tokens: zero parameter gradients, nothing else to do
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  ConvParams p = make_params(x, weight, bias, seq_idx, silu);
  p.dy = dy.data_ptr();
  p.dy_batch_stride = dy.stride(0);
  p.dy_seq_stride = dy.stride(1);
  p.dx = dx.data_ptr();
  p.dx_batch_stride = dx.stride(0);
  p.dx_seq_stride = dx.stride(1);
  p.dweight = dweight.data_ptr();
  p.dweight_dim_stride = dweight.stride(0);
  p.dweight_tap_stride = dweight.stride(1);
  if (bias) {
    p.dbias = dbias.data_ptr();
    p.dbias_stride = dbias.stride(0);
  }
#ifdef R2LM_WITH_CUDA
  if (x.is_cuda()) {
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor workspace = at::empty({(reverse_conv1d_bwd_workspace_cuda(p) + 3) / 4}, x.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr();
    const char* error = reverse_conv1d_bwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == nullptr, "reverse_conv1d_backward: CUDA kernel launch failed: ", error);
    return {dx, dweight, dbias};
  }
#endif
  use_torch_thread_count();
  reverse_conv1d_bwd_cpu(p);
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(r2lm, CPU, m) {
  m.impl("reverse_conv1d", &forward);
  m.impl("reverse_conv1d_backward", &backward);
}

#ifdef R2LM_WITH_CUDA
TORCH_LIBRARY_IMPL(r2lm, CUDA, m) {
  m.impl("reverse_conv1d", &forward);
  m.impl("reverse_conv1d_backward", &backward);
}
#endif

}  // namespace r2lm
