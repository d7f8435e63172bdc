"""cache_attention (DESIGN.md 3.3) against the reference and against SDPA with an explicit mask."""
import math

import pytest
import torch
import torch.nn.functional as F

import r2lm_kernels
from r2lm_kernels import reference as ref

HALF = (torch.bfloat16, torch.float16)


def dtypes_for(device):
    return [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])


@pytest.fixture(params=["auto", "generic", "generic-32", "generic-16"])
def cpu_kernel(request, device, select_cpu_kernel):
    """Which CPU kernel runs: "auto" (on CPUs with AMX-BF16, blocks of >= 16 query rows per kv head use the
    tile-unit kernel) or "generic" (R2LM_ATTENTION_CPU_GENERIC=1 forces the FMA kernel), the latter at
    every vector width the CPU has, so that all of them stay tested."""
    select_cpu_kernel(request.param, device, "R2LM_ATTENTION_CPU_GENERIC")
    return request.param


def strided(shape, dtype, device, pad=64):
    """Random values in a view of a wider tensor: unit last-dim stride, every other stride padded."""
    wide = torch.randn(*shape[:-1], shape[-1] + pad, dtype=torch.float32, device=device).to(dtype)
    return wide[..., : shape[-1]]


def make_case(device, dtype, *, batch, q_len, n_heads, n_kv, head_dim, max_len, paged, page_size=16,
              lens=None, contiguous=False):
    """Random inputs; cache lengths random in [0, max_len - q_len] with 0 and full caches included. Strided
    inputs pad k / k_cache and v / v_cache differently, so that a kernel taking one's strides for the other's
    shows."""
    def maker(pad):
        return (lambda *s: torch.randn(*s, device=device).to(dtype)) if contiguous else \
            (lambda *s: strided(s, dtype, device, pad))

    make, make_v = maker(64), maker(32)
    q = make(batch, q_len, n_heads, head_dim)
    k = make(batch, q_len, n_kv, head_dim)
    v = make_v(batch, q_len, n_kv, head_dim)
    if lens is None:
        lens = torch.randint(0, max_len - q_len + 1, (batch,))
        lens[0] = 0
        if batch > 1:
            lens[1] = max_len - q_len
    cache_seqlens = torch.as_tensor(lens, dtype=torch.int32, device=device)
    if paged:
        pages_per_seq = max_len // page_size
        num_pages = batch * pages_per_seq + 5
        # A permuted page pool and a non-contiguous table (the left columns of a wider one).
        perm = torch.randperm(num_pages, device=device)[: batch * pages_per_seq].to(torch.int32)
        wide = torch.full((batch, pages_per_seq + 3), -7, dtype=torch.int32, device=device)
        wide[:, :pages_per_seq] = perm.reshape(batch, pages_per_seq)
        block_table = wide[:, :pages_per_seq]
        cache_shape = (num_pages, page_size, n_kv, head_dim)
    else:
        block_table = None
        cache_shape = (batch, max_len, n_kv, head_dim)
    k_cache, v_cache = make(*cache_shape), make_v(*cache_shape)
    return q, k, v, k_cache, v_cache, cache_seqlens, block_table


def low_precision_error(q, k, v, k_cache, v_cache, cache_seqlens, block_table, causal, want):
    """Error of the same attention done in q's dtype with PyTorch ops (FlashAttention's reference rule)."""
    outs = []
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        keys = torch.cat([ref._gather_cache(k_cache, b, length, block_table), k[b]], 0)
        vals = torch.cat([ref._gather_cache(v_cache, b, length, block_table), v[b]], 0)
        group = q.shape[2] // k.shape[2]
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[b], keys).float() / math.sqrt(q.shape[-1])
        if causal:
            i = torch.arange(q.shape[1], device=q.device)[:, None]
            j = torch.arange(keys.shape[0], device=q.device)[None]
            s = s.masked_fill(j > i + length, -math.inf)
        p = s.softmax(-1).to(q.dtype)
        outs.append(torch.einsum("hqk,khd->qhd", p, vals))
    lowp = torch.stack(outs)
    return float((lowp.double() - want).norm() / want.norm())


@pytest.fixture
def check_against_reference(rel_err, tol, poison_memory):
    """check_against_reference(device, dtype, causal, paged, write_kv=True, unused=None, **shape): a random case
    (make_case) through the op, out and lse against the fp64 reference, and the caches' slots written as
    expected. unused: a value for every cache slot past cache_seqlens (draft slots and unused pages too)."""
    def check(device, dtype, causal, paged, write_kv=True, unused=None, **shape):
        q, k, v, k_cache, v_cache, lens, table = make_case(device, dtype, paged=paged, **shape)
        if unused is not None:
            fill_unused_slots(k_cache, lens, table, unused)
            fill_unused_slots(v_cache, lens, table, unused)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        want, want_lse = ref.cache_attention(*(t.double().cpu() for t in (q, k, v, k_cache, v_cache)), lens.cpu(),
                                             block_table=None if table is None else table.cpu(), causal=causal,
                                             write_kv=False, return_lse=True)
        want, want_lse = want.to(device), want_lse.to(device)
        poison_memory(device, q.nbytes, q.shape[0] * q.shape[2] * q.shape[1] * 4)  # out, lse
        out, lse = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table, causal=causal,
                                                write_kv=write_kv, return_lse=True)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        err = rel_err(out, want)
        if dtype in HALF:
            lowp = low_precision_error(q, k, v, k_before, v_before, lens, table, causal, want)
            assert err <= 3 * lowp + 1e-4 and err <= tol[dtype], (err, lowp)
        else:
            assert err <= tol[dtype], err
        assert rel_err(lse, want_lse) <= (1e-4 if dtype in HALF else 1e-6), rel_err(lse, want_lse)
        # Elementwise too: one key too few or too many moves a row's lse by that key's softmax weight (up to
        # 2e-3 in some rows with 4096 keys, measured, while the norm moved by 3e-5). Errors beyond lse's own
        # fp32 rounding, measured on the CPU over ~3500 rows per dtype: up to 8e-5 (fp16), 4e-5 (bf16),
        # 2e-6 (fp32).
        lse_excess = (lse.double() - want_lse).abs() - 2 ** -24 * want_lse.abs()
        lse_bound = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-4)
        assert lse_excess.max() <= lse_bound, f"lse is off by {float(lse_excess.max()):.2e} beyond its rounding"
        check_cache_writes(k_cache, k_before, k, lens, table, write_kv)
        check_cache_writes(v_cache, v_before, v, lens, table, write_kv)
    return check


def fill_unused_slots(cache, lens, table, value):
    """Every slot of the cache (a view, filled in place) but those of positions [0, lens[b]) holds value."""
    used = torch.zeros(cache.shape[:2], dtype=torch.bool, device=cache.device)
    for b in range(len(lens)):
        pos = torch.arange(int(lens[b]), device=cache.device)
        if table is None:
            used[b, pos] = True
        else:
            used[table[b, pos // cache.shape[1]].long(), pos % cache.shape[1]] = True
    cache[~used] = value


def check_cache_writes(cache, before, block, lens, table, write_kv):
    """Draft slots hold the block exactly (with write_kv); every other slot is bit-for-bit unchanged."""
    expected = before.clone()
    if write_kv:
        for b in range(block.shape[0]):
            ref._scatter_cache(expected, b, int(lens[b]), block[b], table)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[cache.element_size()]  # NaN slots compare too
    assert torch.equal(cache.view(bits), expected.view(bits))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("q_len", [1, 17, 33])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference(device, cpu_kernel, causal, paged, q_len, head_dim, check_against_reference):
    for dtype in dtypes_for(device):
        check_against_reference(device, dtype, causal, paged, batch=5, q_len=q_len,
                                n_heads=6, n_kv=2, head_dim=head_dim, max_len=160)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_unused_cache_slots_never_reach_the_output(device, cpu_kernel, value, paged, check_against_reference):
    """A cache from torch.empty may hold NaN or inf anywhere it was never written: slots past cache_seqlens
    (the draft slots, which the block's k / v stand for, included), the last page's tail and unused pages
    must not reach the output, not even as 0 * NaN in a masked product. The 1200-slot cache takes the CUDA
    kernels' split-KV path."""
    for dtype in dtypes_for(device):
        for causal, write_kv, q_len, max_len in [(True, True, 17, 160), (False, False, 17, 160),
                                                 (True, False, 1, 160), (False, True, 1, 1200)]:
            check_against_reference(device, dtype, causal, paged, write_kv, unused=value, batch=3, q_len=q_len,
                                    n_heads=4, n_kv=2, head_dim=64, max_len=max_len)


# (20, 10) and (10, 10): more kv heads than one CPU work item takes (8, in the AMX kernel, and in the FMA
# kernel up to 16 rows per kv head, as (10, 10) has): with 2 threads (fewer work items than threads would
# shrink the groups) the last item gets the other 2.
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 1), (12, 4), (20, 10), (10, 10)])
def test_gqa_groups_and_contiguous_inputs(device, cpu_kernel, n_heads, n_kv, check_against_reference):
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        for dtype in dtypes_for(device):
            check_against_reference(device, dtype, True, False, batch=3, q_len=9,
                                    n_heads=n_heads, n_kv=n_kv, head_dim=64, max_len=96, contiguous=True)
    finally:
        torch.set_num_threads(threads)


def test_long_block_and_write_kv_off(device, cpu_kernel, check_against_reference):
    # q_len 128 (a large block: many row tiles per kv head), and write_kv=False leaves the caches alone. Pages
    # of 64 slots: each 64-key tile of the CUDA kernel lies in one page, which it looks up once.
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (True, False):
            check_against_reference(device, dtype, causal, True, write_kv=False, batch=2, q_len=128, n_heads=4,
                                    n_kv=2, head_dim=128, max_len=320, page_size=64)


@pytest.mark.parametrize("paged", [False, True])
def test_full_cache_without_write_kv(device, cpu_kernel, paged, check_against_reference):
    """Without write_kv a block may attend over a full cache: the draft slots are never touched."""
    check_against_reference(device, torch.float32, True, paged, write_kv=False, batch=2,
                            q_len=5, n_heads=4, n_kv=2, head_dim=64, max_len=32, page_size=8, lens=[32, 17])


@pytest.mark.parametrize("batch,dtype,head_dim", [(1, torch.bfloat16, 128), (1, torch.float32, 128),
                                                  (2, torch.bfloat16, 128), (2, torch.float16, 64),
                                                  (2, torch.float32, 64)])
def test_long_cache_small_batch_split_kv(device, cpu_kernel, batch, dtype, head_dim, check_against_reference):
    # Small batches with long caches: the CUDA kernel splits the keys across CTAs and combines by lse; with two
    # sequences of different lengths the partials of one must not land on the other's.
    lens = [int(torch.randint(3000, 4080, ())), int(torch.randint(1000, 2000, ()))][:batch]
    for paged in (False, True):
        check_against_reference(device, dtype, True, paged, batch=batch, q_len=16, n_heads=8, n_kv=2,
                                head_dim=head_dim, max_len=4096, page_size=256, lens=lens)


@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_caches_ending_around_a_key_tile_end(device, cpu_kernel, causal, q_len, check_against_reference):
    """Caches ending 2, 1 and 0 keys before the end of a 64-key tile: the tile holding the cache's end is the
    one that needs masking (block keys past a query, or slots past the block)."""
    for dtype in dtypes_for(device):
        check_against_reference(device, dtype, causal, False, batch=4, q_len=q_len, n_heads=4, n_kv=2, head_dim=64,
                                max_len=192, lens=[62, 126, 63, 64])


def test_pages_of_a_size_not_a_power_of_two(device, cpu_kernel, check_against_reference):
    """12-slot pages: a position's page and slot come from a division, not a shift; caches and blocks end
    inside pages."""
    for dtype in dtypes_for(device):
        check_against_reference(device, dtype, True, True, batch=3, q_len=5, n_heads=4, n_kv=2, head_dim=64,
                                max_len=96, page_size=12, lens=[7, 50, 91])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_causal_block_over_split_keys(device, cpu_kernel, dtype, check_against_reference):
    """A block of 129 queries (three CUDA row tiles) over a cache split across CTAs, one sequence with an empty
    cache: a split may hold only block keys that lie past some of its queries (rows with no visible key)."""
    check_against_reference(device, dtype, True, False, batch=2, q_len=129, n_heads=2, n_kv=1, head_dim=64,
                            max_len=900, lens=[0, 700])


def test_random_shapes(device, cpu_kernel, check_against_reference):
    # Shapes drawn afresh every run (the printed seed replays them) around the kernels' edges: query rows
    # per kv head (q_len x group) on both sides of the 16-row tiles and 64-row CTAs, caches ending anywhere
    # in a key tile and long enough to split the keys on CUDA, pages of 1 to 64 slots. Batch >= 2 with the
    # second sequence's cache full (make_case), so the lse norm never rests on a few one-key rows alone
    # (a single dot product's relative error is unbounded).
    def pick(options):
        return options[int(torch.randint(len(options), ()))]

    for _ in range(4):
        n_kv, group, q_len = pick([1, 2, 3, 8]), pick([1, 2, 3, 5, 8]), pick([1, 2, 15, 16, 17, 33, 64, 65, 129])
        paged, page_size = pick([False, True]), pick([1, 3, 16, 64])
        max_len = q_len + pick([31, 33, 100, 257, 700])
        if paged:
            max_len = -(-max_len // page_size) * page_size
        check_against_reference(device, pick(dtypes_for(device)), pick([True, False]), paged,
                                write_kv=pick([True, False]), batch=pick([2, 3]),
                                q_len=q_len, n_heads=n_kv * group, n_kv=n_kv, head_dim=pick([64, 128]),
                                max_len=max_len, page_size=page_size, contiguous=pick([False, True]))


def test_growing_scores_rescale_the_output(device, cpu_kernel, rel_err, tol):
    # Keys grow along the cache, so each key tile's best score beats the last one by far more than the
    # kernels' rescale margin: the running output is rescaled mid-sequence, not only at the first tile.
    q, k, v, k_cache, v_cache, lens, _ = make_case(device, torch.float32, batch=2, q_len=24, n_heads=4, n_kv=2,
                                                   head_dim=128, max_len=600, paged=False, lens=[576, 300])
    k_cache = k_cache * torch.linspace(0.5, 6.0, k_cache.shape[1], device=device)[None, :, None, None]
    want, want_lse = ref.cache_attention(*(t.double() for t in (q, k, v, k_cache, v_cache)), lens, causal=True,
                                         softmax_scale=0.5, write_kv=False, return_lse=True)
    out, lse = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, softmax_scale=0.5, write_kv=False,
                                            return_lse=True)
    assert rel_err(out, want) <= tol[torch.float32] * 10, rel_err(out, want)
    assert rel_err(lse, want_lse) <= 1e-6, rel_err(lse, want_lse)


def test_fp16_subnormal_values(device, cpu_kernel, rel_err, tol):
    # Values below fp16's normal range (m * 2^-24): the CPU kernels widen fp16 rows without branches, and
    # zeros and subnormals take their own path there.
    q, k, v, k_cache, v_cache, lens, _ = make_case(device, torch.float16, batch=2, q_len=17, n_heads=4, n_kv=2,
                                                   head_dim=64, max_len=96, paged=False)
    def subnormal(t):
        return (torch.randint(-1023, 1024, t.shape, device=device) * 2.0**-24).to(torch.float16)

    v, v_cache = subnormal(v), subnormal(v_cache)
    assert (v_cache.abs() < 2.0**-14).all() and (v_cache != 0).any()
    want = ref.cache_attention(*(t.double() for t in (q, k, v, k_cache, v_cache)), lens, write_kv=False)
    out = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, write_kv=False)
    lowp = low_precision_error(q, k, v, k_cache, v_cache, lens, None, True, want)
    err = rel_err(out, want)
    assert err <= 3 * lowp + 1e-4 and err <= tol[torch.float16], (err, lowp)


@pytest.mark.parametrize("name", ["q", "k", "v", "k_cache", "v_cache"])
def test_16bit_head_strides_the_cuda_kernels_cannot_stream(device, name, cuda_kernels, rel_err, tol):
    """The CUDA kernels copy 16-bit rows in 16-byte chunks: a head stride that is not a multiple of 8 elements
    is refused there, naming the tensor; the CPU kernels take it."""
    case = dict(zip(("q", "k", "v", "k_cache", "v_cache", "cache_seqlens"), make_case(
        device, torch.bfloat16, batch=2, q_len=3, n_heads=4, n_kv=2, head_dim=64, max_len=16, paged=False,
        contiguous=True)))
    case[name] = F.pad(case[name], (0, 4))[..., :64]  # head stride 68, the other strides multiples of 8
    args = [case[n] for n in ("q", "k", "v", "k_cache", "v_cache", "cache_seqlens")]
    if cuda_kernels:
        with pytest.raises(RuntimeError, match=f"{name} must be 16-byte aligned"):
            r2lm_kernels.cache_attention(*args)
    else:
        want = ref.cache_attention(*(t.double() for t in args[:5]), args[5], write_kv=False)
        assert rel_err(r2lm_kernels.cache_attention(*args), want) <= tol[torch.bfloat16]


def test_fp16_output_rounds_half_to_even(device, cpu_kernel):
    """A zero query weighs its two keys equally: each output is the exact mean of two neighbouring fp16 values,
    halfway between them, and must round to the even one as torch does (not away from zero)."""
    q, k, v, k_cache, v_cache, _, _ = make_case(device, torch.float16, batch=2, q_len=1, n_heads=4, n_kv=2,
                                                head_dim=64, max_len=8, paged=False, contiguous=True)
    q.zero_()
    lens = torch.ones(2, dtype=torch.int32, device=device)
    low = (1 + torch.randint(0, 1024, v.shape, device=device) / 1024) * torch.where(
        torch.rand(v.shape, device=device) < 0.5, -1.0, 1.0)               # fp16 values of [1, 2) and (-2, -1]
    v_cache[:, :1] = low.to(torch.float16)
    v.copy_((low + low.sign() / 1024).to(torch.float16))                  # the next fp16 value away from zero
    out = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, write_kv=False)
    want = ((v_cache[:, :1].float() + v.float()) / 2).repeat_interleave(2, 2).half()
    assert torch.equal(out, want)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_sdpa_with_explicit_mask(device, cpu_kernel, causal, rel_err):
    batch, q_len, n_heads, n_kv, head_dim, max_len = 3, 17, 8, 2, 64, 128
    dtype = torch.float32
    q, k, v, k_cache, v_cache, lens, _ = make_case(device, dtype, batch=batch, q_len=q_len, n_heads=n_heads,
                                                   n_kv=n_kv, head_dim=head_dim, max_len=max_len, paged=False)
    scale = 0.3
    out = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, softmax_scale=scale, causal=causal)
    # k_cache now holds the block at [len, len + q_len): the whole sequence in one tensor.
    keys = k_cache.repeat_interleave(n_heads // n_kv, 2).transpose(1, 2)
    vals = v_cache.repeat_interleave(n_heads // n_kv, 2).transpose(1, 2)
    i = torch.arange(q_len, device=device)[None, :, None]
    j = torch.arange(max_len, device=device)[None, None, :]
    L = lens.long()[:, None, None]
    mask = (j < L + i + 1) if causal else (j < L + q_len)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask[:, None],
                                          scale=scale).transpose(1, 2)
    assert rel_err(out, want) <= 1e-5


def _cpu_has_amx_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def test_tile_unit_kernel_runs_where_the_cpu_has_it(device, monkeypatch, rel_err, tol):
    # Both CPU kernels are accurate but round differently: on a CPU with AMX-BF16 the default result must
    # differ in its last bits from the FMA kernel's, which shows the tile-unit kernel was the one that ran.
    if device != "cpu" or not _cpu_has_amx_bf16():
        pytest.skip("needs a Linux CPU with AMX-BF16")
    q, k, v, k_cache, v_cache, lens, _ = make_case(device, torch.float32, batch=2, q_len=16, n_heads=4, n_kv=2,
                                                   head_dim=128, max_len=200, paged=False)
    want = ref.cache_attention(*(t.double() for t in (q, k, v, k_cache, v_cache)), lens, write_kv=False)
    tile_unit = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, write_kv=False)
    monkeypatch.setenv("R2LM_ATTENTION_CPU_GENERIC", "1")
    fma = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, write_kv=False)
    assert not torch.equal(tile_unit, fma)
    for out in (tile_unit, fma):
        assert rel_err(out, want) <= tol[torch.float32] * 10, rel_err(out, want)


def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for paged in (False, True):
            q, k, v, k_cache, v_cache, lens, table = make_case(device, dtype, batch=2, q_len=5, n_heads=4, n_kv=2,
                                                               head_dim=64, max_len=48, paged=paged)
            torch.library.opcheck(torch.ops.r2lm.cache_attention.default, (q, k, v, k_cache, v_cache, lens),
                                  {"block_table": table, "causal": True, "write_kv": True})


def test_torch_compile_fullgraph(device, rel_err):
    """Compiled: eager's output and cache writes, and the reference's output."""
    q, k, v, k_cache, v_cache, lens, table = make_case(device, torch.float32, batch=2, q_len=5, n_heads=4, n_kv=2,
                                                       head_dim=64, max_len=48, paged=True)
    f = torch.compile(lambda *a, **kw: r2lm_kernels.cache_attention(*a, **kw), fullgraph=True, backend="aot_eager")
    k_compiled, v_compiled = k_cache.clone(), v_cache.clone()
    got = f(q, k, v, k_compiled, v_compiled, lens, block_table=table, causal=False)
    want_ref = ref.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table, causal=False, write_kv=False)
    want = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table, causal=False)
    assert rel_err(got, want) == 0
    assert rel_err(got, want_ref) <= 1e-5
    assert torch.equal(k_compiled, k_cache) and torch.equal(v_compiled, v_cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_capture(rel_err):
    q, k, v, k_cache, v_cache, lens, table = make_case("cuda", torch.bfloat16, batch=2, q_len=32, n_heads=16,
                                                       n_kv=8, head_dim=128, max_len=2048, paged=True, page_size=64)
    want = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table)
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, want) == 0


def bad_call(device, **overrides):
    args = dict(zip(("q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table"),
                    make_case(device, torch.float32, batch=2, q_len=4, n_heads=4, n_kv=2, head_dim=64, max_len=32,
                              paged=overrides.pop("paged", False), page_size=8)))
    op = overrides.pop("op", r2lm_kernels.cache_attention)
    args.update(overrides)
    return lambda: op(**args)


def test_bad_inputs_raise_naming_the_argument(device):
    def raises(match, **overrides):
        with pytest.raises((RuntimeError, ValueError), match=match):
            bad_call(device, **overrides)()

    f32 = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    raises("n_heads .* multiple of n_kv_heads", q=f32(2, 4, 3, 64))
    raises("head_dim .* 64 or 128", q=f32(2, 4, 4, 96), k=f32(2, 4, 2, 96), v=f32(2, 4, 2, 96),
           k_cache=f32(2, 32, 2, 96), v_cache=f32(2, 32, 2, 96))
    raises("k must have q's dtype", k=f32(2, 4, 2, 64).half())
    raises("k_cache must have q's dtype", k_cache=f32(2, 32, 2, 64).double())
    raises("q must have dtype", q=torch.randint(0, 5, (2, 4, 4, 64), device=device))
    raises("cache_seqlens must have dtype", cache_seqlens=torch.zeros(2, dtype=torch.int64, device=device))
    raises("cache_seqlens must have shape", cache_seqlens=torch.zeros(3, dtype=torch.int32, device=device))
    raises("cache_seqlens must be contiguous", cache_seqlens=torch.zeros(4, dtype=torch.int32, device=device)[::2])
    raises("v must have shape", v=f32(2, 5, 2, 64))
    raises("v_cache must have shape", v_cache=f32(2, 31, 2, 64))
    raises("k_cache must have shape", k_cache=f32(3, 32, 2, 64))
    raises("q must have unit stride", q=f32(2, 4, 4, 128)[..., ::2])
    raises("block_table must have dtype", paged=True, block_table=torch.zeros(2, 4, dtype=torch.int64, device=device))
    raises(r"block_table must have shape \(2, \*\)", paged=True,
           block_table=torch.zeros(1, 4, dtype=torch.int32, device=device))
    raises("v must have q's dtype", v=f32(2, 4, 2, 64).half())
    raises("v_cache must have q's dtype", v_cache=f32(2, 32, 2, 64).half())
    raises("q must have at least one head", q=f32(2, 4, 0, 64))
    raises("k_cache is written in place", k_cache=f32(1, 32, 2, 64).expand(2, -1, -1, -1))
    # Slots half a slot apart: each slot's second head is the next slot's first.
    raises("v_cache is written in place", v_cache=f32(2 * 32 * 2 * 64).as_strided((2, 32, 2, 64), (2048, 64, 64, 1)))
    shared = f32(2, 32, 2, 64)
    raises("k_cache and v_cache are written in place", k_cache=shared, v_cache=shared)
    bad_call(device, k_cache=f32(1, 32, 2, 64).expand(2, -1, -1, -1), write_kv=False)()  # read only: fine
    for scale in (math.nan, math.inf):
        raises("softmax_scale must be finite", softmax_scale=scale)
    raises(r"softmax_scale must be at most 2.35\d*e\+38 in magnitude for Float inputs", softmax_scale=-1e39)
    if device == "cuda":
        raises("k_cache must be on", k_cache=torch.randn(2, 32, 2, 64))
        raises("float64 is supported on CPU only", **{n: t.double() for n, t in zip(
            ("q", "k", "v", "k_cache", "v_cache"), (f32(2, 4, 4, 64), f32(2, 4, 2, 64), f32(2, 4, 2, 64),
                                                    f32(2, 32, 2, 64), f32(2, 32, 2, 64)))})


@pytest.mark.parametrize("paged", [False, True])
def test_block_kv_inside_the_caches_is_read_before_the_write(device, paged):
    """k / v given as views of the caches (overlapping the draft slots that write_kv fills) act as if copied on
    entry: the same output and cache contents as with separate copies."""
    q, k, v, k_cache, v_cache, seqlens, table = make_case(device, torch.float32, batch=2, q_len=4, n_heads=4, n_kv=2,
                                                          head_dim=64, max_len=32, paged=paged, page_size=8)
    seqlens.copy_(torch.tensor([1, 2]))
    if paged:   # both sequences' block k/v: slots of sequence 0's first page, which its write fills from slot 1
        page = int(table[0, 0])
        k_alias = k_cache[page][None, :4].expand(2, -1, -1, -1)
        v_alias = v_cache[page][None, 2:6].expand(2, -1, -1, -1)
    else:       # each sequence's slots 0-3 / 2-5, overlapping the draft slots it fills from slot 1 / 2
        k_alias, v_alias = k_cache[:, :4], v_cache[:, 2:6]
    expected_caches = (k_cache.clone(), v_cache.clone())
    expected = r2lm_kernels.cache_attention(q, k_alias.clone(), v_alias.clone(), *expected_caches, seqlens,
                                            block_table=table)
    out = r2lm_kernels.cache_attention(q, k_alias, v_alias, k_cache, v_cache, seqlens, block_table=table)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close((k_cache, v_cache), expected_caches, atol=0, rtol=0)


def test_cache_writes_are_visible_to_autograd():
    """The caches' version counters move like a built-in in-place op's: a backward that saved the old cache
    contents raises instead of using the new ones."""
    k_cache = torch.randn(2, 32, 2, 64)
    weight = torch.ones((), requires_grad=True)
    product = k_cache * weight                         # saves k_cache for its backward
    version = k_cache._version
    bad_call("cpu", k_cache=k_cache)()
    assert k_cache._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()


def test_fake_implementation_checks_the_rank():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        args = dict(zip(("q", "k", "v", "k_cache", "v_cache", "cache_seqlens"),
                        make_case("cpu", torch.float32, batch=2, q_len=4, n_heads=4, n_kv=2, head_dim=64,
                                  max_len=32, paged=False, page_size=8)))
        args["q"] = args["q"][0]
        with pytest.raises(RuntimeError, match=r"q must have shape \(batch, q_len, n_heads, head_dim\), got \[4, 4,"):
            torch.ops.r2lm.cache_attention(**args)


@pytest.mark.parametrize("name", ["q", "k", "v", "k_cache", "v_cache"])
@pytest.mark.parametrize("op", [r2lm_kernels.cache_attention, torch.ops.r2lm.cache_attention],
                         ids=["wrapper", "torch.ops"])
def test_inputs_that_require_grad_raise(name, op):
    """No backward: the registered op itself refuses, so torch.ops.r2lm callers get no silently missing grad."""
    q, k, v, k_cache, v_cache, lens, _ = make_case("cpu", torch.float32, batch=2, q_len=4, n_heads=4, n_kv=2,
                                                   head_dim=64, max_len=32, paged=False, contiguous=True)
    args = dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lens)
    args[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"cache_attention has no backward: {name} requires grad"):
        op(**args)
    with torch.no_grad():
        out = op(**args)
    assert (out if isinstance(out, torch.Tensor) else out[0]).shape == q.shape


@pytest.mark.parametrize("pages", [None, 2, 4], ids=["contiguous", "paged-2", "paged-4"])
def test_capacity_past_32_bits_raises(device, pages):
    """Slots are indexed in 32 bits: a larger cache is refused, also where page_size * pages overflows int64
    (an empty pool of 2^62-slot pages: the product wraps to INT64_MIN for 2 pages, to 0 for 4)."""
    q, k, v = (torch.randn(1, 3, n, 64, device=device) for n in (2, 1, 1))
    if pages is None:
        k_cache = torch.randn(1, 1, 1, 64, device=device).expand(1, 2**31, 1, 64)
        table = None
    else:
        k_cache = torch.empty(0, device=device).as_strided((0, 2**62, 1, 64), (64, 64, 64, 1))
        table = torch.zeros(1, pages, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="cache capacity .* must fit in 32 bits"):
        torch.ops.r2lm.cache_attention(q, k, v, k_cache, k_cache, torch.zeros(1, dtype=torch.int32, device=device),
                                       block_table=table, write_kv=False)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("op", [r2lm_kernels.cache_attention, ref.cache_attention], ids=["op", "reference"])
def test_bad_values_raise(paged, op, monkeypatch):
    # Value checks need the data: always on CPU; on CUDA only with R2LM_VALIDATE=1 (they sync) or in the
    # reference (which reads every length on the host anyway).
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    monkeypatch.setenv("R2LM_VALIDATE", "1")
    for device in devices:
        lens = lambda *x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        with pytest.raises((RuntimeError, ValueError), match="cache too small"):
            bad_call(device, op=op, paged=paged, cache_seqlens=lens(0, 29))()
        bad_call(device, op=op, paged=paged, cache_seqlens=lens(0, 32), write_kv=False)()  # no draft slots used
        with pytest.raises((RuntimeError, ValueError), match="cache_seqlens.* exceeds the cache capacity 32"):
            bad_call(device, op=op, paged=paged, cache_seqlens=lens(0, 33), write_kv=False)()
        with pytest.raises((RuntimeError, ValueError), match="cache_seqlens.* negative"):
            bad_call(device, op=op, paged=paged, cache_seqlens=lens(-1, 3))()
        if paged:
            table = torch.tensor([[0, 1, 2, 3], [4, 5, 99, 7]], dtype=torch.int32, device=device)
            with pytest.raises((RuntimeError, ValueError), match=r"block_table\[1, 2\] = 99 is out of range"):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(3, 20))()
            table[1, 2] = -2
            with pytest.raises((RuntimeError, ValueError), match=r"block_table\[1, 2\] = -2 is out of range"):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(3, 20))()
            # Pages past the ones a sequence touches may hold anything (here -1: unused).
            table[1, 2:] = -1
            bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(3, 10))()
            # Without write_kv the draft slots are not touched: their page need not exist.
            bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(3, 16), write_kv=False)()
            with pytest.raises((RuntimeError, ValueError), match=r"block_table\[1, 2\] = -1 is out of range"):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(3, 16))()
            # Sequences may share the pages they read, not a slot that write_kv fills: neither a draft slot of
            # another sequence nor a slot another sequence (or the same one, through a repeated page) has
            # committed.
            table = torch.tensor([[0, 1, 2, 3], [0, 5, 6, 7]], dtype=torch.int32, device=device)
            bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(8, 12))()
            table[1, 1] = 1
            with pytest.raises((RuntimeError, ValueError), match="page 1, slot 0, which write_kv would fill twice"):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(8, 8))()
            with pytest.raises((RuntimeError, ValueError), match="block_table maps draft position 8 of sequence 0 "
                                                                 "to page 1, slot 0, which a sequence has committed"):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=lens(8, 12))()
            for read_only in (lens(8, 12), lens(8, 10)):
                bad_call(device, op=op, paged=True, block_table=table, cache_seqlens=read_only, write_kv=False)()
            self_overlap = torch.tensor([[0, 1, 2, 3], [5, 5, 6, 7]], dtype=torch.int32, device=device)
            with pytest.raises((RuntimeError, ValueError), match="draft position 8 of sequence 1 to page 5, slot 0, "
                                                                 "which a sequence has committed"):
                bad_call(device, op=op, paged=True, block_table=self_overlap, cache_seqlens=lens(0, 6))()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bad_values_on_cuda_stay_in_bounds():
    # Without R2LM_VALIDATE, CUDA clamps instead of checking: no fault, finite output.
    q, k, v, k_cache, v_cache, lens, table = make_case("cuda", torch.bfloat16, batch=2, q_len=4, n_heads=4, n_kv=2,
                                                       head_dim=64, max_len=32, paged=True, page_size=8)
    table[1, 2] = 10_000
    lens = torch.tensor([-5, 40], dtype=torch.int32, device="cuda")
    out = r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, block_table=table)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
