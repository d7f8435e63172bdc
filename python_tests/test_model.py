"""The R2LM model: Qwen3 parity, segment rules, the kernels path against the reference path, save/load."""
import functools

import pytest
import torch

from r2lm_kernels import KVCache, R2LMConfig, R2LMForCausalLM

@pytest.fixture
def tiny_model(tiny_model):
    """conftest's tiny model, with every norm weight perturbed (so a mis-mapped norm shows)."""
    return functools.partial(tiny_model, perturb_norms=True)


# -- Qwen3 parity -------------------------------------------------------------------------------------------

def hf_qwen3(tied, bias, device, **extra):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=tied, attention_bias=bias,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # every weight random (norms and biases included), so a mis-mapped one shows
        for name, p in hf.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + torch.randn_like(p) * 0.1)
    return hf.to(device)


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_qwen3_parity(device, impl, tied, bias, run_or_skip):
    hf = hf_qwen3(tied, bias, device)
    model = R2LMForCausalLM.from_qwen3(hf, block_size=8, impl=impl)
    assert model.config.tie_word_embeddings == tied and model.config.mask_token_id == 100
    ids = torch.randint(0, 100, (3, 37), device=device)
    with torch.no_grad():
        expected = hf(ids).logits
        without_sidecar = model(ids, sidecar=False)
        with_zero_sidecar = run_or_skip(lambda: model(ids))
    torch.testing.assert_close(without_sidecar, expected, atol=1e-5, rtol=1e-5)
    # A converted model's sidecars start with out_proj = 0: still exactly the base model.
    torch.testing.assert_close(with_zero_sidecar, expected, atol=1e-5, rtol=1e-5)
    assert all(layer.sidecar is not None for layer in model.model.layers)
    assert all(float(layer.sidecar.out_proj.weight.detach().abs().max()) == 0 for layer in model.model.layers)


def test_qwen3_conversion_takes_swish_as_silu():
    """transformers names SiLU both "silu" and "swish"; any other activation is refused."""
    hf = hf_qwen3(False, False, "cpu", hidden_act="swish")
    ids = torch.randint(0, 100, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(R2LMForCausalLM.from_qwen3(hf, block_size=8, impl="reference")(ids, sidecar=False),
                                   hf(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden_act"):
        R2LMForCausalLM.from_qwen3(hf_qwen3(False, False, "cpu", hidden_act="gelu"))


def test_qwen3_conversion_rejects_unsupported_rope():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="RoPE"):
        R2LMForCausalLM.from_qwen3(transformers.Qwen3ForCausalLM(config))


def test_qwen3_conversion_rejects_what_it_cannot_represent():
    """Sliding windows (also from a transformers release without layer_types, which windows every layer) and
    attention dropout are refused, not dropped."""
    from types import SimpleNamespace
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    for extra, match in [(dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding"),
                         (dict(attention_dropout=0.1), "attention_dropout")]:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields, **extra))
        with pytest.raises(ValueError, match=match):
            R2LMForCausalLM.from_qwen3(hf)
    older = SimpleNamespace(**fields, use_sliding_window=True, sliding_window=4, max_window_layers=28)
    with pytest.raises(ValueError, match="sliding"):
        R2LMForCausalLM.from_qwen3(SimpleNamespace(config=older))


# -- segment rules ------------------------------------------------------------------------------------------

def test_sidecar_is_block_local_and_sees_right_context(impl, tiny_model, random_ids, run_or_skip):
    model = tiny_model(impl)
    bs = model.config.block_size
    ids = random_ids(model, 2, 5 * bs + 3)
    changed = ids.clone()
    j = 2 * bs + 5                                       # a position inside block 2
    changed[:, j] = (changed[:, j] + 1) % (model.config.vocab_size - 1)
    with torch.no_grad():
        a, b = run_or_skip(lambda: (model(ids), model(changed)))
        a_plain, b_plain = model(ids, sidecar=False), model(changed, sidecar=False)
    block_start = (j // bs) * bs
    # Earlier blocks never see a later change (what makes their K/V cacheable).
    torch.testing.assert_close(a[:, :block_start], b[:, :block_start], atol=1e-12, rtol=0)
    # Inside the block, positions left of j see it through the sidecar only.
    assert (a[:, block_start:j] - b[:, block_start:j]).abs().amax() > 1e-6
    torch.testing.assert_close(a_plain[:, :j], b_plain[:, :j], atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("real_blocks", [1, 2])   # sequence 0's padding starts in a middle block / the last
def test_right_padding_is_hidden_from_real_positions(impl, tiny_model, random_ids, run_or_skip, causal,
                                                     real_blocks):
    """lengths: padding that shares a block with real tokens reaches them neither as keys nor through the
    right-to-left sidecar."""
    model = tiny_model(impl)
    bs = model.config.block_size
    ids = random_ids(model, 2, 2 * bs + 5)
    n = real_blocks * bs + 2                               # sequence 0: 2 real tokens in a block, then padding
    lengths = torch.tensor([n, 2 * bs + 5])
    changed = ids.clone()
    changed[0, n:] = (changed[0, n:] + 1) % (model.config.vocab_size - 1)
    with torch.no_grad():
        a, b = run_or_skip(lambda: (model(ids, lengths=lengths, causal=causal),
                                    model(changed, lengths=lengths, causal=causal)))
    torch.testing.assert_close(a[0, :n], b[0, :n], atol=1e-12, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)
    assert (a[0, n:] - b[0, n:]).abs().amax() > 1e-6   # the padding itself did change
    with torch.no_grad():   # and the padded sequence is the one run alone (same causality, same segments)
        alone = model(ids[:1, :n], causal=causal)
    torch.testing.assert_close(a[0, :n], alone[0], atol=1e-12, rtol=0)


def test_block_mode_equals_full_forward(impl, tiny_model, random_ids, run_or_skip):
    """Prefill + one block through the cache == the cache-free forward, per sequence, different lengths."""
    model = tiny_model(impl)
    bs = model.config.block_size
    committed = [0, bs, 3 * bs]                          # committed (cached) length of each sequence
    ids = random_ids(model, len(committed), 4 * bs)
    cache = model.allocate_cache(len(committed), 5 * bs)
    for layer in cache.k + cache.v:                     # positions past seqlens must never be read
        layer.fill_(float("nan"))
    block = random_ids(model, len(committed), bs)
    block[:, 1::3] = model.config.mask_token_id
    with torch.no_grad():
        def cached():
            model.hidden_states(ids[:, : max(committed)], cache=cache, prefill=True)
            cache.seqlens.copy_(torch.tensor(committed, dtype=torch.int32))
            return model.logits(model.hidden_states(block, cache=cache))
        got = run_or_skip(cached)
        for b, n in enumerate(committed):
            canvas = torch.cat([ids[b, :n], block[b]])[None]
            torch.testing.assert_close(got[b], model(canvas)[0, n:], atol=1e-9, rtol=1e-9)
            # write_kv stored the block's K/V after the committed prefix
            assert all(torch.isfinite(layer[b, : n + bs]).all() for layer in cache.k)
    assert torch.equal(cache.seqlens, torch.tensor(committed, dtype=torch.int32))


def test_bidirectional_block_mode_equals_full_forward_of_one_layer(impl, tiny_model, random_ids, run_or_skip):
    """causal=False in block mode: the block attends to the cache and to all of itself. With one layer the cached
    K/V do not depend on how the prefix attended, so the block's logits equal those of the bidirectional
    cache-free forward of prefix + block."""
    model = tiny_model(impl, num_hidden_layers=1)
    bs = model.config.block_size
    committed = [0, bs, 3 * bs]
    ids = random_ids(model, len(committed), 3 * bs)
    cache = model.allocate_cache(len(committed), 4 * bs)
    block = random_ids(model, len(committed), bs)
    with torch.no_grad():
        def cached():
            model.hidden_states(ids, cache=cache, prefill=True)
            cache.seqlens.copy_(torch.tensor(committed, dtype=torch.int32))
            return model.logits(model.hidden_states(block, cache=cache, causal=False))
        got = run_or_skip(cached)
        for b, n in enumerate(committed):
            canvas = torch.cat([ids[b, :n], block[b]])[None]
            torch.testing.assert_close(got[b], model(canvas, causal=False)[0, n:], atol=1e-9, rtol=1e-9)


def test_rms_norm_of_float64_stays_float64():
    from r2lm_kernels.model import RMSNorm
    norm = RMSNorm(24, 1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    want = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want, atol=1e-14, rtol=1e-13)


def test_prefill_under_grad_mode_keeps_no_graph_in_the_cache(tiny_model, random_ids):
    """A prefill with grad mode on stores plain K/V: a cache holding the forward's graph would keep its
    activations alive and, reused, chain one graph onto the next call after call."""
    model = tiny_model("kernels", torch.float32)
    bs = model.config.block_size
    cache = model.allocate_cache(2, 2 * bs)
    logits = model.logits(model.hidden_states(random_ids(model, 2, bs), cache=cache, prefill=True))
    assert logits.requires_grad
    assert all(t.grad_fn is None and not t.requires_grad for t in cache.k + cache.v)


def test_compiled_block_step_writes_each_layers_cache(tiny_model, random_ids):
    """A block step under torch.compile (inductor, dynamic shapes) gives eager's logits and caches: each
    layer's K/V land in that layer's cache."""
    model = tiny_model("kernels")
    bs = model.config.block_size
    prompt, block = random_ids(model, 2, bs), random_ids(model, 2, bs)

    def step(cache):
        return model.logits(model.hidden_states(block, cache=cache))
    caches = []
    with torch.no_grad():
        for run in (step, torch.compile(step, fullgraph=True, dynamic=True)):
            cache = model.allocate_cache(2, 3 * bs)
            model.hidden_states(prompt, cache=cache, prefill=True)
            cache.seqlens.fill_(bs)
            caches.append((run(cache), cache))
    (want, eager), (got, compiled) = caches
    close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)  # RoPE's angles are fp32
    close(got, want)
    for layer in range(model.config.num_hidden_layers):
        close(compiled.k[layer], eager.k[layer])
        close(compiled.v[layer], eager.v[layer])


class BlockStep(torch.nn.Module):
    """A model's block step as a module, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, block, cache):
        return self.model.logits(self.model.hidden_states(block, cache=cache))


def test_exported_block_step_takes_the_cache(tiny_model, random_ids, tmp_path):
    """torch.export takes a KVCache argument (a pytree node): the exported block step, saved and loaded, gives
    eager's logits and writes each layer's cache as eager does; a KVCache loads with weights_only=True."""
    model = tiny_model("kernels", torch.float32)
    bs = model.config.block_size
    prompt, block = random_ids(model, 2, bs), random_ids(model, 2, bs)
    step = BlockStep(model)

    def prefilled():
        cache = model.allocate_cache(2, 3 * bs)
        model.hidden_states(prompt, cache=cache, prefill=True)
        cache.seqlens.copy_(torch.tensor([bs, 0], dtype=torch.int32))
        return cache
    with torch.no_grad():
        torch.export.save(torch.export.export(step, (block, prefilled())), tmp_path / "step.pt2")
        exported = torch.export.load(tmp_path / "step.pt2").module()
        eager_cache, exported_cache = prefilled(), prefilled()
        want, got = step(block, eager_cache), exported(block, exported_cache)
    torch.testing.assert_close(got, want)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(exported_cache.k[layer], eager_cache.k[layer])
        torch.testing.assert_close(exported_cache.v[layer], eager_cache.v[layer])
    torch.save(eager_cache, tmp_path / "cache.pt")
    loaded = torch.load(tmp_path / "cache.pt", weights_only=True)
    assert isinstance(loaded, KVCache) and torch.equal(loaded.k[1], eager_cache.k[1])


def test_compiled_model_compiles_once(tiny_model, random_ids):
    """Repeated calls of a compiled model reuse its first graph (no state first filled in by a call), and RoPE's
    frequencies stay fp32 through a cast."""
    from torch._dynamo.testing import CompileCounter
    model = tiny_model("kernels", dtype=torch.float32)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = random_ids(model, 2, 2 * model.config.block_size)
    with torch.no_grad():
        got = [compiled(ids) for _ in range(3)]  # before any eager call
        for logits in got:
            torch.testing.assert_close(logits, model(ids))
    assert counter.frame_count == 1
    model.cast(torch.bfloat16)
    assert model._rope_inv_freq.dtype == torch.float32


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float64])
def test_cache_of_another_dtype(impl, tiny_model, random_ids, cache_dtype):
    """A cache in another dtype than the model's (a bf16 cache for an fp32 model, say): K/V are stored in the
    cache's dtype and the logits stay in the model's, near those of a cache in the model's dtype."""
    model = tiny_model(impl, dtype=torch.float32)
    bs = model.config.block_size
    prompt, block = random_ids(model, 2, bs), random_ids(model, 2, bs)
    logits = []
    for dtype in (torch.float32, cache_dtype):
        cache = KVCache.allocate(model.config, 2, 3 * bs, dtype=dtype, device="cpu")
        with torch.no_grad():
            model.hidden_states(prompt, cache=cache, prefill=True)
            cache.seqlens.fill_(bs)
            logits.append(model.logits(model.hidden_states(block, cache=cache)))
    assert logits[1].dtype == torch.float32
    assert (logits[1] - logits[0]).norm() < 0.02 * logits[0].norm()


def test_block_step_under_autocast(impl, tiny_model, random_ids):
    """Under CPU autocast to bf16, prefill and a block step run (q and k leave their fp32 norms, v comes out
    in bf16: the block step gives cache_attention one dtype) and stay near the fp32 logits."""
    model = tiny_model(impl, dtype=torch.float32)
    bs = model.config.block_size
    prompt, block = random_ids(model, 2, bs), random_ids(model, 2, bs)
    logits = []
    for autocast in (False, True):
        cache = model.allocate_cache(2, 3 * bs)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.hidden_states(prompt, cache=cache, prefill=True)
            cache.seqlens.fill_(bs)
            logits.append(model.logits(model.hidden_states(block, cache=cache)).float())
    assert (logits[1] - logits[0]).norm() < 0.05 * logits[0].norm()


# -- kernels path == reference path -------------------------------------------------------------------------

def _rule_error(kernel, reference_low, reference_exact):
    """FlashAttention's rule: the kernel's error against an exact reference is compared with the error of the
    same math done by the reference path at the low precision."""
    err = float((kernel.double() - reference_exact).norm() / reference_exact.norm())
    base = float((reference_low.double() - reference_exact).norm() / reference_exact.norm())
    return err, base


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kernels_path_matches_reference_path(device, dtype, rel_err, tol, tiny_model, random_ids, run_or_skip):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels have no fp64")
    exact = tiny_model("reference", dtype=torch.float64, device=device)
    low = tiny_model("reference", dtype=dtype, device=device)
    low.load_state_dict(exact.state_dict())
    kern = tiny_model("kernels", dtype=dtype, device=device)
    kern.load_state_dict(exact.state_dict())
    ids = random_ids(exact, 3, 33, device=device)
    with torch.no_grad():
        got = run_or_skip(lambda: kern(ids))
        want_low, want_exact = low(ids), exact(ids)
    if dtype in (torch.float64, torch.float32):
        assert rel_err(got, want_low) <= 10 * tol[dtype]
    else:
        err, base = _rule_error(got, want_low, want_exact)
        assert err <= 3 * base + 1e-4, (err, base)


def test_kernels_path_gradients_match_reference(device, rel_err, tiny_model, random_ids, run_or_skip):
    dtype = torch.float64 if device == "cpu" else torch.float32
    ref = tiny_model("reference", dtype=dtype, device=device)
    kern = tiny_model("kernels", dtype=dtype, device=device)
    kern.load_state_dict(ref.state_dict())
    ids = random_ids(ref, 2, 19, device=device)
    weights = torch.randn(2, 19, ref.config.vocab_size, dtype=dtype, device=device)

    def grads(model):
        model.zero_grad()
        (model(ids) * weights).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    got = run_or_skip(lambda: grads(kern))
    want = grads(ref)
    limit = 1e-9 if dtype == torch.float64 else 1e-4
    for name, g in want.items():
        assert got[name] is not None, name
        assert rel_err(got[name], g) <= limit, name
    assert float(want["model.layers.0.sidecar.A_log"].abs().max()) > 0   # the sidecar is on the graph


# -- save / load, configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip(tmp_path, tied, tiny_model, random_ids):
    pytest.importorskip("safetensors")
    model = tiny_model("reference", dtype=torch.float32, tie_word_embeddings=tied, sidecar_layers=[1])
    path = tmp_path / "r2lm.safetensors"
    model.save(path)
    loaded = R2LMForCausalLM.load(path, impl="reference")
    assert loaded.config == model.config and loaded.dtype == torch.float32
    assert loaded.model.layers[0].sidecar is None and loaded.model.layers[1].sidecar is not None
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = random_ids(model, 2, 21)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    bf16 = R2LMForCausalLM.load(path, impl="reference", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16

    # A mixed-precision checkpoint comes back as it was saved: bf16 weights, an fp32 sidecar A_log.
    sidecar = model.model.layers[1].sidecar
    model.to(torch.bfloat16)
    sidecar.A_log.data = sidecar.A_log.data.float()
    model.save(path)
    mixed = R2LMForCausalLM.load(path, impl="reference")
    assert mixed.model.embed_tokens.weight.dtype == torch.bfloat16
    assert mixed.model.layers[1].sidecar.A_log.dtype == torch.float32
    assert (mixed.lm_head.weight is mixed.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(mixed(ids), model(ids))


SIDECAR_SCAN_PARAMETERS = ("sidecar.A_log", "sidecar.D", "sidecar.dt_proj.bias")
SMALL_CONFIG = R2LMConfig(vocab_size=97, hidden_size=44, intermediate_size=72, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, block_size=8)


def check_16_bit_cast(model, fp32_model, dtype):
    """Every parameter in `dtype` but the sidecars' scan parameters, which hold fp32_model's values exactly."""
    want = dict(fp32_model.named_parameters())
    for name, param in model.named_parameters():
        if name.endswith(SIDECAR_SCAN_PARAMETERS):
            assert param.dtype == torch.float32 and torch.equal(param.cpu(), want[name].cpu()), name
        else:
            assert param.dtype == dtype, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_model_keeps_the_scan_parameters_in_fp32(device, dtype, tmp_path, random_ids, run_or_skip):
    torch.manual_seed(1)
    fp32 = R2LMForCausalLM(SMALL_CONFIG, impl="reference", device=device)
    torch.manual_seed(1)
    built = R2LMForCausalLM(SMALL_CONFIG, device=device, dtype=dtype)
    check_16_bit_cast(built, fp32, dtype)
    assert built.dtype == dtype
    pytest.importorskip("safetensors")
    fp32.save(tmp_path / "fp32.safetensors")
    loaded = R2LMForCausalLM.load(tmp_path / "fp32.safetensors", device=device, dtype=dtype)
    check_16_bit_cast(loaded, fp32, dtype)
    # The kernels take the fp32 scan parameters beside 16-bit activations, as the reference does.
    reference = R2LMForCausalLM.load(tmp_path / "fp32.safetensors", impl="reference", device=device, dtype=dtype)
    for sidecar in (layer.sidecar for layer in loaded.model.layers):
        sidecar.out_proj.weight.data.normal_(0, 0.3)  # make the sidecar count
    reference.load_state_dict(loaded.state_dict())
    ids = random_ids(loaded, 2, 19, device=device)
    with torch.no_grad():
        got = run_or_skip(lambda: loaded(ids))
        want = reference(ids)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_cast_keeps_gradients_in_their_parameters_dtype(random_ids):
    model = R2LMForCausalLM(SMALL_CONFIG, impl="reference")
    model(random_ids(model, 2, 11)).sum().backward()
    model.cast(torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.grad.dtype == param.dtype, name
    torch.optim.AdamW(model.parameters()).step()


def test_16_bit_qwen3_conversion_keeps_the_scan_parameters_in_fp32():
    hf = hf_qwen3(tied=False, bias=False, device="cpu").to(torch.bfloat16)
    torch.manual_seed(2)
    model = R2LMForCausalLM.from_qwen3(hf, block_size=8, impl="reference")
    torch.manual_seed(2)
    fp32 = R2LMForCausalLM.from_qwen3(hf.float(), block_size=8, impl="reference")
    check_16_bit_cast(model, fp32, torch.bfloat16)


def test_model_built_on_meta_runs_after_assigned_weights(tiny_model, random_ids):
    """The usual meta-device recipe: build without storage, load_state_dict(assign=True), run."""
    source = tiny_model("kernels", dtype=torch.float32)
    with torch.device("meta"):
        model = R2LMForCausalLM(source.config)
    model.load_state_dict(source.state_dict(), assign=True)
    ids = random_ids(source, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), source(ids), atol=0, rtol=0)


def test_load_rejects_foreign_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "other.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an R2LM checkpoint"):
        R2LMForCausalLM.load(path)


def test_bad_arguments(tiny_model, random_ids):
    with pytest.raises(ValueError, match="impl"):
        R2LMForCausalLM(R2LMConfig.tiny(), impl="cuda")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        R2LMConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        R2LMConfig.tiny(mask_token_id=512)
    with pytest.raises(ValueError, match="sidecar_layers"):
        R2LMConfig.tiny(sidecar_layers=[5])
    with pytest.raises(ValueError, match="mask_token_id must be an int"):
        R2LMConfig.tiny(mask_token_id=3.5)
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive finite number"):
        R2LMConfig.tiny(rms_norm_eps=-1e-6)
    with pytest.raises(ValueError, match="rope_theta"):
        R2LMConfig.tiny(rope_theta=float("nan"))
    for field, value in (("vocab_size", None), ("hidden_size", None), ("sidecar_layers", 5),
                         ("sidecar_layers", ["x"]), ("block_size", True), ("rms_norm_eps", True),
                         ("attention_bias", 1)):
        with pytest.raises(ValueError, match=f"R2LMConfig.{field} must be"):
            R2LMConfig.tiny(**{field: value})
    model = tiny_model("reference", dtype=torch.float32)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        model.hidden_states(random_ids(model, 3, 4), cache=model.allocate_cache(2, 16))
    with pytest.raises(ValueError, match="max_len"):
        model.hidden_states(random_ids(model, 2, 20), cache=model.allocate_cache(2, 16), prefill=True)
    model.hidden_states(random_ids(model, 2, 16), cache=model.allocate_cache(2, 16), prefill=True)  # fills it: fine
    other = tiny_model("reference", dtype=torch.float32, num_hidden_layers=1)
    for cache in (other.allocate_cache(2, 16), tiny_model("reference", num_key_value_heads=4).allocate_cache(2, 16)):
        with pytest.raises(ValueError, match="cache must hold 2 layers of K and V"):
            model.hidden_states(random_ids(model, 2, 8), cache=cache, prefill=True)
    for lengths in (torch.tensor([1, 2, 3]), [2.5, 3.0]):
        with pytest.raises(ValueError, match="lengths must hold one integer per sequence"):
            model(random_ids(model, 2, 3), lengths=lengths)
    bs = model.config.block_size
    with pytest.raises(ValueError, match="must cover whole blocks"):
        model.hidden_states(random_ids(model, 2, bs + 1), cache=model.allocate_cache(2, 4 * bs), prefill=True)
    model.hidden_states(random_ids(model, 2, bs + 1), cache=model.allocate_cache(2, 4 * bs), prefill=True,
                        sidecar=False)   # no sidecar, no block rule (the AR baseline's prefill)


def test_config_defaults_and_dict_roundtrip():
    config = R2LMConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (2048, 28, 128)
    assert config.mask_token_id == config.vocab_size - 1
    assert config.sidecar_d_inner == 1024 and config.sidecar_dt_rank == 128
    assert R2LMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        R2LMConfig.from_dict({"hidden": 3})


def test_more_bad_model_arguments(tiny_model, random_ids):
    model = tiny_model("reference", dtype=torch.float32)
    bs = model.config.block_size
    with pytest.raises(ValueError, match="lengths applies to full-sequence mode only"):
        model.hidden_states(random_ids(model, 2, bs), cache=model.allocate_cache(2, 4 * bs), lengths=[bs, bs])
    with pytest.raises(ValueError, match="lengths must hold one integer per sequence"):
        model(random_ids(model, 2, 3), lengths=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="exceeds the cache's max_len 16"):   # one position too many
        model.hidden_states(random_ids(model, 2, 17), cache=model.allocate_cache(2, 16), prefill=True,
                            sidecar=False)
    short = model.allocate_cache(2, 16)
    short.v = short.v[:1]
    with pytest.raises(ValueError, match="cache must hold 2 layers of K and V"):
        model.hidden_states(random_ids(model, 2, 8), cache=short, prefill=True)


def test_model_without_sidecars_prefills_partial_blocks(tiny_model, random_ids):
    """The whole-block rule of a prefill is the sidecar's: a model with no sidecar layer has none."""
    model = tiny_model("reference", sidecar_layers=[])
    bs = model.config.block_size
    ids = random_ids(model, 2, bs + 3)
    cache = model.allocate_cache(2, 4 * bs)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids, cache=cache, prefill=True), model.hidden_states(ids))


def test_sidecar_starts_with_mambas_initialisation():
    """S4D-real A (A_log[:, n] = log(n + 1)), D = 1, softplus(dt bias) log-uniform in [1e-3, 1e-1], conv weights
    and bias uniform in +-1/sqrt(d_conv), out_proj 0; the other biases 0."""
    model = R2LMForCausalLM(R2LMConfig(**{**SMALL_CONFIG.to_dict(), "attention_bias": True}), impl="reference")
    for layer in model.model.layers:
        s = layer.sidecar
        want_a = torch.log(torch.arange(1, s.d_state + 1, dtype=torch.float32)).expand_as(s.A_log)
        assert torch.equal(s.A_log.detach(), want_a)
        assert torch.equal(s.D.detach(), torch.ones_like(s.D))
        dt = torch.nn.functional.softplus(s.dt_proj.bias.detach().double())
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
        assert dt.min() < 1e-2 < dt.max()                # spread over the whole log range (22 draws)
        bound = s.conv_weight.shape[1] ** -0.5
        w = s.conv_weight.detach().abs()
        assert w.max() <= bound and w.max() > 0.8 * bound
        assert s.conv_bias.detach().abs().max() <= bound
        assert float(s.out_proj.weight.detach().abs().max()) == 0
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith(".bias") and ".sidecar." not in n]
    assert biases and all(float(p.detach().abs().max()) == 0 for _, p in biases)


def test_qwen3_conversion_forwards_its_options():
    hf = hf_qwen3(False, False, "cpu", rms_norm_eps=1e-5)
    kwargs = dict(mask_token_id=7, block_size=4, sidecar_layers=[1], sidecar_d_inner=24, sidecar_d_state=8,
                  sidecar_d_conv=3, sidecar_dt_rank=5, impl="reference")
    model = R2LMForCausalLM.from_qwen3(hf, generator=torch.Generator().manual_seed(5), **kwargs)
    c = model.config
    assert (c.mask_token_id, c.block_size, c.sidecar_layers, c.sidecar_d_inner, c.sidecar_d_state,
            c.sidecar_d_conv, c.sidecar_dt_rank) == (7, 4, [1], 24, 8, 3, 5)
    assert (c.rms_norm_eps, c.max_position_embeddings) == (1e-5, 256) and model.impl == "reference"
    assert model.model.layers[0].sidecar is None and model.model.layers[1].sidecar.conv_weight.shape == (24, 3)
    # the generator draws the sidecars' weights: the same seed, the same model
    again = R2LMForCausalLM.from_qwen3(hf, generator=torch.Generator().manual_seed(5), **kwargs)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_qwen3_conversion_refuses_weights_that_do_not_map():
    hf = hf_qwen3(False, False, "cpu")

    class Partial:                                       # a checkpoint missing one weight
        config = hf.config
        get_input_embeddings = hf.get_input_embeddings

        def state_dict(self):
            return {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="weights did not map.*model.layers.1.mlp.up_proj.weight"):
        R2LMForCausalLM.from_qwen3(Partial())


def test_load_rejects_a_checkpoint_missing_a_weight(tmp_path, tiny_model):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file
    model = tiny_model("reference", dtype=torch.float32)
    path = tmp_path / "r2lm.safetensors"
    model.save(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="does not match its config; missing .*model.layers.1.mlp.up_proj.weight"):
        R2LMForCausalLM.load(path)


def test_more_bad_config_fields():
    for field, value in (("head_dim", 63), ("max_position_embeddings", 0), ("sidecar_layers", [-1])):
        with pytest.raises(ValueError, match=f"R2LMConfig.{field} must be"):
            R2LMConfig.tiny(**{field: value})
    # sidecar_layers: any collection of indices, kept sorted and without repeats
    assert R2LMConfig.tiny(sidecar_layers=range(2)).sidecar_layers == [0, 1]
    assert R2LMConfig.tiny(sidecar_layers={1}).sidecar_layers == [1]
    assert R2LMConfig.tiny(sidecar_layers=[1, 0, 1]) == R2LMConfig.tiny(sidecar_layers=[0, 1])
