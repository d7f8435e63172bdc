"""reverse_selective_scan (DESIGN.md 3.1): wrapper, fake implementation, autograd."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)


def reverse_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           seq_idx=None):
    """Right-to-left selective scan, fused with softplus(delta + delta_bias), the D skip and the
    SiLU(z) gate; the state resets where seq_idx changes. See r2lm_kernels.reference for the math."""
    return torch.ops.r2lm.reverse_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx)


@torch.library.register_fake("r2lm::reverse_selective_scan")
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, seq_idx=None):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.register_fake("r2lm::reverse_selective_scan_backward")
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else u.new_empty(0)
    return (like(u), like(delta), torch.empty_like(A, dtype=torch.float32), like(B), like(C),
            like(D) if D is None else torch.empty_like(D, dtype=torch.float32), like(z),
            like(delta_bias) if delta_bias is None else torch.empty_like(delta_bias, dtype=torch.float32))
