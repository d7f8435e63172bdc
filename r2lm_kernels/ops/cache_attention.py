"""cache_attention (DESIGN.md 3.3): wrapper and fake implementation."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)


def cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None,
                    causal=True, write_kv=True, return_lse=False):
    """Attention of a block of queries over the committed KV cache plus the block itself (causal or
    bidirectional inside the block), GQA, contiguous or paged cache. With write_kv the block's k/v are
    stored at [cache_seqlens, cache_seqlens + q_len) without advancing cache_seqlens.
    Returns out, or (out, lse) with return_lse."""
    out, lse = torch.ops.r2lm.cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                              softmax_scale=softmax_scale, causal=causal, write_kv=write_kv)
    return (out, lse) if return_lse else out


@torch.library.register_fake("r2lm::cache_attention")
def _(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None, causal=True,
      write_kv=True):
    batch, q_len, n_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, n_heads, q_len), dtype=torch.float32))
