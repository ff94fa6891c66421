"""Rotary position embedding of query and key in one launch, forward and backward.

The transformers convention (`rotate_half`): `q * cos + rotate_half(q) * sin`, with q and k shaped
[batch, heads, seq, head_dim] as attention has them after `.transpose(1, 2)`, which makes them
non-contiguous views of [batch, seq, heads, head_dim] storage. The kernel reads and writes through
strides, so neither they nor the outputs are copied to another layout; the outputs take the
inputs' layout, as the eager elementwise ops give them. cos and sin are [batch or 1, seq, head_dim].

One program handles a few positions of one sequence: it loads their cos and sin once and rotates
every query head and every key head (GQA: their counts differ). The backward is the transposed
rotation, the same kernel with the sine terms swapped and negated; only cos and sin are saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import check_device, num_warps_for

# Positions are taken a few at a time so that a program holds about this many elements of q per
# half: one position of Llama-3-8B's 32 heads of 128, several of a small model's heads.
TILE_ELEMENTS = 2048


@triton.jit
def _rotate_heads(
    X_ptr,
    Y_ptr,
    stride_h,
    stride_t,
    positions,
    seq_len,
    n_heads,
    half_dim,
    cos1,
    cos2,
    sin1,
    sin2,
    IS_BACKWARD: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Tiles are [positions, heads, half of head_dim]; cos and sin come as [positions, 1, half]
    heads = tl.arange(0, BLOCK_HEADS)[None, :, None]
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = (positions < seq_len) & (heads < n_heads) & (dims < half_dim)
    offsets = positions * stride_t + heads * stride_h + dims
    x_first = X_ptr + offsets
    y_first = Y_ptr + offsets
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half_dim, mask=mask, other=0.0).to(tl.float32)
    if IS_BACKWARD:
        # The transpose of [[cos1, -sin1], [sin2, cos2]]
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        # rotate_half(x) = cat(-x2, x1)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_first, y1.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_first + half_dim, y2.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q_ptr,
    QO_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    K_ptr,
    KO_ptr,
    k_stride_b,
    k_stride_h,
    k_stride_t,
    COS_ptr,
    SIN_ptr,
    cos_stride_b,
    cos_stride_t,
    seq_len,
    n_q_heads,
    n_k_heads,
    half_dim,
    IS_BACKWARD: tl.constexpr,
    BLOCK_POSITIONS: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Position blocks on grid axis 0 (up to 2**31 - 1 programs): axis 1 stops at 65535, which 150k
    # tokens in blocks of 2 positions exceed.
    b = tl.program_id(1).to(tl.int64)
    positions = tl.program_id(0).to(tl.int64) * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS).to(tl.int64)[:, None, None]

    # Both halves of cos and sin are read: rotary modules repeat the frequencies, but nothing here
    # relies on it. cos and sin share their strides.
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = (positions < seq_len) & (dims < half_dim)
    cos_row = COS_ptr + b * cos_stride_b + positions * cos_stride_t + dims
    sin_row = SIN_ptr + b * cos_stride_b + positions * cos_stride_t + dims
    cos1 = tl.load(cos_row, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + half_dim, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + half_dim, mask=mask, other=0.0).to(tl.float32)

    _rotate_heads(
        Q_ptr + b * q_stride_b,
        QO_ptr + b * q_stride_b,
        q_stride_h,
        q_stride_t,
        positions,
        seq_len,
        n_q_heads,
        half_dim,
        cos1,
        cos2,
        sin1,
        sin2,
        IS_BACKWARD,
        BLOCK_Q_HEADS,
        BLOCK_HALF,
    )
    _rotate_heads(
        K_ptr + b * k_stride_b,
        KO_ptr + b * k_stride_b,
        k_stride_h,
        k_stride_t,
        positions,
        seq_len,
        n_k_heads,
        half_dim,
        cos1,
        cos2,
        sin1,
        sin2,
        IS_BACKWARD,
        BLOCK_K_HEADS,
        BLOCK_HALF,
    )


def _with_output(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x with unit stride on head_dim, and an output of the same strides (one set of strides
    serves both in the kernel). A dense input keeps its layout, as eager elementwise ops keep it;
    anything else is made contiguous first."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, dtype=dtype)
    if out.stride() != x.stride():
        x = x.contiguous()
        out = torch.empty_like(x, dtype=dtype)
    return x, out


def rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_dtype: torch.dtype,
    is_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] (or their gradients) into new tensors."""
    q, q_out = _with_output(q, out_dtype)
    k, k_out = _with_output(k, out_dtype)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    block_half = triton.next_power_of_2(head_dim // 2)
    block_q_heads = triton.next_power_of_2(n_q_heads)
    block_k_heads = triton.next_power_of_2(n_k_heads)
    block_positions = min(max(TILE_ELEMENTS // (block_q_heads * block_half), 1), triton.next_power_of_2(seq_len))
    _rope_kernel[(triton.cdiv(seq_len, block_positions), batch)](
        q,
        q_out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k,
        k_out,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos,
        sin,
        0 if cos.shape[0] == 1 else cos.stride(0),  # a cos of batch 1 serves every sequence
        cos.stride(1),
        seq_len,
        n_q_heads,
        n_k_heads,
        head_dim // 2,
        IS_BACKWARD=is_backward,
        BLOCK_POSITIONS=block_positions,
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=block_k_heads,
        BLOCK_HALF=block_half,
        num_warps=num_warps_for(block_positions * block_q_heads * block_half),
    )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        # The eager `q * cos` promotes: an fp32 cos with bf16 q gives fp32
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        q_out, k_out = rope_launch(q, k, cos, sin, out_dtype, is_backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.q_dtype = q.dtype
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # q and k share a dtype (checked in apply_rotary_pos_emb)
        dq, dk = rope_launch(dq, dk, cos, sin, ctx.q_dtype, is_backward=True)
        # cos and sin come from the rotary module under no_grad: they get no gradient
        return dq, dk, None, None


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' `apply_rotary_pos_emb`: returns (q_embed, k_embed).

    `unsqueeze_dim=1` takes q/k as [batch, heads, seq, head_dim]; `2` as [batch, seq, heads, head_dim].
    cos and sin are [batch or 1, seq, head_dim] and receive no gradient.
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    if unsqueeze_dim == 2:
        q_embed, k_embed = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_embed.transpose(1, 2), k_embed.transpose(1, 2)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d [batch, heads, seq, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, _, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.dim() != 3 or x.shape[0] not in (1, batch) or x.shape[1:] != (seq_len, head_dim):
            raise ValueError(f"{name} must be [1 or {batch}, {seq_len}, {head_dim}], got {tuple(x.shape)}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    check_device(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)
