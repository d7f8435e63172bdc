"""Python side of each op: the public wrapper, its fake (meta) implementation and its autograd."""
import torch.autograd.forward_ad as forward_ad


def check_same_device(op, first, **tensors):
    """The device check of the ops' C++ layer, for their fake implementations: one meta argument sends a
    whole call there, and a call mixing meta and CPU tensors would otherwise return uninitialised memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != first.device:
            raise RuntimeError(f"{op}: {name} must be on {first.device} like the first input, got {tensor.device}")


def refuse_tangents(op, **tensors):
    """The differentiable ops have reverse-mode AD only: an input carrying a forward-mode tangent (a dual
    tensor, torch.func.jvp) is refused rather than its tangent silently dropped."""
    for name, tensor in tensors.items():
        if tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(f"{op} has no forward-mode AD: {name} carries a tangent (a dual tensor, or "
                                      f"torch.func.jvp); use reverse mode (backward or torch.autograd.grad)")
