"""LM head + cross-entropy in chunks of tokens: the [tokens, vocab] logits never exist whole.

Per chunk of tokens: `logits = hidden_chunk @ weight.T (+ bias)` in the compute dtype (cuBLAS),
then one Triton program per row computes, in fp32 and a block of the vocabulary at a time, the
row's logsumexp and loss and overwrites the row in place with d(loss)/d(logits); then
`grad_hidden_chunk = grad_logits @ weight`, and the weight gradient is accumulated (in fp32) only
when the weight requires one: under QLoRA the LM head is frozen and no work is spent on it. The
gradient of the hidden states is thus computed in the forward pass, and the backward only scales
it by the incoming gradient: two matmuls per chunk in all where a recomputing backward needs three.

Ignored tokens (`ignore_index`) are dropped before any matmul, so prompt and padding tokens cost
nothing. The semantics are those of transformers' `ForCausalLMLoss`: labels shifted by one unless
`shift_labels` are given, a sum divided by `num_items_in_batch` when given (gradient accumulation),
else a mean over the labelled tokens. A batch without any labelled token gives a loss of 0 and
zero gradients (the eager mean gives NaN). Optional: Gemma 2's `final_logit_softcapping`, a
logit scale, and per-batch statistics (entropy, top-1 accuracy) from the same kernel.

A frozen head kept off the device (`WeightInChunks`: ftune.engine.host_memory.HostLMHead) is read
once, a block of vocabulary rows at a time, each block's copy overlapping the matmuls on the one
before, so only two blocks are ever on the device. Each row's softmax is then online across the
blocks, as flash attention's is across keys: the running maximum and sum per row, and the
gradient of the hidden states accumulated in fp32 as `sum_v exp(z_v - max) dz_v/dlogit_v W_v`,
rescaled whenever the maximum moves, and divided by the sum at the end; the label's row of the
head (the one-hot part of the gradient) is gathered from the block that holds it. Two matmuls per
block and token, as on the token-chunked path.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import check_device, num_warps_for

# The chunk's logits, in the compute dtype, stay within this bound: 256 MiB holds 1046 tokens of a
# 128256-token vocabulary in bf16, enough rows for the matmuls to run at full speed, where the
# whole logits of 16k tokens would take 4 GiB (8 GiB once upcast to fp32). The memory model counts
# the same figure (ftune/memory/estimate.py LOSS_LOGITS_BYTES).
MAX_CHUNK_LOGITS_BYTES = 256 * 2**20
# The widest slice of a row a program holds at once (Liger-Kernel's choice for H100-class GPUs,
# with 32 warps); rows wider than this are walked block by block.
MAX_BLOCK_SIZE = 32768


@runtime_checkable
class WeightInChunks(Protocol):
    """A frozen [vocab, hidden] weight kept off the device, read a block of rows at a time."""

    shape: torch.Size
    dtype: torch.dtype
    rows_per_chunk: int

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, the block of `rows_per_chunk` rows on the device) in order, the last block
        partial; the caller drops each block before asking for the next."""
        ...


class LossStats(NamedTuple):
    """Per-batch statistics over the labelled tokens, without gradient: 0-d fp32 tensors."""

    entropy_sum: torch.Tensor  # sum over tokens of the entropy of the predicted distribution
    num_correct: torch.Tensor  # tokens whose label is the argmax of the logits (first max on ties)
    num_tokens: torch.Tensor  # labelled tokens


@triton.jit
def _capped_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """A block of a row's logits as the model's head makes them, scaled then capped
    (softcap * tanh(z / softcap), with tanh(x) = 2 * sigmoid(2x) - 1), and the slope of that map
    at each logit: what a gradient with respect to the capped logits is multiplied by."""
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
    slope = logit_scale
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
        z = softcap * t
        slope = logit_scale * (1.0 - t * t)
    return z, slope


@triton.jit
def _row_block_max(row_ptr, start, n_cols, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr,
                   WITH_ARGMAX: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Columns start .. start + BLOCK_SIZE of a row: their capped logits (-inf past the row's end),
    which of them are in the row, their maximum and, WITH_ARGMAX, the first column that holds it."""
    cols = start + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    z, _ = _capped_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP)
    z = tl.where(mask, z, float("-inf"))
    if WITH_ARGMAX:
        block_max, block_arg = tl.max(z, axis=0, return_indices=True)
        block_col = start + block_arg
    else:
        block_max = tl.max(z, axis=0)
        block_col = start
    return z, mask, block_max, block_col


@triton.jit
def _cross_entropy_forward_kernel(
    LOGITS_ptr,
    logits_row_stride,
    TARGETS_ptr,
    LOSS_ptr,
    ENTROPY_ptr,
    CORRECT_ptr,
    SCALE_ptr,
    n_cols,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    WITH_STATS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS_ptr + row * logits_row_stride
    target = tl.load(TARGETS_ptr + row)

    # Pass 1: online logsumexp over the row (and the entropy's sum of p * z, and the argmax)
    m = float("-inf")
    d = 0.0
    sum_ez = 0.0
    best = float("-inf")
    best_idx = 0
    for start in range(0, n_cols, BLOCK_SIZE):
        z, mask, block_max, block_col = _row_block_max(row_ptr, start, n_cols, logit_scale, softcap, HAS_SOFTCAP,
                                                       WITH_STATS, BLOCK_SIZE)
        if WITH_STATS:
            # Strictly greater: an earlier block's maximum wins a tie, as in torch.argmax
            best_idx = tl.where(block_max > best, block_col, best_idx)
            best = tl.maximum(best, block_max)
        m_new = tl.maximum(m, block_max)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        d = d * alpha + tl.sum(e, axis=0)
        if WITH_STATS:
            sum_ez = sum_ez * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)

    z_target = tl.load(row_ptr + target).to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        z_target = softcap * (2.0 * tl.sigmoid(2.0 * z_target / softcap) - 1.0)
    tl.store(LOSS_ptr + row, lse - z_target)
    if WITH_STATS:
        # H = -sum p log p = lse - sum(p * z)
        tl.store(ENTROPY_ptr + row, lse - sum_ez / d)
        tl.store(CORRECT_ptr + row, (best_idx == target).to(tl.float32))

    if WITH_GRAD:
        # Pass 2: overwrite the row with d(loss)/d(logits) = (softmax - onehot) * scale, through
        # the softcap and the logit scale; `scale` is 1/num_items_in_batch (or 1/num labelled)
        scale = tl.load(SCALE_ptr)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            z, slope = _capped_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP)
            grad = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * scale * slope
            tl.store(row_ptr + cols, grad.to(LOGITS_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online_block_kernel(
    LOGITS_ptr,
    logits_row_stride,
    TARGETS_ptr,
    first_col,
    n_cols,
    MAX_ptr,
    SUM_ptr,
    ALPHA_ptr,
    TARGET_LOGIT_ptr,
    TARGET_SLOPE_ptr,
    SUM_EZ_ptr,
    BEST_ptr,
    BEST_COL_ptr,
    logit_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    WITH_STATS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One row of one block of the vocabulary (columns first_col .. first_col + n_cols): folds the
    block into the row's running maximum and sum (and the entropy's sum of p * z, and the argmax),
    stores the factor `alpha` that rescales what was accumulated under the old maximum, and, with
    WITH_GRAD, overwrites the row with exp(z - max) * dz/dlogit for the next matmul."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS_ptr + row * logits_row_stride
    local_target = tl.load(TARGETS_ptr + row) - first_col
    m_old = tl.load(MAX_ptr + row)

    # The label's logit, read before the row is overwritten
    in_block = (local_target >= 0) & (local_target < n_cols)
    z_target = tl.load(row_ptr + tl.where(in_block, local_target, 0)).to(tl.float32) * logit_scale
    slope_target = logit_scale
    if HAS_SOFTCAP:
        t_target = 2.0 * tl.sigmoid(2.0 * z_target / softcap) - 1.0
        z_target = softcap * t_target
        slope_target = logit_scale * (1.0 - t_target * t_target)
    tl.store(TARGET_LOGIT_ptr + row, tl.where(in_block, z_target, tl.load(TARGET_LOGIT_ptr + row)))
    tl.store(TARGET_SLOPE_ptr + row, tl.where(in_block, slope_target, tl.load(TARGET_SLOPE_ptr + row)))

    # Pass 1: the block's maximum (and argmax)
    block_max = float("-inf")
    block_best_col = 0
    for start in range(0, n_cols, BLOCK_SIZE):
        _, _, part_max, part_col = _row_block_max(row_ptr, start, n_cols, logit_scale, softcap, HAS_SOFTCAP,
                                                  WITH_STATS, BLOCK_SIZE)
        if WITH_STATS:
            # Strictly greater: an earlier column wins a tie, as in torch.argmax
            block_best_col = tl.where(part_max > block_max, part_col, block_best_col)
        block_max = tl.maximum(block_max, part_max)
    m_new = tl.maximum(m_old, block_max)
    alpha = tl.exp(m_old - m_new)

    # Pass 2: the block's sum of exp(z - m_new); with WITH_GRAD the row becomes its gradient's numerator
    total = 0.0
    total_ez = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z, slope = _capped_block(row_ptr, cols, mask, logit_scale, softcap, HAS_SOFTCAP)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        total += tl.sum(e, axis=0)
        if WITH_STATS:
            total_ez += tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        if WITH_GRAD:
            tl.store(row_ptr + cols, (e * slope).to(LOGITS_ptr.dtype.element_ty), mask=mask)

    tl.store(MAX_ptr + row, m_new)
    tl.store(SUM_ptr + row, tl.load(SUM_ptr + row) * alpha + total)
    tl.store(ALPHA_ptr + row, alpha)
    if WITH_STATS:
        tl.store(SUM_EZ_ptr + row, tl.load(SUM_EZ_ptr + row) * alpha + total_ez)
        # Strictly greater: an earlier block wins a tie
        best = tl.load(BEST_ptr + row)
        best_col = tl.where(block_max > best, first_col + block_best_col, tl.load(BEST_COL_ptr + row))
        tl.store(BEST_COL_ptr + row, best_col)
        tl.store(BEST_ptr + row, tl.maximum(best, block_max))


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc` without rounding each chunk's product to 16 bits first."""
    if acc.device.type == "cuda" and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def chunk_tokens(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that the chunk's logits stay within MAX_CHUNK_LOGITS_BYTES."""
    return max(1, MAX_CHUNK_LOGITS_BYTES // (vocab_size * dtype.itemsize))


class _Rows(NamedTuple):
    """The labelled rows, found with the loss's one host sync."""

    count: int
    index: torch.Tensor | None  # their positions among the rows, None when every row is labelled
    targets: torch.Tensor  # their labels
    scale: torch.Tensor  # 1/num_items_in_batch, or 1/count: what each row's loss is multiplied by
    per_block: list[int] | None  # a streamed head's: how many labels fall in each block of its rows


def _labelled_rows(targets, vocab_size, ignore_index, num_items_in_batch, block_rows) -> _Rows:
    device = targets.device
    n_rows = targets.shape[0]
    # The one host sync: dropping the ignored tokens before the matmuls needs their count, and
    # the kernel reads each target's logit by index, so an out-of-range label must stop here
    labelled = targets != ignore_index
    in_range = torch.where(labelled, targets, 0)
    summary = torch.stack([labelled.sum(), in_range.min(), in_range.max()])
    if block_rows is not None:
        blocks = triton.cdiv(vocab_size, block_rows)
        # the ignored rows and out-of-range labels counted in a last bucket, never read
        block_of = torch.where(labelled & (targets >= 0) & (targets < vocab_size), targets // block_rows, blocks)
        # scatter_add, not bincount: on CUDA bincount reads its input's range on the host
        per_block = torch.zeros(blocks + 1, dtype=summary.dtype, device=device)
        per_block.scatter_add_(0, block_of, torch.ones_like(block_of))
        summary = torch.cat([summary, per_block[:blocks]])
    n_valid, low, high, *per_block = summary.tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"labels must be in [0, {vocab_size}) or {ignore_index}, got values in [{low}, {high}]")
    index = None if n_valid == n_rows else torch.nonzero_static(labelled, size=n_valid).squeeze(1)
    if num_items_in_batch is None:
        scale = torch.full((), 1.0 / max(n_valid, 1), dtype=torch.float32, device=device)
    else:
        # A tensor stays on the device: no sync
        scale = 1.0 / torch.as_tensor(num_items_in_batch, device=device).float()
    return _Rows(n_valid, index, targets if index is None else targets[index], scale,
                 per_block if block_rows is not None else None)


def _token_chunked(hidden, weight, bias, rows: _Rows, softcap, logit_scale, compute_dtype, chunk_size, with_stats,
                   needs_grad):
    """The head on the device: chunks of tokens, each against the whole vocabulary."""
    device = hidden.device
    n_valid, all_valid = rows.count, rows.index is None
    vocab_size = weight.shape[0]
    grad_h, grad_w, grad_b = needs_grad
    loss_rows = torch.empty(n_valid, dtype=torch.float32, device=device)
    entropy_rows = torch.empty(n_valid if with_stats else 0, dtype=torch.float32, device=device)
    correct_rows = torch.empty(n_valid if with_stats else 0, dtype=torch.float32, device=device)
    grad_hidden = None
    if grad_h:
        # Ignored rows keep a zero gradient
        grad_hidden = torch.empty_like(hidden) if all_valid else torch.zeros_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if grad_w else None
    grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if grad_b else None

    weight_c = weight.to(compute_dtype)
    bias_c = bias.to(compute_dtype) if bias is not None else None
    block_size = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_SIZE)
    chunk_size = min(chunk_size, max(n_valid, 1))
    logits_buffer = torch.empty((chunk_size, vocab_size), dtype=compute_dtype, device=device)
    for start in range(0, n_valid, chunk_size):
        end = min(start + chunk_size, n_valid)
        index = None if all_valid else rows.index[start:end]
        h = (hidden[start:end] if all_valid else hidden.index_select(0, index)).to(compute_dtype)
        logits = logits_buffer[: end - start]
        if bias_c is None:
            torch.mm(h, weight_c.t(), out=logits)
        else:
            torch.addmm(bias_c, h, weight_c.t(), out=logits)
        _cross_entropy_forward_kernel[(end - start,)](
            logits,
            logits.stride(0),
            rows.targets[start:end],
            loss_rows[start:end],
            entropy_rows[start:end] if with_stats else loss_rows,
            correct_rows[start:end] if with_stats else loss_rows,
            rows.scale,
            vocab_size,
            logit_scale,
            softcap if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None,
            WITH_GRAD=any(needs_grad),
            WITH_STATS=with_stats,
            BLOCK_SIZE=block_size,
            num_warps=num_warps_for(block_size),
        )
        # `logits` now holds d(loss)/d(logits)
        if grad_h:
            if all_valid and grad_hidden.dtype == compute_dtype:
                torch.mm(logits, weight_c, out=grad_hidden[start:end])
            elif all_valid:
                grad_hidden[start:end] = logits @ weight_c
            else:
                grad_hidden.index_copy_(0, index, (logits @ weight_c).to(grad_hidden.dtype))
        if grad_w:
            _accumulate_fp32(grad_weight, logits.t(), h)
        if grad_b:
            grad_bias += logits.sum(dim=0, dtype=torch.float32)
    return loss_rows, entropy_rows, correct_rows, (grad_hidden, grad_weight, grad_bias)


def _vocab_streamed(hidden, weight: WeightInChunks, bias, rows: _Rows, softcap, logit_scale, compute_dtype,
                    block_rows, chunk_size, with_stats, grad_h):
    """The head off the device: blocks of its rows, each against every labelled token, with the
    softmax online across blocks (the module's docstring)."""
    device = hidden.device
    n_valid, all_valid = rows.count, rows.index is None
    f32 = dict(dtype=torch.float32, device=device)
    h_all = (hidden if all_valid else hidden.index_select(0, rows.index)).to(compute_dtype)
    row_max = torch.full((n_valid,), float("-inf"), **f32)
    row_sum = torch.zeros(n_valid, **f32)
    alpha = torch.empty(n_valid, **f32)
    target_logit = torch.zeros(n_valid, **f32)
    target_slope = torch.zeros(n_valid, **f32)
    sum_ez = torch.zeros(n_valid if with_stats else 0, **f32)
    best = torch.full((n_valid if with_stats else 0,), float("-inf"), **f32)
    best_col = torch.zeros(n_valid if with_stats else 0, dtype=torch.int64, device=device)
    if grad_h:
        # sum_v exp(z_v - max) dz_v/dlogit_v W_v, and the label's row of the head
        accumulated = torch.zeros((n_valid, hidden.shape[1]), **f32)
        label_rows = torch.empty((n_valid, hidden.shape[1]), dtype=compute_dtype, device=device)
        # the rows in the order of the block their label falls in
        by_block = torch.sort(rows.targets // block_rows, stable=True).indices
        block_ends = list(itertools.accumulate(rows.per_block))
    bias_c = bias.to(compute_dtype) if bias is not None else None
    block_size = min(triton.next_power_of_2(block_rows), MAX_BLOCK_SIZE)
    chunk_size = min(chunk_size, max(n_valid, 1))
    logits_buffer = torch.empty(chunk_size * block_rows, dtype=compute_dtype, device=device)
    block = 0
    # not `enumerate`: its pending result would hold the previous block while the next is fetched
    for first, w in weight.chunks() if n_valid else ():
        w_c = w.to(compute_dtype)
        cols = w_c.shape[0]
        for start in range(0, n_valid, chunk_size):
            end = min(start + chunk_size, n_valid)
            logits = logits_buffer[: (end - start) * cols].view(end - start, cols)
            if bias_c is None:
                torch.mm(h_all[start:end], w_c.t(), out=logits)
            else:
                torch.addmm(bias_c[first : first + cols], h_all[start:end], w_c.t(), out=logits)
            _online_block_kernel[(end - start,)](
                logits,
                logits.stride(0),
                rows.targets[start:end],
                first,
                cols,
                row_max[start:end],
                row_sum[start:end],
                alpha[start:end],
                target_logit[start:end],
                target_slope[start:end],
                sum_ez[start:end] if with_stats else row_sum,
                best[start:end] if with_stats else row_sum,
                best_col[start:end] if with_stats else row_sum,
                logit_scale,
                softcap if softcap is not None else 1.0,
                HAS_SOFTCAP=softcap is not None,
                WITH_GRAD=grad_h,
                WITH_STATS=with_stats,
                BLOCK_SIZE=block_size,
                num_warps=num_warps_for(block_size),
            )
            if grad_h:
                accumulated[start:end].mul_(alpha[start:end, None])
                _accumulate_fp32(accumulated[start:end], logits, w_c)
        if grad_h:
            begin = block_ends[block - 1] if block else 0
            if block_ends[block] > begin:
                in_block = by_block[begin : block_ends[block]]
                label_rows.index_copy_(0, in_block, w_c.index_select(0, rows.targets[in_block] - first))
        del w, w_c  # the block's memory goes back before the next block is fetched
        block += 1

    lse = row_max + row_sum.log()
    loss_rows = lse - target_logit
    entropy_rows = lse - sum_ez / row_sum if with_stats else sum_ez
    correct_rows = (best_col == rows.targets).float() if with_stats else sum_ez
    grad_hidden = None
    if grad_h:
        # d(loss)/d(hidden) = scale * (softmax-weighted rows - the label's row), each through dz/dlogit
        accumulated.div_(row_sum[:, None])
        accumulated.addcmul_(label_rows, target_slope[:, None], value=-1)
        accumulated.mul_(rows.scale)
        if all_valid:
            grad_hidden = accumulated.to(hidden.dtype)
        else:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows.index, accumulated.to(hidden.dtype))
    return loss_rows, entropy_rows, correct_rows, (grad_hidden, None, None)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,  # [N, H]
        weight,  # [V, H], or a WeightInChunks
        bias,  # [V] or None
        targets,  # [N], already shifted
        num_items_in_batch,
        ignore_index,
        softcap,
        logit_scale,
        compute_dtype,
        chunk_size,
        with_stats,
        needs_grad,  # (hidden, weight, bias)
    ):
        device = hidden.device
        streamed = isinstance(weight, WeightInChunks)
        block_rows = weight.rows_per_chunk if streamed else None
        rows = _labelled_rows(targets, weight.shape[0], ignore_index, num_items_in_batch, block_rows)
        # The casts are explicit; an enclosing autocast must not re-cast the matmuls' operands
        with torch.autocast(device.type, enabled=False):
            if streamed:
                chunk_size = chunk_size or chunk_tokens(block_rows, compute_dtype)
                loss_rows, entropy_rows, correct_rows, grads = _vocab_streamed(
                    hidden, weight, bias, rows, softcap, logit_scale, compute_dtype, block_rows, chunk_size,
                    with_stats, needs_grad[0])
            else:
                chunk_size = chunk_size or chunk_tokens(weight.shape[0], compute_dtype)
                loss_rows, entropy_rows, correct_rows, grads = _token_chunked(
                    hidden, weight, bias, rows, softcap, logit_scale, compute_dtype, chunk_size, with_stats,
                    needs_grad)

        if rows.count == 0:
            # Not 0 * scale: with num_items_in_batch == 0 that would be NaN
            loss = torch.zeros((), dtype=torch.float32, device=device)
        else:
            loss = loss_rows.sum() * rows.scale
        num_tokens = torch.full((), float(rows.count), dtype=torch.float32, device=device)
        entropy_sum = entropy_rows.sum()
        num_correct = correct_rows.sum()

        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(entropy_sum, num_correct, num_tokens)
        return loss, entropy_sum, num_correct, num_tokens

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy's gradients were computed once and already used")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # drop the references: the gradients belong to the caller from here
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        # In place: the [N, H] gradient is the largest buffer here, and no one else holds it
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(hidden_dtype))
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | WeightInChunks,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    """Causal-LM loss of `hidden @ weight.T (+ bias)` against `labels`, as transformers'
    `ForCausalLMLoss` computes it on full logits, without the full logits.

    hidden: [..., seq, hidden_size]; weight: [vocab, hidden_size], or a frozen `WeightInChunks`
    (read a block of rows at a time); labels: [..., seq], shifted by one here (the last position
    gets `ignore_index`); `shift_labels`, already shifted, take precedence over them as in
    transformers. Returns the fp32 loss, and with `return_stats` a `LossStats`. `chunk_size` (tokens
    per chunk) defaults to what keeps the chunk's logits within MAX_CHUNK_LOGITS_BYTES.
    """
    if labels is None and shift_labels is None:
        raise ValueError("pass labels (shifted here) or shift_labels (already shifted)")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(shift_labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    streamed = isinstance(weight, WeightInChunks)
    if len(weight.shape) != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden states ({hidden.dtype}) and LM head ({weight.dtype}) differ, outside autocast")
    else:
        compute_dtype = weight.dtype
    check_device(hidden, *([] if streamed else [weight]))
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and not streamed and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    if streamed and needs_grad[2]:
        raise ValueError("a head read in chunks is frozen; its bias must be too (requires_grad=False)")
    loss, entropy_sum, num_correct, num_tokens = FusedLinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        shift_labels.reshape(-1).to(hidden.device),
        num_items_in_batch,
        ignore_index,
        final_logit_softcapping,
        logit_scale,
        compute_dtype,
        chunk_size,
        return_stats,
        needs_grad,
    )
    if return_stats:
        return loss, LossStats(entropy_sum, num_correct, num_tokens)
    return loss
