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
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ftune.kernels.utils import check_device, num_warps_for

# The chunk's logits, in the compute dtype, stay within this bound: 256 MiB holds 1046 tokens of a
# 128256-token vocabulary in bf16, enough rows for the matmuls to run at full speed, where the
# whole logits of 16k tokens would take 4 GiB (8 GiB once upcast to fp32).
MAX_CHUNK_LOGITS_BYTES = 256 * 2**20
# The widest slice of a row a program holds at once (Liger-Kernel's choice for H100-class GPUs,
# with 32 warps); rows wider than this are walked block by block.
MAX_BLOCK_SIZE = 32768


class LossStats(NamedTuple):
    """Per-batch statistics over the labelled tokens, without gradient: 0-d fp32 tensors."""

    entropy_sum: torch.Tensor  # sum over tokens of the entropy of the predicted distribution
    num_correct: torch.Tensor  # tokens whose label is the argmax of the logits (first max on ties)
    num_tokens: torch.Tensor  # labelled tokens


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
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
        if HAS_SOFTCAP:
            # softcap * tanh(z / softcap), with tanh(x) = 2 * sigmoid(2x) - 1
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
        z = tl.where(mask, z, float("-inf"))
        if WITH_STATS:
            block_max, block_arg = tl.max(z, axis=0, return_indices=True)
            # Strictly greater: an earlier block's maximum wins a tie, as in torch.argmax
            best_idx = tl.where(block_max > best, start + block_arg, best_idx)
            best = tl.maximum(best, block_max)
        else:
            block_max = tl.max(z, axis=0)
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
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            if HAS_SOFTCAP:
                t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
                z = softcap * t
            grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = grad * scale
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            grad = grad * logit_scale
            tl.store(row_ptr + cols, grad.to(LOGITS_ptr.dtype.element_ty), mask=mask)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` into an fp32 `acc` without rounding each chunk's product to 16 bits first."""
    if acc.device.type == "cuda" and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def chunk_tokens(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that the chunk's logits stay within MAX_CHUNK_LOGITS_BYTES."""
    return max(1, MAX_CHUNK_LOGITS_BYTES // (vocab_size * dtype.itemsize))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,  # [N, H]
        weight,  # [V, H]
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
        n_rows = hidden.shape[0]
        vocab_size = weight.shape[0]
        grad_h, grad_w, grad_b = needs_grad
        with_grad = grad_h or grad_w or grad_b

        # The one host sync: dropping the ignored tokens before the matmuls needs their count, and
        # the kernel reads each target's logit by index, so an out-of-range label must stop here
        labelled = targets != ignore_index
        in_range = torch.where(labelled, targets, 0)
        n_valid, low, high = torch.stack([labelled.sum(), in_range.min(), in_range.max()]).tolist()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"labels must be in [0, {vocab_size}) or {ignore_index}, got values in [{low}, {high}]")
        all_valid = n_valid == n_rows
        valid = None if all_valid else torch.nonzero_static(labelled, size=n_valid).squeeze(1)
        valid_targets = targets if all_valid else targets[valid]
        if num_items_in_batch is None:
            scale = torch.full((), 1.0 / max(n_valid, 1), dtype=torch.float32, device=device)
        else:
            # A tensor stays on the device: no sync
            scale = 1.0 / torch.as_tensor(num_items_in_batch, device=device).float()

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
        # The casts are explicit; an enclosing autocast must not re-cast the matmuls' operands
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n_valid, chunk_size):
                end = min(start + chunk_size, n_valid)
                rows = None if all_valid else valid[start:end]
                h = (hidden[start:end] if all_valid else hidden.index_select(0, rows)).to(compute_dtype)
                logits = logits_buffer[: end - start]
                if bias_c is None:
                    torch.mm(h, weight_c.t(), out=logits)
                else:
                    torch.addmm(bias_c, h, weight_c.t(), out=logits)
                _cross_entropy_forward_kernel[(end - start,)](
                    logits,
                    logits.stride(0),
                    valid_targets[start:end],
                    loss_rows[start:end],
                    entropy_rows[start:end] if with_stats else loss_rows,
                    correct_rows[start:end] if with_stats else loss_rows,
                    scale,
                    vocab_size,
                    logit_scale,
                    softcap if softcap is not None else 1.0,
                    HAS_SOFTCAP=softcap is not None,
                    WITH_GRAD=with_grad,
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
                        grad_hidden.index_copy_(0, rows, (logits @ weight_c).to(grad_hidden.dtype))
                if grad_w:
                    _accumulate_fp32(grad_weight, logits.t(), h)
                if grad_b:
                    grad_bias += logits.sum(dim=0, dtype=torch.float32)

        if n_valid == 0:
            # Not 0 * scale: with num_items_in_batch == 0 that would be NaN
            loss = torch.zeros((), dtype=torch.float32, device=device)
        else:
            loss = loss_rows.sum() * scale
        num_tokens = torch.full((), float(n_valid), dtype=torch.float32, device=device)
        entropy_sum = entropy_rows.sum()
        num_correct = correct_rows.sum()

        ctx.grads = (grad_hidden, grad_weight, grad_bias)
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
    weight: torch.Tensor,
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

    hidden: [..., seq, hidden_size]; weight: [vocab, hidden_size]; labels: [..., seq], shifted by
    one here (the last position gets `ignore_index`); `shift_labels`, already shifted, take
    precedence over them as in transformers. Returns the fp32 loss, and with `return_stats` a
    `LossStats`. `chunk_size` (tokens per chunk) defaults to what keeps the chunk's logits within
    MAX_CHUNK_LOGITS_BYTES.
    """
    if labels is None and shift_labels is None:
        raise ValueError("pass labels (shifted here) or shift_labels (already shifted)")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(shift_labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"hidden states ({hidden.dtype}) and LM head ({weight.dtype}) differ, outside autocast")
    else:
        compute_dtype = weight.dtype
    check_device(hidden, weight)
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
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
        chunk_size or chunk_tokens(weight.shape[0], compute_dtype),
        return_stats,
        needs_grad,
    )
    if return_stats:
        return loss, LossStats(entropy_sum, num_correct, num_tokens)
    return loss
