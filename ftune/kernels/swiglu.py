"""The gated MLP's product, `act(gate) * up`, forward and backward: SwiGLU (act = silu, Llama,
Qwen, Mistral) and GeGLU (act = tanh-approximated GELU, transformers' `gelu_pytorch_tanh`, Gemma).

Both activations are `g * sigmoid(u(g))`: silu with u = g, tanh-GELU with
u = 2 sqrt(2/pi) (g + 0.044715 g^3), since 0.5 (1 + tanh(z)) = sigmoid(2z). One kernel serves both,
the activation a compile-time constant; the sigmoid form needs no tanh (Triton has none) and keeps
`1 + tanh` free of cancellation for negative gates.

The eager MLP keeps `act(gate)` and the product for the backward on top of gate and up, and
rounds twice (after the activation, after the product). Here the math runs in fp32 inside one
kernel and rounds once; the backward recomputes the activation from the saved gate, so only gate
and up are kept. The kernels walk rows of the last dimension, so gate and up may be column blocks
of one wider buffer (ftune/kernels/lora.py).

Where gate and up are a projection's fresh outputs (the patched MLP), the backward writes their
gradients over them instead of into new buffers: each element is read before it is written, by
the same thread. In the recomputed MLP chunk of an 8B Llama at 8192 tokens that keeps 2 x 126 MiB
off the moment of the gated product's backward, so the step peaks at the down projection's backward
just before it, 14 MiB lower (docs/benchmarks.md). The overwrite bumps the tensors' version counters, so a second backward
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

# The gate's activation, by the names ftune.families uses
ACTIVATIONS = ("silu", "gelu_tanh")
# tanh-GELU as g * sigmoid(GELU_SCALE * (g + GELU_CUBIC * g^3)): GELU_SCALE = 2 sqrt(2/pi)
GELU_SCALE = tl.constexpr(1.5957691216057308)
GELU_CUBIC = tl.constexpr(0.044715)
# ACTIVATIONS' index, as the kernels take it (a compile-time integer)
GELU_TANH = tl.constexpr(1)


@triton.jit
def _sigmoid_argument(gate, ACTIVATION: tl.constexpr):
    """u(gate), where act(gate) = gate * sigmoid(u(gate))."""
    u = gate
    if ACTIVATION == GELU_TANH:
        u = GELU_SCALE * gate * (1.0 + GELU_CUBIC * gate * gate)
    return u


@triton.jit
def _swiglu_forward_kernel(GATE_ptr, UP_ptr, Y_ptr, n_cols, gate_stride, up_stride, y_stride,
                           ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    gate = tl.load(GATE_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(_sigmoid_argument(gate, ACTIVATION)) * up
    tl.store(Y_ptr + row * y_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    DY_ptr, GATE_ptr, UP_ptr, DGATE_ptr, DUP_ptr, n_cols, dy_stride, gate_stride, up_stride, dgate_stride,
    dup_stride, ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(DY_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(_sigmoid_argument(gate, ACTIVATION))
    # act'(g) = sig(u) * (1 + g * (1 - sig(u)) * u'(g)), where u' = 1 for silu
    if ACTIVATION == GELU_TANH:
        dgate = dy * up * sig * (1.0 + gate * (1.0 - sig) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * gate * gate))
    else:
        dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * (gate * sig)
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


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown gate activation '{activation}'; ftune's kernel has {', '.join(ACTIVATIONS)}")


def swiglu_forward(
    gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, activation: str = "silu"
) -> torch.Tensor:
    """`act(gate) * up` into `out` (new when None), act silu or gelu_tanh. All three are matrices
    of rows or tensors viewed as rows of their last dimension; rows of a matrix may lie apart
    (columns of a wider buffer), each row's elements contiguous."""
    _check_activation(activation)
    y = torch.empty_like(gate) if out is None else out
    g, u, o = _rows_of(gate), _rows_of(up), _rows_of(y)
    _swiglu_forward_kernel[_grid(g)](g, u, o, g.shape[1], g.stride(0), u.stride(0), o.stride(0),
                                     ACTIVATION=ACTIVATIONS.index(activation), BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False, activation: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of gate and up; with overwrite_inputs, written over gate and up themselves."""
    _check_activation(activation)
    d = _rows(dy)
    if d is None:  # a gradient through sum() or cat() may be laid out otherwise
        d = _rows_of(dy.contiguous())
    dgate = gate if overwrite_inputs else torch.empty_like(gate)
    dup = up if overwrite_inputs else torch.empty_like(up)
    g, u, dg, du = (_rows_of(t) for t in (gate, up, dgate, dup))
    _swiglu_backward_kernel[_grid(g)](
        d, g, u, dg, du, g.shape[1], d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
        ACTIVATION=ACTIVATIONS.index(activation), BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS
    )
    if overwrite_inputs:
        torch.autograd.graph.increment_version((gate, up))
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, overwrite_inputs, activation):
        # one layout for both, so that the gradients written over them line up with them: rows of
        # contiguous elements with one row stride (the two halves of one gate-up projection's output
        # are read and overwritten in place)
        if _rows(gate) is None or _rows(up) is None or gate.stride() != up.stride():
            gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.overwrite_inputs = overwrite_inputs
        ctx.activation = activation
        return swiglu_forward(gate, up, activation=activation)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return (*swiglu_backward(dy, gate, up, ctx.overwrite_inputs, ctx.activation), None, None)


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, overwrite_inputs: bool = False, activation: str = "silu"
) -> torch.Tensor:
    """`act(gate) * up` in the inputs' dtype, computed in fp32.

    overwrite_inputs: the backward may write the gradients over gate and up, which nothing else
    may read afterwards (true of the projections' outputs in an MLP).
    activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU: transformers' gelu_pytorch_tanh, PyTorch's
    `gelu(approximate="tanh")`).
    """
    _check_activation(activation)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    check_device(gate, up)
    return SwiGLUFunction.apply(gate, up, overwrite_inputs, activation)
