// cache_attention torch layer: argument checks, output allocation, dispatch to the CPU / CUDA kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cache_attention/cache_attention.h"
#include "torch_checks.h"

#ifdef R2LM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace r2lm {
namespace {

constexpr const char* kOp = "cache_attention";

// Shape, dtype, device and stride checks (free on the host); fills everything in the params except
// out / lse / split scratch.
CacheAttnParams check_and_fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                               std::optional<double> softmax_scale, bool causal) {
  TORCH_CHECK(q.dim() == 4, kOp, ": q must have shape (batch, q_len, n_heads, head_dim), got ", shape_str(q));
  const int64_t batch = q.size(0), q_len = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(k.dim() == 4, kOp, ": k must have shape (batch, q_len, n_kv_heads, head_dim), got ", shape_str(k));
  const int64_t n_kv = k.size(2);
  check_shape(k, kOp, "k", {batch, q_len, -1, head_dim});
  check_shape(v, kOp, "v", {batch, q_len, n_kv, head_dim});
  TORCH_CHECK(head_dim == 64 || head_dim == 128, kOp, ": head_dim (q.size(3)) must be 64 or 128, got ", head_dim);
  TORCH_CHECK(n_heads > 0, kOp, ": q must have at least one head (q.size(2)), got ", shape_str(q));
  TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0, kOp, ": n_heads (q.size(2) = ", n_heads,
              ") must be a multiple of n_kv_heads (k.size(2) = ", n_kv, ")");
  check_dtype(q, kOp, "q", {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble});
  for (auto [t, name] : {std::pair{&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    check_same_device(*t, q, kOp, name);
  }
  check_same_device(cache_seqlens, q, kOp, "cache_seqlens");
  check_dtype(cache_seqlens, kOp, "cache_seqlens", {at::kInt});
  check_shape(cache_seqlens, kOp, "cache_seqlens", {batch});

  const bool paged = block_table.has_value();
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must have shape ",
              paged ? "(num_pages, page_size, n_kv_heads, head_dim)" : "(batch, max_len, n_kv_heads, head_dim)",
              ", got ", shape_str(k_cache));
  check_shape(k_cache, kOp, "k_cache", {paged ? -1 : batch, -1, n_kv, head_dim});
  check_shape(v_cache, kOp, "v_cache", {k_cache.size(0), k_cache.size(1), n_kv, head_dim});
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    check_last_dim_contiguous(*t, kOp, name);
  TORCH_CHECK(cache_seqlens.stride(0) == 1 || batch <= 1, kOp, ": cache_seqlens must be contiguous");

  CacheAttnParams p{};
  p.batch = batch; p.q_len = q_len; p.n_heads = n_heads; p.n_kv_heads = n_kv; p.head_dim = head_dim;
  p.group = n_heads / n_kv;
  p.dtype = to_dtype(q.scalar_type());
  TORCH_CHECK(!softmax_scale.has_value() || std::isfinite(*softmax_scale), kOp,
              ": softmax_scale must be finite (or None for 1/sqrt(head_dim)), got ", softmax_scale.value_or(0.0));
  p.scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(head_dim));
  // Below fp64 the kernels scale in float32, times log2(e) for exp2.
  constexpr double kMaxFloatScale = std::numeric_limits<float>::max() / 1.4426950408889634;
  TORCH_CHECK(p.dtype == DType::kFloat64 || std::abs(p.scale) <= kMaxFloatScale, kOp,
              ": softmax_scale must be at most ", kMaxFloatScale, " in magnitude for ", q.scalar_type(),
              " inputs (the kernels compute in float32), got ", p.scale);
  p.causal = causal;
  p.q = q.data_ptr(); p.q_batch_stride = q.stride(0); p.q_seq_stride = q.stride(1); p.q_head_stride = q.stride(2);
  p.k = k.data_ptr(); p.k_batch_stride = k.stride(0); p.k_seq_stride = k.stride(1); p.k_head_stride = k.stride(2);
  p.v = v.data_ptr(); p.v_batch_stride = v.stride(0); p.v_seq_stride = v.stride(1); p.v_head_stride = v.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.k_cache_page_stride = k_cache.stride(0); p.k_cache_slot_stride = k_cache.stride(1);
  p.k_cache_head_stride = k_cache.stride(2);
  p.v_cache = v_cache.data_ptr();
  p.v_cache_page_stride = v_cache.stride(0); p.v_cache_slot_stride = v_cache.stride(1);
  p.v_cache_head_stride = v_cache.stride(2);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.num_pages = k_cache.size(0);
  p.page_size = k_cache.size(1);
  p.capacity = p.page_size;
  if (paged) {
    const at::Tensor& table = *block_table;
    check_same_device(table, q, kOp, "block_table");
    check_dtype(table, kOp, "block_table", {at::kInt});
    check_shape(table, kOp, "block_table", {batch, -1});
    check_last_dim_contiguous(table, kOp, "block_table");
    TORCH_CHECK(p.page_size > 0, kOp, ": k_cache page_size (k_cache.size(1)) must be positive");
    p.block_table = table.data_ptr<int32_t>();
    p.block_table_batch_stride = table.stride(0);
    // Bounded before the product, which could overflow int64 for an empty pool of huge pages.
    TORCH_CHECK(table.size(1) == 0 || p.page_size <= ((int64_t(1) << 31) - 1) / table.size(1), kOp,
                ": cache capacity k_cache.size(1) * block_table.size(1) = ", p.page_size, " * ", table.size(1),
                " must fit in 32 bits");
    p.capacity = p.page_size * table.size(1);
  }
  TORCH_CHECK(p.capacity + q_len < (int64_t(1) << 31), kOp, ": cache capacity ", p.capacity,
              " (plus q_len) must fit in 32 bits");
  return p;
}

// write_kv stores into the caches: two slots sharing memory would be written by several threads.
void check_writable_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_no_internal_overlap(k_cache, kOp, "k_cache");
  check_no_internal_overlap(v_cache, kOp, "v_cache");
  check_no_overlap(k_cache, v_cache, kOp, "k_cache", "v_cache");
}

// With write_kv, a k or v that lives in a cache's memory (e.g. already in the draft slots) could be
// overwritten by the write before it is read: such an input is copied first, so the op stores the block's
// k/v as they were on entry.
at::Tensor apart_from_caches(const at::Tensor& t, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             bool write_kv) {
  return write_kv && (t.is_alias_of(k_cache) || t.is_alias_of(v_cache)) ? t.clone() : t;
}

// Value checks that need the data: done on CPU, where reading it is free. Without write_kv the draft
// slots are never touched, so only the committed positions must fit (a full cache is fine).
void check_values_cpu(const CacheAttnParams& p, const at::Tensor& cache_seqlens,
                      const std::optional<at::Tensor>& block_table, bool write_kv) {
  const int32_t* lens = p.cache_seqlens;
  const char* capacity_is = block_table ? " (page_size * block_table.size(1))" : " (k_cache.size(1))";
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK(lens[b] >= 0, kOp, ": cache_seqlens[", b, "] = ", lens[b], " is negative");
    const int64_t used = lens[b] + (write_kv ? p.q_len : 0);
    if (write_kv) {
      TORCH_CHECK(used <= p.capacity, kOp, ": cache too small: cache_seqlens[", b, "] + q_len = ", used,
                  " exceeds the cache capacity ", p.capacity, capacity_is, " (write_kv fills the draft slots)");
    } else {
      TORCH_CHECK(used <= p.capacity, kOp, ": cache_seqlens[", b, "] = ", used, " exceeds the cache capacity ",
                  p.capacity, capacity_is);
    }
    if (!p.block_table) continue;
    // Every page the sequence touches (committed slots, and draft slots with write_kv) must exist.
    const int64_t pages_used = (used + p.page_size - 1) / p.page_size;
    for (int64_t j = 0; j < pages_used; ++j) {
      const int32_t page = p.block_table[b * p.block_table_batch_stride + j];
      TORCH_CHECK(page >= 0 && page < p.num_pages, kOp, ": block_table[", b, ", ", j, "] = ", page,
                  " is out of range [0, ", p.num_pages, ") (k_cache.size(0))");
    }
  }
  // Sequences may share the pages they read (a common prefix), not a slot that write_kv fills: each draft
  // slot lies past every committed slot of its page (those are the page's first slots) and is filled once.
  if (!p.block_table || !write_kv) return;
  auto page_of = [&](int64_t b, int64_t pos) -> int64_t {
    return p.block_table[b * p.block_table_batch_stride + pos / p.page_size];
  };
  std::vector<int64_t> draft_pages;  // sorted, unique: few, so the committed counts below stay small
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t pos = lens[b]; pos < lens[b] + p.q_len; ++pos) draft_pages.push_back(page_of(b, pos));
  std::sort(draft_pages.begin(), draft_pages.end());
  draft_pages.erase(std::unique(draft_pages.begin(), draft_pages.end()), draft_pages.end());
  auto draft_index = [&](int64_t page) {
    const auto it = std::lower_bound(draft_pages.begin(), draft_pages.end(), page);
    return it != draft_pages.end() && *it == page ? it - draft_pages.begin() : int64_t(-1);
  };
  std::vector<int64_t> committed(draft_pages.size(), 0);  // per draft page: its leading slots some sequence committed
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t j = 0; j * p.page_size < lens[b]; ++j) {
      const int64_t i = draft_index(page_of(b, j * p.page_size));
      if (i >= 0) committed[i] = std::max(committed[i], std::min<int64_t>(p.page_size, lens[b] - j * p.page_size));
    }
  }
  std::vector<int64_t> slots;
  slots.reserve(p.batch * p.q_len);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t pos = lens[b]; pos < lens[b] + p.q_len; ++pos) {
      const int64_t page = page_of(b, pos);
      TORCH_CHECK(pos % p.page_size >= committed[draft_index(page)], kOp, ": block_table maps draft position ", pos,
                  " of sequence ", b, " to page ", page, ", slot ", pos % p.page_size,
                  ", which a sequence has committed (write_kv would overwrite it)");
      slots.push_back(page * p.page_size + pos % p.page_size);
    }
  }
  std::sort(slots.begin(), slots.end());
  const auto twice = std::adjacent_find(slots.begin(), slots.end());
  TORCH_CHECK(twice == slots.end(), kOp, ": block_table maps two draft positions to page ", *twice / p.page_size,
              ", slot ", *twice % p.page_size, ", which write_kv would fill twice");
}

std::tuple<at::Tensor, at::Tensor> cache_attention_cpu_impl(
    const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    std::optional<double> softmax_scale, bool causal, bool write_kv) {
  const at::Tensor k = apart_from_caches(k_in, k_cache, v_cache, write_kv);
  const at::Tensor v = apart_from_caches(v_in, k_cache, v_cache, write_kv);
  CacheAttnParams p = check_and_fill(q, k, v, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal);
  if (write_kv) check_writable_caches(k_cache, v_cache);
  check_values_cpu(p, cache_seqlens, block_table, write_kv);
  at::Tensor out = at::empty({p.batch, p.q_len, p.n_heads, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.n_heads, p.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.num_splits = 1;
  use_torch_thread_count();
  cache_attention_cpu(p, write_kv);
  return {out, lse};
}

#ifdef R2LM_WITH_CUDA
// On CUDA the value checks would need a host sync; the kernels clamp lengths into the cache and skip
// slots without a valid page instead (the Python wrapper validates on request, see its docstring).
std::tuple<at::Tensor, at::Tensor> cache_attention_cuda_impl(
    const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
    const at::Tensor& v_cache, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    std::optional<double> softmax_scale, bool causal, bool write_kv) {
  const at::Tensor k = apart_from_caches(k_in, k_cache, v_cache, write_kv);
  const at::Tensor v = apart_from_caches(v_in, k_cache, v_cache, write_kv);
  CacheAttnParams p = check_and_fill(q, k, v, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal);
  if (write_kv) check_writable_caches(k_cache, v_cache);
  TORCH_CHECK(q.scalar_type() != at::kDouble, kOp, ": q dtype float64 is supported on CPU only; on CUDA use "
              "float16, bfloat16 or float32");
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    const int64_t align = 16 / t->element_size();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 &&
                    (t->size(0) <= 1 || t->stride(0) % align == 0) && (t->size(1) <= 1 || t->stride(1) % align == 0) &&
                    (t->size(2) <= 1 || t->stride(2) % align == 0),
                kOp, ": ", name, " must be 16-byte aligned with strides that are multiples of ", align,
                " elements on CUDA, got strides ", c10::str(t->strides()));
  }
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({p.batch, p.q_len, p.n_heads, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.n_heads, p.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  // Grid limits of the launches (gridDim.x < 2^31, gridDim.y <= 65535): checked here, not truncated.
  constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
  TORCH_CHECK((p.q_len * p.group + 63) / 64 <= 65535 && p.batch * p.n_kv_heads <= kMaxGridX &&
                  p.batch * p.q_len <= kMaxGridX && (p.batch * p.q_len * p.n_heads + 3) / 4 <= kMaxGridX,
              kOp, ": problem too large for one launch on CUDA (q_len * n_heads / n_kv_heads must be at most ",
              65535 * 64, ", batch * q_len * n_heads at most ", 4 * kMaxGridX, ")");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.num_splits = cache_attention_num_splits_cuda(p, q.get_device());
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    partial_out = at::empty({p.num_splits, p.batch, p.n_heads, p.q_len, p.head_dim}, lse.options());
    partial_lse = at::empty({p.num_splits, p.batch, p.n_heads, p.q_len}, lse.options());
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  const char* err = cache_attention_cuda(p, write_kv, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, kOp, ": CUDA launch failed: ", err ? err : "");
  return {out, lse};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(r2lm, CPU, m) { m.impl("cache_attention", &cache_attention_cpu_impl); }

#ifdef R2LM_WITH_CUDA
TORCH_LIBRARY_IMPL(r2lm, CUDA, m) { m.impl("cache_attention", &cache_attention_cuda_impl); }
#endif

}  // namespace r2lm
