"""Plain-PyTorch references for the four r2lm ops: the executable specification (DESIGN.md section 3).

Written for clarity, not speed. Every function accepts float64 inputs (and then computes in float64);
lower precisions compute in float32 and return the input dtype, as the kernels do.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

__all__ = [
    "reverse_selective_scan",
    "reverse_conv1d",
    "cache_attention",
    "parallel_commit",
    "gumbel_uniform",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reverse_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           seq_idx=None):
    """Right-to-left selective scan with segment resets.

    u, delta, z: (batch, seqlen, dim); B, C: (batch, seqlen, d_state); A: (dim, d_state);
    D, delta_bias: (dim,); seq_idx: (batch, seqlen) int32. Returns (batch, seqlen, dim) in u.dtype.
    """
    ct = _compute_dtype(u)
    batch, seqlen, dim = u.shape
    u_, B_, C_, A_ = u.to(ct), B.to(ct), C.to(ct), A.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(batch, dim, A.shape[1], dtype=ct, device=u.device)
    ys = []
    for t in range(seqlen - 1, -1, -1):
        if seq_idx is not None and t < seqlen - 1:
            # A select, not a product: 0 * inf and 0 * NaN would carry one segment's non-finite state on.
            keep = (seq_idx[:, t] == seq_idx[:, t + 1])[:, None, None]
            h = torch.where(keep, h, 0.0)
        dA = torch.exp(dt[:, t, :, None] * A_)                          # (batch, dim, d_state)
        dBu = dt[:, t, :, None] * B_[:, t, None, :] * u_[:, t, :, None]
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C_[:, t]))
    y = torch.stack(ys[::-1], dim=1) if ys else u_.new_zeros(batch, 0, dim)
    if D is not None:
        y = y + D.to(ct) * u_
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)


def reverse_conv1d(x, weight, bias=None, seq_idx=None, silu=False):
    """Anti-causal depthwise conv: y[t] = bias + sum_k weight[:, k] * x[t + k], taps past the sequence
    end or the end of t's segment (a run of equal seq_idx) are zero; optional SiLU. x: (batch, seqlen, dim),
    weight: (dim, width)."""
    ct = _compute_dtype(x)
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    x_, w_ = x.to(ct), weight.to(ct)
    y = torch.zeros(batch, seqlen, dim, dtype=ct, device=x.device)
    if bias is not None:
        y = y + bias.to(ct)
    # Positions t .. t + k inside the sequence and in one run.
    same = torch.ones(batch, seqlen, dtype=torch.bool, device=x.device)
    # Taps at k >= seqlen read nothing; at seqlen 0 tap 0 still runs so that the result keeps its graph.
    for k in range(max(min(width, seqlen), 1)):
        tap = torch.zeros_like(x_)
        tap[:, : seqlen - k] = x_[:, k:]
        same[:, seqlen - k:] = False
        if seq_idx is not None:
            same[:, : seqlen - k] &= seq_idx[:, k:] == seq_idx[:, : seqlen - k]
        # Selects, not products with 0, which would carry a NaN past a cut tap: x from another segment never
        # enters the product, and the gradient of a position whose tap is cut never reaches the weight.
        cut = ~same[..., None]
        y = y + torch.where(cut, 0.0, w_[:, k] * torch.where(cut, 0.0, tap))
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _gather_cache(cache, b, length, block_table):
    """Positions [0, length) of sequence b from a contiguous (batch, max_len, H, D) or paged
    (num_pages, page_size, H, D) cache."""
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    pages = block_table[b, pos // page_size].long()
    return cache[pages, pos % page_size]


def _scatter_cache(cache, b, start, values, block_table):
    n = values.shape[0]
    pos = torch.arange(start, start + n, device=cache.device)
    if block_table is None:
        cache[b, pos] = values
    else:
        page_size = cache.shape[1]
        cache[block_table[b, pos // page_size].long(), pos % page_size] = values


def check_cache_attention_values(q_len, k_cache, cache_seqlens, block_table, write_kv):
    """The value checks of cache_attention (the CPU op's, in PyTorch, with one host sync): lengths inside the
    cache (with write_kv, the draft slots too), the pages used in range, and with write_kv no draft slot
    filled twice or on a slot that a sequence has committed. Run by the reference, and by the op on CUDA
    under R2LM_VALIDATE=1."""
    lens = cache_seqlens.long().cpu()
    page_size = k_cache.shape[1]
    capacity = page_size * (block_table.shape[1] if block_table is not None else 1)
    if (lens < 0).any():
        raise ValueError(f"cache_attention: cache_seqlens has negative entries: {lens.tolist()}")
    used = lens + q_len if write_kv else lens   # without write_kv the draft slots are never touched
    if write_kv and (used > capacity).any():
        raise ValueError(f"cache_attention: cache too small: cache_seqlens + q_len exceeds the cache capacity "
                         f"{capacity}: cache_seqlens = {lens.tolist()}, q_len = {q_len}")
    if (used > capacity).any():
        raise ValueError(f"cache_attention: cache_seqlens exceeds the cache capacity {capacity}: "
                         f"cache_seqlens = {lens.tolist()}")
    if block_table is not None:
        used = (used + page_size - 1) // page_size
        table = block_table.long().cpu()
        touched = torch.arange(table.shape[1])[None, :] < used[:, None]
        bad = touched & ((table < 0) | (table >= k_cache.shape[0]))
        if bad.any():
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(f"cache_attention: block_table[{b}, {j}] = {int(table[b, j])} is out of range "
                             f"[0, {k_cache.shape[0]})")
        if write_kv:  # sequences may share the pages they read (a common prefix), not a slot write_kv fills
            # A page's committed slots are its first ones: per page, as many as the sequence that has most.
            committed = torch.zeros(k_cache.shape[0], dtype=torch.long)
            for b, length in enumerate(lens.tolist()):
                counts = (length - torch.arange(0, length, page_size)).clamp(max=page_size)
                committed.scatter_reduce_(0, table[b, :len(counts)], counts, "amax")
            pos = lens[:, None] + torch.arange(q_len)[None, :]
            pages = table.gather(1, pos // page_size)
            overwrite = pos % page_size < committed[pages]
            if overwrite.any():
                b, i = overwrite.nonzero()[0].tolist()
                raise ValueError(f"cache_attention: block_table maps draft position {int(pos[b, i])} of sequence {b} "
                                 f"to page {int(pages[b, i])}, slot {int(pos[b, i]) % page_size}, which a sequence "
                                 f"has committed (write_kv would overwrite it)")
            slots = (pages * page_size + pos % page_size).flatten()
            values, counts = slots.unique(return_counts=True)
            if (counts > 1).any():
                twice = int(values[counts > 1][0])
                raise ValueError(f"cache_attention: block_table maps two draft positions to page "
                                 f"{twice // page_size}, slot {twice % page_size}, which write_kv would fill twice")


def cache_attention(q, k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None,
                    causal=True, write_kv=True, return_lse=False):
    """Attention of a block of q_len queries over the committed cache plus the block itself.

    Query i of sequence b sees cache positions [0, cache_seqlens[b]) and block positions j <= i
    (causal) or all j < q_len (causal=False). GQA: query head h reads kv head h // (n_heads // n_kv).
    write_kv stores k, v at cache positions [cache_seqlens[b], cache_seqlens[b] + q_len).
    Returns out (batch, q_len, n_heads, head_dim) in q.dtype, and with return_lse also
    lse (batch, n_heads, q_len) fp32 (fp64 for fp64 inputs): log-sum-exp of the scaled scores.
    """
    ct = _compute_dtype(q)
    batch, q_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty(batch, q_len, n_heads, head_dim, dtype=ct, device=q.device)
    lse = torch.empty(batch, n_heads, q_len, dtype=ct, device=q.device)
    check_cache_attention_values(q_len, k_cache, cache_seqlens, block_table, write_kv)
    for b in range(batch):
        length = int(cache_seqlens[b])
        keys = torch.cat([_gather_cache(k_cache, b, length, block_table), k[b]], 0).to(ct)   # (L+q, H_kv, D)
        vals = torch.cat([_gather_cache(v_cache, b, length, block_table), v[b]], 0).to(ct)
        keys = keys.repeat_interleave(group, dim=1)
        vals = vals.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].to(ct), keys) * scale
        if causal:
            i = torch.arange(q_len, device=q.device)[:, None]
            j = torch.arange(length + q_len, device=q.device)[None, :]
            scores = scores.masked_fill(j > i + length, float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vals)
    if write_kv:
        for b in range(batch):
            start = int(cache_seqlens[b])
            _scatter_cache(k_cache, b, start, k[b], block_table)
            _scatter_cache(v_cache, b, start, v[b], block_table)
    out = out.to(q.dtype)
    if return_lse:
        return out, lse if ct == torch.float64 else lse.float()
    return out


# --- parallel_commit ------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding uint32 values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def gumbel_uniform(seed: int, step: int, batch_index, position, vocab_index) -> torch.Tensor:
    """The counter-based uniform in (0, 1) that Gumbel-max sampling draws for one logit; int64 tensors
    broadcast. Mirrors r2lm::commit_uniform in csrc/parallel_commit/parallel_commit.h bit for bit:

        row  = H(seed_lo + H(seed_hi + H(step_lo + H(step_hi + H(batch_index + H(position))))))
        bits = H(row ^ H(vocab_index)),   u = ((bits >> 8) + 0.5) / 2**24

    with H = lowbias32 and all arithmetic modulo 2**32.
    """
    def as_u32(v):
        return torch.as_tensor(v, dtype=torch.int64) & _M32

    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    step_lo, step_hi = step & _M32, (step >> 32) & _M32
    row = _hash32(as_u32(position))
    row = _hash32(as_u32(batch_index) + row)
    row = _hash32(step_hi + row)
    row = _hash32(step_lo + row)
    row = _hash32(seed_hi + row)
    row = _hash32(seed_lo + row)
    bits = _hash32(row ^ _hash32(as_u32(vocab_index)))
    return ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)


def _candidates_and_scores(logits, mask_token_id, temperature, seed, step, score):
    """Per position: candidate token, its score, and whether the row is usable (finite)."""
    batch, block, vocab = logits.shape
    ct = _compute_dtype(logits)
    lg = logits.to(ct)
    # Non-finite policy: a row with a NaN or +inf logit, or whose non-mask logits are all -inf, has no
    # meaningful distribution; its position is never committed and its confidence is -inf.
    non_mask = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    non_mask[mask_token_id] = False
    valid = ~(torch.isnan(lg) | (lg == float("inf"))).any(-1) & torch.isfinite(lg[..., non_mask]).any(-1)
    lg = torch.where(valid[..., None], lg, torch.zeros_like(lg))
    p = torch.softmax(lg, dim=-1)
    pick = lg.masked_fill(~non_mask, float("-inf"))
    if temperature > 0:
        b = torch.arange(batch, device=logits.device)[:, None, None]
        pos = torch.arange(block, device=logits.device)[None, :, None]
        vi = torch.arange(vocab, device=logits.device)[None, None, :]
        u = gumbel_uniform(seed, step, b, pos, vi).to(ct)
        if ct == torch.float32:
            # (2^24 - 1/2) / 2^24 rounds to 1.0 in fp32, whose noise -log(-log(1)) is +inf: cap u at the
            # largest float below 1 (the kernels do the same).
            u = u.clamp(max=1.0 - 2.0**-24)
        pick = pick / temperature - torch.log(-torch.log(u))
    cand = pick.argmax(-1)                                            # ties -> lowest token id
    # Picks of -inf everywhere (x / T overflowing for huge logits): no candidate, as in the kernels.
    valid = valid & (pick.amax(-1) > float("-inf"))
    if score == "prob":
        conf = p.gather(-1, cand[..., None])[..., 0]
    elif score == "margin":
        top2 = p.masked_fill(~non_mask, float("-inf")).topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif score == "neg_entropy":
        conf = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    else:
        raise ValueError(f"parallel_commit: score must be 'prob', 'margin' or 'neg_entropy', got {score!r}")
    return cand, conf.float(), valid


def parallel_commit(logits, tokens, *, mask_token_id, threshold, min_per_step=1, max_per_step=0,
                    temperature=0.0, seed=0, step=0, active=None, score="prob"):
    """One denoising step's commit. Updates `tokens` in place; returns (committed, confidence, n_masked).

    Per active sequence, among positions equal to mask_token_id with a finite logits row: commit those
    whose confidence >= threshold; if fewer than min_per_step, also the most confident remaining ones;
    if max_per_step > 0, at most that many. Order of preference: higher confidence, then lower position.
    confidence is the score at masked positions of active sequences, -inf elsewhere.
    """
    batch, block, vocab = logits.shape
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= 1e-6)):
        raise ValueError(f"parallel_commit: temperature must be 0 (greedy) or a finite number >= 1e-06, "
                         f"got {temperature}")
    if isinstance(step, torch.Tensor):
        step = int(step.reshape(-1)[0])
    cand, conf, valid = _candidates_and_scores(logits, mask_token_id, temperature, seed, step, score)
    masked = tokens == mask_token_id
    if active is not None:
        masked = masked & active.to(torch.bool)[:, None]
    eligible = masked & valid
    confidence = torch.where(eligible, conf, torch.full_like(conf, float("-inf")))
    committed = torch.zeros(batch, block, dtype=torch.bool, device=logits.device)
    for b in range(batch):
        # float(): compared exactly, not with the threshold rounded to the confidence's fp32
        chosen = [i for i in range(block) if eligible[b, i] and float(confidence[b, i]) >= threshold]
        rest = [i for i in range(block) if eligible[b, i] and i not in chosen]
        rest.sort(key=lambda i: (-float(confidence[b, i]), i))
        while len(chosen) < min_per_step and rest:
            chosen.append(rest.pop(0))
        if max_per_step > 0 and len(chosen) > max_per_step:
            chosen.sort(key=lambda i: (-float(confidence[b, i]), i))
            chosen = chosen[:max_per_step]
        for i in chosen:
            committed[b, i] = True
            tokens[b, i] = cand[b, i]
    n_masked = (tokens == mask_token_id).sum(-1).to(torch.int32)
    return committed, confidence, n_masked
