"""The device copy itself through the harness: proves the harness and sets the scale for the others
(a copy should land near 100% of the copy bandwidth)."""
import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy(bench, device, quick, dtype):
    numel = (1 << 22) if quick else (1 << 26)
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    # A peer with a different kernel: the same bytes through an elementwise op.
    clone_out = torch.empty_like(src)
    bench(op="copy", shape=dict(numel=numel), dtype=str(dtype).removeprefix("torch."),
          bytes_moved=2 * src.numel() * src.element_size(),
          impls={"copy_": lambda: dst.copy_(src),
                 "mul(1) out=": lambda: torch.mul(src, 1, out=clone_out),
                 "triton (example skip)": _triton_copy(src, device)},
          primary="copy_")
    torch.testing.assert_close(dst, src, rtol=0, atol=0)


def _triton_copy(src, device):
    """Shows how an unavailable peer is reported: skipped with its reason, never a crash."""
    from harness import Skip
    if device != "cuda":
        return Skip("triton peer runs on CUDA only")
    return lambda: src.clone()
