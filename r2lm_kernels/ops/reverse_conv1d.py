"""reverse_conv1d (DESIGN.md 3.2): wrapper, fake implementation, autograd."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)


def reverse_conv1d(x, weight, bias=None, seq_idx=None, silu=False):
    """Anti-causal depthwise conv1d, segment-local: y[t] = bias + sum_k weight[:, k] * x[t + k],
    optionally fused with SiLU."""
    return torch.ops.r2lm.reverse_conv1d(x, weight, bias, seq_idx, silu)


@torch.library.register_fake("r2lm::reverse_conv1d")
def _(x, weight, bias=None, seq_idx=None, silu=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("r2lm::reverse_conv1d_backward")
def _(dy, x, weight, bias, seq_idx, silu):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), dbias
