"""cache_attention (DESIGN.md 3.3): wrapper and fake implementation."""
from __future__ import annotations

import os

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)
from . import check_same_device
from ..reference import check_cache_attention_values


def cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None,
                    causal=True, write_kv=True, return_lse=False):
    """Attention of a block of queries over the committed KV cache plus the block itself (causal or
    bidirectional inside the block), GQA, contiguous or paged cache. With write_kv the block's k/v are
    stored at [cache_seqlens, cache_seqlens + q_len) without advancing cache_seqlens.
    Returns out, or (out, lse) with return_lse; lse is (batch, n_heads, q_len) fp32. k and v may be views of
    the caches, even of the draft slots: with write_kv they are then copied first, so the values stored and
    attended to are the ones they held on entry. Under torch.compile (inductor) pass the caches into the
    compiled function as they are: once its shapes are dynamic (dynamic=True, or after a recompile), a slice
    of a larger buffer taken inside it is written at the buffer's start (PyTorch's bug, see the README).

    q: (batch, q_len, n_heads, head_dim); k, v: (batch, q_len, n_kv_heads, head_dim), n_heads a multiple
    of n_kv_heads (GQA); caches: (batch, max_len, n_kv_heads, head_dim), or paged (num_pages, page_size,
    n_kv_heads, head_dim) with block_table: (batch, pages per sequence) int32 naming each sequence's pages
    in order; cache_seqlens: (batch,) int32. head_dim must be 64 or 128; q, k, v and the caches share one
    dtype (fp16, bf16, fp32; fp64 on CPU). softmax_scale defaults to head_dim ** -0.5.

    torch.ops.r2lm.cache_attention is the registered op: the same arguments without return_lse (it always
    returns (out, lse)) and without the R2LM_VALIDATE checks below.

    There is no backward: an input that requires grad, with grad mode on, raises (here and through
    torch.ops.r2lm.cache_attention) instead of leaving its gradient silently missing; differentiate the
    cache-free forward instead. An input carrying a forward-mode tangent raises too.

    Value checks (cache_seqlens >= 0, cache_seqlens + q_len <= cache capacity with write_kv, else
    cache_seqlens <= capacity, block_table entries in [0, num_pages) for every page a sequence touches, and
    with write_kv no draft slot that two positions share or that a sequence has committed: sequences may
    share the pages they read) need the data. On CPU they always run and raise naming the argument. On CUDA
    they would need a host sync, so the kernels instead clamp lengths into the cache and skip slots whose
    page is out of range (no out-of-bounds access, but the result of a bad input is meaningless); set
    R2LM_VALIDATE=1 to run the checks on CUDA too (they sync, and are skipped while a CUDA graph is being
    captured).
    """
    if cache_seqlens.is_cuda and os.environ.get("R2LM_VALIDATE") == "1" and \
            not torch.cuda.is_current_stream_capturing():
        check_cache_attention_values(q.shape[1], k_cache, cache_seqlens, block_table, write_kv)
    out, lse = torch.ops.r2lm.cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                              softmax_scale=softmax_scale, causal=causal, write_kv=write_kv)
    return (out, lse) if return_lse else out


@torch.library.register_fake("r2lm::cache_attention")
def _(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None, causal=True,
      write_kv=True):
    check_same_device("cache_attention", q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                      block_table=block_table)
    # The rank is the one thing the shapes below need; the real kernel checks the rest (same message).
    torch._check(q.dim() == 4, lambda: f"cache_attention: q must have shape (batch, q_len, n_heads, head_dim), "
                                       f"got {list(q.shape)}")
    batch, q_len, n_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, n_heads, q_len), dtype=torch.float32))
