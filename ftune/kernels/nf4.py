"""A piece of a bitsandbytes NF4 weight, dequantized in one launch.

The folded 4-bit LoRA path (`ftune/kernels/lora.py`) never holds a whole 16-bit copy of a base
weight: it dequantizes a block of rows (forward) or of columns (backward) at a time. Through
bitsandbytes each block cost four launches: its packed bytes and scales copied out to be
contiguous (a block of columns is strided in the row-major storage), the double-quantized scales
expanded to fp32, and the dequantization. On an H200 the folded step launched 15,700 kernels
against 10,900 without it and lost 1-22% of its speed depending on the host
(docs/benchmarks.md). Here one kernel reads the block where it lies, expands the scales on the
fly and writes the 16-bit values.

The arithmetic is bitsandbytes' own, in the same order and precision: a scale is
`code[q] * absmax2 + offset` in fp32 under double quantization (two roundings: no fused
multiply-add), a value `NF4[nibble] * scale` in fp32, rounded once to the output dtype. The high
nibble of each byte is the even element. Blocks run flat over the row-major weight, as
bitsandbytes' CUDA kernels do; its CPU kernels restart them at each row, which agrees only when a
row is whole blocks (callers check).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import check_device

# 8 x 256 values per program, 4 warps: 16 values a thread, 256-byte rows of packed input
BLOCK_ROWS = 8
BLOCK_COLS = 256
NUM_WARPS = 4


@triton.jit
def _dequantize_nf4_kernel(
    PACKED_ptr, ABSMAX_ptr, CODE_ptr, ABSMAX2_ptr, OFFSET_ptr, LUT_ptr, OUT_ptr,
    row_start, col_start, n_rows, n_cols, in_features,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    # the element's index in the whole flat weight: its packed byte, nibble and quantization block
    element = (row_start + rows[:, None]).to(tl.int64) * in_features + (col_start + cols[None, :])
    byte = tl.load(PACKED_ptr + element // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(element % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(LUT_ptr + nibble, mask=mask, other=0.0)
    block = element // BLOCKSIZE
    if NESTED:
        code_index = tl.load(ABSMAX_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE_ptr + code_index, mask=mask, other=0.0) * tl.load(
            ABSMAX2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET_ptr)
    else:
        scale = tl.load(ABSMAX_ptr + block, mask=mask, other=0.0)
    out = OUT_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    tl.store(out, (value * scale).to(OUT_ptr.dtype.element_ty), mask=mask)


_NF4_VALUES: dict[torch.device, torch.Tensor] = {}


def _nf4_values(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16 NF4 levels in fp32, one copy per device."""
    if device not in _NF4_VALUES:
        import bitsandbytes.functional as bnb_functional

        _NF4_VALUES[device] = bnb_functional.get_4bit_type("nf4", device=device).float().contiguous()
    return _NF4_VALUES[device]


def dequantizes(state) -> bool:
    """Whether `dequantize_nf4` reads this quantization state: NF4 in bitsandbytes' flat layout
    (not the CPU backend's repacked one)."""
    return state.quant_type == "nf4" and not getattr(state, "packing_format_for_cpu", False)


def dequantize_nf4(weight: torch.Tensor, dtype: torch.dtype, rows: tuple[int, int] | None = None,
                   columns: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows `rows` and columns `columns` (start, stop; all when None) of a bitsandbytes 4-bit
    weight `[out_features, in_features]` (its packed bytes, with `quant_state`), in `dtype`."""
    state = weight.quant_state
    if not dequantizes(state):
        raise ValueError(f"dequantize_nf4 reads NF4 weights in bitsandbytes' flat layout, not {state.quant_type}")
    out_features, in_features = state.shape
    row_start, row_stop = rows or (0, out_features)
    col_start, col_stop = columns or (0, in_features)
    if not (0 <= row_start <= row_stop <= out_features and 0 <= col_start <= col_stop <= in_features):
        raise ValueError(f"rows {rows} and columns {columns} are not within a {out_features} x {in_features} weight")
    n_rows, n_cols = row_stop - row_start, col_stop - col_start
    out = torch.empty(n_rows, n_cols, dtype=dtype, device=weight.device)
    packed = weight.data.reshape(-1).view(torch.uint8)
    check_device(packed, out)
    scales = [state.absmax] + ([state.state2.absmax, state.state2.code] if state.nested else [])
    stray = next((t.device for t in scales if t.device != packed.device), None)
    if stray is not None:  # a Triton kernel would read the wrong memory
        raise RuntimeError(f"a 4-bit weight on {packed.device} has its quantization scales on {stray}; "
                           f"move the layer with .to() (bitsandbytes moves its quant_state with it)")
    if state.nested:
        absmax, code, absmax2, blocksize2 = state.absmax, state.state2.code, state.state2.absmax, state.state2.blocksize
        offset = state.offset.to(device=weight.device, dtype=torch.float32).reshape(1)
    else:
        absmax = state.absmax.float()
        code = absmax2 = offset = absmax  # unread
        blocksize2 = 1
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_cols, BLOCK_COLS))
    _dequantize_nf4_kernel[grid](
        packed, absmax, code, absmax2, offset, _nf4_values(weight.device), out,
        row_start, col_start, n_rows, n_cols, in_features,
        BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2, NESTED=state.nested,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # bitsandbytes rounds the scale's product before adding the offset
    )
    return out
