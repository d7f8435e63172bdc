"""reverse_selective_scan (DESIGN.md 3.1): wrapper, fake implementation, autograd."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)
from . import check_same_device, refuse_unsupported_autodiff


def reverse_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           seq_idx=None):
    """Right-to-left selective scan, fused with softplus(delta + delta_bias), the D skip and the
    SiLU(z) gate; the state resets where seq_idx changes. See r2lm_kernels.reference for the math.

    u, delta, z: (batch, seqlen, dim) and B, C: (batch, seqlen, d_state), all in one dtype: float32,
    bfloat16 or float16 (float64 on CPU); A: (dim, d_state), D and delta_bias: (dim,), float32 (float64
    for float64 u); seq_idx: (batch, seqlen) int32, a segment being a run of equal values. Every tensor
    needs unit stride in its last dim (other strides free). d_state is at most 64 on CUDA. The state and
    arithmetic are fp32 (fp64 for fp64 u); returns a contiguous tensor in u's dtype. Differentiable in
    every floating input (deterministic gradients, in the inputs' dtypes), through torch.autograd only: an
    input carrying a forward-mode tangent, or one that torch.func.grad / vjp / jacrev differentiate, raises."""
    refuse_unsupported_autodiff("reverse_selective_scan", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
                                delta_bias=delta_bias)
    return torch.ops.r2lm.reverse_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx)


def _contiguous_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("r2lm::reverse_selective_scan")
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, seq_idx=None):
    check_same_device("reverse_selective_scan", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      seq_idx=seq_idx)
    return _contiguous_like(u)


@torch.library.register_fake("r2lm::reverse_selective_scan_backward")
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx):
    check_same_device("reverse_selective_scan_backward", u, dout=dout, delta=delta, A=A, B=B, C=C, D=D, z=z,
                      delta_bias=delta_bias, seq_idx=seq_idx)
    # Gradients are contiguous; those of A, D, delta_bias keep the parameters' dtype (fp32, or fp64);
    # those of absent optional inputs are empty tensors of u's dtype.
    def like(t):
        return _contiguous_like(t) if t is not None else u.new_empty(0)
    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias, seq_idx = ctx.saved_tensors
    if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum; the kernel reads rows with unit stride
        dout = dout.contiguous()
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = torch.ops.r2lm.reverse_selective_scan_backward(
        dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, seq_idx)
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None, None)


torch.library.register_autograd("r2lm::reverse_selective_scan", _backward, setup_context=_setup_context)
