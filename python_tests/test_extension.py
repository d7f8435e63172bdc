"""The built extension loads, registers every op, and reports its backends."""
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import r2lm_kernels

OPS = ["cache_attention", "parallel_commit", "reverse_conv1d", "reverse_conv1d_backward",
       "reverse_selective_scan", "reverse_selective_scan_backward"]


def test_extension_registers_every_op():
    assert r2lm_kernels.registered_ops() == OPS
    for name in OPS:
        assert hasattr(torch.ops.r2lm, name)


def _small_op_calls():
    """A valid CPU call of every op: (name, its first input's name, tensors by name, other arguments)."""
    r = lambda *s: torch.randn(*s)  # noqa: E731
    seq_idx = torch.zeros(2, 9, dtype=torch.int32)
    scan = dict(u=r(2, 9, 6), delta=r(2, 9, 6), A=-torch.rand(6, 4), B=r(2, 9, 4), C=r(2, 9, 4), D=r(6),
                z=r(2, 9, 6), delta_bias=r(6), seq_idx=seq_idx)
    conv = dict(x=r(2, 9, 6), weight=r(6, 4), bias=r(6), seq_idx=seq_idx)
    return [
        ("reverse_selective_scan", "u", scan, dict(delta_softplus=True)),
        ("reverse_selective_scan_backward", "u", dict(dout=r(2, 9, 6), **scan), dict(delta_softplus=True)),
        ("reverse_conv1d", "x", conv, dict(silu=True)),
        ("reverse_conv1d_backward", "x", dict(dy=r(2, 9, 6), **conv), dict(silu=True)),
        ("cache_attention", "q", dict(q=r(2, 3, 4, 64), k=r(2, 3, 2, 64), v=r(2, 3, 2, 64), k_cache=r(2, 8, 2, 64),
                                      v_cache=r(2, 8, 2, 64), cache_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                                      block_table=torch.tensor([[0], [1]], dtype=torch.int32)), {}),
        ("parallel_commit", "logits", dict(logits=r(2, 5, 10), tokens=torch.full((2, 5), 9),
                                           active=torch.ones(2, dtype=torch.bool),
                                           step_tensor=torch.zeros(1, dtype=torch.int64)),
         dict(mask_token_id=9, threshold=0.5)),
    ]


@pytest.mark.parametrize("index", range(6), ids=[call[0] for call in _small_op_calls()])
def test_a_meta_argument_among_cpu_ones_raises(index):
    """One meta argument sends the whole call to the fake implementation: it checks devices as the kernels'
    C++ layer does, so a mixed call raises instead of returning uninitialised CPU memory."""
    name, first, tensors, others = _small_op_calls()[index]
    op = getattr(torch.ops.r2lm, name)
    out = op(**{n: t.to("meta") for n, t in tensors.items()}, **others)
    assert all(t.device.type == "meta" for t in (out if isinstance(out, tuple) else [out]))
    for moved in tensors:
        expected = (rf"{name}: \w+ must be on meta like the first input, got cpu" if moved == first else
                    f"{name}: {moved} must be on cpu like the first input, got meta")
        with pytest.raises(RuntimeError, match=expected):
            op(**{**tensors, moved: tensors[moved].to("meta")}, **others)


@pytest.mark.parametrize("name", ["reverse_selective_scan", "reverse_conv1d", "cache_attention", "parallel_commit"])
def test_forward_mode_ad_raises(name):
    """No op has a forward-mode derivative: a tangent on its first input raises instead of being dropped
    (the result's tangent would be missing, or zero under torch.func.jvp)."""
    import torch.autograd.forward_ad as forward_ad

    _, first, tensors, others = next(call for call in _small_op_calls() if call[0] == name)
    if name == "parallel_commit":
        tensors["step"] = tensors.pop("step_tensor")   # the wrapper's name for it
    rest = {n: t for n, t in tensors.items() if n != first}
    calls = [(getattr(r2lm_kernels, name), rest)]
    if name in ("cache_attention", "parallel_commit"):  # refused by the registered op itself
        op_names = {"step": "step_tensor"}
        calls.append((getattr(torch.ops.r2lm, name), {op_names.get(n, n): t for n, t in rest.items()}))
    primal, tangent = tensors[first], torch.randn_like(tensors[first])
    for op, op_rest in calls:
        kwargs = {**op_rest, **others}
        with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode AD: {first} carries a tangent"):
            torch.func.jvp(lambda x: op(**{first: x}, **kwargs), (primal,), (tangent,))
        with forward_ad.dual_level(), \
                pytest.raises(NotImplementedError, match=f"{name} has no forward-mode AD: {first} carries"):
            op(**{first: forward_ad.make_dual(primal, tangent)}, **kwargs)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
@pytest.mark.parametrize("name", ["reverse_selective_scan", "reverse_conv1d", "cache_attention", "parallel_commit"])
def test_func_reverse_mode_transforms_raise(name, transform):
    """torch.func.grad / vjp / jacrev cannot run an autograd registered by torch.library: the differentiable
    ops say so and point to torch.autograd (PyTorch's own message would speak of autograd.Function), the
    others refuse an input that requires grad."""
    _, first, tensors, others = next(call for call in _small_op_calls() if call[0] == name)
    if name == "parallel_commit":
        tensors["step"] = tensors.pop("step_tensor")
    rest = {n: t for n, t in tensors.items() if n != first}
    op = getattr(r2lm_kernels, name)

    def loss(x):
        out = op(**{first: x}, **rest, **others)
        return (out[1] if name == "parallel_commit" else out).sum()
    run = {"grad": lambda x: torch.func.grad(loss)(x), "vjp": lambda x: torch.func.vjp(loss, x),
           "jacrev": lambda x: torch.func.jacrev(loss)(x)}[transform]
    expected = (f"{name} does not support torch.func.grad / vjp / jacrev / hessian: {first} is differentiated by "
                f"one; use backward or torch.autograd.grad" if name in ("reverse_selective_scan", "reverse_conv1d")
                else f"r2lm::{name} has no backward: {first} requires grad")
    with pytest.raises((NotImplementedError, RuntimeError), match=expected):
        run(tensors[first])


@pytest.mark.parametrize("name", ["reverse_selective_scan", "reverse_conv1d"])
def test_func_grad_runs_the_ops_on_what_it_does_not_differentiate(name):
    """Under torch.func.grad the scan and the conv run on detached inputs and under no_grad: only an input
    being differentiated is refused."""
    _, first, tensors, others = next(call for call in _small_op_calls() if call[0] == name)
    rest = {n: t for n, t in tensors.items() if n != first}
    op = getattr(r2lm_kernels, name)

    def detached(x):
        return (op(**{first: x.detach()}, **rest, **others) * x).sum()

    def under_no_grad(x):
        with torch.no_grad():
            y = op(**{first: x}, **rest, **others)
        return (y * x).sum()
    want = op(**{first: tensors[first]}, **rest, **others)
    for loss in (detached, under_no_grad):
        torch.testing.assert_close(torch.func.grad(loss)(tensors[first]), want, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["reverse_selective_scan", "reverse_conv1d", "cache_attention", "parallel_commit"])
def test_vmap(name):
    """torch.func.vmap of the scan and the conv (PyTorch's per-sample fallback) equals calls one sample at a
    time; the ops that write their arguments in place refuse it (README)."""
    _, first, tensors, others = next(call for call in _small_op_calls() if call[0] == name)
    if name == "parallel_commit":
        tensors["step"] = tensors.pop("step_tensor")
    op = getattr(r2lm_kernels, name)
    samples = torch.stack([torch.randn_like(tensors[first]) for _ in range(3)])
    rest = {n: t for n, t in tensors.items() if n != first}

    def one(x):
        return op(**{first: x}, **rest, **others)
    if name in ("cache_attention", "parallel_commit"):
        with pytest.raises(RuntimeError, match=f"Batching rule not implemented for r2lm::{name}"):
            torch.func.vmap(one)(samples)
        return
    torch.testing.assert_close(torch.func.vmap(one)(samples), torch.stack([one(x) for x in samples]),
                               atol=0, rtol=0)


@pytest.mark.parametrize("view_taken_inside", [
    False, pytest.param(True, marks=pytest.mark.xfail(
        reason="PyTorch's inductor, with dynamic shapes, misplaces the write into a view taken inside the "
               "compiled function (pytorch/pytorch#198068 / #198069); when this passes, the README's advice can go",
        raises=AssertionError, strict=False))])
@pytest.mark.parametrize("name", ["cache_attention", "parallel_commit"])
def test_compiled_write_into_a_view_of_a_larger_buffer(name, view_taken_inside):
    """The caches / tokens that the op writes are one slice of a larger buffer (a stacked per-layer cache),
    compiled with inductor and dynamic shapes: the write must land in that slice, as in eager. It does when
    the slice is the compiled function's argument (the README's advice); a slice taken inside is PyTorch's
    open bug."""
    _, first, tensors, others = next(call for call in _small_op_calls() if call[0] == name)
    written = ["k_cache", "v_cache"] if name == "cache_attention" else ["tokens"]
    if name == "parallel_commit":
        tensors["step"] = tensors.pop("step_tensor")
        tensors["tokens"][:, ::2] = 3                   # some positions already committed
    stacks = {n: torch.stack([torch.randn_like(tensors[n].float()).to(tensors[n].dtype) if n != "tokens" else
                              torch.randint_like(tensors[n], 0, 10) for _ in range(3)]) for n in written}
    for n in written:
        stacks[n][1] = tensors[n]
    rest = {n: t for n, t in tensors.items() if n not in written}
    op = getattr(r2lm_kernels, name)
    if view_taken_inside:
        def step(stacks):
            return op(**{n: stacks[n][1] for n in written}, **rest, **others)

        def args(stacks):
            return (stacks,)
    else:
        def step(*slices):
            return op(**dict(zip(written, slices)), **rest, **others)

        def args(stacks):
            return tuple(stacks[n][1] for n in written)
    want = {n: t.clone() for n, t in stacks.items()}
    step(*args(want))
    torch._dynamo.reset()
    torch.compile(step, backend="inductor", dynamic=True, fullgraph=True)(*args(stacks))
    for n in written:
        assert torch.equal(stacks[n], want[n]), f"{name}: {n} written in the wrong place"


def test_compiled_backends():
    backends = r2lm_kernels.compiled_backends()
    assert backends["cpu"] is True
    if torch.cuda.is_available():
        assert backends["cuda"], "a GPU is present but the CUDA kernels were not compiled in"
    if backends["cuda"]:
        assert backends["cuda_archs"]


def _run_python(code, folder):
    """Runs code in a fresh interpreter (this one's environment and extension) in `folder`, away from the
    repository root, whose source tree would hide an installed package; returns its stdout."""
    env = dict(os.environ)
    for name in ("R2LM_LIBRARY", "PYTHONPATH"):  # relative paths would not survive the change of folder
        if env.get(name):
            env[name] = os.pathsep.join(os.path.abspath(path) for path in env[name].split(os.pathsep))
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc; needs more than one core")
def test_cpu_kernels_follow_torch_thread_count(tmp_path):
    """A thread that has run no ATen op calls an op after torch.set_num_threads(1) in the main thread: the
    kernel runs on one thread (no OpenMP worker started), as ATen's ops would."""
    _run_python("""
import os, threading, torch, r2lm_kernels
torch.set_num_threads(1)
q, k, v = torch.randn(2, 16, 4, 64), torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
cache = torch.randn(2, 64, 2, 64)
lens = torch.full((2,), 40, dtype=torch.int32)
counts = []
def run():
    before = len(os.listdir("/proc/self/task"))
    torch.ops.r2lm.cache_attention(q, k, v, cache, cache, lens, write_kv=False)
    counts.append((before, len(os.listdir("/proc/self/task"))))
thread = threading.Thread(target=run)
thread.start()
thread.join()
assert counts and counts[0][0] == counts[0][1], counts
""", tmp_path)


@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="AddressSanitizer dies on a failed allocation")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the address space size from /proc")
def test_failed_allocation_in_a_cpu_kernel_raises(tmp_path):
    """Per-thread scratch is allocated inside the kernels' OpenMP regions: under an address-space limit the
    scan's (d_state 20M: GBs per thread) fails there, and the op raises instead of ending the process."""
    out = _run_python("""
import resource, torch, r2lm_kernels
N = 20_000_000
u, delta = torch.randn(1, 1, 1), torch.randn(1, 1, 1)
A, B, C = -torch.rand(1, N), torch.randn(1, 1, N), torch.randn(1, 1, N)
size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    r2lm_kernels.reverse_selective_scan(u, delta, A, B, C)
except (RuntimeError, MemoryError) as error:
    print("forward raised", type(error).__name__)
try:
    torch.ops.r2lm.reverse_selective_scan_backward(torch.ones(1, 1, 1), u, delta, A, B, C, None, None,
                                                   None, False, None)
except (RuntimeError, MemoryError) as error:
    print("backward raised", type(error).__name__)
""", tmp_path)
    assert "forward raised" in out and "backward raised" in out, out


def test_cpu_vector_bytes_and_its_cap(monkeypatch):
    # The portable CPU kernels run at the CPU's widest vector width unless R2LM_CPU_VECTOR_BYTES caps it
    # (the kernel tests cap it to cover every width).
    monkeypatch.delenv("R2LM_CPU_VECTOR_BYTES", raising=False)
    widest = r2lm_kernels.cpu_vector_bytes()
    assert widest in (16, 32, 64)
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        flags = set(next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split())
        if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"} <= flags:
            assert widest == 64
        elif not {"avx2", "fma"} <= flags:
            assert widest == 16
    for cap, expected in (("64", widest), ("32", min(widest, 32)), ("16", 16), ("", widest)):
        monkeypatch.setenv("R2LM_CPU_VECTOR_BYTES", cap)
        assert r2lm_kernels.cpu_vector_bytes() == expected, cap
    x, weight = torch.randn(1, 5, 3), torch.randn(3, 2)
    for cap in ("8", "48", "junk"):  # refused, by the query and by the kernels that read it
        monkeypatch.setenv("R2LM_CPU_VECTOR_BYTES", cap)
        with pytest.raises(ValueError, match=f"R2LM_CPU_VECTOR_BYTES must be 64, 32 or 16 .*got '{cap}'"):
            r2lm_kernels.cpu_vector_bytes()
        with pytest.raises(ValueError, match="R2LM_CPU_VECTOR_BYTES must be 64, 32 or 16"):
            r2lm_kernels.reverse_conv1d(x, weight)


@pytest.mark.skipif(shutil.which("nvcc") is None and not torch.cuda.is_available(), reason="no CUDA toolkit")
def test_cuda_kernels_built_where_nvcc_exists():
    # CI compiles the CUDA sources whenever nvcc is present, so a CUDA compile error fails CI.
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build")
    if r2lm_kernels._ext._C.build_info()["cuda_option"] == "OFF":
        pytest.skip("built with R2LM_CUDA=OFF")
    assert r2lm_kernels.compiled_backends()["cuda"]


def test_extension_refuses_another_torch_release(monkeypatch):
    """Built against one torch release and run with another, the import fails saying what to do."""
    from r2lm_kernels import _ext
    built = _ext._C.build_info()["torch"]
    assert torch.__version__.startswith(built + ".") or torch.__version__ == built
    _ext._check_torch_release(_ext._C)
    monkeypatch.setattr(torch, "__version__", "1.13.1")
    with pytest.raises(ImportError, match=rf"built against torch {built}, but torch 1.13.1 is installed: rebuild"):
        _ext._check_torch_release(_ext._C)


REBUILD = "rebuild it against the installed torch"


@pytest.mark.parametrize("loader_error,message", [
    ("/site/r2lm_kernels/_C.so: undefined symbol: _ZN3c104cuda9SetDevice", f"does not link with torch.*{REBUILD}"),
    ("libc10_cuda.so: cannot open shared object file: No such file or directory",
     f"needs libc10_cuda.so, which torch .* does not have.*{REBUILD}"),
    ("libfoo.so: cannot open shared object file", "^libfoo.so: cannot open shared object file$"),  # not torch's
])
def test_extension_loader_errors_say_to_rebuild(monkeypatch, loader_error, message):
    """The dynamic loader's errors for an extension built against another torch become a rebuild message."""
    from r2lm_kernels import _ext

    def fail(path):
        raise ImportError(loader_error)
    monkeypatch.setattr(_ext, "_import", fail)
    with pytest.raises(ImportError, match=message):
        _ext._load()


def test_version_matches_the_package_metadata():
    import tomllib
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert tomllib.loads(pyproject.read_text())["project"]["version"] == r2lm_kernels.__version__


def _editable_install():
    from importlib import metadata
    try:
        direct_url = metadata.distribution("r2lm_kernels").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    return bool(direct_url) and json.loads(direct_url).get("dir_info", {}).get("editable", False)


def test_source_tree_without_extension_says_how_to_fix_the_import(tmp_path):
    """Python started in the repository root imports the source tree, which has no _C: the error says so."""
    sources = Path(__file__).resolve().parent.parent
    if list((sources / "r2lm_kernels").glob("_C*.so")):
        pytest.skip("an extension was built into the source tree")
    if _editable_install():
        pytest.skip("an editable install maps r2lm_kernels._C to its build, whatever the path")
    env = {k: v for k, v in os.environ.items() if k != "R2LM_LIBRARY"}
    env["PYTHONPATH"] = str(sources)
    done = subprocess.run([sys.executable, "-c", "import r2lm_kernels"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "holds no compiled extension (_C)" in done.stderr and "R2LM_LIBRARY" in done.stderr, done.stderr


def test_public_api_matches_design_names():
    import inspect
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(r2lm_kernels.reverse_selective_scan) == [
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "seq_idx"]
    assert params(r2lm_kernels.reverse_conv1d)[:4] == ["x", "weight", "bias", "seq_idx"]
    assert params(r2lm_kernels.cache_attention) == [
        "q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table", "softmax_scale", "causal",
        "write_kv", "return_lse"]
    assert params(r2lm_kernels.parallel_commit) == [
        "logits", "tokens", "mask_token_id", "threshold", "min_per_step", "max_per_step", "temperature", "seed",
        "step", "active", "score"]
    for name in ("reverse_selective_scan", "reverse_conv1d", "cache_attention", "parallel_commit"):
        assert params(getattr(r2lm_kernels, name)) == params(getattr(r2lm_kernels.reference, name))


def test_fake_implementations_of_permuted_inputs():
    """Inputs with batch and sequence strides swapped (unit last-dim stride, accepted): the fake outputs are
    contiguous, as the kernels' are."""
    def permuted(*shape):                                # (batch, seqlen, ...) stored as (seqlen, batch, ...)
        return torch.randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    x, dy = permuted(2, 9, 6), permuted(2, 9, 6)
    w, b = torch.randn(6, 4), torch.randn(6)
    torch.library.opcheck(torch.ops.r2lm.reverse_conv1d.default, (x, w, b, None, True))
    torch.library.opcheck(torch.ops.r2lm.reverse_conv1d_backward.default, (dy, x, w, b, None, True))
    u, delta, z, dout = (permuted(2, 9, 6) for _ in range(4))
    B, C = permuted(2, 9, 4), permuted(2, 9, 4)
    A, D, bias = -torch.rand(6, 4) - 0.1, torch.randn(6), torch.randn(6)
    torch.library.opcheck(torch.ops.r2lm.reverse_selective_scan.default, (u, delta, A, B, C, D, z, bias, True, None))
    torch.library.opcheck(torch.ops.r2lm.reverse_selective_scan_backward.default,
                          (dout, u, delta, A, B, C, D, z, bias, True, None))
    q, k, v = permuted(2, 3, 4, 64), permuted(2, 3, 2, 64), permuted(2, 3, 2, 64)
    k_cache, v_cache = torch.randn(2, 8, 2, 64), torch.randn(2, 8, 2, 64)
    torch.library.opcheck(torch.ops.r2lm.cache_attention.default,
                          (q, k, v, k_cache, v_cache, torch.tensor([0, 4], dtype=torch.int32)), {"write_kv": True})


@pytest.mark.parametrize("name,inputs", [("reverse_conv1d", ["weight", "bias"]),
                                         ("reverse_selective_scan", ["delta", "A", "B", "C", "D", "z",
                                                                     "delta_bias"])])
def test_forward_mode_ad_raises_for_every_differentiable_input(name, inputs):
    import torch.autograd.forward_ad as forward_ad
    seq_idx = torch.zeros(2, 9, dtype=torch.int32)
    r = torch.randn
    args = (dict(x=r(2, 9, 6), weight=r(6, 4), bias=r(6), seq_idx=seq_idx, silu=True) if name == "reverse_conv1d"
            else dict(u=r(2, 9, 6), delta=r(2, 9, 6), A=-torch.rand(6, 4), B=r(2, 9, 4), C=r(2, 9, 4), D=r(6),
                      z=r(2, 9, 6), delta_bias=r(6), delta_softplus=True, seq_idx=seq_idx))
    op = getattr(r2lm_kernels, name)
    for input_name in inputs:
        with forward_ad.dual_level(), pytest.raises(NotImplementedError,
                                                    match=f"{name} has no forward-mode AD: {input_name} carries"):
            op(**{**args, input_name: forward_ad.make_dual(args[input_name], torch.randn_like(args[input_name]))})
