"""Python side of each op: the public wrapper, its fake (meta) implementation and its autograd."""
