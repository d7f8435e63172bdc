// cache_attention: parameters, indexing and masking shared by the CPU and CUDA kernels, launchers.
// No torch headers: the torch layer (cache_attention_torch.cpp) fills CacheAttnParams.
#pragma once

#include <cstdint>

#include "r2lm_common.h"

namespace r2lm {

// Rows of the attention problem are grouped per (batch, kv head): row r = i * group + g is query
// position i of query head kv_head * group + g, so all heads sharing a kv head are processed together.
//
// Keys of sequence b are numbered 0 .. L + q_len - 1 with L = cache_seqlens[b]: position p < L is read
// from the cache, p >= L is block key p - L read from the k / v inputs (never from the cache, so
// write_kv does not race with the reads).
//
// A contiguous cache is a paged cache with one page per sequence (page_size = max_len, page = b and no
// block table); both are addressed as page * cache_page_stride + slot * cache_slot_stride + head * ...
struct CacheAttnParams {
  int64_t batch, q_len, n_heads, n_kv_heads, head_dim, group;
  DType dtype;
  double scale;
  bool causal;

  const void* q; int64_t q_batch_stride, q_seq_stride, q_head_stride;
  const void* k; int64_t k_batch_stride, k_seq_stride, k_head_stride;
  const void* v; int64_t v_batch_stride, v_seq_stride, v_head_stride;
  void* k_cache; int64_t k_cache_page_stride, k_cache_slot_stride, k_cache_head_stride;
  void* v_cache; int64_t v_cache_page_stride, v_cache_slot_stride, v_cache_head_stride;
  int64_t page_size, num_pages;
  int64_t capacity;                        // cache slots a sequence owns: max_len, or page_size * pages_per_seq
  const int32_t* cache_seqlens;            // (batch,)
  const int32_t* block_table;              // (batch, pages_per_seq), null for a contiguous cache
  int64_t block_table_batch_stride;

  void* out;                               // (batch, q_len, n_heads, head_dim) contiguous, q's dtype
  float* lse;                              // (batch, n_heads, q_len) contiguous

  // CUDA split-KV scratch (allocated by the torch layer): fp32 (splits, batch, n_heads, q_len, head_dim)
  // and (splits, batch, n_heads, q_len). Unused when num_splits == 1.
  int num_splits;
  float* partial_out;
  float* partial_lse;
};

// Committed length of sequence b, clamped into [0, capacity] so that a bad value can never address
// memory outside the cache (the CPU torch layer rejects such values before launching).
R2LM_HD int64_t attn_cache_len(const CacheAttnParams& p, int64_t b) {
  int64_t len = p.cache_seqlens[b];
  return len < 0 ? 0 : (len > p.capacity ? p.capacity : len);
}

// Page and slot of cache position `pos` of sequence b; false when pos is outside the cache or its page
// is out of range. Positions fit in 32 bits (the torch layer checks the capacity), so the division is
// a 32-bit one.
R2LM_HD bool attn_cache_slot(const CacheAttnParams& p, int64_t b, int64_t pos, int64_t& page, int64_t& slot) {
  if (pos < 0 || pos >= p.capacity) return false;
  page = b;
  slot = pos;
  if (p.block_table != nullptr) {
    const int32_t page_size = int32_t(p.page_size), pos32 = int32_t(pos);
    page = p.block_table[b * p.block_table_batch_stride + pos32 / page_size];
    slot = pos32 % page_size;
    return page >= 0 && page < p.num_pages;
  }
  return true;
}

// Whether query position i may attend key position `key` of a sequence with `len` committed keys.
R2LM_HD bool attn_visible(int64_t key, int64_t i, int64_t len, int64_t q_len, bool causal) {
  if (key < len) return true;
  int64_t j = key - len;
  return causal ? j <= i : j < q_len;
}

// CPU kernel (cache_attention_cpu.cpp): attention, then the write_kv copy when write_kv.
void cache_attention_cpu(const CacheAttnParams& p, bool write_kv);

#ifdef R2LM_WITH_CUDA
// How many KV splits the CUDA kernel uses for this problem (the torch layer sizes the scratch with it).
int cache_attention_num_splits_cuda(const CacheAttnParams& p, int device);
// Launches attention (and the write_kv copy) on `stream` (a cudaStream_t). Returns nullptr on
// success, else a static description of the launch error.
const char* cache_attention_cuda(const CacheAttnParams& p, bool write_kv, void* stream);
#endif

}  // namespace r2lm
