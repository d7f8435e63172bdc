"""Stress tests of the CUDA reverse_selective_scan kernels (on a GPU, or on CPU tensors with the emulated build).

The CUDA kernels tile the sequence: forward chunks of 16 / 8 / 4 tokens (d_state padded to 16 / 32 / 64),
backward superchunks of 64 tokens (32 at d_state > 32) whose boundary states are stored, subchunks of
8 tokens (4) recomputed per token, and dB / dC partial sums per block of 64 (32) channels; its compact
configuration, for GPUs with 99 KB of shared memory per block, one warp per block and superchunks of 64 /
32 / 8 tokens (d_state 16 / 32 / 64) with subchunks of 8 / 4 / 2. These tests
put segment boundaries exactly on and around those edges, run 16k-token sequences, every padded
d_state, and check that the backward is bitwise reproducible. The reference runs in float64 on the device.
"""
import os

import pytest
import torch

import r2lm_kernels
from r2lm_kernels import reference

# "cuda", or "cpu" where CPU tensors run the CUDA kernels (the emulated build of scripts/emulate_cuda.sh).
DEVICE = os.environ.get("R2LM_CUDA_STRESS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device")

GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def _inputs(batch, seqlen, dim, d_state, dtype, seq_idx=None, slow_decay=False):
    dev = DEVICE
    # Slow decays (|dt * A| down to ~1e-3) make the state remember thousands of tokens: errors in the
    # carry across chunk boundaries then show up far from where they happen.
    lo = -7.0 if slow_decay else -2.0
    A = -torch.empty(dim, d_state, device=dev).uniform_(lo, 0.7).exp()
    return dict(
        u=torch.randn(batch, seqlen, dim, device=dev).to(dtype),
        delta=(torch.randn(batch, seqlen, dim, device=dev) * 0.5).to(dtype),
        A=A,
        B=torch.randn(batch, seqlen, d_state, device=dev).to(dtype),
        C=torch.randn(batch, seqlen, d_state, device=dev).to(dtype),
        D=torch.randn(dim, device=dev),
        z=torch.randn(batch, seqlen, dim, device=dev).to(dtype),
        delta_bias=torch.randn(dim, device=dev) * 0.5 - (3.0 if slow_decay else 1.0),
        delta_softplus=True,
        seq_idx=seq_idx,
    )


def _f64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}


def _magnitudes(args):
    """The same problem with |u|, |B|, |C|, |D| (as test_reverse_selective_scan.py's): sums of one sign."""
    return {k: (v.abs() if k in ("u", "B", "C", "D") and v is not None else v) for k, v in args.items()}


def _rel(a, b, scale=None):
    """||a - b|| / ||b||, or / ||scale|| where that is larger."""
    a, b = a.double(), b.double()
    denominator = b.norm() if scale is None else torch.maximum(b.norm(), scale.double().norm())
    return float((a - b).norm() / denominator.clamp_min(1e-300))


def _reference_grads(args, dout):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    full = dict(args, **leaves)
    out = reference.reverse_selective_scan(**full)
    grads = torch.autograd.grad(out, [leaves[n] for n in GRAD_NAMES], dout)
    return out.detach(), dict(zip(GRAD_NAMES, grads))


def _kernel_grads(args, dout):
    grads = torch.ops.r2lm.reverse_selective_scan_backward(
        dout, args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
        args["delta_bias"], args["delta_softplus"], args["seq_idx"])
    return dict(zip(GRAD_NAMES, grads))


def _boundary_segments(batch, seqlen):
    """Segments whose edges sit on, just before and just after multiples of 4, 8, 16, 32 and 64."""
    edges = sorted({e + o for e in range(4, seqlen, 4) if e % 16 == 0 or e % 64 in (4, 8, 32)
                    for o in (-1, 0, 1) if 0 < e + o < seqlen})
    starts = torch.zeros(batch, seqlen, dtype=torch.int32, device=DEVICE)
    starts[0, edges] = 1
    if batch > 1:  # a second pattern: single-token segments right at superchunk edges
        for e in range(63, seqlen, 64):
            starts[1, e:e + 2] = 1
    return torch.cumsum(starts, dim=1, dtype=torch.int32)


def _check(args, dout, poison_memory, tol=1e-5):
    """fp32 kernel against the fp64 reference: error below tol, or below 3x the error of the reference
    itself run in fp32 (long, slowly decaying segments accumulate rounding in any fp32 evaluation)."""
    ref_out, ref_grads = _reference_grads(_f64(args), dout.double())
    low_out, low_grads = _reference_grads(args, dout)
    poison = [16 * ref_out.numel()] * 4  # bytes: 4 blocks, each 4x the fp32 output, room for every gradient
    poison_memory(DEVICE, *poison)
    out = r2lm_kernels.reverse_selective_scan(**args)
    assert not out.isnan().any(), "forward left NaN (unwritten) elements"
    err, bound = _rel(out, ref_out), max(tol, 3 * _rel(low_out, ref_out))
    assert err < bound, f"forward error {err:.3g} >= {bound:.3g}"
    poison_memory(DEVICE, *poison)
    grads = _kernel_grads(args, dout)
    # A gradient that sums over tokens (dD, ddelta_bias, dA) can cancel far below its terms (ddelta_bias of
    # one channel: 0.024 from terms of total 39): its rounding is relative to the gradient of the same
    # problem with terms of one sign.
    _, scale_grads = _reference_grads(_f64(_magnitudes(args)), dout.double().abs())
    for name in GRAD_NAMES:
        assert not grads[name].isnan().any(), f"d{name} has NaN (unwritten) elements"
        scale = scale_grads[name]
        err = _rel(grads[name], ref_grads[name], scale)
        bound = max(tol, 3 * _rel(low_grads[name], ref_grads[name], scale))
        assert err < bound, f"d{name} error {err:.3g} >= {bound:.3g}"


@pytest.mark.parametrize("d_state", [1, 15, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("seqlen", [1, 63, 64, 65, 129, 200])
def test_chunk_boundary_segments(d_state, seqlen, poison_memory):
    batch, dim = 2, 45  # dim spans a partial block of channels
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, _boundary_segments(batch, seqlen), slow_decay=True)
    dout = torch.randn(batch, seqlen, dim, device=DEVICE)
    _check(args, dout, poison_memory)


@pytest.mark.parametrize("d_state", [16, 64])
def test_long_sequence_16k(d_state, poison_memory):
    batch, seqlen, dim = 1, 16384, 40
    seq_idx = (torch.arange(seqlen, device=DEVICE) // 5000).to(torch.int32)[None]  # few, long segments
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, seq_idx, slow_decay=True)
    dout = torch.randn(batch, seqlen, dim, device=DEVICE)
    _check(args, dout, poison_memory)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("d_state", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_lowprec_reference(dtype, d_state, compact, monkeypatch):
    if compact:
        monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "1")
    batch, seqlen, dim = 2, 777, 96
    seq_idx = _boundary_segments(batch, seqlen)
    args = _inputs(batch, seqlen, dim, d_state, dtype, seq_idx)
    dout = torch.randn(batch, seqlen, dim, device=DEVICE).to(dtype)
    ref_out, ref_grads = _reference_grads(_f64(args), dout.double())
    low_out, low_grads = _reference_grads(args, dout)  # the reference at the input precision
    out = r2lm_kernels.reverse_selective_scan(**args)
    assert _rel(out, ref_out) <= 3 * _rel(low_out, ref_out) + 1e-4
    grads = _kernel_grads(args, dout)
    for name in GRAD_NAMES:
        assert _rel(grads[name], ref_grads[name]) <= 3 * _rel(low_grads[name], ref_grads[name]) + 1e-4, name


def test_noncontiguous_views(poison_memory):
    batch, seqlen, dim, d_state = 2, 150, 50, 16
    wide = lambda *shape: torch.randn(*shape[:-1], shape[-1] + 7, device=DEVICE)[..., 3:3 + shape[-1]]  # noqa: E731
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, _boundary_segments(batch, seqlen))
    for name in ("u", "delta", "z"):
        args[name] = wide(batch, seqlen, dim).copy_(args[name])
    for name in ("B", "C"):
        args[name] = wide(batch, seqlen, d_state).copy_(args[name])
    args["A"] = wide(dim, d_state).copy_(args["A"])
    args["seq_idx"] = torch.zeros(batch, seqlen + 5, dtype=torch.int32, device=DEVICE)[:, 2:2 + seqlen].copy_(
        args["seq_idx"])
    assert not args["u"].is_contiguous() and not args["B"].is_contiguous()
    dout = torch.randn(batch, seqlen, dim + 4, device=DEVICE)[..., :dim]
    _check(args, dout, poison_memory)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_state", [16, 64])
def test_backward_bitwise_deterministic(dtype, d_state):
    batch, seqlen, dim = 3, 1000, 300
    args = _inputs(batch, seqlen, dim, d_state, dtype, _boundary_segments(batch, seqlen))
    dout = torch.randn(batch, seqlen, dim, device=DEVICE).to(dtype)
    first = _kernel_grads(args, dout)
    for _ in range(3):
        again = _kernel_grads(args, dout)
        for name in GRAD_NAMES:
            assert torch.equal(first[name], again[name]), f"d{name} differs between runs"


@pytest.mark.skipif(not ON_GPU, reason="CPU tensors run the CUDA kernels here")
def test_cuda_and_host_kernels_agree():
    batch, seqlen, dim, d_state = 2, 333, 70, 16
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, _boundary_segments(batch, seqlen))
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    assert _rel(r2lm_kernels.reverse_selective_scan(**args).cpu(), r2lm_kernels.reverse_selective_scan(**cpu)) < 1e-5
    dout = torch.randn(batch, seqlen, dim, device=DEVICE)
    gpu_grads = _kernel_grads(args, dout)
    cpu_grads = _kernel_grads(cpu, dout.cpu())
    for name in GRAD_NAMES:
        assert _rel(gpu_grads[name].cpu(), cpu_grads[name]) < 2e-5, name


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_graph_capture_and_stream():
    """No host synchronisation inside: the forward and backward capture into a CUDA graph and replay."""
    args = _inputs(2, 100, 64, 16, torch.float32, _boundary_segments(2, 100))
    dout = torch.randn(2, 100, 64, device=DEVICE)
    expected_out = r2lm_kernels.reverse_selective_scan(**args)
    expected = _kernel_grads(args, dout)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (workspace allocation, shared-memory attribute) off-graph
        r2lm_kernels.reverse_selective_scan(**args)
        _kernel_grads(args, dout)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = r2lm_kernels.reverse_selective_scan(**args)
        grads = _kernel_grads(args, dout)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected_out)
    for name in GRAD_NAMES:
        assert torch.equal(grads[name], expected[name]), name


def test_large_d_state_rejected():
    args = _inputs(1, 8, 4, 65, torch.float32)
    with pytest.raises(RuntimeError, match="d_state"):
        r2lm_kernels.reverse_selective_scan(**args)


@pytest.mark.parametrize("d_state", [1, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("seqlen", [1, 7, 8, 9, 31, 33, 65, 200])
def test_compact_backward(d_state, seqlen, monkeypatch, poison_memory):
    """The backward's compact configuration (for GPUs with 99 KB of shared memory per block: one warp per
    block, superchunks of 64 / 32 / 8 tokens at d_state 16 / 32 / 64), forced on any GPU."""
    monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "1")
    batch, dim = 2, 45
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, _boundary_segments(batch, seqlen), slow_decay=True)
    dout = torch.randn(batch, seqlen, dim, device=DEVICE)
    _check(args, dout, poison_memory)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("d_state", [16, 32])
@pytest.mark.parametrize("dim", [1, 33, 65, 129])
def test_channel_counts_one_past_a_block(dim, d_state, compact, monkeypatch, poison_memory):
    """One channel past the blocks of the grids (forward: 128 channels; backward: 64 at d_state 16, else 32,
    and 32 in the compact configuration), and a single channel: a grid one block short leaves the last
    channels unwritten or reads partial sums no block wrote."""
    if compact:
        monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "1")
    batch, seqlen = 2, 20
    args = _inputs(batch, seqlen, dim, d_state, torch.float32, _boundary_segments(batch, seqlen))
    _check(args, torch.randn(batch, seqlen, dim, device=DEVICE), poison_memory)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("d_state", [1, 16, 64])
def test_fast_decays_keep_dA_accurate(d_state, compact, monkeypatch, poison_memory):
    """Decays of e^-15 to e^-30: dA sums dt * adj * decay * h_{t+1}, which the backward must keep as such;
    h_t minus the token's input term is rounding noise at these decays."""
    if compact:
        monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "1")
    batch, seqlen, dim = 2, 72, 20
    args = _inputs(batch, seqlen, dim, d_state, torch.float32)
    args.update(delta=torch.full((batch, seqlen, dim), 0.5, device=DEVICE), delta_softplus=False,
                delta_bias=0.05 * torch.randn(dim, device=DEVICE),
                A=-30.0 - 30.0 * torch.rand(dim, d_state, device=DEVICE))
    _check(args, torch.randn(batch, seqlen, dim, device=DEVICE), poison_memory)


@pytest.mark.skipif(ON_GPU, reason="the emulated build stands in for a GPU with less shared memory")
@pytest.mark.parametrize("d_state", [16, 32, 64])
def test_backward_on_a_gpu_with_99_kb_of_shared_memory(d_state, monkeypatch):
    """A GPU of compute capability 8.6 / 8.9 has 99 KB of shared memory per block, less than the backward's
    full configuration needs at any d_state: it runs the compact one, bit for bit."""
    args = _inputs(2, 100, 40, d_state, torch.float32, _boundary_segments(2, 100))
    dout = torch.randn(2, 100, 40, device=DEVICE)
    monkeypatch.setenv("R2LM_SCAN_CUDA_COMPACT", "1")
    compact = _kernel_grads(args, dout)
    monkeypatch.delenv("R2LM_SCAN_CUDA_COMPACT")
    monkeypatch.setenv("R2LM_EMULATOR_SMEM_OPTIN", "101376")
    small_gpu = _kernel_grads(args, dout)
    for name in GRAD_NAMES:
        assert torch.equal(small_gpu[name], compact[name]), name


@pytest.mark.skipif(ON_GPU, reason="the emulated build stands in for a GPU with less shared memory")
def test_backward_where_even_the_compact_configuration_does_not_fit(monkeypatch, poison_memory):
    """Below the compact configuration's shared memory the backward raises, and the failed opt-in does not
    make the next launch fail."""
    args = _inputs(2, 40, 24, 16, torch.float32, _boundary_segments(2, 40))
    dout = torch.randn(2, 40, 24, device=DEVICE)
    monkeypatch.setenv("R2LM_EMULATOR_SMEM_OPTIN", "49152")
    with pytest.raises(RuntimeError, match=r"backward at d_state 16 could not opt in to \d+ bytes of shared memory"):
        _kernel_grads(args, dout)
    out = r2lm_kernels.reverse_selective_scan(**args)  # its launch check must not see the opt-in's error
    assert _rel(out, reference.reverse_selective_scan(**_f64(args))) < 1e-5
    monkeypatch.delenv("R2LM_EMULATOR_SMEM_OPTIN")
    _check(args, dout, poison_memory)
