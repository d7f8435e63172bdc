"""reverse_selective_scan forward and backward: achieved GB/s against the copy bandwidth of the same run,
and the ratio to peers timed in the same run: the reference, torch.compile of the reference, and an eager
torch composition (flip, a left-to-right selective scan with segment resets, flip back).

The reference is a Python loop over the sequence; torch.compile unrolls it, so compiling it at the full
lengths takes many minutes. torch.compile(reference) is therefore timed only in the short-sequence rows
(seqlen 128), and reported as skipped, with that reason, in the others; the reference's backward (quadratic
in seqlen) up to seqlen 1024.

Bytes that must move once: the forward reads u, delta, z, B, C and writes out; the backward reads dout,
u, delta, z, B, C and writes du, ddelta, dz, dB, dC (A, D, delta_bias, their gradients and seq_idx are
counted too; they are small). The kernels' recomputation and scratch traffic are not counted.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import r2lm_kernels
from r2lm_kernels import reference
from harness import Skip, built_on_first_call, parametrize_cases

D_STATE = 16
BLOCK = 32  # block-diffusion segment length
COMPILE_MAX_SEQLEN = 128
# The reference's backward writes a full-size gradient for every step's slices (quadratic in seqlen: seconds a
# call at the GPU shapes), so it is timed up to this length; the flip peer is the eager baseline beyond.
REFERENCE_BACKWARD_MAX_SEQLEN = 1024

# (batch, seqlen, dim, segmented): the sidecar at training scale (d_inner 2048, bf16 activations, fp32
# parameters) with and without its block-diffusion segments, one long sequence, and a short row where
# torch.compile(reference) is affordable.
GPU_SHAPES = [(8, 4096, 2048, True), (8, 4096, 2048, False), (1, 16384, 2048, True), (8, 128, 2048, True)]
CPU_SHAPES = [(2, 1024, 512, True), (2, 1024, 512, False), (2, 128, 512, True)]
QUICK_SHAPES = [(2, 256, 256, True), (2, 128, 256, True)]


def _cases(device, quick):
    if quick:
        return [(shape, torch.float32) for shape in QUICK_SHAPES]
    if device == "cuda":
        return [(shape, torch.bfloat16) for shape in GPU_SHAPES] + [(GPU_SHAPES[0], torch.float32)]
    return [(shape, torch.float32) for shape in CPU_SHAPES]


def pytest_generate_tests(metafunc):
    """Cases depend on the device and --quick."""
    parametrize_cases(metafunc, _cases)


def _inputs(batch, seqlen, dim, segmented, dtype, device):
    """The sidecar's arguments: activations in dtype, fp32 parameters, softplus on, z gate, segments."""
    act = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return dict(
        u=act(batch, seqlen, dim),
        delta=(torch.randn(batch, seqlen, dim, device=device) * 0.5).to(dtype),
        A=-torch.empty(dim, D_STATE, device=device).uniform_(0.05, 2.0),
        B=act(batch, seqlen, D_STATE),
        C=act(batch, seqlen, D_STATE),
        D=torch.randn(dim, device=device),
        z=act(batch, seqlen, dim),
        delta_bias=torch.randn(dim, device=device) * 0.5 - 1.0,
        delta_softplus=True,
        seq_idx=(torch.arange(seqlen, device=device, dtype=torch.int32) // BLOCK).expand(batch, seqlen).contiguous()
        if segmented else None,
    )


def flip_forward_scan_flip(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx):
    """Eager peer: reverse the sequence, run a left-to-right selective scan (state reset where a segment
    starts) with the per-step factors precomputed as whole tensors, reverse back. fp32 math."""
    dtype = u.dtype
    flip = lambda t: None if t is None else t.flip(1)  # noqa: E731
    u, delta, B, C, z, seq_idx = map(flip, (u, delta, B, C, z, seq_idx))
    u, B, C = u.float(), B.float(), C.float()
    dt = delta.float() + delta_bias
    dt = F.softplus(dt) if delta_softplus else dt
    decay = torch.exp(dt[..., None] * A)                                  # (batch, seqlen, dim, d_state)
    if seq_idx is not None:
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        decay = decay.masked_fill(starts[..., None, None], 0.0)
    # unbind once: indexing step t of the whole tensors would make every step's backward write a
    # full-size gradient.
    decays, drives, Cs = decay.unbind(1), (dt * u)[..., None] * B[:, :, None, :], C.unbind(1)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], device=u.device)
    ys = []
    for decay_t, drive_t, C_t in zip(decays, drives.unbind(1), Cs):
        h = decay_t * h + drive_t
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = (torch.stack(ys, 1) + D * u) * F.silu(z.float())
    return y.flip(1).to(dtype)


def _bytes(args, backward):
    act = args["u"].nbytes
    state = args["B"].nbytes
    params = sum(args[k].nbytes for k in ("A", "D", "delta_bias"))
    seq = args["seq_idx"].nbytes if args["seq_idx"] is not None else 0
    if backward:
        return 7 * act + 4 * state + 2 * params + seq
    return 4 * act + 2 * state + params + seq


def _shape_dict(batch, seqlen, dim, segmented):
    return dict(batch=batch, seqlen=seqlen, dim=dim, d_state=D_STATE,
                segments=f"block {BLOCK}" if segmented else "none", z=True, softplus=True)


def _compiled_reference(seqlen):
    if seqlen > COMPILE_MAX_SEQLEN:
        return Skip(f"compiling the {seqlen}-step Python loop takes minutes; timed at seqlen {COMPILE_MAX_SEQLEN}")
    return torch.compile(reference.reverse_selective_scan)


def _dtype_name(dtype):
    return f"{str(dtype).removeprefix('torch.')} (fp32 A, D, delta_bias)"


def test_forward(bench, device, case):
    (batch, seqlen, dim, segmented), dtype = case
    args = _inputs(batch, seqlen, dim, segmented, dtype, device)
    compiled = _compiled_reference(seqlen)
    impls = {
        "r2lm": lambda: r2lm_kernels.reverse_selective_scan(**args),
        "reference": lambda: reference.reverse_selective_scan(**args),
        "torch.compile(reference)": compiled if isinstance(compiled, Skip) else (lambda: compiled(**args)),
        "flip+forward scan+flip": lambda: flip_forward_scan_flip(**args),
    }
    bench(op="reverse_selective_scan.fwd", shape=_shape_dict(batch, seqlen, dim, segmented), dtype=_dtype_name(dtype),
          bytes_moved=_bytes(args, backward=False), impls=impls, primary="r2lm",
          notes=f"torch.compile(reference) is timed only at seqlen <= {COMPILE_MAX_SEQLEN}")


def test_backward(bench, device, case):
    (batch, seqlen, dim, segmented), dtype = case
    args = _inputs(batch, seqlen, dim, segmented, dtype, device)
    dout = torch.randn_like(args["u"])
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]

    def graph_backward(fn):
        """Backward only: the first call builds the forward graph (compiling, where fn compiles, inside
        the harness's first-call accounting), every call replays its backward."""
        if isinstance(fn, Skip):
            return fn

        def build():
            leaves = {k: args[k].detach().clone().requires_grad_() for k in names}
            out = fn(**{**args, **leaves})
            return lambda: torch.autograd.grad(out, list(leaves.values()), dout, retain_graph=True)
        return built_on_first_call(build)

    def r2lm_backward():
        return torch.ops.r2lm.reverse_selective_scan_backward(dout, *args.values())

    compiled = _compiled_reference(seqlen)
    reference_backward = (graph_backward(reference.reverse_selective_scan) if seqlen <= REFERENCE_BACKWARD_MAX_SEQLEN
                          else Skip(f"the reference's backward is quadratic in seqlen; timed at seqlen <= "
                                    f"{REFERENCE_BACKWARD_MAX_SEQLEN}"))
    impls = {
        "r2lm": r2lm_backward,
        "reference": reference_backward,
        "torch.compile(reference)": graph_backward(compiled),
        "flip+forward scan+flip": graph_backward(flip_forward_scan_flip),
    }
    bench(op="reverse_selective_scan.bwd", shape=_shape_dict(batch, seqlen, dim, segmented), dtype=_dtype_name(dtype),
          bytes_moved=_bytes(args, backward=True), impls=impls, primary="r2lm",
          notes="r2lm recomputes the forward inside its backward; peers replay a retained autograd graph "
                f"(backward only); torch.compile(reference) is timed only at seqlen <= {COMPILE_MAX_SEQLEN}, the "
                f"reference at seqlen <= {REFERENCE_BACKWARD_MAX_SEQLEN}")


def test_backward_compact_configuration(bench, device, case, monkeypatch):
    """The CUDA backward's compact configuration (what GPUs with 99 KB of shared memory per block run),
    forced on this GPU, against the full configuration timed in the same run."""
    if device != "cuda" or case != (GPU_SHAPES[0], torch.bfloat16):
        pytest.skip("a CUDA configuration, timed at the first GPU shape")
    (batch, seqlen, dim, segmented), dtype = case
    args = _inputs(batch, seqlen, dim, segmented, dtype, device)
    dout = torch.randn_like(args["u"])
    monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "0")  # restored after the test

    def backward(compact):
        os.environ["R2LM_SCAN_CUDA_COMPACT"] = "1" if compact else "0"  # read by each call
        return torch.ops.r2lm.reverse_selective_scan_backward(dout, *args.values())

    bench(op="reverse_selective_scan.bwd_compact", shape=_shape_dict(batch, seqlen, dim, segmented),
          dtype=_dtype_name(dtype), bytes_moved=_bytes(args, backward=True), primary="r2lm compact",
          impls={"r2lm compact": lambda: backward(True), "r2lm full": lambda: backward(False)},
          notes="R2LM_SCAN_CUDA_COMPACT=1 forces the configuration of GPUs with 99 KB of shared memory per block")
