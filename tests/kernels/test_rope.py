"""Rotary embedding kernel against transformers' `apply_rotary_pos_emb` (rotate_half convention)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as transformers_rope

from ftune.kernels.rope import apply_rotary_pos_emb
from tests.kernels.common import DEVICE, gpu

# A rotation mixes two products per element: fp32 agrees to rounding; 16-bit eager rounds each
# product and the sum, the kernel once (and the interpreter truncates bf16), so a couple of ulps.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def reference_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _inputs(batch, q_heads, k_heads, seq, head_dim, dtype, device, cos_batch=1, layout="attention"):
    """q, k as attention has them: [B, H, T, D] views of [B, T, H, D] projections (or contiguous)."""
    generator = torch.Generator(device=device).manual_seed(0)
    if layout == "attention":
        q = torch.randn(batch, seq, q_heads, head_dim, dtype=dtype, device=device, generator=generator).transpose(1, 2)
        k = torch.randn(batch, seq, k_heads, head_dim, dtype=dtype, device=device, generator=generator).transpose(1, 2)
    else:
        q = torch.randn(batch, q_heads, seq, head_dim, dtype=dtype, device=device, generator=generator)
        k = torch.randn(batch, k_heads, seq, head_dim, dtype=dtype, device=device, generator=generator)
    # As the rotary module builds them: the frequencies repeated over both halves, in the model dtype
    positions = torch.arange(seq, device=device, dtype=torch.float32) + torch.arange(cos_batch, device=device)[:, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def _compare(q, k, cos, sin, dtype, unsqueeze_dim=1):
    results = []
    for fn in (apply_rotary_pos_emb, reference_rope):
        q_, k_ = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        q_out, k_out = fn(q_, k_, cos, sin, unsqueeze_dim)
        generator = torch.Generator(device=q.device).manual_seed(1)
        grad_q = torch.randn(q_out.shape, dtype=q_out.dtype, device=q.device, generator=generator)
        grad_k = torch.randn(k_out.shape, dtype=k_out.dtype, device=q.device, generator=generator)
        torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
        results.append((q_out, k_out, q_.grad, k_.grad))
    tol = TOLERANCES[dtype]
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, **tol)
    return results[0]


def test_reference_is_transformers():
    q, k, cos, sin = _inputs(2, 4, 2, 5, 8, torch.bfloat16, "cpu")
    for actual, expected in zip(reference_rope(q, k, cos, sin), transformers_rope(q, k, cos, sin), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    "batch,q_heads,k_heads,seq,head_dim",
    [
        (1, 4, 2, 1, 16),  # one position (decoding)
        (2, 4, 2, 7, 16),  # GQA
        (2, 3, 3, 17, 100),  # odd head count, half of head_dim not a power of two
        (3, 8, 1, 5, 10),  # MQA
    ],
)
@pytest.mark.parametrize("cos_batch", ["one", "batch"])
def test_rope_fp32(batch, q_heads, k_heads, seq, head_dim, cos_batch):
    inputs = _inputs(batch, q_heads, k_heads, seq, head_dim, torch.float32, DEVICE, 1 if cos_batch == "one" else batch)
    _compare(*inputs, torch.float32)


def test_halves_are_not_assumed_equal():
    """Any cos and sin, not only the repeated frequencies of rotary modules: each half of the
    rotation, and its transpose in the backward, uses its own half of cos and sin."""
    q, k, _, _ = _inputs(2, 4, 2, 7, 16, torch.float32, DEVICE)
    angles = torch.randn(2, 7, 16, device=DEVICE)
    _compare(q, k, angles.cos() * 1.3, angles.sin() * 0.6, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_16bit(dtype):
    _compare(*_inputs(2, 4, 2, 17, 64, dtype, DEVICE), dtype)


@pytest.mark.parametrize("layout", ["attention", "contiguous"])
def test_outputs_keep_the_input_layout(layout):
    """Like the eager elementwise ops, the outputs (and q/k gradients) take the inputs' strides."""
    q, k, cos, sin = _inputs(2, 4, 2, 7, 16, torch.float32, DEVICE, layout=layout)
    q_out, k_out, _, _ = _compare(q, k, cos, sin, torch.float32)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


def test_non_dense_input():
    """Every other position of q and k (not one dense block): copied first, then rotated."""
    q, k, cos, sin = _inputs(2, 4, 2, 14, 16, torch.float32, DEVICE)
    _compare(q[:, :, ::2], k[:, :, ::2], cos[:, ::2], sin[:, ::2], torch.float32)


def test_seq_heads_layout():
    """unsqueeze_dim=2: q/k as [batch, seq, heads, head_dim]."""
    q, k, cos, sin = _inputs(2, 4, 2, 7, 16, torch.float32, DEVICE)
    _compare(q.transpose(1, 2), k.transpose(1, 2), cos, sin, torch.float32, unsqueeze_dim=2)


def test_rejects_bad_arguments():
    q, k, cos, sin = _inputs(1, 2, 1, 3, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="head_dim must be even"):
        apply_rotary_pos_emb(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary_pos_emb(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="does not match"):
        apply_rotary_pos_emb(q, k[:, :, :2], cos, sin)


@gpu
@pytest.mark.parametrize(
    "batch,q_heads,k_heads,seq,head_dim",
    [(1, 32, 8, 4096, 128), (2, 28, 4, 1024, 128), (4, 16, 16, 333, 64)],
    ids=["llama3-8b", "qwen2.5-7b", "odd-seq"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_gpu(batch, q_heads, k_heads, seq, head_dim, dtype):
    _compare(*_inputs(batch, q_heads, k_heads, seq, head_dim, dtype, "cuda", cos_batch=batch), dtype)
