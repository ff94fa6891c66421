"""SwiGLU kernel against the eager `act_fn(gate) * up` of transformers' MLPs."""

import pytest
import torch

from ftune.kernels.swiglu import BLOCK_SIZE, swiglu
from tests.kernels.common import DEVICE, gpu

# fp32 agrees to rounding. 16-bit: eager rounds after the silu and after the product, the kernel
# once (the interpreter truncating bf16), so within a few ulps of each other.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def reference_swiglu(gate, up):
    """LlamaMLP's `self.act_fn(self.gate_proj(x)) * self.up_proj(x)` with act_fn = silu."""
    return torch.nn.functional.silu(gate) * up


def _compare(shape, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(shape, dtype=dtype, device=device, generator=generator) * 3
    up = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    grad_out = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    results = []
    for fn in (swiglu, reference_swiglu):
        gate_, up_ = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(gate_, up_)
        y.backward(grad_out)
        results.append((y, gate_.grad, up_.grad))
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


# One element, less than a block, not a multiple of the block, several blocks
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 17, 96), (3, BLOCK_SIZE + 5)])
def test_swiglu_fp32(shape):
    _compare(shape, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_16bit(dtype):
    _compare((3, 17, 100), dtype, DEVICE)


def test_non_contiguous_inputs():
    """gate and up as column slices of one fused projection: copied, then the same result."""
    fused = torch.randn(5, 7, 64, device=DEVICE)
    gate, up = fused[..., :32], fused[..., 32:]
    torch.testing.assert_close(swiglu(gate, up), reference_swiglu(gate, up), **TOLERANCES[torch.float32])


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE))


@gpu
@pytest.mark.parametrize("shape", [(1, 4096, 14336), (2, 2048, 18944), (333, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_gpu(shape, dtype):
    _compare(shape, dtype, "cuda")
