// The op registry: every r2lm schema is defined here, once. Each backend registers its kernels
// with TORCH_LIBRARY_IMPL beside the kernel (csrc/<op>/<op>_torch.cpp).
#include <torch/library.h>
#include <pybind11/pybind11.h>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r2lm_kernels compiled extension: registers torch.ops.r2lm.*";
  m.def("compiled_backends", &compiled_backends, "Which kernel backends this build contains.");
  m.def("cpu_vector_bytes", &r2lm::cpu_vector_bytes,
        "Vector width in bytes (64, 32 or 16) of the portable CPU kernels on this CPU, after the "
        "R2LM_CPU_VECTOR_BYTES cap.");
}
