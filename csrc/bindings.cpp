// The op registry: every r2lm schema is defined here, once. Each backend registers its kernels
// with TORCH_LIBRARY_IMPL beside the kernel (csrc/<op>/<op>_torch.cpp).
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <torch/version.h>
#include <pybind11/pybind11.h>

#include <vector>

#include "cpu_vector.h"

TORCH_LIBRARY(r2lm, m) {
  // DESIGN.md 3.1. Backward returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); the gradients of
  // absent optional inputs are empty tensors.
  m.def("reverse_selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D=None, "
        "Tensor? z=None, Tensor? delta_bias=None, bool delta_softplus=False, Tensor? seq_idx=None) -> Tensor");
  m.def("reverse_selective_scan_backward(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? seq_idx) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // DESIGN.md 3.2; silu fuses the activation. Backward returns (dx, dweight, dbias).
  m.def("reverse_conv1d(Tensor x, Tensor weight, Tensor? bias=None, Tensor? seq_idx=None, bool silu=False) -> Tensor");
  m.def("reverse_conv1d_backward(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, bool silu) "
        "-> (Tensor, Tensor, Tensor)");
  // DESIGN.md 3.3. Returns (out, lse); lse is (batch, n_heads, q_len) fp32. Writes the block's k/v into
  // the caches when write_kv.
  m.def("cache_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_seqlens, *, Tensor? block_table=None, float? softmax_scale=None, bool causal=True, "
        "bool write_kv=True) -> (Tensor, Tensor)");
  // DESIGN.md 3.4. `step_tensor` (one-element int64, on the logits' device) overrides `step` so a
  // captured CUDA graph reads a fresh step on every replay. Returns (committed, confidence, n_masked).
  m.def("parallel_commit(Tensor logits, Tensor(a!) tokens, *, int mask_token_id, float threshold, "
        "int min_per_step=1, int max_per_step=0, float temperature=0.0, int seed=0, int step=0, "
        "Tensor? step_tensor=None, Tensor? active=None, str score=\"prob\") -> (Tensor, Tensor, Tensor)");
}

namespace {

// The ops that write arguments in place (schema `Tensor(a!)`) return fresh tensors, not the written ones, so
// PyTorch's own ADInplaceOrView fallback (which bumps written *outputs*) does not apply. This kernel bumps
// the written arguments' version counters, as built-in in-place ops do: autograd then notices a tensor it
// saved being overwritten, and an inference tensor is refused outside inference mode.
void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    at::Tensor t = (*stack)[first + i].toTensor();
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op.schema().name(), ": ",
                arguments[i].name(), " is an inference tensor, which the op writes in place: call it inside "
                "torch.inference_mode() or pass a normal tensor");
    written.push_back(std::move(t));
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

// cache_attention and parallel_commit have no derivative (generation with a KV cache; discrete commits).
// With grad mode on, an input that requires grad is refused, naming it, rather than left with a silently
// missing gradient, and so is an input carrying a forward-mode tangent (a dual tensor, torch.func.jvp);
// the op is called through torch.ops.r2lm or the Python wrappers alike.
void refuse_inputs_to_differentiate(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                    torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    TORCH_CHECK_NOT_IMPLEMENTED(!(value.isTensor() && value.toTensor()._fw_grad(/*level=*/0).defined()),
                                op.schema().name(), " has no forward-mode AD: ", arguments[i].name(),
                                " carries a tangent (a dual tensor, or torch.func.jvp)");
  }
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < arguments.size(); ++i) {
      const c10::IValue& value = (*stack)[first + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op.schema().name(),
                  " has no backward: ", arguments[i].name(), " requires grad; call it under torch.no_grad() or "
                  "torch.inference_mode(), or pass ", arguments[i].name(), ".detach()");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

// The backward ops have no derivative either: a backward through them (double backward of the scan or the
// conv) raises instead of silently dropping the second-order gradients.
TORCH_LIBRARY_IMPL(r2lm, Autograd, m) {
  for (const char* op : {"reverse_selective_scan_backward", "reverse_conv1d_backward"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  for (const char* op : {"cache_attention", "parallel_commit"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_inputs_to_differentiate>());
}

TORCH_LIBRARY_IMPL(r2lm, ADInplaceOrView, m) {
  for (const char* op : {"cache_attention", "parallel_commit"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written_arguments>());
}

namespace {

pybind11::dict compiled_backends() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef R2LM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = R2LM_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  return d;
}

// What the extension was compiled against and asked for: the Python side refuses a torch of another
// release (C++ ABI), and the tests read the build's R2LM_CUDA.
pybind11::dict build_info() {
  pybind11::dict d;
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  d["cuda_option"] = R2LM_CUDA_OPTION;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r2lm_kernels compiled extension: registers torch.ops.r2lm.*";
  m.def("compiled_backends", &compiled_backends, "Which kernel backends this build contains.");
  m.def("build_info", &build_info, "The torch release (major.minor) and R2LM_CUDA option of this build.");
  m.def("cpu_vector_bytes", &r2lm::cpu_vector_bytes,
        "Vector width in bytes (64, 32 or 16) of the portable CPU kernels on this CPU, after the "
        "R2LM_CPU_VECTOR_BYTES cap.");
}
