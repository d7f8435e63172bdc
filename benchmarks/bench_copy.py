"""The device copy itself through the harness: sets the scale for the other benchmarks (a copy should land
near 100% of the copy bandwidth; a small copy on CPU can exceed it from cache) and shows peers."""
import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy(bench, device, quick, dtype):
    numel = (1 << 22) if quick else (1 << 26)
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    mul_out = torch.empty_like(src)
    bench(op="copy", shape=dict(numel=numel), dtype=str(dtype).removeprefix("torch."),
          bytes_moved=2 * src.numel() * src.element_size(),
          impls={"copy_": lambda: dst.copy_(src),
                 "mul(1) out=": lambda: torch.mul(src, 1, out=mul_out),   # the same bytes through an elementwise op
                 "clone (allocates)": lambda: src.clone()},
          primary="copy_")
    torch.testing.assert_close(dst, src, rtol=0, atol=0)
