"""parallel_commit: the r2lm kernel against the eager PyTorch composition (softmax, max, sort, scatter) and
its torch.compile, in the same run. Bytes that must move: the logits once, plus tokens and outputs."""
import math

import pytest
import torch

import r2lm_kernels

MASK_ID = 151_643


def _eager_commit(logits, tokens, mask_id, threshold, min_per_step, max_per_step, temperature=0.0):
    """Commit as a framework would write it: softmax (mask included), the mask column zeroed for the
    argmax (or a Gumbel-max draw from torch.rand), a stable sort to rank positions, a scatter back to
    ranks, a where into the tokens."""
    wide = logits.float()
    p = torch.softmax(wide, dim=-1)
    p[..., mask_id] = 0.0
    if temperature > 0:
        pick = wide / temperature - torch.log(-torch.log(torch.rand_like(p)))
        pick[..., mask_id] = -math.inf
        cand = pick.argmax(dim=-1)
        conf = p.gather(-1, cand[..., None])[..., 0]
    else:
        conf, cand = p.max(dim=-1)
    masked = tokens == mask_id
    key = torch.where(masked, conf, torch.full_like(conf, -math.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    n_pass = (masked & (conf >= threshold)).sum(-1, keepdim=True)
    n = torch.maximum(n_pass, torch.full_like(n_pass, min_per_step)).minimum(masked.sum(-1, keepdim=True))
    if max_per_step > 0:
        n = n.clamp(max=max_per_step)
    committed = masked & (rank < n)
    tokens.copy_(torch.where(committed, cand, tokens))
    return committed, key, (tokens == mask_id).sum(-1).int()


def _cases(device, quick):
    """(name, batch, block, vocab, dtype, temperature)."""
    vocab = 32_768 if quick else 151_936
    if device == "cuda":
        big = 8 if quick else 64
        return [("greedy", big, 32, vocab, torch.bfloat16, 0.0),
                ("sampling", big, 32, vocab, torch.bfloat16, 1.0),
                ("greedy", big, 32, vocab, torch.float32, 0.0),
                ("greedy, one sequence", 1, 32, vocab, torch.bfloat16, 0.0)]
    batch = 2 if quick else 8
    return [("greedy", batch, 32, vocab, torch.float32, 0.0),
            ("greedy", batch, 32, vocab, torch.bfloat16, 0.0),
            ("sampling", batch, 32, vocab, torch.float32, 1.0)]


@pytest.mark.parametrize("case", range(4), ids=lambda i: f"case{i}")
def test_parallel_commit(bench, device, quick, case):
    cases = _cases(device, quick)
    if case >= len(cases):
        pytest.skip(f"{device} runs {len(cases)} cases")
    name, batch, block, vocab, dtype, temperature = cases[case]
    mask_id = min(MASK_ID, vocab - 1)
    # LLM-like spread (a few logits well above the bulk); every position masked, so every row is read.
    logits = (torch.randn(batch, block, vocab, device=device) * 3).to(dtype)
    start = torch.full((batch, block), mask_id, device=device)
    tokens = start.clone()
    threshold = 0.9
    step = torch.zeros(1, dtype=torch.long, device=device)

    def reset_tokens():  # every call starts from the same fully masked block (outside the timing)
        tokens.copy_(start)

    def r2lm():
        return r2lm_kernels.parallel_commit(logits, tokens, mask_token_id=mask_id, threshold=threshold,
                                            temperature=temperature, seed=1, step=step)

    def eager():
        return _eager_commit(logits, tokens, mask_id, threshold, 1, 0, temperature)

    compiled_commit = torch.compile(_eager_commit)

    def compiled():
        return compiled_commit(logits, tokens, mask_id, threshold, 1, 0, temperature)

    impls = {"r2lm": r2lm, "eager composition": eager, "torch.compile(eager composition)": compiled}
    if temperature == 0:
        # Same candidates as the peer (checked once, outside the timing, committing every position:
        # which positions pass 0.9 may differ where two confidences agree to fp32 rounding).
        got, want = start.clone(), start.clone()
        r2lm_kernels.parallel_commit(logits, got, mask_token_id=mask_id, threshold=-math.inf)
        _eager_commit(logits, want, mask_id, -math.inf, 1, 0)
        assert torch.equal(got, want), "r2lm and the eager composition pick different candidates"
    rows = batch * block
    bytes_moved = logits.numel() * logits.element_size() + rows * (8 + 8 + 1 + 4) + batch * 4
    notes = f"{name}; logits randn*3, every position masked, threshold {threshold}"
    if temperature > 0:
        notes += f"; Gumbel-max sampling at temperature {temperature} (peers draw with torch.rand)"
    bench(op="parallel_commit", shape=dict(batch=batch, block=block, vocab=vocab, temperature=temperature),
          dtype=str(dtype)[6:],
          bytes_moved=bytes_moved, impls=impls, primary="r2lm", notes=notes, setup=reset_tokens)
