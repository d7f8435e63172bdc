"""reverse_conv1d forward and backward: achieved GB/s against the copy bandwidth of the same run, and the
ratio to peers timed in the same run: the reference, torch.compile of the reference, and an eager torch
composition (flip, causal F.conv1d with groups=dim, flip back). The composition has no segment support,
so it runs only in the segment-free rows (it is skipped, with that reason, where seq_idx is given).

Bytes that must move once: forward reads x and writes y; backward reads x and dy and writes dx (the
parameters, bias and seq_idx are counted too; they are small).
"""
import torch
import torch.nn.functional as F

import r2lm_kernels
from r2lm_kernels import reference
from harness import Skip, built_on_first_call, parametrize_cases

# (batch, seqlen, dim, segmented): the model's shape at training scale (d_inner 2048, bf16 activations,
# fp32 parameters), its block-diffusion segments (block 32), and one long sequence.
SHAPES = [(8, 4096, 2048, False), (8, 4096, 2048, True), (1, 16384, 2048, True)]
QUICK_SHAPES = [(2, 1024, 512, False), (2, 1024, 512, True)]
CPU_SHAPES = [(2, 2048, 512, False), (2, 2048, 512, True)]
WIDTH = 4
BLOCK = 32


def _shapes(device, quick):
    if device != "cuda":
        return QUICK_SHAPES if quick else CPU_SHAPES
    return QUICK_SHAPES if quick else SHAPES


def _inputs(batch, seqlen, dim, segmented, dtype, device):
    x = torch.randn(batch, seqlen, dim, device=device).to(dtype)
    weight = torch.randn(dim, WIDTH, device=device) / WIDTH ** 0.5     # fp32 parameters (mixed precision)
    bias = torch.randn(dim, device=device)
    seq_idx = (torch.arange(seqlen, device=device, dtype=torch.int32) // BLOCK).expand(batch, seqlen).contiguous() \
        if segmented else None
    return x, weight, bias, seq_idx


def _conv1d_flip(x, weight, bias):
    """Segment-free peer: the anti-causal conv as a causal depthwise conv over the reversed sequence."""
    width = weight.shape[1]
    flipped = x.flip(1).transpose(1, 2)
    y = F.conv1d(F.pad(flipped, (width - 1, 0)), weight.flip(1).unsqueeze(1).to(x.dtype), bias.to(x.dtype),
                 groups=x.shape[2])
    return F.silu(y.transpose(1, 2).flip(1))


def _nbytes(tensor):
    return 0 if tensor is None else tensor.nbytes


def _cases(device, quick):
    dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    return [(shape, dtype) for shape in _shapes(device, quick) for dtype in dtypes
            if not (dtype == torch.float32 and shape[1] > 4096)]


def pytest_generate_tests(metafunc):
    """Cases depend on the device and --quick."""
    parametrize_cases(metafunc, _cases)


def _shape_dict(batch, seqlen, dim, segmented):
    return dict(batch=batch, seqlen=seqlen, dim=dim, width=WIDTH, segments=f"block {BLOCK}" if segmented else "none",
                silu=True)


def test_forward(bench, device, case):
    (batch, seqlen, dim, segmented), dtype = case
    x, weight, bias, seq_idx = _inputs(batch, seqlen, dim, segmented, dtype, device)
    compiled = torch.compile(reference.reverse_conv1d)
    impls = {
        "r2lm": lambda: r2lm_kernels.reverse_conv1d(x, weight, bias, seq_idx, True),
        "reference": lambda: reference.reverse_conv1d(x, weight, bias, seq_idx, True),
        "torch.compile(reference)": lambda: compiled(x, weight, bias, seq_idx, True),
        "eager F.conv1d (flip)": Skip("no segment support") if segmented else (lambda: _conv1d_flip(x, weight, bias)),
    }
    bench(op="reverse_conv1d.fwd", shape=_shape_dict(batch, seqlen, dim, segmented),
          dtype=f"{str(dtype).removeprefix('torch.')} (fp32 weight)",
          bytes_moved=2 * x.nbytes + weight.nbytes + bias.nbytes + _nbytes(seq_idx), impls=impls, primary="r2lm",
          notes="eager F.conv1d (flip) peer is segment-free; it runs only where segments=none")


def test_backward(bench, device, case):
    (batch, seqlen, dim, segmented), dtype = case
    x, weight, bias, seq_idx = _inputs(batch, seqlen, dim, segmented, dtype, device)
    dy = torch.randn_like(x)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]

    def graph_backward(fn):
        """Backward only: the first call builds the forward graph (compiling, where fn compiles, inside
        the harness's first-call accounting), every call replays its backward."""
        def build():
            out = fn(*leaves)
            return lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)
        return built_on_first_call(build)

    def r2lm_backward():
        with torch.no_grad():
            return torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, seq_idx, True)

    compiled = torch.compile(reference.reverse_conv1d)
    impls = {
        "r2lm": r2lm_backward,
        "reference": graph_backward(lambda a, w, b: reference.reverse_conv1d(a, w, b, seq_idx, True)),
        "torch.compile(reference)": graph_backward(lambda a, w, b: compiled(a, w, b, seq_idx, True)),
        "eager F.conv1d (flip)": Skip("no segment support") if segmented else graph_backward(_conv1d_flip),
    }
    bench(op="reverse_conv1d.bwd", shape=_shape_dict(batch, seqlen, dim, segmented),
          dtype=f"{str(dtype).removeprefix('torch.')} (fp32 weight)",
          # dy and x read, dx written; weight and bias read, their gradients written; seq_idx read
          bytes_moved=3 * x.nbytes + 2 * (weight.nbytes + bias.nbytes) + _nbytes(seq_idx), impls=impls,
          primary="r2lm",
          notes="backward only (peers replay a retained autograd graph); eager F.conv1d (flip) is segment-free")
