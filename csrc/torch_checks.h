// Argument checks for the torch-facing layer: every failure names the argument and what was expected.
#pragma once

#include <torch/library.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "r2lm_common.h"

namespace r2lm {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// Checks that `t` has exactly `sizes` (a -1 entry accepts any size).
inline void check_shape(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<int64_t> sizes) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t i = 0;
  for (int64_t s : sizes) {
    if (ok && s >= 0 && t.size(i) != s) ok = false;
    ++i;
  }
  if (!ok) {
    std::string want = "(";
    i = 0;
    for (int64_t s : sizes) want += (i++ ? ", " : "") + (s >= 0 ? std::to_string(s) : std::string("*"));
    want += ")";
    TORCH_CHECK(false, op, ": ", name, " must have shape ", want, ", got ", shape_str(t));
  }
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::string want;
  int index = 0;
  for (auto s : allowed) {
    bool repeat = false;  // a list such as {x's dtype, kFloat} may name one twice
    for (int j = 0; j < index; ++j) repeat = repeat || allowed.begin()[j] == s;
    if (!repeat) want += std::string(want.empty() ? "" : " or ") + c10::toString(s);
    ++index;
  }
  TORCH_CHECK(false, op, ": ", name, " must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like the first input, got ",
              t.device());
}

// Whether no two elements of `t` share memory, decided from its strides alone: sorted by stride, each
// dimension must step past the whole extent of the smaller ones. at::has_internal_overlap answers only
// the easy cases (dense, or a zero stride) and "too hard" for partly overlapping as_strided views. The
// test also refuses the rare layouts that interleave dimensions without sharing (sizes (3, 2), strides
// (2, 3)): such a tensor cannot be shown apart cheaply.
inline bool elements_apart(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions that step
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;  // the largest offset the smaller dimensions reach
  for (auto [stride, size] : dims) {
    if (stride <= extent) return false;
    extent += (size - 1) * stride;
  }
  return true;
}

// A tensor written in place must not have elements sharing memory (an expanded view, say): the kernels
// would write them from several threads and keep one write at random.
inline void check_no_internal_overlap(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(elements_apart(t), op, ": ", name,
              " is written in place and must not have elements sharing memory (an expanded or as_strided view?), "
              "got sizes ", shape_str(t), " and strides ", c10::str(t.strides()));
}

inline void check_no_overlap(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                             const char* name_b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name_a,
              " and ", name_b, " are written in place and must not share memory");
}

// Tensors without elements have no layout to check (autograd may hand over all-zero strides for them).
inline void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have unit stride in its last dimension, got strides ", c10::str(t.strides()));
}

// Before a CPU kernel: this thread's OpenMP team takes torch's thread count (torch.set_num_threads), as
// ATen's own ops make it do; in a thread that has run no ATen parallel op it would be OpenMP's default.
inline void use_torch_thread_count() { at::internal::lazy_init_num_threads(); }

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "r2lm: unsupported dtype ", s);
  }
}

}  // namespace r2lm
