"""The gated-product kernel against the eager `act_fn(gate) * up` of transformers' MLPs: SwiGLU
(silu) and GeGLU (Gemma's gelu_pytorch_tanh)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from ftune.kernels.swiglu import ACTIVATIONS, BLOCK_SIZE, swiglu, swiglu_backward, swiglu_forward
from tests.kernels.common import DEVICE, gpu

# fp32 agrees to rounding. 16-bit: eager rounds after the activation and after the product, the
# kernel once (the interpreter truncating bf16), so within a few ulps of each other. Measured under
# the interpreter, the worst element uses this share of its tolerance: SwiGLU 2% (fp32), 35% (bf16),
# 43% (fp16); GeGLU 23%, 36%, 41%. GeGLU's fp32 share is the larger because eager's `1 + tanh`
# cancels for negative gates (its gate gradient is up to 5e-4 off float64 there in relative terms,
# the kernel's 7e-6).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def reference_swiglu(gate, up):
    """LlamaMLP's `self.act_fn(self.gate_proj(x)) * self.up_proj(x)` with act_fn = silu."""
    return torch.nn.functional.silu(gate) * up


def reference_geglu(gate, up):
    """Gemma's MLP: act_fn = gelu_pytorch_tanh, which is PyTorch's tanh-approximated GELU."""
    return F.gelu(gate, approximate="tanh") * up


REFERENCES = {"silu": reference_swiglu, "gelu_tanh": reference_geglu}
# Under the interpreter, sigmoid of a large negative argument computes exp(+large) in numpy, which
# warns on its way to the right answer (inf, then sigmoid 0); tanh-GELU's cubic argument gets there
# from gates of about -10.
quiet_overflow = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _projections(shape, dtype, device):
    """gate and up as an MLP makes them: outputs of an op, not leaves (so they may be overwritten)."""
    generator = torch.Generator(device=device).manual_seed(0)
    gate = (torch.randn(shape, dtype=dtype, device=device, generator=generator) * 3).requires_grad_()
    up = torch.randn(shape, dtype=dtype, device=device, generator=generator).requires_grad_()
    grad_out = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    return gate, up, grad_out


def _compare(shape, dtype, device, activation="silu"):
    gate, up, grad_out = _projections(shape, dtype, device)
    results = []
    ours = partial(swiglu, activation=activation)
    for fn in (ours, partial(ours, overwrite_inputs=True), REFERENCES[activation]):
        gate.grad = up.grad = None
        y = fn(gate * 1, up * 1)
        y.backward(grad_out)
        results.append((y, gate.grad, up.grad))
    ours, overwriting, reference = results
    for actual, expected in zip(ours + overwriting, reference + reference, strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


# One element, less than a block, not a multiple of the block, several blocks
@quiet_overflow
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (2, 17, 96), (3, BLOCK_SIZE + 5)])
def test_swiglu_fp32(shape, activation):
    _compare(shape, torch.float32, DEVICE, activation)


@quiet_overflow
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_16bit(dtype, activation):
    _compare((3, 17, 100), dtype, DEVICE, activation)


def test_geglu_reference_is_gemmas_activation():
    """The reference is what Gemma's MLP runs: transformers' gelu_pytorch_tanh, and not exact GELU."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(ACT2FN["gelu_pytorch_tanh"](x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    assert (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max() > 1e-4


@quiet_overflow
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_gates_stay_finite(activation):
    """Gates far into both tails (fp32; the activation's argument overflows exp there): the product
    and both gradients are finite and equal the reference's, which saturate to 0 and to `up`."""
    gate = torch.tensor([-1e4, -300.0, -90.0, -30.0, -12.0, 12.0, 30.0, 90.0, 300.0, 1e4], device=DEVICE)
    gate = gate.requires_grad_()
    up = torch.linspace(-2, 2, gate.numel(), device=DEVICE).requires_grad_()
    results = []
    for fn in (partial(swiglu, activation=activation), REFERENCES[activation]):
        gate.grad = up.grad = None
        y = fn(gate * 1, up * 1)
        y.sum().backward()
        results.append((y, gate.grad, up.grad))
    for actual, expected in zip(*results, strict=True):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])


def test_non_contiguous_inputs():
    """gate and up as column slices of one fused projection, or laid out differently: the same result."""
    fused = torch.randn(5, 7, 64, device=DEVICE)
    gate, up = fused[..., :32], fused[..., 32:]
    torch.testing.assert_close(swiglu(gate, up), reference_swiglu(gate, up), **TOLERANCES[torch.float32])
    transposed = torch.randn(7, 5, 32, device=DEVICE).transpose(0, 1)  # another layout than gate's: copied
    torch.testing.assert_close(swiglu(gate, transposed), reference_swiglu(gate, transposed), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_halves_of_one_projection_train_in_place(activation):
    """Phi-3's MLP: `gate, up = gate_up_proj(x).chunk(2)`. The kernel reads the halves where they
    are and writes their gradients over them: the projection's gradient is the reference's."""
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(3, 6, 16, device=DEVICE, generator=generator)
    weight = torch.randn(2 * 40, 16, device=DEVICE, generator=generator, requires_grad=True)
    grad_out = torch.randn(3, 6, 40, device=DEVICE, generator=generator)
    results = []
    for fn in (partial(swiglu, overwrite_inputs=True, activation=activation), REFERENCES[activation]):
        weight.grad = None
        both = F.linear(x, weight)
        fn(*both.chunk(2, dim=-1)).backward(grad_out)
        results.append((weight.grad, both.detach()))
    (grad, written), (expected, _) = results
    torch.testing.assert_close(grad, expected, **TOLERANCES[torch.float32])
    # the gradients were written over the projection's output (no copy of it was taken)
    torch.testing.assert_close(torch.einsum("bto,bti->oi", written, x), expected, **TOLERANCES[torch.float32])


@quiet_overflow
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_blocks_of_one_buffer(dtype, activation):
    """gate and up as the two halves of one wider buffer and the product written into the first
    columns of another (the fused LoRA MLP's layout): the reference's values and gradients, the
    gradients written over gate and up in place, the other columns untouched."""
    rows, width = 5, BLOCK_SIZE + 7
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    both = torch.randn(rows, 2 * width + 4, dtype=dtype, device=DEVICE, generator=generator) * 3
    product = torch.full((rows, width + 8), 5.0, dtype=dtype, device=DEVICE)
    gate, up = both[:, :width].clone().requires_grad_(), both[:, width:2 * width].clone().requires_grad_()
    grad_out = torch.randn(rows, width, dtype=dtype, device=DEVICE, generator=generator)
    expected = REFERENCES[activation](gate, up)
    expected.backward(grad_out)
    swiglu_forward(both[:, :width], both[:, width:2 * width], out=product[:, :width], activation=activation)
    torch.testing.assert_close(product[:, :width], expected.detach(), **TOLERANCES[dtype])
    assert (product[:, width:] == 5.0).all()
    tail = both[:, 2 * width:].clone()
    swiglu_backward(grad_out, both[:, :width], both[:, width:2 * width], overwrite_inputs=True, activation=activation)
    torch.testing.assert_close(both[:, :width], gate.grad, **TOLERANCES[dtype])
    torch.testing.assert_close(both[:, width:2 * width], up.grad, **TOLERANCES[dtype])
    assert torch.equal(both[:, 2 * width:], tail)


def test_a_gradient_that_is_not_rows():
    """Through a cat() along the sequence the product's gradient is a slice whose rows lie apart
    unevenly (no matrix of rows views it): the backward takes a copy of it."""
    gate, up, _ = _projections((3, 4, 40), torch.float32, DEVICE)
    grad = torch.randn(3, 6, 40, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    results = []
    for fn in (swiglu, reference_swiglu):
        gate.grad = up.grad = None
        torch.cat([fn(gate * 1, up * 1), torch.zeros(3, 2, 40, device=DEVICE)], dim=1).backward(grad)
        results.append((gate.grad, up.grad))
    torch.testing.assert_close(results[0], results[1], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inputs_kept_unless_overwrite_is_allowed(activation):
    gate, up, grad_out = _projections((4, 50), torch.float32, DEVICE)
    kept_gate, kept_up = gate.detach().clone(), up.detach().clone()
    swiglu(gate, up, activation=activation).backward(grad_out)
    assert torch.equal(gate, kept_gate) and torch.equal(up, kept_up)

    gate_in, up_in = gate * 1, up * 1
    swiglu(gate_in, up_in, overwrite_inputs=True, activation=activation).backward(grad_out)
    assert not torch.equal(gate_in, kept_gate)  # now holds the gradient, as documented


def test_product_written_over_the_gate():
    """`out=gate`, as the fused LoRA MLP writes the product: GeGLU in place equals GeGLU apart."""
    gate, up, _ = _projections((6, 70), torch.float32, DEVICE)
    gate, up = gate.detach(), up.detach()
    expected = reference_geglu(gate, up)
    swiglu_forward(gate, up, out=gate, activation="gelu_tanh")
    torch.testing.assert_close(gate, expected, **TOLERANCES[torch.float32])


def test_overwriting_backward_refuses_a_second_backward():
    """retain_graph would read gradients as activations: the bumped version makes autograd raise."""
    gate, up, grad_out = _projections((4, 50), torch.float32, DEVICE)
    y = swiglu(gate * 1, up * 1, overwrite_inputs=True)
    y.backward(grad_out, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(grad_out)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE))


def test_rejects_an_unknown_activation():
    gate = torch.randn(2, 3, device=DEVICE)
    for call in (lambda: swiglu(gate, gate, activation="gelu"), lambda: swiglu_forward(gate, gate, activation="relu"),
                 lambda: swiglu_backward(gate, gate, gate, activation="gelu_pytorch_tanh")):
        with pytest.raises(ValueError, match="silu, gelu_tanh"):
            call()


@gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 4096, 14336), (2, 2048, 18944), (333, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_gpu(shape, dtype, activation):
    _compare(shape, dtype, "cuda", activation)
