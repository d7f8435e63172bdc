"""reverse_selective_scan (DESIGN.md 3.1) against r2lm_kernels.reference on every available device.

Inputs are fresh random tensors every run (conftest's per-test seed is printed on failure). Outputs the
op allocates are poisoned by filling and freeing same-sized NaN buffers right before the call, so an
element the kernel fails to write shows up as NaN (reliable on CUDA's caching allocator, best effort on
CPU). Tolerances: fp64 / fp32 from the conftest table against an fp64 reference; bf16 / fp16 also by
the reference-relative rule (the kernel's error against fp64 at most 3x + eps the error of the
reference run at that precision).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import r2lm_kernels
from r2lm_kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HALF = (torch.bfloat16, torch.float16)
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

# (batch, seqlen, dim, d_state): seqlen 1, odd lengths (not a multiple of the kernels' internal chunks:
# 16 channels per CPU block, 32-128 token chunks on CUDA), dims not a multiple of 8 or spanning several
# channel blocks, d_state 1 to 64.
SHAPES = [
    (1, 1, 5, 3),
    (2, 17, 24, 16),
    (3, 33, 70, 7),
    (2, 129, 37, 16),
    (1, 300, 20, 64),
    (2, 65, 130, 16),
]


# The optional arguments a case passes: all four (the model's use), none, and two partial sets that between
# them take D without z and z without D, delta_bias without softplus and softplus without delta_bias. These
# change only per-token terms (the step, the D skip, the gate), not where the state resets, so they run with
# random segments only.
OPTIONAL = ("D", "z", "delta_bias", "softplus")
PARTIAL = ["D+delta_bias", "z+softplus"]
SEGMENTS_OPTIONS = [(s, o) for s in ("none", "random", "blocks") for o in ("all", "none")] + \
    [("random", o) for o in PARTIAL]


@pytest.fixture
def scan_inputs(make_segments):
    """scan_inputs(batch, seqlen, dim, d_state, dtype, device, *, options="all", segments="random"): random
    inputs as a dict of the op's arguments. options names the optional arguments used: "all" (D, z,
    delta_bias and softplus), "none", or some of OPTIONAL joined by "+". Without softplus the step
    delta + delta_bias is positive, as a step size must be (delta_bias then takes either sign)."""
    def make(batch, seqlen, dim, d_state, dtype, device, *, options="all", segments="random"):
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        used = OPTIONAL if options == "all" else () if options == "none" else tuple(options.split("+"))
        assert set(used) <= set(OPTIONAL), options
        softplus, bias = "softplus" in used, "delta_bias" in used

        def act(*shape, scale=1.0):
            return (torch.randn(*shape, device=device) * scale).to(dtype)

        def step_bias():
            if softplus:
                return (torch.randn(dim, device=device) * 0.5 - 1.0).to(param_dtype)
            return torch.empty(dim, device=device).uniform_(-0.2, 0.2).to(param_dtype)

        low, high = (0.21, 0.5) if bias else (0.01, 0.3)  # without softplus: delta + delta_bias in (0.01, 0.7)
        delta = act(batch, seqlen, dim, scale=0.5) if softplus else \
            torch.empty(batch, seqlen, dim, device=device).uniform_(low, high).to(dtype)
        return dict(
            u=act(batch, seqlen, dim),
            delta=delta,
            A=-torch.empty(dim, d_state, device=device).uniform_(0.05, 2.0).to(param_dtype),
            B=act(batch, seqlen, d_state),
            C=act(batch, seqlen, d_state),
            D=torch.randn(dim, device=device).to(param_dtype) if "D" in used else None,
            z=act(batch, seqlen, dim) if "z" in used else None,
            delta_bias=step_bias() if bias else None,
            delta_softplus=softplus,
            seq_idx=make_segments(batch, seqlen, device, segments),
        )

    return make


@pytest.fixture(params=["auto", "generic", "generic-32", "generic-16"])
def cpu_kernel(request, device, select_cpu_kernel):
    """Which CPU forward runs: "auto" (on AVX-512 machines the fp32 d_state-16 forward is an AVX-512 kernel)
    or "generic" (R2LM_SCAN_CPU_GENERIC=1 forces the portable vector code), the latter at every vector
    width the CPU has, so that all of them stay tested."""
    select_cpu_kernel(request.param, device, "R2LM_SCAN_CPU_GENERIC")
    return request.param


def _f64(args):
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}


def _magnitudes(args):
    """The same problem with |u|, |B|, |C|, |D|: the forward's sums (and the backward's, with |dout|) then
    add terms of one sign, so its result is the scale that rounding errors are relative to. Random inputs
    can make a sum cancel far below its terms (a 3-state B . C at seqlen 1 does about once in a thousand),
    and an error relative to the cancelled result would then fail a correct kernel."""
    return {k: (v.abs() if k in ("u", "B", "C", "D") and v is not None else v) for k, v in args.items()}


def _assert_close(name, out, ref64, ref_low, dtype, tol, scale64, low_factor=3.0):
    """out against the fp64 reference, relative to the norm of `scale64` (the reference on _magnitudes)
    where that exceeds the reference's own."""
    assert not torch.isnan(out).any(), f"{name}: NaN (an element left unwritten?)"
    denominator = max(float(ref64.double().norm()), float(scale64.double().norm()), 1e-300)
    rel = lambda x: float((x.double() - ref64.double()).norm()) / denominator  # noqa: E731
    err = rel(out)
    assert err <= tol[dtype], f"{name}: relative error {err:.3e} > {tol[dtype]:.1e} ({dtype})"
    if dtype in HALF:
        ref_err = rel(ref_low)
        assert err <= low_factor * ref_err + 1e-5, \
            f"{name}: error {err:.3e} > {low_factor}x the low-precision reference's own {ref_err:.3e}"


def _run_forward(args, poison_memory):
    u = args["u"]
    poison_memory(u.device, u.nbytes)
    return r2lm_kernels.reverse_selective_scan(**args)


@pytest.mark.parametrize("segments,options", SEGMENTS_OPTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(check_device, scan_inputs, device, dtype, shape, segments, options, tol, cpu_kernel,
                 poison_memory):
    check_device(device, dtype)
    args = scan_inputs(*shape, dtype, device, options=options, segments=segments)
    out = _run_forward(args, poison_memory)
    assert out.shape == args["u"].shape and out.dtype == dtype and out.is_contiguous()
    ref64 = reference.reverse_selective_scan(**_f64(args))
    ref_low = reference.reverse_selective_scan(**args) if dtype in HALF else None
    scale64 = reference.reverse_selective_scan(**_f64(_magnitudes(args)))
    _assert_close("out", out, ref64, ref_low, dtype, tol, scale64)


def _grads_through_reference(args, dout):
    """Gradients of every floating input by autograd through the reference (in the inputs' precision)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    out = reference.reverse_selective_scan(**{**args, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return dict(zip(leaves.keys(), grads))


def _grads_through_op(args, dout, poison_memory):
    # detach() keeps a view's strides, so the kernel sees exactly the layout it was given.
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    poison_memory(args["u"].device, *(t.nbytes for t in leaves.values()))
    out = r2lm_kernels.reverse_selective_scan(**{**args, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return dict(zip(leaves.keys(), grads))


# Gradient tolerances: fp32 gradients are sums over many steps and channels; 2e-5 leaves room for that
# accumulation while still catching any wrong term (those show up at 1e-2 and above).
GRAD_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _check_gradients(args, dtype, poison_memory):
    """The op's gradients of every floating input against the fp64 (and low-precision) reference's."""
    dout = torch.randn(args["u"].shape, device=args["u"].device).to(dtype)
    got = _grads_through_op(args, dout, poison_memory)
    ref64 = _grads_through_reference(_f64(args), dout.double())
    ref_low = _grads_through_reference(args, dout) if dtype in HALF else None
    scale64 = _grads_through_reference(_f64(_magnitudes(args)), dout.double().abs())
    for name, g in got.items():
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        _assert_close(f"d{name}", g, ref64[name], ref_low[name] if ref_low else None, dtype, GRAD_TOL, scale64[name])


@pytest.mark.parametrize("options", ["all", "none"])
@pytest.mark.parametrize("segments", ["none", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(check_device, scan_inputs, device, dtype, shape, segments, options, vector_width,
                  poison_memory):
    check_device(device, dtype)
    _check_gradients(scan_inputs(*shape, dtype, device, options=options, segments=segments), dtype, poison_memory)


@pytest.mark.parametrize("d_state", [65, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_d_state_beyond_the_cuda_limit(scan_inputs, cuda_kernels, dtype, d_state, tol, cpu_kernel,
                                           poison_memory):
    """The CPU kernels take any d_state (CUDA stops at 64): forward and gradients against the reference."""
    if cuda_kernels:
        pytest.skip("the CUDA kernels stop at d_state 64 (test_large_d_state_rejected)")
    args = scan_inputs(2, 37, 19, d_state, dtype, "cpu")
    out = _run_forward(args, poison_memory)
    ref_low = reference.reverse_selective_scan(**args) if dtype in HALF else None
    _assert_close("out", out, reference.reverse_selective_scan(**_f64(args)), ref_low, dtype, tol,
                  reference.reverse_selective_scan(**_f64(_magnitudes(args))))
    _check_gradients(args, dtype, poison_memory)


@pytest.mark.parametrize("options", PARTIAL)
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_partial_options(check_device, scan_inputs, device, dtype, shape, options, vector_width,
                                  poison_memory):
    """test_backward's check with the partial sets of optional arguments, on two of the small shapes (d_state
    16 and 7, several channel blocks) with random segments: they add per-token terms only, cheap to cover."""
    check_device(device, dtype)
    _check_gradients(scan_inputs(*shape, dtype, device, options=options, segments="random"), dtype,
                     poison_memory)


@pytest.mark.parametrize("regime", ["softplus_identity", "softplus_underflow", "large_gate", "tiny_gate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softplus_and_gate_at_extremes(scan_inputs, device, dtype, regime, tol, cpu_kernel, poison_memory):
    """Steps and gates where the fp32 math of softplus and sigmoid overflows or loses everything unless written
    as the reference is: delta + delta_bias past softplus's threshold of 20 (softplus(x) = x, derivative 1), up
    to 100 where e^x overflows; far below 0 (softplus(x) = log1p(e^x) ~ e^x, which log(1 + e^x) rounds to 0;
    no D or z, so the output is made of those steps alone); gates z of 90-100 (e^z overflows); gates of
    -100 to -90 (the output ~1e-40: finite, no relative error)."""
    options = "softplus" if regime == "softplus_underflow" else "all"
    args = scan_inputs(2, 40, 20, 16, dtype, device, options=options)
    uniform = lambda low, high: torch.empty(args["u"].shape, device=device).uniform_(low, high)  # noqa: E731
    if regime == "softplus_identity":
        args["delta"] = torch.where(torch.rand_like(args["u"], dtype=torch.float32) < 0.2, uniform(90, 100),
                                    uniform(20.5, 30)).to(dtype)
        args["delta_bias"] = torch.empty(20, device=device).uniform_(-0.2, 0.2)
    elif regime == "softplus_underflow":
        args["delta"] = uniform(-36, -20).to(dtype)
    else:
        args["z"] = (uniform(90, 100) if regime == "large_gate" else uniform(-100, -90)).to(dtype)
    out = _run_forward(args, poison_memory)
    if regime == "tiny_gate":
        assert torch.isfinite(out).all() and out.abs().max() < 1e-30
        dout = torch.randn(args["u"].shape, device=device).to(dtype)
        assert all(torch.isfinite(g).all() for g in _grads_through_op(args, dout, poison_memory).values())
        return
    ref64 = reference.reverse_selective_scan(**_f64(args))
    ref_low = reference.reverse_selective_scan(**args) if dtype in HALF else None
    _assert_close("out", out, ref64, ref_low, dtype, tol, reference.reverse_selective_scan(**_f64(_magnitudes(args))))
    _check_gradients(args, dtype, poison_memory)


def test_absent_optional_grads_are_empty(scan_inputs, device):
    args = scan_inputs(2, 9, 5, 3, torch.float32, device, options="none")
    dout = torch.randn_like(args["u"])
    grads = torch.ops.r2lm.reverse_selective_scan_backward(
        dout, args["u"], args["delta"], args["A"], args["B"], args["C"], None, None, None, False, None)
    assert [tuple(g.shape) for g in grads[5:]] == [(0,), (0,), (0,)]


def _forward_scan_composition(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx):
    """An independent formulation: flip the sequence, run an ordinary (left-to-right) selective scan
    whose state resets where a segment starts, flip back. fp64 torch ops."""
    flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
    u, delta, B, C, z, seq_idx = map(flip, (u, delta, B, C, z, seq_idx))
    dt = delta + (delta_bias if delta_bias is not None else 0)
    dt = F.softplus(dt) if delta_softplus else dt
    decay = torch.exp(dt[..., None] * A)                                  # (batch, seqlen, dim, d_state)
    drive = (dt * u)[..., None] * B[:, :, None, :]
    if seq_idx is not None:
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        decay = decay.masked_fill(starts[..., None, None], 0.0)
    h = torch.zeros_like(drive[:, 0])
    ys = []
    for t in range(u.shape[1]):
        h = decay[:, t] * h + drive[:, t]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y.flip(1)


def test_matches_forward_scan_composition(scan_inputs, device, rel_err):
    args = scan_inputs(2, 45, 21, 8, torch.float32, device, segments="blocks")
    out = r2lm_kernels.reverse_selective_scan(**args)
    expected = _forward_scan_composition(**_f64(args))
    assert rel_err(out, expected) <= 1e-5


# Views with unit stride in the last dim: slices of wider tensors (each padded by its own amount, so that a
# kernel taking one tensor's strides for another's shows), sequence-major storage, A sliced from a wider
# parameter. None of them may be copied behind the caller's back.
PADS = {"u": 5, "delta": 3, "A": 5, "B": 7, "C": 9, "z": 11}


def _views(args, kind):
    def widen(t, pad):  # the same values inside a wider tensor
        if t is None:
            return None
        wide = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]

    def seq_major(t):
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    out = dict(args)
    for name in ("u", "delta", "B", "C", "z"):
        if args[name] is not None:
            out[name] = widen(args[name], PADS[name]) if kind == "sliced" else seq_major(args[name])
    out["A"] = widen(args["A"], PADS["A"])
    if args["seq_idx"] is not None:
        wide = torch.zeros(args["seq_idx"].shape[0], args["seq_idx"].shape[1] + 3, dtype=torch.int32,
                           device=args["seq_idx"].device)
        wide[:, : args["seq_idx"].shape[1]] = args["seq_idx"]
        out["seq_idx"] = wide[:, : args["seq_idx"].shape[1]]
    return out


def _copies_made(fn):
    """Names of the copy ops the profiler saw while running fn."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages() if e.key in ("aten::contiguous", "aten::clone", "aten::copy_")]


@pytest.mark.parametrize("kind", ["sliced", "seq_major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views(check_device, scan_inputs, device, dtype, kind, tol, poison_memory):
    check_device(device, dtype)
    args = scan_inputs(2, 37, 19, 16, dtype, device)
    views = _views(args, kind)
    assert not views["u"].is_contiguous() and not views["A"].is_contiguous()
    out = _run_forward(views, poison_memory)
    ref64 = reference.reverse_selective_scan(**_f64(args))
    ref_low = reference.reverse_selective_scan(**args) if dtype in HALF else None
    scale64 = reference.reverse_selective_scan(**_f64(_magnitudes(args)))
    _assert_close("out", out, ref64, ref_low, dtype, tol, scale64)
    assert _copies_made(lambda: torch.ops.r2lm.reverse_selective_scan(*views.values())) == []

    dout = torch.randn(args["u"].shape, device=device).to(dtype)
    got = _grads_through_op(views, dout, poison_memory)
    want = _grads_through_op(args, dout, poison_memory)
    for name in got:
        assert torch.equal(got[name], want[name]), f"d{name} differs between a view and a contiguous copy"
    dargs = [views[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "seq_idx")]
    assert _copies_made(lambda: torch.ops.r2lm.reverse_selective_scan_backward(dout, *dargs)) == []


def test_expanded_grad_output(scan_inputs, device, rel_err):
    """out.sum() hands the backward an expanded (stride 0) gradient."""
    args = scan_inputs(2, 20, 9, 4, torch.float32, device)
    leaves = {k: args[k].clone().requires_grad_() for k in ("u", "A")}
    r2lm_kernels.reverse_selective_scan(**{**args, **leaves}).sum().backward()
    want = _grads_through_reference(_f64(args), torch.ones(args["u"].shape, dtype=torch.float64, device=device))
    for k in leaves:
        assert rel_err(leaves[k].grad, want[k]) <= 2e-5


@pytest.mark.parametrize("d_state", [16, 64])
def test_long_sequence(scan_inputs, device, d_state, rel_err, cpu_kernel, poison_memory):
    seqlen = 16384 + 3 if device == "cuda" else 2048 + 3
    args = scan_inputs(1, seqlen, 12, d_state, torch.float32, device, segments="blocks")
    out = _run_forward(args, poison_memory)
    ref64 = reference.reverse_selective_scan(**_f64(args))
    assert rel_err(out, ref64) <= 1e-5
    no_segments = dict(args, seq_idx=None)
    out = _run_forward(no_segments, poison_memory)
    ref64 = reference.reverse_selective_scan(**_f64(no_segments))
    assert rel_err(out, ref64) <= 1e-5


@pytest.mark.parametrize("decay", ["underflow", "growth"])
def test_extreme_decays(scan_inputs, device, decay, rel_err, cpu_kernel, poison_memory):
    """Decay arguments past the fast exponential's range: dt * A far below -126 / ln 2 (decays that
    underflow, the clamped path), and positive A entries (growth, the general path)."""
    args = scan_inputs(2, 67, 40, 16, torch.float32, device)
    A = args["A"]
    if decay == "underflow":
        A[:, ::3] *= 200.0
    else:
        A[::2, 1] = torch.rand(A.shape[0] // 2 + A.shape[0] % 2, device=device) * 0.3
    out = _run_forward(args, poison_memory)
    ref64 = reference.reverse_selective_scan(**_f64(args))
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64) <= 1e-5


@pytest.mark.parametrize("width", ["widest", "32", "16"], ids=lambda w: f"vec-{w}")
@pytest.mark.parametrize("segments", ["none", "random"])
@pytest.mark.parametrize("options", ["all", "none"])
def test_gradcheck(scan_inputs, options, segments, width, cap_vector_width):
    cap_vector_width(width, "cpu")
    args = scan_inputs(2, 11, 5, 3, torch.float64, "cpu", options=options, segments=segments)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for k in names:
        args[k] = args[k].requires_grad_()
    ordered = list(args.values())
    assert torch.autograd.gradcheck(lambda *a: r2lm_kernels.reverse_selective_scan(*a), ordered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_deterministic(scan_inputs, device, dtype, vector_width, repeated_calls):
    """Bitwise-equal gradients run after run (and on the CPU whatever the thread count)."""
    args = scan_inputs(3, 200, 300, 16, dtype, device)
    dout = torch.randn(args["u"].shape, device=device).to(dtype)
    call = lambda: torch.ops.r2lm.reverse_selective_scan_backward(dout, *args.values())  # noqa: E731
    first = call()
    for run in repeated_calls(call, device):
        for name, a, b in zip(GRAD_NAMES, first, run):
            assert torch.equal(a, b), f"d{name} differs between runs"


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("options", ["all", "none"])
def test_opcheck(scan_inputs, device, options, requires_grad):
    args = scan_inputs(2, 13, 10, 4, torch.float32, device, options=options)
    if requires_grad:
        for k, v in args.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.requires_grad_()
    torch.library.opcheck(torch.ops.r2lm.reverse_selective_scan.default, tuple(args.values()))
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    dout = torch.randn_like(plain["u"])
    torch.library.opcheck(torch.ops.r2lm.reverse_selective_scan_backward.default, (dout, *plain.values()))


def test_torch_compile_fullgraph(scan_inputs, device, rel_err):
    args = scan_inputs(2, 19, 11, 4, torch.float32, device)
    leaves = {k: args[k].clone().requires_grad_() for k in ("u", "delta", "A")}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(u, delta, A):
        return r2lm_kernels.reverse_selective_scan(u, delta, A, args["B"], args["C"], args["D"], args["z"],
                                                   args["delta_bias"], True, args["seq_idx"]) * 2

    out = f(**leaves)
    assert rel_err(out.detach(), 2 * reference.reverse_selective_scan(**_f64(args))) <= 1e-5
    out.sum().backward()
    want = _grads_through_reference(_f64(args), 2 * torch.ones(out.shape, dtype=torch.float64, device=device))
    for k, leaf in leaves.items():
        assert rel_err(leaf.grad, want[k]) <= 2e-5


def test_empty_sequence(scan_inputs, device):
    args = scan_inputs(2, 0, 5, 3, torch.float32, device)
    assert r2lm_kernels.reverse_selective_scan(**args).shape == (2, 0, 5)
    grads = torch.ops.r2lm.reverse_selective_scan_backward(torch.empty(2, 0, 5, device=device), *args.values())
    assert grads[2].shape == (5, 3) and not grads[2].any() and not grads[5].any() and not grads[7].any()


@pytest.mark.parametrize("batch,seqlen", [(0, 5), (2, 0)])
def test_autograd_through_an_empty_scan(scan_inputs, device, batch, seqlen):
    """Autograd hands an empty output's gradient over with all-zero strides: the backward takes it."""
    args = scan_inputs(batch, seqlen, 5, 3, torch.float32, device)
    args["B"].requires_grad_(True)
    args["A"].requires_grad_(True)
    r2lm_kernels.reverse_selective_scan(**args).sum().backward()
    assert args["B"].grad.shape == args["B"].shape and not args["A"].grad.any()
    assert reference.reverse_selective_scan(**args).shape == (batch, seqlen, 5)


def test_double_backward_raises(scan_inputs):
    """The backward has no derivative of its own: a second-order gradient raises, not silently missing."""
    args = scan_inputs(1, 6, 4, 3, torch.float32, "cpu")
    args["u"].requires_grad_(True)
    args["B"].requires_grad_(True)
    (du,) = torch.autograd.grad(r2lm_kernels.reverse_selective_scan(**args).sum(), args["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for r2lm::reverse_selective_scan_backward is not implemented"):
        (du ** 2).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d_state", [4, 16])  # 16: the model's, with kernels of its own
def test_segments_are_runs_of_equal_seq_idx(scan_inputs, device, cpu_kernel, d_state, dtype):
    """A seq_idx value that comes back after another one starts a new segment (DESIGN 3.1: h = 0 wherever
    seq_idx[t] != seq_idx[t + 1], in either direction): labels drawn from two values give exactly the result
    of their run numbers, forward and backward."""
    args = scan_inputs(3, 45, 20, d_state, dtype, device)  # 20 channels: a whole CPU block of 16 and a tail
    labels = torch.randint(0, 2, (3, 45), dtype=torch.int32, device=device)
    changes = torch.cat([torch.zeros(3, 1, dtype=torch.int32, device=device),
                         (labels[:, 1:] != labels[:, :-1]).int()], 1)
    runs = changes.cumsum(1, dtype=torch.int32)
    dout = torch.randn(3, 45, 20, device=device).to(dtype)
    for scan in (r2lm_kernels.reverse_selective_scan, reference.reverse_selective_scan):
        assert torch.equal(scan(**{**args, "seq_idx": labels}), scan(**{**args, "seq_idx": runs})), scan
    values = [v for k, v in args.items() if k != "seq_idx"]
    got = torch.ops.r2lm.reverse_selective_scan_backward(dout, *values, labels)
    want = torch.ops.r2lm.reverse_selective_scan_backward(dout, *values, runs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_input_stays_in_its_segment(scan_inputs, device, cpu_kernel, bad):
    """A NaN or inf in one position's u (the forward's state) and in another's output gradient (the adjoint):
    non-finite outputs and gradients exactly where the reference (fp64) has them, the rest equal to it. No
    state or adjoint carried across a segment's start (nor across the kernels' chunk, warp and channel-block
    bounds) may bring them elsewhere, not even multiplied by 0."""
    batch, seqlen, dim = 2, 150, 20
    args = scan_inputs(batch, seqlen, dim, 16, torch.float32, device)
    args["seq_idx"] = (torch.arange(seqlen, device=device) // 37).int().expand(batch, -1).contiguous()
    args["u"][0, 60, 3] = bad                                    # in segment 1 (positions 37-73)
    dout = torch.randn(batch, seqlen, dim, device=device)
    dout[1, 100, 7] = bad                                        # in segment 2 (positions 74-110)
    values = [v for k, v in args.items() if k != "seq_idx"]
    got = [r2lm_kernels.reverse_selective_scan(**args),
           *torch.ops.r2lm.reverse_selective_scan_backward(dout, *values, args["seq_idx"])]
    args64 = {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in _f64(args).items()}
    out = reference.reverse_selective_scan(**args64)
    out.backward(dout.double())
    want = [out.detach()] + [args64[name].grad for name in GRAD_NAMES]
    for name, g, w in zip(["out"] + GRAD_NAMES, got, want):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite at {(~torch.isfinite(g)).nonzero()}"
        assert float((g[finite].double() - w[finite]).norm() / w[finite].norm()) < 1e-5, name
    assert not torch.isfinite(got[0][0, 37:61, 3]).any() and torch.isfinite(got[0][:, :37]).all()
    assert not torch.isfinite(got[1][1, 100:111, 7]).any() and torch.isfinite(got[1][1, 111:]).all()  # du


def test_no_channels_gives_zero_gradients(scan_inputs, device):
    """dim 0 with tokens: B and C still hold elements, and nothing depends on them."""
    args = scan_inputs(2, 7, 0, 3, torch.float32, device)
    assert r2lm_kernels.reverse_selective_scan(**args).shape == (2, 7, 0)
    grads = torch.ops.r2lm.reverse_selective_scan_backward(torch.empty(2, 7, 0, device=device), *args.values())
    assert grads[3].shape == (2, 7, 3) and grads[4].shape == (2, 7, 3)
    assert not grads[3].any() and not grads[4].any()


def _bad_cases(scan_inputs, device):
    """(argument name, replacement value) pairs that the op must reject naming that argument."""
    a = scan_inputs(2, 9, 6, 4, torch.float32, device)
    act = a["u"]
    cases = [
        ("u", act[:, :, None]),                                   # 4-D
        ("u", act.to(torch.int32)),
        ("u", torch.randn(2, 9, 12, device=device)[..., ::2]),    # non-unit last stride
        ("delta", act[:, :8]),
        ("delta", act.to(torch.float16)),
        ("delta", torch.randn(2, 9, 12, device=device)[..., ::2]),
        ("A", a["A"][:5]),
        ("A", a["A"].double()),
        ("A", torch.randn(4, 6, device=device).t()),
        ("A", a["A"][:, :0]),                                     # d_state 0
        ("B", a["B"][:, :, :3]),
        ("B", a["B"].half()),
        ("B", torch.randn(2, 9, 8, device=device)[..., ::2]),
        ("C", a["C"][:1]),
        ("C", a["C"].double()),
        ("D", a["D"][:5]),
        ("D", a["D"].half()),
        ("z", a["z"][:, :, :5]),
        ("z", a["z"].bfloat16()),
        ("delta_bias", a["delta_bias"][None]),
        ("delta_bias", a["delta_bias"].to(torch.int64)),
        ("seq_idx", a["seq_idx"][:, :8]),
        ("seq_idx", a["seq_idx"].long()),
        ("seq_idx", torch.zeros(2, 18, dtype=torch.int32, device=device)[:, ::2]),
    ]
    if device == "cuda":
        cases += [
            ("u", act.double()),                                  # fp64 is CPU-only
            ("A", torch.randn(6, 65, device=device)),             # d_state > 64
        ]
        for name in ("delta", "A", "B", "C", "D", "z", "delta_bias", "seq_idx"):
            cases.append((name, a[name].cpu()))
    return a, cases


def test_bad_inputs(scan_inputs, device):
    base, cases = _bad_cases(scan_inputs, device)
    for name, value in cases:
        args = dict(base, **{name: value})
        if name == "u" and value.dtype == torch.float64:
            args.update(_f64(base), u=value)
        if name == "A" and value.shape[1] != base["A"].shape[1] and value.shape[1] > 0:
            args.update(B=torch.randn(2, 9, value.shape[1], device=device),
                        C=torch.randn(2, 9, value.shape[1], device=device))
        with pytest.raises(RuntimeError, match=rf"reverse_selective_scan: {name} (must|has)"):
            torch.ops.r2lm.reverse_selective_scan(*args.values())


def test_bad_grad_output(scan_inputs, device):
    args = scan_inputs(2, 9, 6, 4, torch.float32, device)
    for dout in (torch.randn(2, 9, 5, device=device), torch.randn(2, 9, 6, device=device).half(),
                 torch.randn(2, 9, 12, device=device)[..., ::2]):
        with pytest.raises(RuntimeError, match="reverse_selective_scan_backward: dout must"):
            torch.ops.r2lm.reverse_selective_scan_backward(dout, *args.values())
