"""Generation: the cacheability invariant, cache-free recompute, batch independence, stopping, statistics,
the AR and bidirectional baselines, CUDA graphs."""
import copy
import math

import pytest
import torch

from r2lm_kernels import R2LMForCausalLM, autoregressive_generate, bidirectional_generate, generate, reference

@pytest.fixture
def random_prompts(random_ids):
    """random_prompts(model, lengths, device="cpu"): one prompt of random non-mask ids per length."""
    def prompts(model, lengths, device="cpu"):
        return [random_ids(model, n, device=device) for n in lengths]
    return prompts


def device_dtype(device):
    """fp64 where the kernels have it (CPU): there, cached and cache-free runs agree to ~1e-15 and argmax
    decisions cannot flip."""
    return torch.float64 if device == "cpu" else torch.float32


# With block_size 8: 0, 2 and 3 whole prompt blocks and tails of 1, 1 and 0 tokens; the longest prompt, which
# sets how much of the batch is prefilled, ends on a block boundary.
LENGTHS = [1, 17, 24]


def poison_caches(monkeypatch):
    """Caches start as NaN: a read of a position past cache_seqlens would turn logits into NaN."""
    allocate = R2LMForCausalLM.allocate_cache

    def allocate_poisoned(self, batch, max_len):
        cache = allocate(self, batch, max_len)
        for layer in cache.k + cache.v:
            layer.fill_(float("nan"))
        return cache

    monkeypatch.setattr(R2LMForCausalLM, "allocate_cache", allocate_poisoned)


def test_cache_invariant(device, impl, monkeypatch, tiny_model, random_prompts, run_or_skip):
    """Every step's logits with the cache == a cache-free forward of [committed blocks + current block]."""
    poison_caches(monkeypatch)
    dtype = device_dtype(device)
    model = tiny_model(impl, dtype, device)
    prompts = random_prompts(model, LENGTHS, device)
    seen = []
    out = run_or_skip(lambda: generate(model, prompts, max_new_tokens=19, threshold=0.6, min_per_step=1,
                                       max_per_step=3, step_callback=seen.append))
    bs = model.config.block_size
    checked, worst = 0, 0.0
    with torch.no_grad():
        for info in seen:
            for b in range(len(prompts)):
                if not info.active[b]:
                    continue
                start = int(info.block_start[b])
                assert start % bs == 0
                block = info.block[b].clone()
                block[max(0, LENGTHS[b] + 19 - start):] = model.config.mask_token_id  # past the budget
                canvas = torch.cat([out.sequences[b, :start], block])[None]
                fresh = model(canvas)[0, start:]
                worst = max(worst, float((fresh - info.logits[b]).abs().max()))
                checked += 1
    assert checked >= 3 * 3                               # three sequences, three blocks each at least
    assert worst <= (1e-9 if dtype == torch.float64 else 1e-4), worst   # logits are O(1..10)
    assert all(int(n) == 19 for n in out.stats.num_generated)


def test_compiled_network_generates_the_same(tiny_model, random_prompts):
    """The README's way to compile generation (the model's hidden_states under torch.compile, inductor,
    dynamic shapes) gives eager's tokens, sampled ones included."""
    model = tiny_model("kernels")
    prompts = random_prompts(model, LENGTHS)
    kwargs = dict(max_new_tokens=19, threshold=0.5, max_per_step=3, temperature=0.7,
                  seed=int(torch.randint(0, 2**62, ())))
    eager = generate(model, prompts, **kwargs)
    torch._dynamo.reset()
    model.hidden_states = torch.compile(model.hidden_states, fullgraph=True, dynamic=True)
    compiled = generate(model, prompts, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.stats.steps, eager.stats.steps)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_cache_free_recompute_generates_the_same(impl, temperature, tiny_model, random_prompts, run_or_skip):
    model = tiny_model(impl)
    prompts = random_prompts(model, LENGTHS)
    seed = int(torch.randint(0, 2**62, ()))
    kwargs = dict(max_new_tokens=21, threshold=0.5, min_per_step=1, max_per_step=4, temperature=temperature, seed=seed)
    cached = run_or_skip(lambda: generate(model, prompts, use_cache=True, **kwargs))
    recomputed = generate(model, prompts, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.stats.steps, recomputed.stats.steps)
    # the sidecar matters: without it the model generates something else
    plain = generate(model, prompts, sidecar=False, **kwargs)
    assert not torch.equal(plain.sequences, cached.sequences)


@pytest.mark.parametrize("score", ["margin", "neg_entropy"])
def test_each_step_commits_as_the_reference_op(device, score, tiny_model, random_prompts, run_or_skip):
    """Replaying every step's commit with the reference op on the logits the generator saw gives the block
    the generator ran on next (the same block, or the next one once no mask is left)."""
    model = tiny_model("kernels", device_dtype(device), device)
    prompts = random_prompts(model, LENGTHS, device)
    mask = model.config.mask_token_id
    commit = dict(threshold=0.3 if score == "margin" else -1.0, min_per_step=1, max_per_step=3, score=score)
    seen = []
    out = run_or_skip(lambda: generate(model, prompts, max_new_tokens=19, step_callback=lambda info: seen.append(
        (info.block, info.block_start, info.logits.clone(), info.active)), **commit))
    for b in range(len(prompts)):
        steps = [(block[b], int(start[b]), logits[b]) for block, start, logits, active in seen if active[b]]
        for i, (block, start, logits) in enumerate(steps):
            after = block[None].clone()
            reference.parallel_commit(logits[None], after, mask_token_id=mask, **commit)
            if i + 1 < len(steps) and steps[i + 1][1] == start:
                assert torch.equal(after[0], steps[i + 1][0]), (b, i)
            else:  # the block is complete: what the sequence holds
                n = min(len(block), int(out.lengths[b]) - start)
                assert not (after[0, :n] == mask).any() and torch.equal(after[0, :n],
                                                                         out.sequences[b, start:start + n])


def test_decoding_runs_only_the_new_positions(tiny_model, random_prompts):
    """With the cache, a step runs the block (generate) or one token (autoregressive), never the prefix."""
    model = tiny_model("kernels")
    prompts = random_prompts(model, LENGTHS)
    widths = []
    run = model.hidden_states

    def spy(input_ids, **kwargs):
        if not kwargs.get("prefill"):
            widths.append(input_ids.shape[1])
        return run(input_ids, **kwargs)

    model.hidden_states = spy
    generate(model, prompts, max_new_tokens=19, threshold=0.6)
    assert widths and set(widths) == {model.config.block_size}
    widths.clear()
    autoregressive_generate(model, prompts, max_new_tokens=6)
    assert widths and set(widths) == {1}


def test_kernels_and_reference_generate_the_same(monkeypatch, tiny_model, random_prompts, run_or_skip):
    poison_caches(monkeypatch)
    model = tiny_model("kernels")
    prompts = random_prompts(model, [2, 9, 26])
    kwargs = dict(max_new_tokens=20, threshold=0.5, min_per_step=1, max_per_step=4)
    runs = {}
    for impl in ("reference", "kernels"):
        model.impl = impl
        runs[impl] = run_or_skip(lambda: (generate(model, prompts, **kwargs),
                                          autoregressive_generate(model, prompts, max_new_tokens=6),
                                          bidirectional_generate(model, prompts, **kwargs)))
    for ours, theirs in zip(runs["kernels"], runs["reference"]):
        assert torch.equal(ours.sequences, theirs.sequences)
        assert torch.equal(ours.stats.steps, theirs.stats.steps)


def test_batch_independence(impl, tiny_model, random_prompts, run_or_skip):
    model = tiny_model(impl)
    prompts = random_prompts(model, [5, 17, 1, 30])
    kwargs = dict(max_new_tokens=18, threshold=0.5, min_per_step=2)
    together = run_or_skip(lambda: generate(model, prompts, **kwargs))
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], **kwargs)
        assert alone.tolist()[0] == together.tolist()[b]
        assert int(alone.stats.steps[0]) == int(together.stats.steps[b])


def expected_steps(prompt_len, max_new, bs, k):
    """Steps of the fixed k-per-step policy: per block, ceil(masks in the block / k)."""
    steps, blocks, pos, end = 0, 0, prompt_len, prompt_len + max_new
    while pos < end:
        block_end = min((pos // bs + 1) * bs, end)
        steps += math.ceil((block_end - pos) / k)
        blocks += 1
        pos = block_end
    return steps, blocks


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fixed_tokens_per_step_statistics(device, k, tiny_model, random_prompts, run_or_skip):
    model = tiny_model("kernels", device_dtype(device), device)
    prompts = random_prompts(model, LENGTHS, device)
    out = run_or_skip(lambda: generate(model, prompts, max_new_tokens=19, threshold=float("inf"), min_per_step=k,
                                       max_per_step=k))
    bs = model.config.block_size
    per_seq = [expected_steps(n, 19, bs, k) for n in LENGTHS]
    assert out.stats.steps.tolist() == [s for s, _ in per_seq]
    # every block costs its denoising steps plus one clean pass, except the last block
    assert out.stats.forward_passes == max(s + blocks - 1 for s, blocks in per_seq)
    assert out.stats.num_generated.tolist() == [19] * 3
    assert out.stats.tokens_per_step == pytest.approx(57 / sum(s for s, _ in per_seq))
    assert out.stats.wall_time > 0 and out.stats.tokens_per_second > 0
    for b, n in enumerate(LENGTHS):
        row = out.sequences[b]
        assert int(out.lengths[b]) == n + 19
        assert torch.equal(row[:n], prompts[b])
        assert not (row[: n + 19] == model.config.mask_token_id).any()


@pytest.mark.parametrize("use_cache", [True, False])
def test_padding_past_the_budget_does_not_change_the_output(device, impl, use_cache, tiny_model, random_prompts,
                                                            run_or_skip):
    """The last block's positions past the budget are [MASK] to the model, whatever the padding token: the
    right-to-left sidecar reads them, so a padding token seen there would change what is generated."""
    model = tiny_model(impl, device_dtype(device), device)
    prompts = random_prompts(model, LENGTHS, device)
    kwargs = dict(max_new_tokens=11, threshold=0.9, min_per_step=1, use_cache=use_cache)   # 11: not a block
    outs = [run_or_skip(lambda: generate(model, prompts, pad_token_id=pad, **kwargs)) for pad in (0, 5, 50)]
    # eos_token_id pads when pad_token_id is None; one that is never generated must not change the output
    eos = next(t for t in range(model.config.vocab_size) if not (outs[0].sequences == t).any())
    outs.append(generate(model, prompts, eos_token_id=eos, **kwargs))
    for b, n in enumerate(LENGTHS):
        for out, pad in zip(outs, (0, 5, 50, eos)):
            assert torch.equal(out.sequences[b, :n + 11], outs[0].sequences[b, :n + 11]), (b, pad)
            assert (out.sequences[b, n + 11:] == pad).all()


def test_eos_stops_after_its_block(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, LENGTHS)
    kwargs = dict(max_new_tokens=30, threshold=0.5, min_per_step=1, pad_token_id=0)
    free = generate(model, prompts, **kwargs)
    eos = int(free.sequences[0, LENGTHS[0] + 12])       # a token the first sequence generates in block 2
    stopped = generate(model, prompts, eos_token_id=eos, **kwargs)
    bs = model.config.block_size
    for b, n in enumerate(LENGTHS):
        gen = free.sequences[b, n: n + 30].tolist()
        length = n + (gen.index(eos) + 1 if eos in gen else 30)
        assert int(stopped.lengths[b]) == length
        assert torch.equal(stopped.sequences[b, :length], free.sequences[b, :length])
        assert (stopped.sequences[b, length:] == 0).all()
        assert int(stopped.stats.num_generated[b]) == length - n
        assert int(stopped.stats.steps[b]) <= int(free.stats.steps[b])
    # the first sequence stopped when the block holding its EOS was complete
    eos_block_end = ((LENGTHS[0] + free.sequences[0, LENGTHS[0]:].tolist().index(eos)) // bs + 1) * bs
    assert int(stopped.stats.steps[0]) < int(free.stats.steps[0]) or eos_block_end >= LENGTHS[0] + 30


def test_autoregressive_baseline_matches_naive_loop(impl, tiny_model, random_prompts, run_or_skip):
    model = tiny_model(impl)
    prompts = random_prompts(model, [1, 9, 20])
    out = run_or_skip(lambda: autoregressive_generate(model, prompts, max_new_tokens=7))
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            seq = prompt[None]
            for _ in range(7):
                logits = model(seq, sidecar=False)[0, -1]
                logits[model.config.mask_token_id] = float("-inf")
                seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
            assert out.tolist()[b] == seq[0].tolist()
    assert out.stats.steps.tolist() == [7, 7, 7] and out.stats.tokens_per_step == 1.0
    assert out.stats.forward_passes == 7


def test_autoregressive_step_info(tiny_model, random_prompts, run_or_skip):
    """The callback sees the token the model ran on, at block_start, with that position's next-token logits;
    a finished row's token stays where it was written."""
    model = tiny_model("kernels")
    prompts = random_prompts(model, [1, 9])
    first = run_or_skip(lambda: autoregressive_generate(model, prompts, max_new_tokens=5))
    gen = [first.sequences[b, len(p):len(p) + 5].tolist() for b, p in enumerate(prompts)]
    # An EOS that sequence 1 generates early and, where one exists, sequence 0 never does.
    eos = next((t for t in gen[1][1:4] if t not in gen[0]), gen[1][1])
    stop = [g.index(eos) + 1 if eos in g else 5 for g in gen]   # steps each sequence runs
    seen = []
    out = autoregressive_generate(model, prompts, max_new_tokens=5, eos_token_id=eos, pad_token_id=0,
                                  step_callback=seen.append)
    assert len(seen) == max(stop)
    with torch.no_grad():
        for info in seen:
            for b in range(len(prompts)):
                start = int(info.block_start[b])
                assert int(info.block[b, 0]) == int(info.canvas[b, start])
                assert bool(info.active[b]) == (info.index < stop[b])
                if not info.active[b]:
                    continue
                assert start == len(prompts[b]) - 1 + info.index
                want = model(out.sequences[b:b + 1, :start + 1], sidecar=False)[0, -1]
                torch.testing.assert_close(info.logits[b, 0], want, atol=1e-9, rtol=1e-9)


def test_autoregressive_eos_and_sampling(tiny_model, random_prompts, run_or_skip):
    model = tiny_model("kernels")
    prompts = random_prompts(model, [4, 11])
    seed = int(torch.randint(0, 2**62, ()))
    a = run_or_skip(lambda: autoregressive_generate(model, prompts, max_new_tokens=9, temperature=1.0, seed=seed))
    b = autoregressive_generate(model, prompts, max_new_tokens=9, temperature=1.0, seed=seed)
    assert torch.equal(a.sequences, b.sequences)                  # reproducible for a seed
    eos = int(a.sequences[1, 11 + 3])
    c = autoregressive_generate(model, prompts, max_new_tokens=9, temperature=1.0, seed=seed, eos_token_id=eos,
                                pad_token_id=0)
    gen = a.sequences[1, 11:20].tolist()
    assert int(c.lengths[1]) == 11 + gen.index(eos) + 1
    assert c.tolist()[1] == a.tolist()[1][: 11 + gen.index(eos) + 1]


def naive_bidirectional(model, prompt, max_new, bs, **commit):
    """LLaDA's semi-autoregressive loop written out for one sequence."""
    mask = model.config.mask_token_id
    canvas = torch.cat([prompt, torch.full((max_new,), mask)])[None]
    n, step = len(prompt), 0
    for start in range(n, n + max_new, bs):
        end = min(start + bs, n + max_new)
        while (canvas[0, start:end] == mask).any():
            logits = model(canvas, causal=False, sidecar=False)[:, start:end]
            block = canvas[:, start:end].clone()
            reference.parallel_commit(logits, block, mask_token_id=mask, step=step, **commit)
            canvas[:, start:end] = block
            step += 1
    return canvas[0].tolist(), step


@pytest.mark.parametrize("score", ["prob", "margin"])
def test_bidirectional_baseline_matches_naive_loop(impl, score, tiny_model, random_prompts, run_or_skip):
    model = tiny_model(impl)
    prompts = random_prompts(model, [3, 12, 7])
    commit = dict(threshold=0.5 if score == "prob" else 0.2, min_per_step=1, max_per_step=3, score=score)
    out = run_or_skip(lambda: bidirectional_generate(model, prompts, max_new_tokens=13, block_size=5, **commit))
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            tokens, steps = naive_bidirectional(model, prompt, 13, 5, **commit)
            assert out.tolist()[b] == tokens
            assert int(out.stats.steps[b]) == steps


def test_bad_arguments(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, [4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="min_per_step"):
        generate(model, prompts, max_new_tokens=4, min_per_step=0)
    with pytest.raises(ValueError, match="mask_token_id"):
        generate(model, [[1, model.config.mask_token_id]], max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids holds token ids outside"):
        bidirectional_generate(model, [[1, 2], [model.config.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="integer token ids, got torch.float32"):
        generate(model, [[1.7, 2.2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        generate(model, torch.ones(1, 3, dtype=torch.bool), max_new_tokens=4)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompts, max_new_tokens=4, eos_token_id=10_000)
    with pytest.raises(ValueError, match="pad_token_id"):
        autoregressive_generate(model, prompts, max_new_tokens=4, pad_token_id=model.config.mask_token_id)
    for block_size in (0, True):
        with pytest.raises(ValueError, match="block_size"):
            bidirectional_generate(model, prompts, max_new_tokens=4, block_size=block_size)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, max_new_tokens=True)
    with pytest.raises(ValueError, match="each sequence in the list must be 1-D"):
        generate(model, [torch.tensor([[1, 2], [3, 4]])], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be a 2-D integer tensor or a list"):
        generate(model, [["a", "b"]], max_new_tokens=2)
    for generator in (generate, autoregressive_generate, bidirectional_generate):
        with pytest.raises(ValueError, match="cuda_graph"):
            generator(model, prompts, max_new_tokens=4, cuda_graph=True)
    with pytest.raises(TypeError, match="R2LMForCausalLM"):
        generate(torch.nn.Linear(2, 2), prompts, max_new_tokens=4)
    with pytest.raises(TypeError, match=r"got OptimizedModule \(torch.compile\(model\) wraps forward.*compile "
                                        r"model.hidden_states instead"):
        generate(torch.compile(model), prompts, max_new_tokens=4)
    flat = prompts[0].tolist()                      # one tokenized prompt, not wrapped in a list
    for generator in (generate, autoregressive_generate, bidirectional_generate):
        with pytest.raises(ValueError, match="flat list of token ids"):
            generator(model, flat, max_new_tokens=4)
        with pytest.raises(TypeError, match="eos_token_id must be one token id"):
            generator(model, prompts, max_new_tokens=4, eos_token_id=[1, 2])   # e.g. a generation_config's list
        with pytest.raises(ValueError, match="eos_token_id must differ from mask_token_id"):
            generator(model, prompts, max_new_tokens=4, eos_token_id=model.config.mask_token_id, pad_token_id=0)


def test_non_finite_logits_raise_in_every_generator(tiny_model, random_prompts):
    """A NaN logit row leaves nothing to commit: every generator raises rather than emitting mask tokens."""
    model = tiny_model("kernels", dtype=torch.float32)
    prompts = random_prompts(model, [3, 4])
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    for generator, message in ((generate, "no progress"), (bidirectional_generate, "no progress"),
                               (autoregressive_generate, r"no token could be chosen for sequence\(s\) \[0, 1\]")):
        with pytest.raises(RuntimeError, match=message):
            generator(model, prompts, max_new_tokens=4)


def test_eos_in_the_prompt_does_not_stop_generation(tiny_model, random_prompts):
    """Chat prompts hold the EOS id (end of a turn): only a generated EOS stops a sequence."""
    model = tiny_model("reference")
    prompt = random_prompts(model, [11])[0]
    eos = int(prompt[9])                                 # inside the prompt's last, partial block
    kwargs = dict(max_new_tokens=12, pad_token_id=0)
    for generator, commit in ((generate, dict(threshold=0.5)), (autoregressive_generate, {}),
                              (bidirectional_generate, dict(threshold=0.5))):
        free = generator(model, [prompt], **commit, **kwargs)
        stopped = generator(model, [prompt], eos_token_id=eos, **commit, **kwargs)
        gen = free.sequences[0, 11:].tolist()
        expected = 11 + (gen.index(eos) + 1 if eos in gen else 12)
        assert int(stopped.lengths[0]) == expected, generator.__name__
        assert torch.equal(stopped.sequences[0, :expected], free.sequences[0, :expected])


def test_bidirectional_eos_stops_early(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, LENGTHS)
    kwargs = dict(max_new_tokens=30, threshold=0.5, min_per_step=1, pad_token_id=0, block_size=8)
    free = bidirectional_generate(model, prompts, **kwargs)
    eos = int(free.sequences[0, LENGTHS[0] + 4])         # generated in the first sequence's first block
    stopped = bidirectional_generate(model, prompts, eos_token_id=eos, **kwargs)
    for b, n in enumerate(LENGTHS):
        gen = free.sequences[b, n: n + 30].tolist()
        length = n + (gen.index(eos) + 1 if eos in gen else 30)
        assert int(stopped.lengths[b]) == length
        assert torch.equal(stopped.sequences[b, :length], free.sequences[b, :length])
        assert int(stopped.stats.steps[b]) <= int(free.stats.steps[b])
    assert int(stopped.stats.steps[0]) < int(free.stats.steps[0]), "the first sequence stops after its first block"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager(dtype, tiny_model, random_prompts, run_or_skip):
    model = tiny_model("kernels", dtype, "cuda")
    prompts = random_prompts(model, LENGTHS, "cuda")
    seed = int(torch.randint(0, 2**62, ()))
    kwargs = dict(max_new_tokens=27, threshold=0.4, min_per_step=1, max_per_step=4, temperature=0.8, seed=seed)
    eager = run_or_skip(lambda: generate(model, prompts, **kwargs))
    graphed = generate(model, prompts, cuda_graph=True, **kwargs)
    assert torch.equal(eager.sequences, graphed.sequences)
    assert torch.equal(eager.stats.steps, graphed.stats.steps)
    ar_eager = autoregressive_generate(model, prompts, max_new_tokens=9, temperature=0.8, seed=seed)
    ar_graphed = autoregressive_generate(model, prompts, max_new_tokens=9, temperature=0.8, seed=seed, cuda_graph=True)
    assert torch.equal(ar_eager.sequences, ar_graphed.sequences)
    bi_eager = bidirectional_generate(model, prompts, **kwargs)
    bi_graphed = bidirectional_generate(model, prompts, cuda_graph=True, **kwargs)
    assert torch.equal(bi_eager.sequences, bi_graphed.sequences)
    assert torch.equal(bi_eager.stats.steps, bi_graphed.stats.steps)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graph_on_another_device_than_the_current_one(tiny_model, random_prompts):
    """A model on cuda:1 while cuda:0 is current, after a capture on cuda:0 (which makes PyTorch's default capture
    stream there): the graphed generation captures on the model's device and matches the eager one."""
    warm = torch.cuda.CUDAGraph()
    with torch.cuda.device(0), torch.cuda.graph(warm):
        torch.ones(4, device="cuda:0").add_(1)
    model = tiny_model("kernels", torch.float32, "cuda:1")
    prompts = random_prompts(model, LENGTHS, "cuda:1")
    kwargs = dict(max_new_tokens=19, threshold=0.4, min_per_step=1, max_per_step=4)
    with torch.cuda.device(0):
        assert torch.equal(generate(model, prompts, **kwargs).sequences,
                           generate(model, prompts, cuda_graph=True, **kwargs).sequences)


@needs_cuda
def test_cuda_graph_generators_in_threads(tiny_model, random_prompts, run_or_skip):
    """Generators in several threads (a serving process) capture their graphs in turn and give the tokens of
    calls made one at a time."""
    import threading

    model = tiny_model("kernels", torch.float32, "cuda")
    prompts = random_prompts(model, LENGTHS, "cuda")
    kwargs = [dict(max_new_tokens=17 + 2 * i, threshold=0.4, min_per_step=1, max_per_step=4, temperature=0.8,
                   seed=i, cuda_graph=True) for i in range(4)]
    want = [run_or_skip(lambda: generate(model, prompts, **kw)).sequences for kw in kwargs]
    got, errors = [None] * len(kwargs), []
    start = threading.Barrier(len(kwargs))

    def run(i):
        try:
            start.wait()
            got[i] = generate(model, prompts, **kwargs[i]).sequences
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kwargs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_cuda
def test_bf16_fixed_policy_on_cuda(tiny_model, run_or_skip):
    model = tiny_model("kernels", torch.bfloat16, "cuda", head_dim=128)
    prompts = torch.randint(0, 96, (5, 40), device="cuda")
    out = run_or_skip(lambda: generate(model, prompts, max_new_tokens=24, threshold=float("inf"), min_per_step=4,
                                       max_per_step=4, cuda_graph=True))
    steps, _ = expected_steps(40, 24, model.config.block_size, 4)
    assert out.stats.steps.tolist() == [steps] * 5
    assert not (out.sequences == model.config.mask_token_id).any()
    assert torch.equal(out.sequences[:, :40], prompts)


def test_demo_runs(capsys):
    from r2lm_kernels import demo

    assert demo.main(["--quick", "--device", "cpu", "--batch", "2", "--new-tokens", "12", "--block-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "cache invariant on this run: HELD" in printed
    for method in ("R2LM", "autoregressive", "bidirectional"):
        assert method in printed
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--device", "cpu", "--batch", "0"])
    assert "--batch: must be a positive int, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("generator", [generate, bidirectional_generate], ids=lambda g: g.__name__)
def test_sampled_steps_replay_with_the_reference_commit(generator, tiny_model, random_prompts):
    """temperature, seed and the step counter reach parallel_commit: each step's commit is the reference op's
    on the logits the step saw, keyed by (seed, step = the step's index, batch index, position)."""
    model = tiny_model("reference")                      # the generator's own commit is the reference op's
    prompts = random_prompts(model, LENGTHS)
    mask = model.config.mask_token_id
    seed = int(torch.randint(0, 2**62, ()))
    commit = dict(threshold=0.5, min_per_step=1, max_per_step=3, temperature=0.9)
    seen = []
    out = generator(model, prompts, max_new_tokens=19, seed=seed, step_callback=lambda info: seen.append(
        (info.index, info.block.clone(), info.block_start.clone(), info.logits.clone(), info.active.clone())),
        **commit)
    greedy = generator(model, prompts, max_new_tokens=19, seed=seed, **{**commit, "temperature": 0.0})
    assert not torch.equal(out.sequences, greedy.sequences)     # sampling happened
    for i, (index, block, start, logits, active) in enumerate(seen):
        assert index == i
        after = block.clone()
        reference.parallel_commit(logits, after, mask_token_id=mask, seed=seed, step=i, active=active, **commit)
        for b in range(len(prompts)):
            if not active[b]:
                continue
            following = seen[i + 1] if i + 1 < len(seen) else None
            if following is not None and int(following[2][b]) == int(start[b]):
                assert torch.equal(after[b], following[1][b]), (i, b)
            else:                                        # the block is complete: what the sequence holds
                s = int(start[b])
                n = min(after.shape[1], int(out.lengths[b]) - s)
                assert torch.equal(after[b, :n], out.sequences[b, s:s + n]), (i, b)


def test_autoregressive_sampled_steps_replay_with_the_reference_commit(tiny_model, random_prompts):
    """AR sampling: the token chosen at step i is the reference commit's with (seed, step=i) on that step's
    logits; the first token (from the prefill) is step 0."""
    model = tiny_model("reference")
    prompts = random_prompts(model, [3, 10])
    mask = model.config.mask_token_id
    seed = int(torch.randint(0, 2**62, ()))
    seen = []
    out = autoregressive_generate(model, prompts, max_new_tokens=8, temperature=0.9, seed=seed,
                                  step_callback=lambda info: seen.append(
                                      (info.block_start.clone(), info.logits.clone(), info.active.clone())))
    assert len(seen) == 8
    for i, (start, logits, active) in enumerate(seen):
        proposal = torch.full((len(prompts), 1), mask)
        reference.parallel_commit(logits, proposal, mask_token_id=mask, threshold=float("-inf"), min_per_step=1,
                                  max_per_step=1, temperature=0.9, seed=seed, step=i, active=active)
        for b in range(len(prompts)):
            assert int(proposal[b, 0]) == int(out.sequences[b, int(start[b]) + 1]), (i, b)


def test_prefill_of_exactly_one_block(monkeypatch, tiny_model, random_prompts):
    """A batch whose longest prompt holds one whole block (8 <= length < 16) prefills that block."""
    poison_caches(monkeypatch)
    model = tiny_model("reference")
    prompts = random_prompts(model, [9, 12])
    kwargs = dict(max_new_tokens=10, threshold=0.5, max_per_step=3)
    cached = generate(model, prompts, **kwargs)
    recomputed = generate(model, prompts, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)


def test_stats_prefill_time_and_a_single_step(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, [9, 17])
    for generator in (generate, autoregressive_generate):
        stats = generator(model, prompts, max_new_tokens=5).stats
        assert 0 < stats.prefill_time <= stats.wall_time, generator.__name__
    one = generate(model, random_prompts(model, [3]), max_new_tokens=1)
    assert one.stats.steps.tolist() == [1] and one.stats.tokens_per_step == 1.0


def test_more_bad_generation_arguments(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, [4])
    vocab = model.config.vocab_size
    for generator in (generate, autoregressive_generate, bidirectional_generate):
        with pytest.raises(ValueError, match="input_ids holds token ids outside"):
            generator(model, [[1, -1]], max_new_tokens=4)
        for name in ("eos_token_id", "pad_token_id"):
            with pytest.raises(ValueError, match=rf"{name} must be in \[0, vocab_size={vocab}\)"):
                generator(model, prompts, max_new_tokens=4, **{name: vocab})
    zero_mask = tiny_model("reference", mask_token_id=0)   # the default padding token (0) is the mask token
    for generator in (generate, autoregressive_generate, bidirectional_generate):
        with pytest.raises(ValueError, match="the padding token .* equals mask_token_id"):
            generator(zero_mask, [[1, 2, 3]], max_new_tokens=4)


def test_autoregressive_finished_row_stays_at_its_last_token(tiny_model, random_prompts):
    """After a row stops at EOS, StepInfo.block_start keeps pointing at its last token (its cache length no
    longer advances)."""
    model = tiny_model("reference")
    prompts = random_prompts(model, [1, 9])
    first = autoregressive_generate(model, prompts, max_new_tokens=5)
    gen = [first.sequences[b, len(p):len(p) + 5].tolist() for b, p in enumerate(prompts)]
    eos = next((t for t in gen[1][:4] if t not in gen[0]), None)
    if eos is None:
        pytest.skip("no token that only sequence 1 generates")
    stop = gen[1].index(eos) + 1
    seen = []
    autoregressive_generate(model, prompts, max_new_tokens=5, eos_token_id=eos, pad_token_id=0,
                            step_callback=lambda info: seen.append((info.block_start.clone(), info.active.clone())))
    inactive = [int(start[1]) for start, active in seen if not active[1]]
    assert inactive and set(inactive) == {len(prompts[1]) + stop - 1}


def test_sidecar_off_is_the_causal_block_diffusion_baseline(tiny_model, random_prompts):
    """sidecar=False runs no sidecar anywhere (prefill and block steps, cached or not): it generates what the
    same model with zeroed sidecars generates."""
    model = tiny_model("reference")
    prompts = random_prompts(model, LENGTHS)
    kwargs = dict(max_new_tokens=19, threshold=0.5, max_per_step=3)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.sidecar.out_proj.weight.zero_()
    want = generate(plain, prompts, **kwargs).sequences
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompts, sidecar=False, use_cache=use_cache, **kwargs).sequences, want)


def test_output_width_is_prompt_plus_budget(tiny_model, random_prompts):
    model = tiny_model("reference")
    prompts = random_prompts(model, LENGTHS)             # 24 + 19 = 43: not a multiple of the block size
    for generator in (generate, autoregressive_generate, bidirectional_generate):
        out = generator(model, prompts, max_new_tokens=19)
        assert out.sequences.shape == (3, 24 + 19), generator.__name__
        assert out.lengths.tolist() == [n + 19 for n in LENGTHS]
