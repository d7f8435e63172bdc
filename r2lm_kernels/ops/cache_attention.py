"""cache_attention (DESIGN.md 3.3): wrapper and fake implementation."""
from __future__ import annotations

import os

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)


def cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None,
                    causal=True, write_kv=True, return_lse=False):
    """Attention of a block of queries over the committed KV cache plus the block itself (causal or
    bidirectional inside the block), GQA, contiguous or paged cache. With write_kv the block's k/v are
    stored at [cache_seqlens, cache_seqlens + q_len) without advancing cache_seqlens.
    Returns out, or (out, lse) with return_lse; lse is (batch, n_heads, q_len) fp32.

    head_dim must be 64 or 128; q, k, v and the caches share one dtype (fp16, bf16, fp32; fp64 on CPU).
    There is no backward: an input that requires grad, with grad mode on, raises instead of leaving its
    gradient silently missing.

    Value checks (cache_seqlens >= 0, cache_seqlens + q_len <= cache capacity, block_table entries in
    [0, num_pages) for every page a sequence touches, and with write_kv no draft slot that two positions
    share: sequences may share the pages they read) need the data. On CPU they always run and raise
    naming the argument. On CUDA they would need a host sync, so the kernels instead clamp lengths into
    the cache and skip slots whose page is out of range (no out-of-bounds access, but the result of a
    bad input is meaningless); set R2LM_VALIDATE=1 to run the checks on CUDA too (they sync, and are
    skipped while a CUDA graph is being captured).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_cache, v_cache)):
        raise RuntimeError("cache_attention has no backward (it serves generation with a KV cache): call it under "
                           "torch.no_grad() or torch.inference_mode(), or differentiate the cache-free forward")
    if cache_seqlens.is_cuda and os.environ.get("R2LM_VALIDATE") == "1" and \
            not torch.cuda.is_current_stream_capturing():
        _validate_values(q, k_cache, cache_seqlens, block_table, write_kv)
    out, lse = torch.ops.r2lm.cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                              softmax_scale=softmax_scale, causal=causal, write_kv=write_kv)
    return (out, lse) if return_lse else out


def _check_draft_slots(lens, q_len, table, page_size):
    """Sequences may share the pages they read (a common prefix), not a slot that write_kv fills.
    lens (batch,) int64 and table (batch, pages) int64, on the host."""
    pos = lens[:, None] + torch.arange(q_len)[None, :]
    slots = (table.gather(1, pos // page_size) * page_size + pos % page_size).flatten()
    values, counts = slots.unique(return_counts=True)
    if (counts > 1).any():
        twice = int(values[counts > 1][0])
        raise ValueError(f"cache_attention: block_table maps two draft positions to page {twice // page_size}, "
                         f"slot {twice % page_size}, which write_kv would fill twice")


def _validate_values(q, k_cache, cache_seqlens, block_table, write_kv):
    """The CPU kernel's value checks, done in PyTorch (one host sync) for CUDA inputs."""
    q_len = q.shape[1]
    lens = cache_seqlens.long().cpu()
    page_size = k_cache.shape[1]
    capacity = page_size * (block_table.shape[1] if block_table is not None else 1)
    if (lens < 0).any():
        raise ValueError(f"cache_attention: cache_seqlens has negative entries: {lens.tolist()}")
    if (lens + q_len > capacity).any():
        raise ValueError(f"cache_attention: cache too small: cache_seqlens + q_len exceeds the cache capacity "
                         f"{capacity}: cache_seqlens = {lens.tolist()}, q_len = {q_len}")
    if block_table is not None:
        used = (lens + q_len + page_size - 1) // page_size
        table = block_table.long().cpu()
        touched = torch.arange(table.shape[1])[None, :] < used[:, None]
        bad = touched & ((table < 0) | (table >= k_cache.shape[0]))
        if bad.any():
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(f"cache_attention: block_table[{b}, {j}] = {int(table[b, j])} is out of range "
                             f"[0, {k_cache.shape[0]})")
        if write_kv:
            _check_draft_slots(lens, q_len, table, page_size)


@torch.library.register_fake("r2lm::cache_attention")
def _(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None, causal=True,
      write_kv=True):
    batch, q_len, n_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, n_heads, q_len), dtype=torch.float32))
