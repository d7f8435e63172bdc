"""Python side of each op: the public wrapper, its fake (meta) implementation and its autograd."""


def check_same_device(op, first, **tensors):
    """The device check of the ops' C++ layer, for their fake implementations: one meta argument sends a
    whole call there, and a call mixing meta and CPU tensors would otherwise return uninitialised memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != first.device:
            raise RuntimeError(f"{op}: {name} must be on {first.device} like the first input, got {tensor.device}")

