"""Python side of each op: the public wrapper, its fake (meta) implementation and its autograd."""
import torch
import torch.autograd.forward_ad as forward_ad


def check_same_device(op, first, **tensors):
    """The device check of the ops' C++ layer, for their fake implementations: one meta argument sends a
    whole call there, and a call mixing meta and CPU tensors would otherwise return uninitialised memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != first.device:
            raise RuntimeError(f"{op}: {name} must be on {first.device} like the first input, got {tensor.device}")


# torch.func's grad transform wraps the tensors it differentiates (a private query; absent: never wrapped).
_is_func_grad_tensor = getattr(torch._C._functorch, "is_gradtrackingtensor", lambda tensor: False)


def refuse_unsupported_autodiff(op, **tensors):
    """The differentiable ops have reverse-mode AD through torch.autograd only: an input carrying a
    forward-mode tangent (a dual tensor, torch.func.jvp) is refused rather than its tangent silently dropped,
    and one that torch.func.grad / vjp / jacrev differentiate is refused with this advice instead of
    PyTorch's message about autograd.Function (an autograd registered by torch.library cannot run there)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if forward_ad.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(f"{op} has no forward-mode AD: {name} carries a tangent (a dual tensor, or "
                                      f"torch.func.jvp); use reverse mode (backward or torch.autograd.grad)")
        # Dynamo cannot trace the query; a wrapped tensor that is detached (or seen under no_grad) is not
        # differentiated, and runs.
        if not torch.compiler.is_compiling() and _is_func_grad_tensor(tensor) and tensor.requires_grad and \
                torch.is_grad_enabled():
            raise NotImplementedError(f"{op} does not support torch.func.grad / vjp / jacrev / hessian: {name} is "
                                      f"differentiated by one; use backward or torch.autograd.grad")
