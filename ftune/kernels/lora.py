"""LoRA's update added inside one GEMM: `base(x) + s * (x A^T) B^T` as `addmm(base(x), x A^T, B^T, alpha=s)`.

peft's LoRA forward (for a 4-bit base layer) makes three passes over each projection's output
after the base GEMM: a defensive `clone` of it, the `* scaling` of the adapter's product, and the
`+` of the two. Each pass reads and writes a tensor of tokens x out_features (14336 wide for the
MLP): for the 8B shape at 8192 tokens, 45 GB of memory traffic per forward, ~15 ms per pass
on an H100. `addmm` folds the scaling and the sum into the GEMM's epilogue (it reads the base
output once while writing the result), so the three passes disappear; the backward is addmm's
own (the incoming gradient passes through to the base output unchanged).

Numerically it rounds once where peft rounds three times (product, scaled product, sum); in fp32
the two agree to the last bits (tests/kernels/test_lora.py).

Over a bitsandbytes 4-bit base with one adapter and no dropout, training can go through
`_LoRAOver4bit`, whose backward also folds the adapter's input gradient into the base's. Autograd
computes the two as separate tokens x in_features tensors and then sums them, both alive at once:
in the recomputed MLP chunk of the 8B shape (4608 tokens, down projection 14336 wide) a 127 MiB
gradient sits at the step's peak beside the base's own 126 MiB (docs/benchmarks.md). With it the
8B shape's peak at 8192 tokens is 5.99 GiB instead of 6.17 on an H200, and the gradients are
peft's (tests/kernels/test_lora.py), but it stays off (FOLD_ADAPTER_INPUT_GRADIENT): its blocks
cost 1-22% of the step's speed there, depending on the host (docs/benchmarks.md). Its blocks now
dequantize in one launch each (`ftune/kernels/nf4.py`, 1.7x bitsandbytes' four launches on an H200);
the folded step has not been timed again since.

The fast path covers what training uses: one or more plain LoRA adapters, active, unmerged, without
DoRA-style variants or per-row adapter names, with the input already in the adapter's dtype or
autocast on (so that peft would not cast). Anything else calls peft's own forward, unchanged.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.nn import functional as F

from ftune.kernels.nf4 import dequantize_nf4, dequantizes

# Route training over 4-bit bases through _LoRAOver4bit (see the module docstring): off, for its
# price in speed.
FOLD_ADAPTER_INPUT_GRADIENT = False
# Largest piece of a 4-bit weight that _LoRAOver4bit dequantizes at once (linear_through_4bit,
# grad_through_4bit).
DEQUANTIZED_BLOCK_BYTES = 32 * 1024**2
# Up to this many tokens bitsandbytes multiplies by the 4-bit weight in its own kernels, without
# a 16-bit copy of it (its CUDA backend's _gemm_4bit_custom_max_m); above, it dequantizes all of it.
BITSANDBYTES_FUSED_MAX_TOKENS = 1536
# Blocks of a weight span whole GEMM tiles (and quantization blocks, 64 values).
GEMM_TILE = 128
# The 16-bit copies of 4-bit base weights made inside `dequantized_once`, by (weight, dtype).
_REUSED_WEIGHTS: dict[tuple[int, torch.dtype], torch.Tensor] | None = None


def overwritable(x: torch.Tensor) -> torch.Tensor:
    """Mark `x` as read by nothing but the LoRA projection it is passed to (an MLP's SwiGLU
    product into down_proj): that projection's backward may then write x's gradient over x."""
    x._ftune_overwritable = True
    return x


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A bound `forward` for a peft LoRA layer; `self._ftune_peft_forward` is peft's."""
    group = getattr(self, "_ftune_projection_group", None)
    if group is not None and not args and not kwargs:  # lora_augmented.ProjectionGroup
        result = group.forward(self, x)
        if result is not None:
            return result
    if not _fast_path_applies(self, x, kwargs):
        return self._ftune_peft_forward(x, *args, **kwargs)
    single = _single_plain_adapter(self) if FOLD_ADAPTER_INPUT_GRADIENT else None
    if single is not None and torch.is_grad_enabled() and not args and not kwargs and _is_4bit(self.base_layer):
        return _LoRAOver4bit.apply(x, self.lora_A[single].weight, self.lora_B[single].weight, self.base_layer,
                                   self.scaling[single], getattr(x, "_ftune_overwritable", False))
    if (getattr(self, "_ftune_output_unread", False) and torch.is_grad_enabled() and not args and not kwargs
            and _is_4bit(self.base_layer) and self.base_layer.bias is None):
        result = _Base4bitGradientOnly.apply(x, self.base_layer)
    elif _REUSED_WEIGHTS is not None and not args and not kwargs and _reads_whole_weight(self.base_layer, x):
        result = _Base4bitReused.apply(x, self.base_layer)
    else:
        result = self.base_layer(x, *args, **kwargs)
    out_shape = result.shape
    result = result.reshape(-1, out_shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        down = F.linear(self.lora_dropout[name](x), lora_a.weight).reshape(-1, lora_a.weight.shape[0])
        result = torch.addmm(result, down, lora_b.weight.t(), alpha=self.scaling[name])
    return result.reshape(out_shape)


@contextlib.contextmanager
def output_unread(layer: nn.Module | None):
    """Within this block, `layer`'s output is only differentiated, never read: the recomputed MLP's
    down projection (ftune/engine/halves.py), whose output the layer adds to the residual stream,
    which the backward already has. Its 4-bit base GEMM then runs only in the backward, for the
    input gradient; the forward's (a third of the recomputed MLP's GEMM work, and a dequantization
    of the weight) is skipped."""
    if layer is None:
        yield
        return
    layer._ftune_output_unread = True
    try:
        yield
    finally:
        layer._ftune_output_unread = False


@contextlib.contextmanager
def dequantized_once():
    """Within this block each 4-bit base weight is dequantized once, and that 16-bit copy serves
    every GEMM that reads the weight, forward and backward, until the block ends.

    A recomputed layer's MLP runs in chunks of tokens (ftune/engine/halves.py), and each chunk went
    through bitsandbytes, which dequantizes the whole weight for every GEMM past its fused kernels'
    range: in the backward of one layer at 8192 tokens of the 8B shape (two chunks), 10
    dequantizations of the MLP's three weights, 20 at 16384 (four chunks); 3 in this block,
    whatever the length. The price is the three copies alive together for the block (336 MiB for
    the 8B MLP) where one was alive at a time.
    """
    global _REUSED_WEIGHTS
    outer, _REUSED_WEIGHTS = _REUSED_WEIGHTS, {}
    try:
        yield
    finally:
        _REUSED_WEIGHTS = outer


def _dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight in `dtype`: `dequantized_once`'s copy inside its block, a new one outside."""
    if _REUSED_WEIGHTS is None:
        return _whole_weight(weight, dtype)
    key = (id(weight), dtype)
    if key not in _REUSED_WEIGHTS:
        _REUSED_WEIGHTS[key] = _whole_weight(weight, dtype)
    return _REUSED_WEIGHTS[key]


def _reads_whole_weight(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether bitsandbytes would multiply x by this layer's whole dequantized weight (so a reused
    copy computes exactly what it computes): a 4-bit NF4/FP4 layer in the flat layout, frozen bias,
    autocast off or in the compute dtype, and on CUDA more tokens than its fused kernels take."""
    if not _is_4bit(layer) or getattr(layer.weight, "quant_state", None) is None:
        return False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False) or (layer.bias is not None and layer.bias.requires_grad):
        return False
    tokens = x.numel() // max(1, x.shape[-1])
    if x.device.type == "cuda" and tokens <= BITSANDBYTES_FUSED_MAX_TOKENS:
        return False
    dtype = layer.compute_dtype or x.dtype
    autocast = torch.is_autocast_enabled(x.device.type)
    return not autocast or torch.get_autocast_dtype(x.device.type) == dtype


class _Base4bitInputGradient(torch.autograd.Function):
    """The input gradient of a bitsandbytes Linear4bit exactly as bitsandbytes' own backward makes it
    (the weight dequantized, one matmul in the gradient's compute dtype), the weight taken from
    `dequantized_once` inside its block; the subclasses' forwards differ."""

    @staticmethod
    def _prepare(ctx, x, layer) -> torch.dtype:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(layer)
        ctx.layer, ctx.input_dtype = layer, x.dtype
        ctx.compute_dtype = layer.compute_dtype or x.dtype
        return ctx.compute_dtype

    @staticmethod
    def backward(ctx, grad_output):
        # Linear4bit casts x to its compute dtype and the product back: the casts' backwards and
        # MatMul4Bit's, in that order
        grad = grad_output.to(ctx.compute_dtype)
        return torch.matmul(grad, _dequantized(ctx.layer.weight, grad.dtype)).to(ctx.input_dtype), None


class _Base4bitReused(_Base4bitInputGradient):
    """A bitsandbytes Linear4bit as bitsandbytes computes it for long inputs (x cast to the compute
    dtype, one GEMM with the whole dequantized weight, the bias added, the product cast back), the
    weight taken from `dequantized_once`."""

    @staticmethod
    def forward(ctx, x, layer):
        dtype = _Base4bitInputGradient._prepare(ctx, x, layer)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x.to(dtype), _dequantized(layer.weight, dtype), bias).to(x.dtype)


class _Base4bitGradientOnly(_Base4bitInputGradient):
    """A bitsandbytes Linear4bit (no bias) whose output is never read: the forward returns an
    uninitialized tensor of the output's shape and dtype; the backward is bitsandbytes' input gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        _Base4bitInputGradient._prepare(ctx, x, layer)
        return x.new_empty(*x.shape[:-1], layer.weight.quant_state.shape[0])


class _LoRAOver4bit(torch.autograd.Function):
    """`base(x) + s (x A^T) B^T` over a frozen 4-bit base; the backward adds the adapter's input
    gradient into the base's in place, dequantizing the base weight a block at a time.

    With `overwrite_input` (see `overwritable`) the input gradient is written over x itself once
    the adapter's gradients have read it: in the 8B shape's recomputed MLP that is the 112 MiB
    SwiGLU product of a 4096-token chunk, alive at the step's peak beside its gradient. Writing
    bumps x's version counter, so a second backward through the graph raises instead of reading
    the gradient as x.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base_layer, scaling, overwrite_input=False):
        result = linear_through_4bit(x, base_layer)
        out_shape = result.shape
        down = F.linear(x, lora_a)
        result = torch.addmm(result.reshape(-1, out_shape[-1]), down.reshape(-1, down.shape[-1]), lora_b.t(),
                             alpha=scaling)
        ctx.save_for_backward(x, down, lora_a, lora_b)
        ctx.base_layer, ctx.scaling, ctx.overwrite_input = base_layer, scaling, overwrite_input
        return result.reshape(out_shape)

    @staticmethod
    def backward(ctx, grad_output):
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        x, down, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        dtype = grad.dtype
        down = down.reshape(-1, down.shape[-1]).to(dtype)
        grad_down = torch.mm(grad, lora_b.to(dtype)).mul_(scaling)
        grad_x = grad_a = grad_b = None
        # the adapter's gradients first: they read x, which the input gradient may overwrite
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_down.t(), x.reshape(-1, x.shape[-1]).to(dtype)).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(grad.t(), down).mul_(scaling).to(lora_b.dtype)
        if ctx.needs_input_grad[0]:
            layer = ctx.base_layer
            fix_4bit_weight_quant_state_from_module(layer)  # FSDP's gathered weight lacks it
            in_place = ctx.overwrite_input and x.dtype == dtype and x.is_contiguous()
            grad_x = grad_through_4bit(grad, layer.weight, out=x.view(-1, x.shape[-1]) if in_place else None)
            grad_x.addmm_(grad_down, lora_a.to(dtype))
            grad_x = grad_x.view(*x.shape[:-1], grad_x.shape[-1]).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def linear_through_4bit(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear4bit's forward, `x W^T`, with W dequantized a block of output
    rows at a time (at most DEQUANTIZED_BLOCK_BYTES), each block's GEMM writing its own output
    columns. bitsandbytes dequantizes all of W for long inputs: 112 MiB beside the recomputed
    MLP chunk's gate, up and product at the 8B shape's peak. Every output element is still one
    full dot product in the compute dtype, as bitsandbytes computes it. Short inputs (which
    bitsandbytes multiplies without a 16-bit W), biases and CPU-repacked weights take the layer's
    own forward.
    """
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    weight, state = layer.weight, layer.weight.quant_state
    out_features, in_features = state.shape
    tokens = x.numel() // in_features
    dtype = layer.compute_dtype or x.dtype
    rows = DEQUANTIZED_BLOCK_BYTES // (in_features * torch.empty((), dtype=dtype).element_size())
    # whole 128-wide GEMM tiles and 16-byte aligned output columns (32 MiB of the down projection
    # is 1170 rows, which would misalign them; aligning did not change the step's speed on an H200)
    rows = rows // GEMM_TILE * GEMM_TILE if rows >= GEMM_TILE else rows
    autocast = torch.is_autocast_enabled(x.device.type)
    if (tokens <= BITSANDBYTES_FUSED_MAX_TOKENS or not 0 < rows < out_features or not _blocks_apply(state)
            or layer.bias is not None or (autocast and torch.get_autocast_dtype(x.device.type) != dtype)):
        return layer(x)
    flat = x.reshape(tokens, in_features).to(dtype)
    result = torch.empty(tokens, out_features, dtype=dtype, device=x.device)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        block = dequantize_nf4(weight, dtype, rows=(start, stop))
        torch.mm(flat, block.t(), out=result[:, start:stop])
        del block
    return result.view(*x.shape[:-1], out_features).to(x.dtype)


def _whole_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight dequantized whole, in `dtype`, as its own backward makes it."""
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(dtype)


def _blocks_apply(state) -> bool:
    """Whether a weight can be dequantized a block at a time here: NF4 in bitsandbytes' flat
    layout (`dequantize_nf4`), its rows whole quantization blocks. bitsandbytes' CPU kernels
    restart the blocks at each row and its CUDA kernels do not, which agree only then; the
    layer's own path keeps the tests on CPU comparable with it."""
    return dequantizes(state) and state.shape[1] % state.blocksize == 0


def grad_through_4bit(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`grad @ W` for a bitsandbytes 4-bit weight W [out, in], in the gradient's dtype (into `out`
    when given, which grad must not overlap).

    bitsandbytes' own backward dequantizes all of W to 16 bits first: 112 MiB for the 8B shape's
    MLP projections, alive at the step's peak beside the gradient it produces (docs/benchmarks.md).
    Here W is dequantized a block of input columns at a time (at most DEQUANTIZED_BLOCK_BYTES),
    and each block's GEMM writes its own columns of the result. Every output element is still one
    full-length dot product rounded once, so the result is the one-shot product's; splitting over
    output rows instead would round partial sums to bf16 once per block.
    """
    state = weight.quant_state
    dtype = grad.dtype
    out_features, in_features = state.shape
    step = max(GEMM_TILE, state.blocksize)  # both powers of two: a multiple of each
    columns = DEQUANTIZED_BLOCK_BYTES // (out_features * grad.element_size()) // step * step
    if not 0 < columns < in_features or not _blocks_apply(state):
        return torch.mm(grad, _whole_weight(weight, dtype), out=out)
    result = torch.empty(grad.shape[0], in_features, dtype=dtype, device=grad.device) if out is None else out
    for start in range(0, in_features, columns):
        stop = min(start + columns, in_features)
        block = dequantize_nf4(weight, dtype, columns=(start, stop))
        torch.mm(grad, block, out=result[:, start:stop])
        del block  # freed before the next block is made: the allocator hands the same memory back
    return result


def _single_plain_adapter(layer) -> str | None:
    """The name of the layer's one active adapter when it has no dropout, else None."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or not isinstance(layer.lora_dropout[active[0]], nn.Identity):
        return None
    return active[0]


def _is_4bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def _fast_path_applies(layer, x: torch.Tensor, kwargs: dict) -> bool:
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return False
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active or any(name in getattr(layer, "lora_variant", {}) for name in active):
        return False
    if any(layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None for name in active):
        return False
    # peft casts x to the adapter's dtype when autocast is off; the fast path would not, so it
    # takes only inputs that need no cast
    autocast = torch.is_autocast_enabled(x.device.type)
    return autocast or all(layer.lora_A[name].weight.dtype == x.dtype for name in active)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers around linear projections (plain, bitsandbytes 4-bit or 8-bit) in `model`."""
    from peft.tuners.lora import LoraLayer

    # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses; embeddings and convolutions are not
    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), nn.Linear)]


def patch_lora(model: nn.Module) -> int:
    """Give each LoRA layer of `model` the fused forward, and the attention's projections their
    groups (lora_augmented.py); returns how many layers were patched."""
    from ftune.kernels.lora_augmented import group_projections  # it builds on this module

    layers = lora_layers(model)
    for layer in layers:
        layer._ftune_peft_forward = layer.forward
        layer.forward = types.MethodType(fused_lora_forward, layer)
    group_projections(model)
    return len(layers)
