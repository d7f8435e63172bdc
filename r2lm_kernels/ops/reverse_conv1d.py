"""reverse_conv1d (DESIGN.md 3.2): wrapper, fake implementation, autograd."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)
from . import check_same_device, refuse_unsupported_autodiff


def reverse_conv1d(x, weight, bias=None, seq_idx=None, silu=False):
    """Anti-causal depthwise conv1d, segment-local: y[t] = bias + sum_k weight[:, k] * x[t + k] over the
    taps inside the sequence and inside t's segment (seq_idx equal from t to t + k: a segment is a run of
    equal values, as for the scan), optionally fused with SiLU.

    x: (batch, seqlen, dim) float32 / bfloat16 / float16 (float64 on CPU), unit stride in the last dim
    (other strides free); weight: (dim, width), 1 <= width <= 8; bias: (dim,); weight and bias each in
    x's dtype or float32; seq_idx: (batch, seqlen) int32. Arithmetic is fp32 (fp64 for fp64 x); returns
    a contiguous tensor in x's dtype. Differentiable in x, weight and bias (gradients in their dtypes;
    the parameter gradients are reduced in a fixed order, so they are bitwise reproducible), through
    torch.autograd only: an input carrying a forward-mode tangent, or one that torch.func.grad / vjp / jacrev
    differentiate, raises.
    """
    refuse_unsupported_autodiff("reverse_conv1d", x=x, weight=weight, bias=bias)
    return torch.ops.r2lm.reverse_conv1d(x, weight, bias, seq_idx, silu)


@torch.library.register_fake("r2lm::reverse_conv1d")
def _(x, weight, bias=None, seq_idx=None, silu=False):
    check_same_device("reverse_conv1d", x, weight=weight, bias=bias, seq_idx=seq_idx)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("r2lm::reverse_conv1d_backward")
def _(dy, x, weight, bias, seq_idx, silu):
    check_same_device("reverse_conv1d_backward", x, dy=dy, weight=weight, bias=bias, seq_idx=seq_idx)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight, bias, seq_idx = ctx.saved_tensors
    # The op takes unit last-dim stride; autograd may hand over expanded (stride 0) gradients.
    if dy.dim() == 3 and dy.size(-1) > 1 and dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dweight, dbias = torch.ops.r2lm.reverse_conv1d_backward(dy, x, weight, bias, seq_idx, ctx.silu)
    return dx, dweight, dbias if ctx.has_bias else None, None, None


torch.library.register_autograd("r2lm::reverse_conv1d", _backward, setup_context=_setup_context)
