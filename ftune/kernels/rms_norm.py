"""RMSNorm, forward and backward, with transformers' numerics.

Llama, Mistral, Qwen2 and Qwen3 (`casting_mode="llama"`): in fp32, `x * rsqrt(mean(x^2) + eps)`,
rounded to the input dtype, then multiplied by the weight (in the promoted dtype of the two).
Gemma and Gemma 2 (`offset=1.0, casting_mode="gemma"`): the multiply by `(1 + weight)` happens in
fp32 and only the product is rounded to the input dtype.

Only the input and one fp32 `rstd` per row are saved for the backward; the eager module keeps an
fp32 copy of the input, the normalized rows and their rounded copy. The weight gradient is computed
only when the weight requires one (it is frozen under LoRA), from per-program partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import block_settings, check_device, num_programs, num_warps_for

CASTING_MODES = ("llama", "gemma")

# Rows are processed in tiles of about this many elements: one 4096-wide row of Llama's hidden
# states, or 32 rows of Qwen3's 128-wide per-head norms, where one short row per program would
# leave most of each program's threads idle.
TILE_ELEMENTS = 4096


@triton.jit
def _rms_norm_forward_kernel(
    Y_ptr,
    Y_row_stride,
    X_ptr,
    X_row_stride,
    W_ptr,
    RSTD_ptr,
    n_rows,
    n_cols,
    eps,
    offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_SIZE)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]

    x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD_ptr + rows, rstd, mask=row_mask)

    normed = x * rstd[:, None]
    if CAST_BEFORE_WEIGHT:
        # Llama: `weight * normed.to(input_dtype)`. The product of two 16-bit floats is exact in
        # fp32, so rounding it once on the store gives the very bits of the eager 16-bit multiply.
        normed = normed.to(X_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(W_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    y = normed * w[None, :]
    tl.store(Y_ptr + rows[:, None] * Y_row_stride + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY_ptr,
    DY_row_stride,
    DX_ptr,
    DX_row_stride,
    X_ptr,
    X_row_stride,
    W_ptr,
    RSTD_ptr,
    DW_ptr,
    n_rows,
    n_cols,
    offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Program p takes the tiles p, p + P, p + 2P, ... With a weight gradient, P is about the number
    # of SMs and each program adds its tiles into one partial row (summed after the launch, no
    # atomics); without, there is one tile per program.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), n_programs):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + rows[:, None] * DY_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)[:, None]
        normed = x * rstd
        dnormed = dy * w[None, :]
        # d(x * rstd)/dx applied to dnormed: rstd * (dnormed - normed * mean(dnormed * normed))
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / n_cols)[:, None])
        tl.store(DX_ptr + rows[:, None] * DX_row_stride + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            if CAST_BEFORE_WEIGHT:
                # The forward multiplied the weight by the rounded rows
                normed = normed.to(X_ptr.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * normed, axis=0)
    if HAS_DW:
        tl.store(DW_ptr + pid * n_cols + cols, dw, mask=col_mask)


def _tile_settings(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """BLOCK_ROWS, BLOCK_SIZE and num_warps for tiles of whole rows."""
    block_size, _ = block_settings(n_cols)
    block_rows = min(max(TILE_ELEMENTS // block_size, 1), triton.next_power_of_2(n_rows))
    return block_rows, block_size, num_warps_for(block_rows * block_size)


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (y, x as rows, rstd)."""
    shape = x.shape
    n_cols = shape[-1]
    x2d = x.reshape(-1, n_cols)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    n_rows = x2d.shape[0]
    cast_before_weight = casting_mode == "llama"
    # Llama multiplies in the promoted dtype (an fp32 weight gives fp32 output); Gemma returns the input dtype
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_rows, block_size, num_warps = _tile_settings(n_rows, n_cols)
    _rms_norm_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
        y,
        y.stride(0),
        x2d,
        x2d.stride(0),
        weight,
        rstd,
        n_rows,
        n_cols,
        eps,
        offset,
        CAST_BEFORE_WEIGHT=cast_before_weight,
        BLOCK_ROWS=block_rows,
        BLOCK_SIZE=block_size,
        num_warps=num_warps,
    )
    return y.view(shape), x2d, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting_mode: str,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (dx shaped like dy, dweight or None)."""
    shape = dy.shape
    n_rows, n_cols = x2d.shape
    dy2d = dy.reshape(-1, n_cols)
    if dy2d.stride(-1) != 1:
        dy2d = dy2d.contiguous()
    dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    block_rows, block_size, num_warps = _tile_settings(n_rows, n_cols)
    n_tiles = triton.cdiv(n_rows, block_rows)
    if weight_grad:
        grid = min(num_programs(x2d.device), n_tiles)
        dw_partial = torch.empty((grid, n_cols), dtype=torch.float32, device=x2d.device)
    else:
        grid = n_tiles
        dw_partial = rstd  # never read: HAS_DW is off
    _rms_norm_backward_kernel[(grid,)](
        dy2d,
        dy2d.stride(0),
        dx,
        dx.stride(0),
        x2d,
        x2d.stride(0),
        weight,
        rstd,
        dw_partial,
        n_rows,
        n_cols,
        offset,
        CAST_BEFORE_WEIGHT=casting_mode == "llama",
        HAS_DW=weight_grad,
        BLOCK_ROWS=block_rows,
        BLOCK_SIZE=block_size,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(dim=0).to(weight.dtype) if weight_grad else None
    return dx.view(shape), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting_mode):
        y, x2d, rstd = rms_norm_forward(x, weight, eps, offset, casting_mode)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset = offset
        ctx.casting_mode = casting_mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(
            dy, x2d, weight, rstd, ctx.offset, ctx.casting_mode, weight_grad=ctx.needs_input_grad[1]
        )
        return dx, dw, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> torch.Tensor:
    """RMSNorm over the last dimension of `x`, scaled by `weight + offset`.

    `casting_mode="llama"` rounds the normalized rows to `x.dtype` before the weight multiply
    (LlamaRMSNorm and its copies); `"gemma"` multiplies in fp32 and rounds the product (Gemma's
    `offset=1.0`).
    """
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match rows of {x.shape[-1]}")
    check_device(x, weight)
    return RMSNormFunction.apply(x, weight, eps, offset, casting_mode)
