// cache_attention: parameters, indexing and masking shared by the CPU and CUDA kernels, launchers.
// No torch headers: the torch layer (cache_attention_torch.cpp) fills CacheAttnParams.
#pragma once

#include <cstdint>
#include <cstring>

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

// Storage conversions shared by the CPU kernel (the CUDA kernel uses the intrinsics).
struct Half16 { uint16_t bits; };
struct BFloat16Bits { uint16_t bits; };

// Branch-free, so that the loops converting whole rows vectorise. The half's exponent and mantissa are
// moved into float position and the exponent rebiased (15 -> 127); Inf/NaN get the rest of the bias;
// zeros and subnormals (m * 2^-24) come out exactly as (1 + m / 1024) * 2^-14 - 2^-14.
inline float half_bits_to_float(uint16_t h) {
  const auto as_float = [](uint32_t bits) {
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
  };
  const auto as_bits = [](float x) {
    uint32_t out;
    std::memcpy(&out, &x, 4);
    return out;
  };
  // Selects as masks: GCC does not if-convert the ternaries for AVX2.
  const uint32_t magnitude = uint32_t(h & 0x7fff) << 13, exp = magnitude & 0x0f800000u;
  const uint32_t special = 0u - uint32_t(exp == 0x0f800000u), tiny = 0u - uint32_t(exp == 0);
  const uint32_t bits = magnitude + (112u << 23) + ((112u << 23) & special);
  const uint32_t small = as_bits(as_float(bits + (1u << 23)) - as_float(113u << 23));
  return as_float((small & tiny) | (bits & ~tiny) | uint32_t(h & 0x8000) << 16);
}

inline uint16_t float_to_half_bits(float x) {  // round to nearest even
  uint32_t f;
  std::memcpy(&f, &x, 4);
  uint32_t sign = (f >> 16) & 0x8000;
  uint32_t absf = f & 0x7fffffff;
  if (absf > 0x7f800000u) return uint16_t(sign | 0x7e00);        // NaN
  if (absf >= 0x477ff000u) return uint16_t(sign | 0x7c00);       // overflow (>= 65520) to inf
  if (absf < 0x38800000u) {                                      // subnormal or zero half
    if (absf < 0x33000000u) return uint16_t(sign);
    uint32_t exp = absf >> 23, man = (absf & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - exp;                                  // 14 .. 24
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t rounded = absf + 0xfff + ((absf >> 13) & 1);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

inline float bf16_bits_to_float(uint16_t h) {
  uint32_t f = uint32_t(h) << 16;
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline uint16_t float_to_bf16_bits(float x) {  // round to nearest even, NaN kept quiet
  uint32_t f;
  std::memcpy(&f, &x, 4);
  if ((f & 0x7fffffff) > 0x7f800000u) return uint16_t((f >> 16) | 0x40);
  return uint16_t((f + 0x7fff + ((f >> 16) & 1)) >> 16);
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
