"""The NF4 dequantization kernel against bitsandbytes' own: whole weights and blocks of rows or
columns, with and without double quantization, and the flat block layout of bitsandbytes' CUDA
kernels where a row is not whole blocks."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from ftune.kernels.nf4 import BLOCK_COLS, BLOCK_ROWS, dequantize_nf4, dequantizes
from ftune.kernels.utils import INTERPRET
from tests.kernels.common import DEVICE, gpu


def _quantized(out_features, in_features, nested, device=DEVICE, seed=0, blocksize=64):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, state = bnb_functional.quantize_4bit(weight.to(device), blocksize=blocksize, compress_statistics=nested,
                                                 quant_type="nf4")
    packed.quant_state = state
    return packed, state


def _as_bitsandbytes_rounds(values_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel's 16-bit output is here: rounded to nearest when compiled, as bitsandbytes
    rounds; truncated under Triton's interpreter, which casts float32 to bfloat16 by dropping bits."""
    if INTERPRET and dtype == torch.bfloat16:
        return (values_fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return values_fp32.to(dtype)


# blocks of 64 values, rows of 3 to 6 of them; shapes beyond one program's 8 x 256 tile and within it
SHAPES = [(70, 384), (2 * BLOCK_ROWS + 3, BLOCK_COLS + 64), (5, 192)]
PIECES = {  # a piece of an out_features x in_features weight
    "whole": lambda rows, cols: {},
    "rows": lambda rows, cols: dict(rows=(1, rows - 2)),
    "columns": lambda rows, cols: dict(columns=(64, cols)),
    "rows-and-columns": lambda rows, cols: dict(rows=(1, 4), columns=(64, 128)),
}


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_dequantize_nf4_equals_bitsandbytes(shape, nested, piece):
    packed, state = _quantized(*shape, nested)
    whole = bnb_functional.dequantize_4bit(packed, state)  # fp32: the arithmetic itself, bit for bit
    piece = PIECES[piece](*shape)
    expected = whole[slice(*piece.get("rows", (None,))), slice(*piece.get("columns", (None,)))]
    actual = dequantize_nf4(packed, torch.float32, **piece)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(dequantize_nf4(packed, dtype, **piece), _as_bitsandbytes_rounds(expected, dtype),
                                   atol=0, rtol=0)


def bitsandbytes_columns(packed: torch.Tensor, state, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns start:stop of a 4-bit weight through bitsandbytes: the block's packed bytes and
    scales copied out contiguous, the double-quantized scales expanded, then its dequantization
    (the four launches per block that the kernel replaces; rows must be whole blocks)."""
    out_features, in_features = state.shape
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float().view(out_features, in_features // state.blocksize)
    rows = packed.view(torch.uint8).view(out_features, in_features // 2)
    piece = bnb_functional.QuantState(absmax=absmax[:, start // state.blocksize: stop // state.blocksize].contiguous(),
                                      shape=(out_features, stop - start), blocksize=state.blocksize,
                                      quant_type=state.quant_type, dtype=dtype)
    return bnb_functional.dequantize_4bit(rows[:, start // 2: stop // 2].contiguous(), piece)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_a_block_of_columns_is_bitsandbytes_block(nested):
    packed, state = _quantized(24, 512, nested)
    torch.testing.assert_close(dequantize_nf4(packed, torch.float32, columns=(128, 384)),
                               bitsandbytes_columns(packed, state, 128, 384, torch.float32), atol=0, rtol=0)


def _flat_reference(packed: torch.Tensor, state) -> torch.Tensor:
    """NF4 with quantization blocks running flat over the row-major weight, as bitsandbytes'
    CUDA kernels lay them out (its CPU kernels restart them at each row)."""
    out_features, in_features = state.shape
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    nibbles = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1).long()
    levels = bnb_functional.get_4bit_type("nf4", device=packed.device)
    values = levels[nibbles[: out_features * in_features]].float()
    scales = absmax.float().repeat_interleave(state.blocksize)[: out_features * in_features]
    return (values * scales).view(out_features, in_features)


@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_blocks_run_flat_across_rows_as_on_cuda(nested, blocksize):
    """Rows of 101 values: the quantization blocks straddle the rows, and half the elements start
    in the low nibble of a byte. Pieces start at odd rows and columns."""
    packed, state = _quantized(9, 101, nested, blocksize=blocksize)
    reference = _flat_reference(packed, state)
    torch.testing.assert_close(dequantize_nf4(packed, torch.float32), reference, atol=0, rtol=0)
    torch.testing.assert_close(dequantize_nf4(packed, torch.float32, rows=(3, 8), columns=(33, 70)),
                               reference[3:8, 33:70], atol=0, rtol=0)


def test_refuses_fp4_and_pieces_outside_the_weight():
    packed, state = _quantized(16, 128, nested=True)
    with pytest.raises(ValueError, match="not within a 16 x 128 weight"):
        dequantize_nf4(packed, torch.float32, columns=(64, 192))
    fp4, fp4_state = bnb_functional.quantize_4bit(torch.randn(16, 128, device=DEVICE), quant_type="fp4")
    fp4.quant_state = fp4_state
    assert not dequantizes(fp4_state)
    with pytest.raises(ValueError, match="fp4"):
        dequantize_nf4(fp4, torch.float32)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_dequantize_nf4_on_the_gpu_is_bitsandbytes_bit_for_bit(dtype, nested):
    """The 8B shape's down projection (4096 x 14336), compiled: whole, a block of 1152 columns as
    the folded LoRA backward reads it, and a block of 1152 rows as its forward does."""
    packed, state = _quantized(4096, 14336, nested, device="cuda")
    state.dtype = dtype
    whole = bnb_functional.dequantize_4bit(packed, state)
    assert whole.dtype == dtype
    torch.testing.assert_close(dequantize_nf4(packed, dtype), whole, atol=0, rtol=0)
    torch.testing.assert_close(dequantize_nf4(packed, dtype, columns=(1152, 2304)), whole[:, 1152:2304],
                               atol=0, rtol=0)
    torch.testing.assert_close(dequantize_nf4(packed, dtype, rows=(2304, 3456)), whole[2304:3456], atol=0, rtol=0)


@gpu
def test_scales_left_on_another_device_are_refused():
    packed, state = _quantized(16, 128, nested=True, device="cuda")
    state.absmax = state.absmax.cpu()
    with pytest.raises(RuntimeError, match="quantization scales on cpu"):
        dequantize_nf4(packed, torch.bfloat16)
