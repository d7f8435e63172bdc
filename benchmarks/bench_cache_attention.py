"""cache_attention: a block of queries over a long KV cache (GQA), against SDPA with an explicit mask and,
on GPU, FlexAttention with a block mask for the same pattern. Bytes that must move once: the cache K/V
up to each sequence's length, the block's q/k/v and the output.

"r2lm (paged, write_kv)" times the same attention over a paged copy of the cache (64-slot pages in a random
order) that also stores the block's k/v, as a model's step does: its ratio to "r2lm" is what paging and the
write cost.

SDPA peers: with enable_gqa (on CUDA an explicit mask and GQA leave it the math backend), and on K/V
expanded to every query head before timing (the memory-efficient backend takes the mask there; the
expansion itself is not timed, so this peer is SDPA's best case with a mask)."""
import pytest
import torch
import torch.nn.functional as F

import r2lm_kernels
from harness import built_on_first_call

# (batch, cache_len, q_len, n_heads, n_kv_heads, head_dim)
# CPU: the block shape in fp32 (the CPU target) and bf16 (what models run), and plain decode in bf16.
CPU_CASES = [((4, 2048, 32, 16, 8, 128), torch.float32), ((4, 2048, 32, 16, 8, 128), torch.bfloat16),
             ((8, 4096, 1, 32, 8, 128), torch.bfloat16)]
GPU_SHAPES = [(32, 8192, 32, 16, 8, 128), (1, 32768, 32, 16, 8, 128), (64, 2048, 32, 16, 8, 128),
              (8, 4096, 1, 32, 8, 128)]
QUICK_SHAPES = [(2, 512, 32, 16, 8, 128)]


ALL_SHAPES = ([("cpu", s, d) for s, d in CPU_CASES] + [("cuda", s, None) for s in GPU_SHAPES]
              + [("quick", s, None) for s in QUICK_SHAPES])


def _flex_peer(q, keys, vals, lens, q_len, check_against_r2lm):
    """FlexAttention (compiled) with a block mask: cache prefix plus the causal block. The mask and the
    compilation are built in the first call, which the harness counts as compilation."""
    def build():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        batch, n_keys = keys.shape[0], keys.shape[2]

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= lens[b] + q_idx

        block_mask = create_block_mask(mask_mod, batch, None, q_len, n_keys, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        run = lambda: flex(q, keys, vals, block_mask=block_mask, enable_gqa=True)  # noqa: E731
        check_against_r2lm("flex_attention", run())
        return run
    return built_on_first_call(build)


def _paged_copy(k_cache, v_cache, page_size):
    """The contiguous caches as pages of page_size slots in a random order, and the block table naming them."""
    batch, max_len = k_cache.shape[:2]
    per_seq = -(-max_len // page_size)
    order = torch.randperm(batch * per_seq, device=k_cache.device)

    def paged(cache):
        padded = torch.zeros(batch, per_seq * page_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
        padded[:, :max_len] = cache
        pages = torch.empty_like(padded).view(batch * per_seq, page_size, *cache.shape[2:])
        pages[order] = padded.view(batch * per_seq, page_size, *cache.shape[2:])
        return pages
    return paged(k_cache), paged(v_cache), order.view(batch, per_seq).to(torch.int32)


@pytest.mark.parametrize("where,shape,dtype", ALL_SHAPES,
                         ids=[f"{w}-{'x'.join(map(str, s))}" + (f"-{str(d).removeprefix('torch.')}" if d else "")
                              for w, s, d in ALL_SHAPES])
def test_cache_attention(bench, device, quick, where, shape, dtype):
    if where != ("quick" if quick else device):
        pytest.skip(f"shape for {where} runs")
    batch, cache_len, q_len, n_heads, n_kv, head_dim = shape
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    elem = torch.finfo(dtype).bits // 8
    max_len = cache_len + q_len
    q = torch.randn(batch, q_len, n_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, q_len, n_kv, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    k_cache = torch.randn(batch, max_len, n_kv, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    # The peers read one (batch, heads, keys, dim) tensor holding cache + block.
    k_cache[:, cache_len:] = k
    v_cache[:, cache_len:] = v
    keys, vals = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    qt = q.transpose(1, 2).contiguous()
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(max_len, device=device)[None, :]
    mask = (j <= lens.long()[:, None, None] + i)[:, None]           # (batch, 1, q_len, keys)
    group = n_heads // n_kv

    keys_expanded, vals_expanded = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
    k_pages, v_pages, block_table = _paged_copy(k_cache, v_cache, page_size=64)

    impls = {
        "r2lm": lambda: r2lm_kernels.cache_attention(q, k, v, k_cache, v_cache, lens, write_kv=False),
        "sdpa+mask (gqa)": lambda: F.scaled_dot_product_attention(qt, keys, vals, attn_mask=mask, enable_gqa=True),
        "sdpa+mask (kv expanded)": lambda: F.scaled_dot_product_attention(qt, keys_expanded, vals_expanded,
                                                                          attn_mask=mask),
        "r2lm (paged, write_kv)": lambda: r2lm_kernels.cache_attention(q, k, v, k_pages, v_pages, lens,
                                                                       block_table=block_table),
    }

    # Correctness of what is timed: every peer against r2lm (Flex when it is built).
    want = impls["r2lm"]().transpose(1, 2).float()

    def check_against_r2lm(name, out):
        err = float((out.float() - want).norm() / want.norm())
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), f"{name}: relative error {err}"
    for name in ("sdpa+mask (gqa)", "sdpa+mask (kv expanded)"):
        check_against_r2lm(name, impls[name]())
    check_against_r2lm("r2lm (paged, write_kv)", impls["r2lm (paged, write_kv)"]().transpose(1, 2))
    if device == "cuda":
        impls["flex_attention+block_mask"] = _flex_peer(qt, keys, vals, lens, q_len, check_against_r2lm)

    kv_bytes = 2 * batch * max_len * n_kv * head_dim * elem        # cache up to the length, plus the block
    bytes_moved = kv_bytes + 2 * q.numel() * elem                   # + q read and out written
    flops = 4 * batch * n_heads * q_len * max_len * head_dim
    bench(op="cache_attention", dtype=str(dtype).removeprefix("torch."),
          shape=dict(batch=batch, cache=cache_len, q_len=q_len, heads=f"{n_heads}/{n_kv}", head_dim=head_dim),
          bytes_moved=bytes_moved, flops=flops, impls=impls, primary="r2lm")
