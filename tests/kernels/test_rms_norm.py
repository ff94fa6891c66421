"""RMSNorm kernel against transformers' LlamaRMSNorm and GemmaRMSNorm numerics."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ftune.kernels.rms_norm import rms_norm
from tests.kernels.common import DEVICE, gpu

# fp32: only the summation order differs. 16-bit: both sides round to the dtype, but the kernel
# keeps the backward in fp32 where eager rounds its intermediates, and the interpreter truncates
# fp32 -> bf16 where the GPU rounds to nearest, so a few ulps (bf16's is 2^-8 relative).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}
LLAMA = dict(offset=0.0, casting_mode="llama")
GEMMA = dict(offset=1.0, casting_mode="gemma")


def reference_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama"):
    """LlamaRMSNorm.forward ("llama") and GemmaRMSNorm.forward ("gemma", weight + offset)."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        return weight * hidden.to(input_dtype)
    return (hidden * (offset + weight.float())).to(input_dtype)


def reference_weight_grad(x, grad_out, eps, offset=0.0, casting_mode="llama"):
    """The exact weight gradient, summed in fp32. Eager 16-bit autograd rounds every row's product
    to 16 bits before summing them (off by ~10% on a few weights over 64k rows); the kernel sums
    in fp32 and rounds once, so it is held to this instead."""
    hidden = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        hidden = hidden.to(x.dtype).float()
    return (grad_out.float() * hidden).flatten(0, -2).sum(0)


def _compare(shape, dtype, mode, weight_grad, device, weight_dtype=None, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, device=device, generator=generator) * 3
    weight = torch.randn(shape[-1], dtype=weight_dtype or dtype, device=device, generator=generator)
    grad_out = torch.randn(shape, dtype=torch.promote_types(dtype, weight.dtype), device=device, generator=generator)
    if mode is GEMMA:
        grad_out = grad_out.to(dtype)
    results = []
    for fn in (rms_norm, reference_rms_norm):
        x_ = x.clone().requires_grad_()
        w_ = weight.clone().requires_grad_(weight_grad)
        y = fn(x_, w_, 1e-6, **mode)
        y.backward(grad_out)
        results.append((y, x_.grad, w_.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    tol = TOLERANCES[dtype]
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    if weight_grad:
        assert dw.dtype == dw_ref.dtype
        # Rounding errors of a sum over rows grow with the square root of their number
        rows = x.numel() // shape[-1]
        expected = reference_weight_grad(x, grad_out, 1e-6, **mode)
        torch.testing.assert_close(dw.float(), expected, atol=tol["atol"] * rows**0.5, rtol=tol["rtol"])
    else:
        assert dw is None


def test_reference_is_transformers():
    """The reference here is, bit for bit, the modules the patch replaces."""
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)
    llama, gemma = LlamaRMSNorm(40, eps=1e-5).bfloat16(), GemmaRMSNorm(40, eps=1e-5).bfloat16()
    torch.nn.init.normal_(llama.weight)
    torch.nn.init.normal_(gemma.weight)
    assert torch.equal(llama(x), reference_rms_norm(x, llama.weight, 1e-5, **LLAMA))
    assert torch.equal(gemma(x), reference_rms_norm(x, gemma.weight, 1e-5, **GEMMA))


# Widths below, at and above a power of two; 1 row, odd row counts, Qwen3's per-head layout
SHAPES = [(1, 33), (7, 100), (2, 17, 64), (3, 5, 4, 16), (5, 257)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", [LLAMA, GEMMA], ids=["llama", "gemma"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable"])
def test_rms_norm_fp32(shape, mode, weight_grad):
    _compare(shape, torch.float32, mode, weight_grad, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [LLAMA, GEMMA], ids=["llama", "gemma"])
def test_rms_norm_16bit(dtype, mode):
    _compare((3, 17, 100), dtype, mode, True, DEVICE)


@pytest.mark.parametrize("mode", [LLAMA, GEMMA], ids=["llama", "gemma"])
def test_casting_structure(mode):
    """fp16 input, fp32 weight: Llama rounds the normalized rows to fp16 then multiplies in fp32
    (fp32 out), Gemma multiplies in fp32 then rounds (fp16 out). Output and weight gradient agree
    to fp32 precision; skipping Llama's rounding would be off by ~2^-11 relative. (fp16, not bf16:
    the interpreter's fp16 rounding is exact, its bf16 conversion truncates.)"""
    x = torch.randn(4, 64, dtype=torch.float16, device=DEVICE)
    weight = torch.randn(64, device=DEVICE, requires_grad=True)
    y, y_ref = rms_norm(x, weight, 1e-6, **mode), reference_rms_norm(x, weight, 1e-6, **mode)
    assert y.dtype == y_ref.dtype == (torch.float32 if mode is LLAMA else torch.float16)
    grad_out = torch.randn_like(y)
    (dw,), (dw_ref,) = torch.autograd.grad(y, weight, grad_out), torch.autograd.grad(y_ref, weight, grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["strided_rows", "strided_last_dim"])
def test_non_contiguous_input(layout):
    if layout == "strided_rows":  # read in place through the row stride
        x = torch.randn(6, 50, device=DEVICE)[:, 5:45]
    else:  # copied into rows first
        x = torch.randn(6, 40, 3, device=DEVICE).transpose(1, 2)
    x.requires_grad_()
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight)
    dx, dw = torch.autograd.grad(y.sum(), (x, weight))
    y_ref = reference_rms_norm(x, weight, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(y_ref.sum(), (x, weight))
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])


def test_rejects_bad_arguments():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="casting_mode"):
        rms_norm(x, torch.ones(8, device=DEVICE), casting_mode="t5")
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(x, torch.ones(9, device=DEVICE))


@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (2, 2048, 4096), (8192, 8, 128), (1000, 3584)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [LLAMA, GEMMA], ids=["llama", "gemma"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trainable"])
def test_rms_norm_gpu(shape, dtype, mode, weight_grad):
    _compare(shape, dtype, mode, weight_grad, "cuda")
