// cache_attention CUDA kernels (no torch headers).
//
// fp16 / bf16: FlashAttention-style. One CTA = (batch * kv head, tile of 64 rows, KV split); rows are the
// q_len x group queries sharing the kv head, so each K/V tile is read from global memory once for the whole
// GQA group and block. 4 warps x 16 rows; K/V tiles of 64 keys are streamed through XOR-swizzled shared
// memory with cp.async double buffering; S = Q K^T and O += P V use mma.sync m16n8k16 (fp32 accumulate)
// with ldmatrix operands; the softmax is online in fp32 registers (exp2 domain). Split-KV divides each
// sequence's key tiles evenly across gridDim.z CTAs, which write normalised partial outputs and their lse;
// a combine kernel merges them deterministically.
// fp32 (tests): one warp per query row, scalar online softmax.
// write_kv: a separate copy kernel; attention reads the block's keys from k / v, never from the draft slots.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "cache_attention/cache_attention.h"

namespace r2lm {
namespace {

constexpr int kBlockM = 64;   // rows per CTA
constexpr int kBlockN = 64;   // keys per tile
constexpr int kThreads = 128; // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunks are XOR-swizzled by row, so that
// the 8 row addresses of an ldmatrix (and the cp.async writes) hit distinct banks.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

template <typename T> struct MmaTraits;
template <> struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <> struct MmaTraits<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <int D>
constexpr int smem_bytes() { return (kBlockM + 4 * kBlockN) * D * 2; }  // Q + 2 stages of K and V

// Keys [0, n_keys) of the CTA's rows; row r is query r / group. Causal rows past the CTA's last query
// see nothing beyond it, so those keys are never loaded.
__device__ __forceinline__ int64_t cta_key_count(const CacheAttnParams& p, int64_t len, int64_t row_end) {
  const int64_t last_query = (row_end - 1) / p.group;
  return len + (p.causal ? min_i64(p.q_len, last_query + 1) : p.q_len);
}

// Issues the cp.async copies of key tile k0 (K and V) for sequence b, kv head kvh.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const CacheAttnParams& p, int64_t b, int64_t kvh, int64_t len,
                                             int64_t n_keys, int64_t k0, T* sk, T* sv, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  int64_t page, slot;
  if (k0 + kBlockN <= len && (p.block_table == nullptr || p.page_size % kBlockN == 0) &&
      attn_cache_slot(p, b, k0, page, slot)) {
    // A tile of committed keys inside one valid page (a contiguous cache is one page per sequence): the
    // same rows as the general path below, from one page lookup and one base pointer per thread, without
    // its per-chunk position and page arithmetic.
    const int row0 = tid / kChunksPerRow, col = (tid % kChunksPerRow) * 8;
    const T* ks = static_cast<const T*>(p.k_cache) + page * p.k_cache_page_stride +
                  (slot + row0) * p.k_cache_slot_stride + kvh * p.k_cache_head_stride + col;
    const T* vs = static_cast<const T*>(p.v_cache) + page * p.v_cache_page_stride +
                  (slot + row0) * p.v_cache_slot_stride + kvh * p.v_cache_head_stride + col;
#pragma unroll
    for (int it = 0; it < kBlockN / kRowsPerPass; ++it) {
      const int row = row0 + it * kRowsPerPass;
      cp_async_16(sk + swizzle<D>(row, col), ks + it * kRowsPerPass * p.k_cache_slot_stride, true);
      cp_async_16(sv + swizzle<D>(row, col), vs + it * kRowsPerPass * p.v_cache_slot_stride, true);
    }
    return;
  }
#pragma unroll
  for (int it = 0; it < kBlockN / kRowsPerPass; ++it) {
    const int c = tid + it * kThreads, row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int64_t key = k0 + row;
    const T* ks = static_cast<const T*>(p.k);
    const T* vs = static_cast<const T*>(p.v);
    bool valid = false;
    if (key < len) {
      if (attn_cache_slot(p, b, key, page, slot)) {
        ks = static_cast<const T*>(p.k_cache) + page * p.k_cache_page_stride + slot * p.k_cache_slot_stride +
             kvh * p.k_cache_head_stride + col;
        vs = static_cast<const T*>(p.v_cache) + page * p.v_cache_page_stride + slot * p.v_cache_slot_stride +
             kvh * p.v_cache_head_stride + col;
        valid = true;
      }
    } else if (key < n_keys) {
      const int64_t j = key - len;
      ks += b * p.k_batch_stride + j * p.k_seq_stride + kvh * p.k_head_stride + col;
      vs += b * p.v_batch_stride + j * p.v_seq_stride + kvh * p.v_head_stride + col;
      valid = true;
    }
    // Invalid keys are zero-filled: masked scores, and no stale NaN reaches P . V.
    cp_async_16(sk + swizzle<D>(row, col), ks, valid);
    cp_async_16(sv + swizzle<D>(row, col), vs, valid);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_mma_kernel(const CacheAttnParams p) {
  using Mma = MmaTraits<T>;
  constexpr int kNTiles = kBlockN / 8;  // 8-key column tiles of S
  constexpr int kDTiles = D / 8;        // 8-wide column tiles of O
  constexpr int kDSteps = D / 16;       // k-steps of Q K^T
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Q, then per stage a K tile followed by a V tile.
  T* sq = reinterpret_cast<T*>(smem_raw);
  auto sk = [&](int stage) { return sq + (kBlockM + 2 * stage * kBlockN) * D; };
  auto sv = [&](int stage) { return sq + (kBlockM + (2 * stage + 1) * kBlockN) * D; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b = blockIdx.x / p.n_kv_heads, kvh = blockIdx.x % p.n_kv_heads;
  const int64_t rows = p.q_len * p.group;
  const int64_t m0 = int64_t(blockIdx.y) * kBlockM;
  const int64_t row_end = min_i64(m0 + kBlockM, rows);
  const int64_t len = attn_cache_len(p, b);
  const int64_t n_keys = cta_key_count(p, len, row_end);

  // This split's share of the key tiles.
  const int64_t n_tiles = (n_keys + kBlockN - 1) / kBlockN;
  const int64_t tiles_per_split = (n_tiles + gridDim.z - 1) / gridDim.z;
  const int64_t t_begin = int64_t(blockIdx.z) * tiles_per_split;
  const int64_t t_end = min_i64(n_tiles, t_begin + tiles_per_split);

  // Q tile (zero rows past the end).
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int it = 0; it < kBlockM * kChunksPerRow / kThreads; ++it) {
    const int c = tid + it * kThreads, r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int64_t row = m0 + r;
    const T* src = static_cast<const T*>(p.q);
    const bool valid = row < rows;
    if (valid) {
      const int64_t i = row / p.group, h = kvh * p.group + row % p.group;
      src += b * p.q_batch_stride + i * p.q_seq_stride + h * p.q_head_stride + col;
    }
    cp_async_16(sq + swizzle<D>(r, col), src, valid);
  }
  cp_async_commit();
  if (t_begin < t_end) load_kv_tile<T, D>(p, b, kvh, len, n_keys, t_begin * kBlockN, sk(0), sv(0), tid);
  cp_async_commit();

  const int group_id = lane / 4, tig = lane % 4;  // mma fragment coordinates
  const int mat = lane / 8, mat_row = lane % 8;   // ldmatrix: which 8x8 matrix this lane addresses
  const int warp_row0 = warp * 16;
  // Query position of this thread's two fragment rows (group_id and group_id + 8).
  int64_t query[2];
  for (int rr = 0; rr < 2; ++rr) query[rr] = (m0 + warp_row0 + group_id + rr * 8) / p.group;

  const float scale_log2 = float(p.scale) * kLog2e;
  float o_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
    for (int e = 0; e < 4; ++e) o_acc[dt][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  // Q's fragments before the loop (the first key tile may still be in flight): loaded inside it, their
  // shared-memory addresses stayed live in registers through every iteration. Nothing is in flight at
  // exit: the loop's last iteration waits for all groups, and an empty split's second group is empty.
  unsigned q_frag[kDSteps][4];
  cp_async_wait<1>();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < kDSteps; ++ks)
    ldmatrix_x4(q_frag[ks], sq + swizzle<D>(warp_row0 + mat_row + (mat & 1) * 8, ks * 16 + (mat >> 1) * 8));

  for (int64_t t = t_begin; t < t_end; ++t) {
    const int stage = int((t - t_begin) & 1);
    if (t + 1 < t_end) {
      load_kv_tile<T, D>(p, b, kvh, len, n_keys, (t + 1) * kBlockN, sk(stage ^ 1), sv(stage ^ 1), tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        unsigned kb[4];
        ldmatrix_x4(kb, sk(stage) + swizzle<D>(np * 16 + mat_row + (mat >> 1) * 8, ks * 16 + (mat & 1) * 8));
        Mma::mma(s[2 * np], q_frag[ks], kb[0], kb[1]);
        Mma::mma(s[2 * np + 1], q_frag[ks], kb[2], kb[3]);
      }
    }

    // Scale into the exp2 domain; mask tiles that reach the block or the end of the keys.
    const int64_t k0 = t * kBlockN;
    const bool needs_mask = k0 + kBlockN > len;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    if (needs_mask) {  // one branch around the whole loop: tiles of committed keys skip it
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = k0 + nt * 8 + tig * 2 + (e & 1);
          if (key >= n_keys || !attn_visible(key, query[e >> 1], len, p.q_len, p.causal)) s[nt][e] = -INFINITY;
        }
    }

    // Online softmax; each row is spread over the 4 lanes of a quad.
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[nt][0], s[nt][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float correction[2], base[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      tile_max[rr] = fmaxf(tile_max[rr], __shfl_xor_sync(0xffffffffu, tile_max[rr], 1));
      tile_max[rr] = fmaxf(tile_max[rr], __shfl_xor_sync(0xffffffffu, tile_max[rr], 2));
      correction[rr] = row_max[rr] == -INFINITY ? 0.f : sfu_exp2(row_max[rr] - tile_max[rr]);
      base[rr] = tile_max[rr] == -INFINITY ? 0.f : tile_max[rr];  // all masked so far: p = 0, no NaN
      row_max[rr] = tile_max[rr];
      row_sum[rr] *= correction[rr];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = sfu_exp2(s[nt][e] - base[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[dt][e] *= correction[e >> 1];

    // O += P V: the S accumulators of two adjacent key tiles are exactly an A fragment of 16 keys.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const unsigned p_frag[4] = {Mma::pack(s[2 * kk][0], s[2 * kk][1]), Mma::pack(s[2 * kk][2], s[2 * kk][3]),
                                  Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        unsigned vb[4];
        ldmatrix_x4_trans(vb, sv(stage) + swizzle<D>(kk * 16 + mat_row + (mat & 1) * 8, dp * 16 + (mat >> 1) * 8));
        Mma::mma(o_acc[2 * dp], p_frag, vb[0], vb[1]);
        Mma::mma(o_acc[2 * dp + 1], p_frag, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    row_sum[rr] += __shfl_xor_sync(0xffffffffu, row_sum[rr], 1);
    row_sum[rr] += __shfl_xor_sync(0xffffffffu, row_sum[rr], 2);
  }

  const bool split = gridDim.z > 1;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t row = m0 + warp_row0 + group_id + rr * 8;
    if (row >= rows) continue;
    const int64_t i = row / p.group, h = kvh * p.group + row % p.group;
    const bool empty = row_sum[rr] == 0.f;
    const float inv = empty ? 0.f : 1.f / row_sum[rr];
    const float lse = empty ? -INFINITY : row_max[rr] * kLn2 + logf(row_sum[rr]);
    const int64_t lse_index = (b * p.n_heads + h) * p.q_len + i;
    if (split) {
      const int64_t split_row = int64_t(blockIdx.z) * p.batch * p.n_heads * p.q_len + lse_index;
      float* dst = p.partial_out + split_row * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const float2 v = make_float2(o_acc[dt][rr * 2] * inv, o_acc[dt][rr * 2 + 1] * inv);
        *reinterpret_cast<float2*>(dst + dt * 8 + tig * 2) = v;
      }
      if (tig == 0) p.partial_lse[split_row] = lse;
    } else {
      T* dst = static_cast<T*>(p.out) + ((b * p.q_len + i) * p.n_heads + h) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const unsigned v = Mma::pack(o_acc[dt][rr * 2] * inv, o_acc[dt][rr * 2 + 1] * inv);
        *reinterpret_cast<unsigned*>(dst + dt * 8 + tig * 2) = v;
      }
      if (tig == 0) p.lse[lse_index] = lse;
    }
  }
}

// Merges the splits of one output row per warp: out = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s.
template <typename T, int D>
__global__ void __launch_bounds__(128) combine_splits_kernel(const CacheAttnParams p) {
  const int64_t n_rows = p.batch * p.n_heads * p.q_len;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, i) in lse order
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, p.partial_lse[s * n_rows + row]);
  float acc[D / 32] = {};
  float total = 0.f;
  // No branch on the loaded lse, so that the loads of several splits are in flight at once. A split with
  // no visible key for this row wrote lse -inf (weight 0) and an output of 0, or NaN where one of its
  // masked values is NaN, as the unsplit kernel's 0 * V products give.
#pragma unroll 8
  for (int s = 0; s < p.num_splits; ++s) {
    const float l = p.partial_lse[s * n_rows + row];
    const float w = l == -INFINITY ? 0.f : __expf(l - max_lse);
    total += w;
    const float* src = p.partial_out + (s * n_rows + row) * D;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) acc[e] += w * src[lane + 32 * e];
  }
  const int64_t i = row % p.q_len, h = (row / p.q_len) % p.n_heads, b = row / (p.q_len * p.n_heads);
  T* dst = static_cast<T*>(p.out) + ((b * p.q_len + i) * p.n_heads + h) * D;
  const float inv = 1.f / total;
#pragma unroll
  for (int e = 0; e < D / 32; ++e) dst[lane + 32 * e] = MmaTraits<T>::from_float(acc[e] * inv);
  if (lane == 0) p.lse[row] = max_lse + logf(total);
}

// fp32 path (tests): one warp per (b, i, h) row, keys one at a time.
template <int D>
__global__ void __launch_bounds__(128) attention_fp32_kernel(const CacheAttnParams p) {
  constexpr int kPerLane = D / 32;
  const int64_t n_rows = p.batch * p.q_len * p.n_heads;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, i, h) in out order
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  const int64_t h = row % p.n_heads, i = (row / p.n_heads) % p.q_len, b = row / (p.n_heads * p.q_len);
  const int64_t kvh = h / p.group;
  const int64_t len = attn_cache_len(p, b);
  const int64_t n_keys = len + (p.causal ? i + 1 : p.q_len);
  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + i * p.q_seq_stride + h * p.q_head_stride;
  float qv[kPerLane], acc[kPerLane] = {};
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) qv[e] = q[lane + 32 * e] * float(p.scale);
  float row_max = -INFINITY, row_sum = 0.f;
  for (int64_t key = 0; key < n_keys; ++key) {
    const float* kp;
    const float* vp;
    int64_t page, slot;
    if (key < len) {
      if (!attn_cache_slot(p, b, key, page, slot)) continue;  // no valid page (bad block_table): skipped
      kp = static_cast<const float*>(p.k_cache) + page * p.k_cache_page_stride + slot * p.k_cache_slot_stride +
           kvh * p.k_cache_head_stride;
      vp = static_cast<const float*>(p.v_cache) + page * p.v_cache_page_stride + slot * p.v_cache_slot_stride +
           kvh * p.v_cache_head_stride;
    } else {
      const int64_t j = key - len;
      kp = static_cast<const float*>(p.k) + b * p.k_batch_stride + j * p.k_seq_stride + kvh * p.k_head_stride;
      vp = static_cast<const float*>(p.v) + b * p.v_batch_stride + j * p.v_seq_stride + kvh * p.v_head_stride;
    }
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dot += qv[e] * kp[lane + 32 * e];
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float new_max = fmaxf(row_max, dot);
    const float correction = expf(row_max - new_max), weight = expf(dot - new_max);
    row_sum = row_sum * correction + weight;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = acc[e] * correction + weight * vp[lane + 32 * e];
    row_max = new_max;
  }
  float* dst = static_cast<float*>(p.out) + row * D;
  const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) dst[lane + 32 * e] = acc[e] * inv;
  if (lane == 0) p.lse[(b * p.n_heads + h) * p.q_len + i] = row_sum > 0.f ? row_max + logf(row_sum) : -INFINITY;
}

// Copies the block's k/v into the draft slots [len, len + q_len); one CTA per (b, i), 16-byte chunks.
__global__ void __launch_bounds__(128) write_kv_kernel(const CacheAttnParams p, int elem_bytes) {
  const int64_t b = blockIdx.x / p.q_len, i = blockIdx.x % p.q_len;
  int64_t page, slot;
  if (!attn_cache_slot(p, b, attn_cache_len(p, b) + i, page, slot)) return;  // skipped, never out of bounds
  const int64_t ko = page * p.k_cache_page_stride + slot * p.k_cache_slot_stride;
  const int64_t vo = page * p.v_cache_page_stride + slot * p.v_cache_slot_stride;
  const int chunks_per_head = int(p.head_dim * elem_bytes / 16);
  const char* k = static_cast<const char*>(p.k);
  const char* v = static_cast<const char*>(p.v);
  char* kc = static_cast<char*>(p.k_cache);
  char* vc = static_cast<char*>(p.v_cache);
  for (int64_t c = threadIdx.x; c < p.n_kv_heads * chunks_per_head; c += blockDim.x) {
    const int64_t h = c / chunks_per_head, off = int64_t(c % chunks_per_head) * 16;
    *reinterpret_cast<uint4*>(kc + (ko + h * p.k_cache_head_stride) * elem_bytes + off) =
        *reinterpret_cast<const uint4*>(k + (b * p.k_batch_stride + i * p.k_seq_stride + h * p.k_head_stride) * elem_bytes + off);
    *reinterpret_cast<uint4*>(vc + (vo + h * p.v_cache_head_stride) * elem_bytes + off) =
        *reinterpret_cast<const uint4*>(v + (b * p.v_batch_stride + i * p.v_seq_stride + h * p.v_head_stride) * elem_bytes + off);
  }
}

template <typename T, int D>
const char* launch_mma(const CacheAttnParams& p, cudaStream_t stream) {
  constexpr int bytes = smem_bytes<D>();
  // The shared-memory opt-in is set once per device (so a later CUDA-graph capture issues no such call);
  // atomic flags, since host threads may make their first calls at once. A failed runtime call's error is
  // cleared before returning it, so that the next op's launch check does not report it again.
  static std::atomic<bool> opted_in[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess && (device < 0 || device >= 64 || !opted_in[device].load(std::memory_order_relaxed)))
    err = cudaFuncSetAttribute(attention_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaGetErrorString(err);
  }
  if (device >= 0 && device < 64) opted_in[device].store(true, std::memory_order_relaxed);
  const dim3 grid(unsigned(p.batch * p.n_kv_heads), unsigned((p.q_len * p.group + kBlockM - 1) / kBlockM),
                  unsigned(p.num_splits));
  attention_mma_kernel<T, D><<<grid, kThreads, bytes, stream>>>(p);
  if (p.num_splits > 1) {
    const int64_t n_rows = p.batch * p.n_heads * p.q_len;
    combine_splits_kernel<T, D><<<unsigned((n_rows + 3) / 4), 128, 0, stream>>>(p);
  }
  return nullptr;
}

int device_sm_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      (void)cudaGetLastError();
      n = 132;
    }
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace

int cache_attention_num_splits_cuda(const CacheAttnParams& p, int device) {
  if (p.dtype == DType::kFloat32 || p.dtype == DType::kFloat64) return 1;
  // Lengths live on the device, so split by the largest possible key count: enough CTAs for about two
  // per SM (the kernel's occupancy at head_dim 128), each split keeping at least 4 tiles of keys.
  const int64_t ctas = p.batch * p.n_kv_heads * ((p.q_len * p.group + kBlockM - 1) / kBlockM);
  const int64_t target = 2 * int64_t(device_sm_count(device));
  if (ctas * 5 >= target * 4) return 1;
  const int64_t max_tiles = (p.capacity + p.q_len + kBlockN - 1) / kBlockN;
  // Rounded down: one more split than fits would start a second, mostly idle wave.
  const int64_t splits = std::min<int64_t>({target / ctas, max_tiles / 4, 64});
  return int(std::max<int64_t>(splits, 1));
}

const char* cache_attention_cuda(const CacheAttnParams& p, bool write_kv, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const char* err = nullptr;
  const bool d64 = p.head_dim == 64;
  switch (p.dtype) {
    case DType::kBFloat16:
      err = d64 ? launch_mma<__nv_bfloat16, 64>(p, stream) : launch_mma<__nv_bfloat16, 128>(p, stream);
      break;
    case DType::kFloat16:
      err = d64 ? launch_mma<__half, 64>(p, stream) : launch_mma<__half, 128>(p, stream);
      break;
    case DType::kFloat32: {
      const unsigned blocks = unsigned((p.batch * p.q_len * p.n_heads + 3) / 4);
      if (d64) attention_fp32_kernel<64><<<blocks, 128, 0, stream>>>(p);
      else attention_fp32_kernel<128><<<blocks, 128, 0, stream>>>(p);
      break;
    }
    default: return "cache_attention: unsupported dtype on CUDA";
  }
  if (err) return err;
  if (write_kv) {
    const int elem_bytes = p.dtype == DType::kFloat32 ? 4 : 2;
    write_kv_kernel<<<unsigned(p.batch * p.q_len), 128, 0, stream>>>(p, elem_bytes);
  }
  const cudaError_t launch = cudaGetLastError();
  return launch == cudaSuccess ? nullptr : cudaGetErrorString(launch);
}

}  // namespace r2lm
