"""The references (the executable specification) checked against independent formulations."""
import math

import pytest
import torch
import torch.nn.functional as F

from r2lm_kernels import reference as ref


def _random_segments(batch, seqlen, max_segments=4):
    """Sorted int32 segment ids per sequence, with random boundaries."""
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for b in range(batch):
        cuts = torch.randint(1, max(seqlen, 2), (torch.randint(0, max_segments, ()).item(),))
        for c in cuts.tolist():
            seq_idx[b, c:] += 1
    return seq_idx


def _scan_inputs(batch, seqlen, dim, d_state, dtype=torch.float64):
    u = torch.randn(batch, seqlen, dim, dtype=dtype)
    delta = torch.randn(batch, seqlen, dim, dtype=dtype) * 0.5
    A = -torch.rand(dim, d_state, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, seqlen, d_state, dtype=dtype)
    C = torch.randn(batch, seqlen, d_state, dtype=dtype)
    D = torch.randn(dim, dtype=dtype)
    z = torch.randn(batch, seqlen, dim, dtype=dtype)
    delta_bias = torch.randn(dim, dtype=dtype) * 0.5
    return u, delta, A, B, C, D, z, delta_bias


def _forward_scan(u, delta, A, B, C, D, z, delta_bias, softplus, seq_idx):
    """Mamba's left-to-right selective scan, resetting the state where a segment starts."""
    dt = delta + delta_bias
    dt = F.softplus(dt) if softplus else dt
    batch, seqlen, dim = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    out = torch.empty_like(u)
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(u.dtype)[:, None, None]
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        out[:, t] = (h * C[:, t, None, :]).sum(-1)
    return (out + D * u) * F.silu(z)


@pytest.mark.parametrize("seqlen", [1, 17, 33])
@pytest.mark.parametrize("segments", [False, True])
def test_scan_equals_flipped_forward_scan(seqlen, segments):
    u, delta, A, B, C, D, z, delta_bias = _scan_inputs(2, seqlen, 5, 3)
    seq_idx = _random_segments(2, seqlen) if segments else None
    got = ref.reverse_selective_scan(u, delta, A, B, C, D, z, delta_bias, True, seq_idx)
    flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
    want = flip(_forward_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, True,
                              flip(seq_idx)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scan_equals_quadratic_form():
    """y[t] = sum over s >= t in t's segment of C[t]·(exp(A·sum_{r=t}^{s-1} dt[r]) ⊙ dt[s] B[s] u[s]) + D u[t]."""
    batch, seqlen, dim, d_state = 2, 23, 4, 3
    u, delta, A, B, C, D, _, delta_bias = _scan_inputs(batch, seqlen, dim, d_state)
    seq_idx = _random_segments(batch, seqlen)
    got = ref.reverse_selective_scan(u, delta, A, B, C, D, None, delta_bias, False, seq_idx)
    dt = delta + delta_bias
    want = D * u
    magnitude = want.abs()  # sum of |summands|: without softplus dt < 0 lets terms grow and cancel
    for b in range(batch):
        for t in range(seqlen):
            for s in range(t, seqlen):
                if seq_idx[b, s] != seq_idx[b, t]:
                    break
                decay = torch.exp(A * dt[b, t:s].sum(0)[:, None])              # (dim, d_state)
                term = decay * (dt[b, s] * u[b, s])[:, None] * B[b, s] * C[b, t]
                want[b, t] += term.sum(-1)
                magnitude[b, t] += term.abs().sum(-1)
    # Rounding error is bounded by the summands, not the (possibly cancelled) sum: ~1e-14 of it seen.
    error = (got - want).abs() / magnitude
    assert error.max() < 1e-13, f"error {error.max():.3g} of the summands' magnitude"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_scan_segments_are_independent_sequences(bad):
    """Each segment scans as a sequence of its own, output and input gradients, also when another segment
    holds a non-finite input (the reset sets the state to 0, it does not multiply it by 0)."""
    inputs = _scan_inputs(1, 29, 5, 3)
    seq_idx = torch.tensor([[0] * 9 + [1] * 11 + [2] * 9], dtype=torch.int32)
    inputs[0][0, 12, 1] = bad                                    # u, in the middle segment
    u, delta, A, B, C, D, z, delta_bias = [t.requires_grad_() for t in inputs]
    got = ref.reverse_selective_scan(u, delta, A, B, C, D, z, delta_bias, True, seq_idx)
    got.sum().backward()
    for part in (slice(0, 9), slice(20, 29)):
        alone = [t.detach()[:, part].requires_grad_() for t in (u, delta, B, C, z)]
        want = ref.reverse_selective_scan(*alone[:2], A.detach(), *alone[2:4], D.detach(), alone[4],
                                          delta_bias.detach(), True)
        want.sum().backward()
        torch.testing.assert_close(got[:, part], want, rtol=1e-12, atol=1e-12)
        for full, piece in zip((u, delta, B, C, z), alone):
            torch.testing.assert_close(full.grad[:, part], piece.grad, rtol=1e-12, atol=1e-12)


def test_scan_low_precision_keeps_fp32_state():
    u, delta, A, B, C, D, z, delta_bias = _scan_inputs(1, 40, 6, 4)
    want = ref.reverse_selective_scan(u, delta, A, B, C, D, z, delta_bias, True)
    low = [t.to(torch.bfloat16) for t in (u, delta, B, C, z)]
    got = ref.reverse_selective_scan(low[0], low[1], A.float(), low[2], low[3], D.float(), low[4],
                                     delta_bias.float(), True)
    assert got.dtype == torch.bfloat16
    assert float((got.double() - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("seqlen", [1, 3, 17])
@pytest.mark.parametrize("silu", [False, True])
def test_conv_equals_flipped_causal_conv(seqlen, silu):
    x = torch.randn(2, seqlen, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    got = ref.reverse_conv1d(x, w, bias, silu=silu)
    # Anti-causal conv == causal conv of the flipped sequence (taps reversed into conv1d's cross-correlation).
    xf = F.pad(x.flip(1).transpose(1, 2), (3, 0))
    want = F.conv1d(xf, w.flip(1)[:, None, :], bias, groups=6).transpose(1, 2).flip(1)
    want = F.silu(want) if silu else want
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seqlen", [0, 2, 9])
def test_conv_gradients_equal_flipped_causal_conv_gradients(seqlen):
    """Without a bias too, and at seqlen 0, where the gradients are zeros of the inputs' shapes."""
    x = torch.randn(2, seqlen, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, seqlen, 6, dtype=torch.float64)
    got = torch.autograd.grad(ref.reverse_conv1d(x, w), (x, w), dy)
    if seqlen == 0:  # conv1d refuses an input shorter than its kernel
        want = (torch.zeros_like(x), torch.zeros_like(w))
    else:
        xf = F.pad(x.flip(1).transpose(1, 2), (3, 0))
        want = torch.autograd.grad(F.conv1d(xf, w.flip(1)[:, None, :], groups=6).transpose(1, 2).flip(1),
                                   (x, w), dy)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_conv_segments_are_independent_sequences(bad):
    """Also when one segment holds a non-finite input: a tap past a segment's end is 0, not a product with 0.
    The weight gradient is the sum of the segments' (each x[t + k] paired only with dy[t] of its segment)."""
    x = torch.randn(1, 29, 5, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 9 + [1] * 11 + [2] * 9], dtype=torch.int32)
    if bad is not None:
        x[0, 9, 1] = bad                                         # the middle segment's first position
    x.requires_grad_()
    got = ref.reverse_conv1d(x, w, None, seq_idx)
    got.sum().backward()
    dw = torch.zeros_like(w)
    for s in range(3):
        part = seq_idx[0] == s
        piece, w_piece = x.detach()[:, part].requires_grad_(), w.detach().clone().requires_grad_()
        want = ref.reverse_conv1d(piece, w_piece)
        want.sum().backward()
        torch.testing.assert_close(got[:, part], want, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(x.grad[:, part], piece.grad, rtol=1e-12, atol=1e-12)
        dw += w_piece.grad
    torch.testing.assert_close(w.grad, dw, rtol=1e-12, atol=1e-12, equal_nan=True)


def _paged(cache, page_size, table):
    """A contiguous (batch, max_len, ...) cache rearranged into the pages that `table` names; spare pages
    hold random values."""
    batch, pages_per_seq = table.shape
    paged = torch.randn(batch * pages_per_seq + 2, page_size, *cache.shape[2:], dtype=cache.dtype)
    for b in range(batch):
        for p in range(pages_per_seq):
            paged[table[b, p]] = cache[b, p * page_size:(p + 1) * page_size]
    return paged


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True])
def test_attention_equals_sdpa_with_explicit_mask(causal, paged):
    batch, q_len, n_heads, n_kv, head_dim, max_len = 3, 5, 4, 2, 8, 24
    q = torch.randn(batch, q_len, n_heads, head_dim, dtype=torch.float64)
    k = torch.randn(batch, q_len, n_kv, head_dim, dtype=torch.float64)
    v = torch.randn(batch, q_len, n_kv, head_dim, dtype=torch.float64)
    k_cache = torch.randn(batch, max_len, n_kv, head_dim, dtype=torch.float64)
    v_cache = torch.randn(batch, max_len, n_kv, head_dim, dtype=torch.float64)
    lens = torch.tensor([0, 7, max_len - q_len], dtype=torch.int32)
    # SDPA over the full padded key range [cache | block], masking what query i of b may not see.
    keys = torch.cat([k_cache, k], 1).repeat_interleave(n_heads // n_kv, 2)
    vals = torch.cat([v_cache, v], 1).repeat_interleave(n_heads // n_kv, 2)
    j = torch.arange(max_len + q_len)
    i = torch.arange(q_len)[:, None]
    mask = torch.stack([
        (j < lens[b]) | ((j >= max_len) & (((j - max_len) <= i) if causal else (i >= 0))) for b in range(batch)
    ])[:, None]
    want = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)
    if paged:
        table = torch.randperm(batch * max_len // 4 + 2)[:batch * max_len // 4].view(batch, -1).to(torch.int32)
        k_cache, v_cache = _paged(k_cache, 4, table), _paged(v_cache, 4, table)
    else:
        table = None
    k_before, v_before = k_cache.clone(), v_cache.clone()
    got, lse = ref.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table, causal=causal,
                                   return_lse=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(head_dim)
    torch.testing.assert_close(lse, scores.masked_fill(~mask, -math.inf).logsumexp(-1), rtol=1e-12, atol=1e-12)
    # write_kv stored the block in the draft slots and left every other slot alone.
    for b in range(batch):
        for t in range(max_len):
            draft = lens[b] <= t < lens[b] + q_len
            page, off = (table[b, t // 4], t % 4) if paged else (b, t)
            want_k = k[b, t - lens[b]] if draft else k_before[page, off]
            want_v = v[b, t - lens[b]] if draft else v_before[page, off]
            torch.testing.assert_close(k_cache[page, off], want_k, rtol=0, atol=0)
            torch.testing.assert_close(v_cache[page, off], want_v, rtol=0, atol=0)


def _sort_based_commit(logits, tokens, mask_id, threshold, min_per_step, max_per_step, active):
    """Selection written as a sort: rank eligible positions by (confidence desc, position asc) and take the
    first n, where n = clamp(max(#passing, min_per_step), <= #eligible, <= max_per_step)."""
    p = logits.double().softmax(-1)
    pick = logits.double().clone()
    pick[..., mask_id] = -math.inf
    cand = pick.argmax(-1)
    conf = p.gather(-1, cand[..., None])[..., 0].float()
    eligible = (tokens == mask_id) & active[:, None]
    key = torch.where(eligible, conf.double(), torch.full_like(conf.double(), -math.inf))
    block = tokens.shape[1]
    # Stable descending sort keeps the lower position first among equal confidences.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    n_pass = (eligible & (conf >= threshold)).sum(1)
    n = torch.maximum(n_pass, torch.full_like(n_pass, min_per_step)).minimum(eligible.sum(1))
    if max_per_step > 0:
        n = n.clamp(max=max_per_step)
    take = torch.arange(block)[None, :] < n[:, None]
    committed = torch.zeros_like(eligible).scatter(1, order, take)
    out = torch.where(committed, cand, tokens)
    return committed, out


@pytest.mark.parametrize("rule", ["threshold", "topk", "quota"])
def test_commit_equals_sort_based_selection(rule):
    batch, block, vocab, mask_id = 4, 16, 50, 49
    threshold, min_k, max_k = {"threshold": (0.2, 1, 0), "topk": (math.inf, 3, 3), "quota": (0.3, 2, 0)}[rule]
    logits = torch.randn(batch, block, vocab) * 3
    logits[0, 3] = logits[0, 5]                             # two positions with equal confidence
    tokens = torch.randint(0, vocab - 1, (batch, block))
    tokens[torch.rand(batch, block) < 0.6] = mask_id
    active = torch.tensor([True, True, False, True])
    want_committed, want_tokens = _sort_based_commit(logits, tokens, mask_id, threshold, min_k, max_k, active)
    got_tokens = tokens.clone()
    committed, confidence, n_masked = ref.parallel_commit(
        logits, got_tokens, mask_token_id=mask_id, threshold=threshold, min_per_step=min_k, max_per_step=max_k,
        active=active)
    assert torch.equal(committed, want_committed)
    assert torch.equal(got_tokens, want_tokens)
    assert torch.equal(n_masked, (want_tokens == mask_id).sum(1).int())
    assert not committed[2].any() and torch.isinf(confidence[2]).all()
    assert (got_tokens[committed] != mask_id).all()


def test_commit_never_picks_mask_and_skips_non_finite_rows():
    logits = torch.randn(1, 4, 10)
    logits[0, :, 9] = 100.0                                  # the mask token is the most likely everywhere
    logits[0, 1, 2] = math.nan
    logits[0, 2, :9] = -math.inf                             # only the mask token is possible
    tokens = torch.full((1, 4), 9)
    committed, confidence, n_masked = ref.parallel_commit(logits, tokens, mask_token_id=9, threshold=0.0,
                                                          min_per_step=4)
    assert committed.tolist() == [[True, False, False, True]]
    assert (tokens[0, [0, 3]] != 9).all() and (tokens[0, [1, 2]] == 9).all()
    assert torch.isinf(confidence[0, 1]) and torch.isinf(confidence[0, 2])
    assert n_masked.tolist() == [2]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_commit_scores_equal_their_formulas(temperature):
    """The three scores written out in float64, one position at a time. p is the softmax of the logits (not
    of logits / temperature) over the whole vocabulary, the mask token included; the mask token is never
    the candidate nor the margin's runner-up. prob = p[candidate] (the sampled one at temperature > 0),
    margin = largest minus second largest p of the non-mask tokens (whatever the candidate),
    neg_entropy = sum of p log p over the whole vocabulary."""
    batch, block, vocab = 3, 12, 40
    mask_id = int(torch.randint(0, vocab, ()))
    logits = torch.randn(batch, block, vocab, dtype=torch.float64) * torch.empty(batch, block, 1).uniform_(0.5, 4)
    non_mask = logits.clone()
    non_mask[..., mask_id] = -math.inf
    top2 = non_mask.topk(2, -1).values
    logits[0, :, mask_id] = top2[0, :, 0] + 1.0                        # the mask token the most likely
    logits[1, :, mask_id] = (top2[1, :, 0] + top2[1, :, 1]) / 2        # the mask token the runner-up
    seed, step = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    for score in ("prob", "margin", "neg_entropy"):
        tokens = torch.full((batch, block), mask_id)
        committed, confidence, _ = ref.parallel_commit(logits, tokens, mask_token_id=mask_id, threshold=-math.inf,
                                                       temperature=temperature, seed=seed, step=step, score=score)
        assert committed.all() and (tokens != mask_id).all()
        for b in range(batch):
            for i in range(block):
                x = logits[b, i].tolist()
                z = sum(math.exp(v) for v in x)
                p = [math.exp(v) / z for v in x]
                candidate = int(tokens[b, i])
                if temperature == 0:
                    assert x[candidate] == max(x[v] for v in range(vocab) if v != mask_id)
                ranked = sorted((p[v] for v in range(vocab) if v != mask_id), reverse=True)
                want = {"prob": p[candidate], "margin": ranked[0] - ranked[1],
                        "neg_entropy": sum(q * math.log(q) for q in p if q > 0)}[score]
                assert math.isclose(float(confidence[b, i]), want, rel_tol=1e-6, abs_tol=1e-7), (score, b, i)


def _lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_gumbel_uniform_matches_integer_definition():
    seed, step, b, pos = 2**40 + 12345, 7, 3, 11
    vocab = torch.arange(64)
    got = ref.gumbel_uniform(seed, step, b, pos, vocab)
    m = 0xFFFFFFFF
    row = _lowbias32(pos)
    for part in (b, step >> 32, step & m, seed >> 32, seed & m):
        row = _lowbias32((part + row) & m)
    want = [((_lowbias32(row ^ _lowbias32(v)) >> 8) + 0.5) / 2**24 for v in range(64)]
    assert got.tolist() == want
    many = ref.gumbel_uniform(1, 2, 3, torch.arange(1000)[:, None], torch.arange(1000)[None, :])
    assert 0 < float(many.min()) and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.005


def test_commit_sampling_is_reproducible_and_varies_with_step():
    logits = torch.randn(2, 8, 30)
    draws = []
    for step in (0, 0, 1):
        tokens = torch.full((2, 8), 29)
        ref.parallel_commit(logits, tokens, mask_token_id=29, threshold=0.0, temperature=1.0, seed=5, step=step)
        draws.append(tokens)
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
