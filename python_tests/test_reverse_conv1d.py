"""reverse_conv1d (DESIGN.md 3.2) against r2lm_kernels.reference on every available device.

Inputs are fresh random tensors every run (conftest's per-test seed is printed on failure). Outputs the
op allocates are poisoned by filling and freeing same-sized NaN buffers right before the call, so an
element the kernel fails to write shows up as NaN (reliable on CUDA's caching allocator, best effort on
CPU). Tolerances: fp64 / fp32 from the conftest table against an fp64 reference; bf16 / fp16 also by
the reference-relative rule (the kernel's error against fp64 at most 2x + eps the error of the
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

# (batch, seqlen, dim, width): odd sizes, seqlen 1, dims not a multiple of 8, lengths that are not a
# multiple of the CUDA kernels' token runs (32 / 64 tokens) and blocks (128 / 256 tokens), channel
# counts that span several CUDA channel blocks (512 bf16 / 256 fp32 channels); every width 1-8.
SHAPES = [
    (1, 1, 5, 7),
    (2, 17, 24, 6),
    (3, 33, 70, 3),
    (2, 129, 64, 1),
    (1, 300, 37, 2),
    (2, 257, 1040, 4),
    (2, 65, 40, 5),
    (1, 200, 16, 8),
]


def _inputs(batch, seqlen, dim, width, dtype, weight_dtype, device, bias=True):
    x = torch.randn(batch, seqlen, dim, device=device).to(dtype)
    weight = (torch.randn(dim, width, device=device) / width ** 0.5).to(weight_dtype)
    b = torch.randn(dim, device=device).to(weight_dtype) if bias else None
    return x, weight, b


def _grad_tol(leaf_dtype, batch, seqlen, tol):
    """Tolerance of a parameter gradient: its own dtype's; in fp32, grown with the batch * seqlen terms that
    each element sums (the weight and bias gradients are fp32 whenever those parameters are, whatever x's
    dtype)."""
    if leaf_dtype == torch.float32:
        return 1e-5 * max(1.0, (batch * seqlen / 256) ** 0.5)
    return tol[leaf_dtype]


def _f64(t):
    return None if t is None else t.detach().double()


def _assert_close(name, out, ref64, ref_low, dtype, tol, rel_err):
    """out vs the fp64 reference; for half precision also against the low-precision reference's error."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element left unwritten?)"
    err = rel_err(out, ref64)
    assert err <= tol[dtype], f"{name}: relative error {err:.3e} > {tol[dtype]:.1e} ({dtype})"
    if dtype in HALF:
        ref_err = rel_err(ref_low, ref64)
        assert err <= 2 * ref_err + 1e-6, f"{name}: error {err:.3e} > 2x the reference's own {ref_err:.3e}"


# (segments, mode): mode "plain" (no bias, no SiLU) and "bias+silu" (the model's use) with each segments kind;
# "bias" and "silu", each without the other, with random segments only (they change the per-token epilogue,
# not which taps a window reads).
SEGMENTS_MODES = [(s, m) for s in ("none", "random", "blocks") for m in ("plain", "bias+silu")] + \
    [("random", "bias"), ("random", "silu")]


def _grid(test):
    """The forward / backward grid: dtype x weight dtype x shape x (segments, mode)."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
    test = pytest.mark.parametrize("weight_dtype", ["same", "fp32"])(test)
    test = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))(test)
    return pytest.mark.parametrize("segments,mode", SEGMENTS_MODES)(test)


def _grid_case(device, dtype, weight_dtype, shape, segments, mode, check_device, make_segments):
    """Skips what the device lacks; returns the case's weight dtype, inputs (a bias only in modes "bias" and
    "bias+silu"), seq_idx and whether SiLU is on (modes "silu" and "bias+silu")."""
    check_device(device, dtype)
    batch, seqlen, dim, width = shape
    wdt = dtype if weight_dtype == "same" else torch.float32
    x, weight, bias = _inputs(batch, seqlen, dim, width, dtype, wdt, device, bias="bias" in mode.split("+"))
    seq_idx = make_segments(batch, seqlen, device, segments)
    return wdt, x, weight, bias, seq_idx, "silu" in mode.split("+")


@_grid
def test_forward(device, dtype, weight_dtype, shape, segments, mode, tol, rel_err, check_device, make_segments,
                 vector_width, poison_memory):
    batch, seqlen, dim, width = shape
    _, x, weight, bias, seq_idx, silu = _grid_case(device, dtype, weight_dtype, shape, segments, mode, check_device,
                                                   make_segments)
    poison_memory(device, x.nbytes)
    y = r2lm_kernels.reverse_conv1d(x, weight, bias, seq_idx, silu)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    ref64 = reference.reverse_conv1d(_f64(x), _f64(weight), _f64(bias), seq_idx, silu)
    ref_low = reference.reverse_conv1d(x, weight, bias, seq_idx, silu)
    _assert_close("y", y, ref64, ref_low, dtype, tol, rel_err)


@_grid
def test_backward(device, dtype, weight_dtype, shape, segments, mode, tol, rel_err, check_device, make_segments,
                  vector_width, poison_memory):
    batch, seqlen, dim, width = shape
    wdt, x, weight, bias, seq_idx, silu = _grid_case(device, dtype, weight_dtype, shape, segments, mode,
                                                     check_device, make_segments)
    dy = torch.randn(batch, seqlen, dim, device=device).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = r2lm_kernels.reverse_conv1d(leaves[0], leaves[1], leaves[2] if bias is not None else None, seq_idx, silu)
    poison_memory(device, *(t.nbytes for t in leaves))
    grads = torch.autograd.grad(out, leaves, dy)

    leaves64 = [_f64(t).requires_grad_() for t in leaves]
    out64 = reference.reverse_conv1d(leaves64[0], leaves64[1], leaves64[2] if bias is not None else None,
                                     seq_idx, silu)
    grads64 = torch.autograd.grad(out64, leaves64, dy.double())
    leaves_low = [t.detach().requires_grad_() for t in leaves]
    out_low = reference.reverse_conv1d(leaves_low[0], leaves_low[1], leaves_low[2] if bias is not None else None,
                                       seq_idx, silu)
    grads_low = torch.autograd.grad(out_low, leaves_low, dy)
    for name, g, g64, g_low, leaf in zip(["dx", "dweight", "dbias"], grads, grads64, grads_low, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        table = dict(tol)
        if name != "dx":
            table[torch.float32] = _grad_tol(torch.float32, batch, seqlen, tol)
        _assert_close(name, g, g64, g_low, leaf.dtype if name != "dx" else dtype, table, rel_err)


@pytest.mark.parametrize("width", [3, 4])
def test_segments_are_runs_of_equal_seq_idx(device, width, vector_width):
    """A seq_idx value that comes back after another one starts a new segment, as in the scan: labels
    drawn from two values give exactly the result of their run numbers (forward and backward)."""
    batch, seqlen, dim = 3, 37, 20
    x, dy = torch.randn(batch, seqlen, dim, device=device), torch.randn(batch, seqlen, dim, device=device)
    weight, bias = torch.randn(dim, width, device=device), torch.randn(dim, device=device)
    labels = torch.randint(0, 2, (batch, seqlen), dtype=torch.int32, device=device)
    labels[:, 5:8] = torch.tensor([0, 1, 0], dtype=torch.int32)   # position 7 is in the window of 5, past a 1
    changes = torch.cat([torch.zeros(batch, 1, dtype=torch.int32, device=device),
                         (labels[:, 1:] != labels[:, :-1]).int()], 1)
    runs = changes.cumsum(1, dtype=torch.int32)
    for conv in (r2lm_kernels.reverse_conv1d, reference.reverse_conv1d):
        assert torch.equal(conv(x, weight, bias, labels, True), conv(x, weight, bias, runs, True)), conv
    got = torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, labels, True)
    want = torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, runs, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_input_stays_in_its_segment(device, bad, segments, vector_width):
    """A NaN or inf in x at a segment's first position, which the windows of the previous segment's last
    positions would reach (also at the CUDA kernels' run and block bounds), and in dy at a segment's and at the
    sequence's second-last position, whose windows reach past their ends: non-finite outputs and gradients
    exactly where the reference (fp64) has them, the rest equal to it."""
    batch, seqlen, dim, width = 2, 300, 40, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, torch.float32, torch.float32, device)
    seq_idx = (torch.arange(seqlen, device=device) // 37).int().expand(batch, -1).contiguous() if segments else None
    x[0, 148, 5] = bad                                           # segment 4 starts at 148
    x[1, 259, 2] = bad                                           # segment 7 at 259, past a 256-token block
    dy = torch.randn(batch, seqlen, dim, device=device)
    dy[1, 72, 9] = bad                                           # segment 1 ends at 73
    dy[0, 298, 11] = bad
    got = [r2lm_kernels.reverse_conv1d(x, weight, bias, seq_idx, True),
           *torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, seq_idx, True)]
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = reference.reverse_conv1d(*leaves, seq_idx, True)
    out.backward(dy.double())
    want = [out.detach()] + [leaf.grad for leaf in leaves]
    for name, g, w in zip(["y", "dx", "dweight", "dbias"], got, want):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite at {(~torch.isfinite(g)).nonzero()}"
        assert float((g[finite].double() - w[finite]).norm() / w[finite].norm()) < 1e-5, name
    assert not torch.isfinite(got[2][11, :2]).any() and torch.isfinite(got[2][11, 2:]).all()  # dweight
    if segments:
        assert torch.isfinite(got[0][0, :148]).all() and not torch.isfinite(got[0][0, 148, 5])
        assert not torch.isfinite(got[1][1, 72:74, 9]).any() and torch.isfinite(got[1][1, 74:259]).all()  # dx
        assert not torch.isfinite(got[2][9, :2]).any() and torch.isfinite(got[2][9, 2:]).all()


@pytest.mark.parametrize("weight_view", ["transposed", "every_other_tap"])
@pytest.mark.parametrize("view", ["slice", "slice_misaligned", "transposed", "odd_batch_stride"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views(check_device, device, dtype, view, weight_view, tol, rel_err, make_segments):
    """Strided views with unit last-dim stride are taken as they are (no copies) and give the same result;
    a weight with gaps between its elements gets a dense gradient."""
    check_device(device, dtype)
    batch, seqlen, dim, width = 3, 77, 48, 4
    if view == "transposed":
        x = torch.randn(seqlen, batch, dim, device=device).to(dtype).transpose(0, 1)
        dy = torch.randn(seqlen, batch, dim, device=device).to(dtype).transpose(0, 1)
    elif view == "odd_batch_stride":  # aligned start and token stride; every sequence after the first is not
        x, dy = (torch.randn(batch * (seqlen * dim + 1), device=device).to(dtype)
                 .as_strided((batch, seqlen, dim), (seqlen * dim + 1, dim, 1)) for _ in range(2))
    else:
        offset = 8 if view == "slice" else 1  # 1: not 16-byte aligned, takes the scalar CUDA path
        x = torch.randn(batch, seqlen, dim + 16, device=device).to(dtype)[..., offset:offset + dim]
        dy = torch.randn(batch, seqlen, dim + 16, device=device).to(dtype)[..., offset:offset + dim]
    assert not x.is_contiguous() and x.stride(-1) == 1
    if weight_view == "transposed":
        weight = torch.randn(width + 3, dim, device=device).t()[:, 1:1 + width]  # strided in both dims
    else:
        weight = torch.randn(dim, 2 * width, device=device)[:, ::2]
    bias = torch.randn(2 * dim, device=device)[::2]
    seq_idx = make_segments(batch, 2 * seqlen, device, "random")[:, ::2]
    y = r2lm_kernels.reverse_conv1d(x, weight, bias, seq_idx, True)
    ref = reference.reverse_conv1d(x.double(), weight.double(), bias.double(), seq_idx, True)
    assert rel_err(y, ref) <= tol[dtype]
    dx, dweight, dbias = torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, seq_idx, True)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    grads = torch.autograd.grad(reference.reverse_conv1d(*leaves, seq_idx, True), leaves, dy.double())
    assert rel_err(dx, grads[0]) <= max(tol[dtype], 1e-5)
    for name, got, want in zip(("dweight", "dbias"), (dweight, dbias), grads[1:]):   # fp32 gradients
        err = rel_err(got, want)
        assert err <= _grad_tol(got.dtype, batch, seqlen, tol), f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight_dtype,bias_dtype", [("x", "fp32"), ("fp32", "x")])
def test_bias_dtype_apart_from_the_weight_dtype(device, dtype, weight_dtype, bias_dtype, tol, rel_err, vector_width,
                                               make_segments):
    """weight and bias each take x's dtype or fp32, independently: each is read, and its gradient written, in
    its own dtype."""
    batch, seqlen, dim, width = 2, 45, 40, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, dtype, torch.float32, device)
    weight = weight.to(dtype if weight_dtype == "x" else torch.float32)
    bias = bias.to(dtype if bias_dtype == "x" else torch.float32)
    (y, y64), grads, grads64 = _silu_conv_and_grads(x, weight, bias, make_segments(batch, seqlen, device, "random"))
    assert rel_err(y, y64) <= tol[dtype]
    assert rel_err(grads[0], grads64[0]) <= tol[dtype]
    for name, g, g64, leaf in zip(("dweight", "dbias"), grads[1:], grads64[1:], (weight, bias)):
        assert g.dtype == leaf.dtype
        err = rel_err(g, g64)
        assert err <= _grad_tol(leaf.dtype, batch, seqlen, tol), f"{name} ({leaf.dtype}): relative error {err:.3e}"


def _silu_conv_and_grads(x, weight, bias, seq_idx):
    """(y, fp64 reference y), the gradients of x, weight, bias for a random dy, and the reference's in fp64."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = r2lm_kernels.reverse_conv1d(*leaves, seq_idx, True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference.reverse_conv1d(*leaves64, seq_idx, True)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return (y.detach(), y64.detach()), grads, grads64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequence(device, dtype, tol, rel_err, make_segments):
    """seqlen >= 16k with block segments and random segments in one batch."""
    batch, seqlen, dim, width = 2, 16411, 24, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, dtype, torch.float32, device)
    seq_idx = torch.cat([make_segments(1, seqlen, device, "blocks"), make_segments(1, seqlen, device, "random")])
    (y, y64), grads, grads64 = _silu_conv_and_grads(x, weight, bias, seq_idx)
    assert rel_err(y, y64) <= tol[dtype]
    assert rel_err(grads[0], grads64[0]) <= max(tol[dtype], 1e-4)
    for name, g, g64 in zip(("dweight", "dbias"), grads[1:], grads64[1:]):           # fp32 gradients
        err = rel_err(g, g64)
        assert err <= _grad_tol(g.dtype, batch, seqlen, tol), f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_outputs_round_half_to_even(device, dtype, vector_width):
    """y = x + bias with the bias half a unit in the last place of x: every output lies halfway between two
    values of x's dtype and must round to the even one, as torch does (37 channels: whole vectors and tails)."""
    batch, seqlen, dim = 2, 19, 37
    ulp = torch.finfo(dtype).eps                                         # spacing of the values in [1, 2)
    sign = torch.where(torch.rand(dim, device=device) < 0.5, -1.0, 1.0)
    x = ((1 + torch.randint(0, int(1 / ulp), (batch, seqlen, dim), device=device) * ulp) * sign).to(dtype)
    weight, bias = torch.ones(dim, 1, device=device), sign * ulp / 2
    y = r2lm_kernels.reverse_conv1d(x, weight, bias)
    assert torch.equal(y, (x.float() + bias).to(dtype))


def test_matches_conv1d_composition(device, rel_err):
    """Independent formulation (no segments): flip, causal F.conv1d with groups=dim, flip back."""
    batch, seqlen, dim, width = 2, 93, 40, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, torch.float64 if device == "cpu" else torch.float32,
                              torch.float64 if device == "cpu" else torch.float32, device)
    flipped = x.flip(1).transpose(1, 2)                                   # (batch, dim, seqlen), reversed time
    # Output t' of a causal conv over the reversed sequence sums x[t + k] * weight[k]: taps flipped.
    causal = F.conv1d(F.pad(flipped, (width - 1, 0)), weight.flip(1).unsqueeze(1), bias, groups=dim)
    expected = causal.transpose(1, 2).flip(1)
    got = r2lm_kernels.reverse_conv1d(x, weight, bias)
    assert rel_err(got, expected) <= (1e-12 if x.dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("width", ["widest", "32", "16"], ids=lambda w: f"vec-{w}")
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("segments", ["none", "random"])
def test_gradcheck(silu, segments, width, make_segments, cap_vector_width):
    cap_vector_width(width, "cpu")
    batch, seqlen, dim, width = 2, 13, 5, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, torch.float64, torch.float64, "cpu")
    seq_idx = make_segments(batch, seqlen, "cpu", segments)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda a, w, b: r2lm_kernels.reverse_conv1d(a, w, b, seq_idx, silu), leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_deterministic(device, dtype, make_segments, repeated_calls):
    """dweight / dbias reduce over batch * seqlen in a fixed order: bitwise equal run after run (and on the
    CPU whatever the thread count)."""
    batch, seqlen, dim, width = 4, 3001, 520, 4
    x, weight, bias = _inputs(batch, seqlen, dim, width, dtype, torch.float32, device)
    seq_idx = make_segments(batch, seqlen, device, "random")
    dy = torch.randn_like(x)
    call = lambda: torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, seq_idx, True)  # noqa: E731
    first = call()
    for again in repeated_calls(call, device):
        for name, a, b in zip(("dx", "dweight", "dbias"), first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("case", ["plain", "bias+seq+silu", "fp32-weight"])
def test_opcheck(device, case, requires_grad, make_segments):
    dtype = torch.bfloat16 if case == "fp32-weight" else torch.float32
    x, weight, bias = _inputs(2, 19, 12, 4, dtype, torch.float32, device, bias=case != "plain")
    seq_idx = make_segments(2, 19, device, "random") if case == "bias+seq+silu" else None
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.r2lm.reverse_conv1d.default, (x, weight, bias, seq_idx, case == "bias+seq+silu"))
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.r2lm.reverse_conv1d_backward.default,
                          (dy, x.detach(), weight.detach(), None if bias is None else bias.detach(), seq_idx, True))


def test_torch_compile_fullgraph(device, rel_err, make_segments):
    x, weight, bias = _inputs(2, 21, 16, 4, torch.float32, torch.float32, device)
    seq_idx = make_segments(2, 21, device, "random")

    def block(x, weight, bias):
        return r2lm_kernels.reverse_conv1d(x * 2, weight, bias, seq_idx, silu=True).sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    want = block(*leaves)
    want_grads = torch.autograd.grad(want.sum(), leaves)
    assert rel_err(out.detach(), want.detach()) <= 1e-6
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-6


def test_expanded_grad_output(device, rel_err):
    """y.sum().backward() hands the op a stride-0 gradient; the autograd wrapper densifies it."""
    x, weight, bias = _inputs(2, 9, 6, 3, torch.float32, torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    r2lm_kernels.reverse_conv1d(*leaves).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    reference.reverse_conv1d(*leaves64).sum().backward()
    for a, b in zip(leaves, leaves64):
        assert rel_err(a.grad, b.grad) <= 1e-5


def _bad_cases(device):
    f32 = dict(device=device, dtype=torch.float32)
    x = torch.randn(2, 7, 6, **f32)
    w = torch.randn(6, 4, **f32)
    b = torch.randn(6, **f32)
    s = torch.zeros(2, 7, dtype=torch.int32, device=device)
    cases = [
        ("x must have shape", (x[0], w, b, s)),
        ("x must have dtype", (x.to(torch.int32), w, b, s)),
        ("x must have unit stride", (torch.randn(2, 7, 12, **f32)[..., ::2], w, b, s)),
        ("weight must have shape", (x, torch.randn(5, 4, **f32), b, s)),
        ("weight must have shape", (x, torch.randn(6, 4, 1, **f32), b, s)),
        ("weight width", (x, torch.randn(6, 0, **f32), b, s)),
        ("weight width", (x, torch.randn(6, 9, **f32), b, s)),
        ("weight must have dtype Float, got Double", (x, w.double(), b, s)),
        ("weight must have dtype BFloat16 or Float, got Half", (x.bfloat16(), w.half(), b, s)),
        ("bias must have shape", (x, w, torch.randn(7, **f32), s)),
        ("bias must have dtype", (x.half(), w, b.bfloat16(), s)),
        ("seq_idx must have shape", (x, w, b, s[:, :6])),
        ("seq_idx must have dtype", (x, w, b, s.long())),
    ]
    if device == "cuda":
        cases += [
            ("weight must be on", (x, w.cpu(), b, s)),
            ("bias must be on", (x, w, b.cpu(), s)),
            ("seq_idx must be on", (x, w, b, s.cpu())),
            ("x must have dtype", (x.double(), w.double(), b.double(), s)),
        ]
    return cases


def test_bad_inputs(device):
    for message, args in _bad_cases(device):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.r2lm.reverse_conv1d(*args, False)
        with pytest.raises(RuntimeError, match=message):
            torch.ops.r2lm.reverse_conv1d_backward(torch.randn(2, 7, 6, device=device), *args, False)


def test_bad_grad_output(device):
    x = torch.randn(2, 7, 6, device=device)
    w = torch.randn(6, 4, device=device)
    for message, dy in [("dy must have shape", torch.randn(2, 7, 5, device=device)),
                        ("dy must have dtype", torch.randn(2, 7, 6, device=device).double()),
                        ("dy must have unit stride", torch.randn(2, 7, 12, device=device)[..., ::2])]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.r2lm.reverse_conv1d_backward(dy, x, w, None, None, False)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="dy must be on"):
            torch.ops.r2lm.reverse_conv1d_backward(torch.randn(2, 7, 6), x, w, None, None, False)


@pytest.mark.parametrize("shape", [(0, 5, 6), (2, 0, 6)])
def test_autograd_through_an_empty_conv(device, shape):
    """Autograd hands an empty output's gradient over with all-zero strides: the backward takes it."""
    x = torch.randn(*shape, device=device, requires_grad=True)
    w = torch.randn(6, 3, device=device, requires_grad=True)
    r2lm_kernels.reverse_conv1d(x, w).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_double_backward_raises():
    x = torch.randn(1, 7, 4, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    (dx,) = torch.autograd.grad(r2lm_kernels.reverse_conv1d(x, w, silu=True).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for r2lm::reverse_conv1d_backward is not implemented"):
        (dx ** 2).sum().backward()


def test_empty(device):
    """No tokens: empty output, zero parameter gradients."""
    x = torch.randn(2, 0, 6, device=device)
    w = torch.randn(6, 3, device=device)
    b = torch.randn(6, device=device)
    assert r2lm_kernels.reverse_conv1d(x, w, b).shape == (2, 0, 6)
    dx, dw, db = torch.ops.r2lm.reverse_conv1d_backward(torch.randn_like(x), x, w, b, None, True)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
