"""Shared test configuration: devices, the per-dtype tolerance table, and input helpers."""
import os

import pytest
import torch

# Relative-norm tolerance of a kernel against the reference, per input dtype (DESIGN.md section 4).
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import r2lm_kernels
    return f"r2lm_kernels backends: {r2lm_kernels.compiled_backends()}; test devices: {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def cuda_kernels(request, device):
    """Whether the device's tensors run the CUDA kernels: on a GPU, or on CPU tensors under the warp emulator
    (scripts/emulate_cuda.sh)."""
    return device == "cuda" or request.config.pluginmanager.hasplugin("cuda_emulator.pytest_plugin")


@pytest.fixture
def rel_err():
    """‖a − b‖ / ‖b‖ in float64."""
    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))
    return rel


@pytest.fixture
def tol():
    return TOLERANCE


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh random seed for every test, printed so a failure can be replayed (R2LM_TEST_SEED=...)."""
    seed = int(os.environ.get("R2LM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"replay with R2LM_TEST_SEED={value}"))


# -- shared input helpers (tests run with --import-mode=importlib, so they are shared as fixtures) -----------

@pytest.fixture
def poison_memory():
    """poison_memory(device, *nbytes), called just before an op allocates its outputs, so that an element the
    op leaves unwritten shows instead of holding zeros or an earlier result. On CUDA it fills and frees
    blocks of these sizes, which the caching allocator hands over as they are: all-ones bytes (NaN in every
    float dtype, -1 in the integer ones). On CPU, where malloc keeps its bookkeeping in a freed block's first
    bytes and small blocks come from elsewhere, it turns on torch's fill of uninitialised memory until the
    test ends: every empty tensor, the ops' outputs included, starts as NaN (float), the largest value
    (integer) or True (bool)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)

    def poison(device, *nbytes):
        if torch.device(device).type == "cpu":
            torch.utils.deterministic.fill_uninitialized_memory = True
            torch.use_deterministic_algorithms(True, warn_only=True)  # the fill comes with this mode
        else:
            held = [torch.full((n,), 255, dtype=torch.uint8, device=device) for n in nbytes]
            del held
    yield poison
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


@pytest.fixture
def check_device():
    """Skips a (device, dtype) case the CUDA kernels do not have: float64 on CUDA."""
    def check(device, dtype):
        if device == "cuda" and dtype == torch.float64:
            pytest.skip("float64 runs on CPU only (gradcheck); the CUDA kernels are fp32/bf16/fp16")
    return check


@pytest.fixture
def repeated_calls():
    """repeated_calls(call, device): four more results of call(), for a bitwise comparison with a first one;
    on the CPU the last runs with a team of OpenMP threads of another size."""
    def calls(call, device):
        runs = [call() for _ in range(3)]
        if device == "cpu":
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1 if threads > 1 else 2)
                runs.append(call())
            finally:
                torch.set_num_threads(threads)
        return runs
    return calls


@pytest.fixture
def cap_vector_width(monkeypatch):
    """cap_vector_width(width, device): the portable CPU kernels run at `width` bytes ("widest": the CPU's
    own, else "32" or "16", through R2LM_CPU_VECTOR_BYTES). Cases that would repeat another are skipped:
    a narrower width off the CPU, or one that is the CPU's widest or more."""
    def cap(width, device):
        monkeypatch.delenv("R2LM_CPU_VECTOR_BYTES", raising=False)
        if width == "widest":
            return
        if device != "cpu":
            pytest.skip("R2LM_CPU_VECTOR_BYTES only affects the CPU kernels")
        import r2lm_kernels
        if int(width) >= r2lm_kernels.cpu_vector_bytes():
            pytest.skip(f"{width}-byte vectors are this CPU's widest or more: the widest case runs them")
        monkeypatch.setenv("R2LM_CPU_VECTOR_BYTES", width)
    return cap


@pytest.fixture
def select_cpu_kernel(monkeypatch, cap_vector_width):
    """select_cpu_kernel(kernel, device, generic_env): "auto" leaves the op its own choice; "generic",
    "generic-32" and "generic-16" force its portable kernel (generic_env=1) at that vector width."""
    def select(kernel, device, generic_env):
        if kernel == "auto":
            return
        if device != "cpu":
            pytest.skip(f"{generic_env} only affects the CPU kernels")
        monkeypatch.setenv(generic_env, "1")
        cap_vector_width(kernel.removeprefix("generic").removeprefix("-") or "widest", device)
    return select


@pytest.fixture(params=["widest", "32", "16"], ids=lambda w: f"vec-{w}")
def vector_width(request, device, cap_vector_width):
    """The portable CPU kernels at every vector width the CPU has (64 AVX-512, 32 AVX2, 16 SSE2 / NEON)."""
    cap_vector_width(request.param, device)
    return request.param


@pytest.fixture
def make_segments():
    """make_segments(batch, seqlen, device, kind) -> seq_idx (batch, seqlen) int32: None (kind "none"),
    random monotonic segments (kind "random": some of length 1, many straddling the kernels' chunk and run
    boundaries), or fixed blocks with a random phase as in block diffusion (kind "blocks")."""
    def segments(batch, seqlen, device, kind):
        if kind == "none":
            return None
        if kind == "random":
            draws = torch.rand(batch, seqlen, device=device)   # before the rates: the historical draw order
            starts = draws < torch.empty(batch, 1, device=device).uniform_(0.02, 0.4)
            return torch.cumsum(starts.int(), dim=1, dtype=torch.int32)
        block = int(torch.randint(2, 40, ()))
        phase = torch.randint(0, block, (batch, 1), device=device)
        return ((torch.arange(seqlen, device=device) + phase) // block).to(torch.int32)
    return segments


# -- the model and generation tests --------------------------------------------------------------------------

IMPLS = ["reference", "kernels"]


@pytest.fixture(params=IMPLS)
def impl(request):
    """The model's implementation: the plain-PyTorch reference path or the kernels path."""
    return request.param


@pytest.fixture
def run_or_skip():
    """run_or_skip(fn): runs fn; skips the test only when the dispatcher has no CUDA kernel because this build
    was made without CUDA. Every op has CPU and CUDA kernels, so any other NotImplementedError fails."""
    import r2lm_kernels

    def run(fn):
        try:
            return fn()
        except NotImplementedError as e:
            if "'CUDA' backend" in str(e) and not r2lm_kernels.compiled_backends().get("cuda"):
                pytest.skip(f"build without CUDA kernels: {str(e).splitlines()[0]}")
            raise
    return run


@pytest.fixture
def tiny_model():
    """tiny_model(impl, dtype=float64, device="cpu", perturb_norms=False, **config_overrides): a small random
    model whose sidecar is switched on (non-zero out_proj) and whose logits vary enough that different inputs
    give different tokens. perturb_norms adds N(0, 0.1) noise to every norm weight (so a mis-mapped norm
    shows)."""
    from r2lm_kernels import R2LMConfig, R2LMForCausalLM

    def make(impl, dtype=torch.float64, device="cpu", perturb_norms=False, **overrides):
        fields = dict(vocab_size=97, hidden_size=44, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, block_size=8)
        fields.update(overrides)
        model = R2LMForCausalLM(R2LMConfig(**fields), impl=impl)
        model.init_weights(std=0.3, sidecar_out_std=0.3)
        if perturb_norms:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.add_(torch.randn_like(p) * 0.1)
        return model.to(device=device, dtype=dtype).eval()
    return make


@pytest.fixture
def random_ids():
    """random_ids(model, *shape, device="cpu"): random token ids other than the model's mask token."""
    def ids(model, *shape, device="cpu"):
        out = torch.randint(0, model.config.vocab_size - 1, shape, device=device)
        return torch.where(out >= model.config.mask_token_id, out + 1, out)
    return ids
