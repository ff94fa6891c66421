"""SwiGLU, `silu(gate) * up`, forward and backward.

The eager MLP keeps `silu(gate)` and the product for the backward on top of gate and up, and
rounds twice (after the silu, after the product). Here the math runs in fp32 inside one kernel
and rounds once; the backward recomputes the silu from the saved gate, so only gate and up are
kept. The kernels walk rows of the last dimension, so gate and up may be column blocks of one
wider buffer (ftune/kernels/lora_augmented.py).

Where gate and up are a projection's fresh outputs (the patched MLP), the backward writes their
gradients over them instead of into new buffers: each element is read before it is written, by
the same thread. In the recomputed MLP chunk of an 8B Llama at 8192 tokens that removes 2 x 126
MiB from the moment of the SwiGLU backward, which was the step's peak; the down projection's
backward just before it is now the peak, 14 MiB lower (6.237 to 6.223 GiB on an H200, see
docs/benchmarks.md). The overwrite bumps the tensors' version counters, so a second backward
through the same graph (retain_graph) raises instead of reading gradients as activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import check_device

# 1024 elements, 4 warps: 8 per thread, full 128-bit loads of 16-bit data
BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_forward_kernel(GATE_ptr, UP_ptr, Y_ptr, n_cols, gate_stride, up_stride, y_stride,
                           BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    gate = tl.load(GATE_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y_ptr + row * y_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    DY_ptr, GATE_ptr, UP_ptr, DGATE_ptr, DUP_ptr, n_cols, dy_stride, gate_stride, up_stride, dgate_stride,
    dup_stride, BLOCK_SIZE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(DY_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * silu
    tl.store(DGATE_ptr + row * dgate_stride + cols, dgate.to(DGATE_ptr.dtype.element_ty), mask=mask)
    tl.store(DUP_ptr + row * dup_stride + cols, dup.to(DUP_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as a matrix of its last dimension's rows without a copy (rows may lie apart), or None
    when no such matrix views it."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    rows = _rows(t)
    if rows is None:
        raise ValueError("swiglu reads rows of contiguous elements")
    return rows


def _grid(rows: torch.Tensor):
    return (rows.shape[0], triton.cdiv(rows.shape[1], BLOCK_SIZE))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(gate) * up` into `out` (new when None). All three are matrices of rows or tensors
    viewed as rows of their last dimension; rows of a matrix may lie apart (columns of a wider
    buffer), each row's elements contiguous."""
    y = torch.empty_like(gate) if out is None else out
    g, u, o = _rows_of(gate), _rows_of(up), _rows_of(y)
    _swiglu_forward_kernel[_grid(g)](g, u, o, g.shape[1], g.stride(0), u.stride(0), o.stride(0),
                                     BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of gate and up; with overwrite_inputs, written over gate and up themselves."""
    d = _rows(dy)
    if d is None:  # a gradient through sum() or cat() may be laid out otherwise
        d = _rows_of(dy.contiguous())
    dgate = gate if overwrite_inputs else torch.empty_like(gate)
    dup = up if overwrite_inputs else torch.empty_like(up)
    g, u, dg, du = (_rows_of(t) for t in (gate, up, dgate, dup))
    _swiglu_backward_kernel[_grid(g)](
        d, g, u, dg, du, g.shape[1], d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
        BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS
    )
    if overwrite_inputs:
        torch.autograd.graph.increment_version((gate, up))
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, overwrite_inputs):
        # one layout for both, so that the gradients written over them line up with them
        gate = gate.contiguous()
        up = up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.overwrite_inputs = overwrite_inputs
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return (*swiglu_backward(dy, gate, up, ctx.overwrite_inputs), None)


def swiglu(gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False) -> torch.Tensor:
    """`silu(gate) * up` in the inputs' dtype, computed in fp32.

    overwrite_inputs: the backward may write the gradients over gate and up, which nothing else
    may read afterwards (true of the projections' outputs in an MLP).
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    check_device(gate, up)
    return SwiGLUFunction.apply(gate, up, overwrite_inputs)
