"""Attention's output parked beside the layer input, so a recomputed layer skips attention's forward.

A recomputed layer reruns its attention half to rebuild what the backward reads: the rotated
query, key and value, and attention's output with its log-sum-exp. The flash kernels' backward
needs exactly those. Recomputing q, k and v costs three projections. Recomputing the output costs
a whole attention forward, quadratic in the sequence: on an H200, 4% of an 8192-token step of
the 8B shape and 7% at 16384 (docs/benchmarks.md).

So an offloaded layer's forward keeps the output and the log-sum-exp its kernel made. They go to
host memory beside the layer input, with the residual after attention (the MLP's input). The
backward then runs the MLP straight from the parked residual, while the input, output and
log-sum-exp come back over the host link. The attention half is rerun last, for its graph only:
the projections and RoPE are recomputed, the parked output stands in for the attention forward,
and the output projection's forward is skipped (ftune/integrations/peft.py, `unread`).

transformers calls attention through a registry (`AttentionInterface`); ftune wraps its `sdpa`
entry (ftune/integrations/transformers.py `wrap_attention`). Outside a recording or a replay, and
for any call the parked path does not cover (a padding mask, dropout, cached keys), the wrapper
calls transformers' own function unchanged. Whether a step parks at all is the memory model's
rule (ftune/memory/estimate.py `parks`): within a share of host memory and a number of tokens.

A padding-free batch (TRL's collator: the batch's rows end to end in one sequence, positions
restarting at each row) parks too. Its rows are the collator's `cu_seq_lens_q` (where each row
starts), which reach the attention beside the block-diagonal causal mask that transformers built
from the same positions. The parked path reads the rows and not the mask: on CUDA it runs
PyTorch's flash-attention kernel for rows of varying length, which skips the blocks between rows
(a dense mask makes SDPA compute them and throw them away); on CPU the flash kernel for CPU with
the block-diagonal mask made from the rows.

The kernels: on CUDA, cuDNN's fused attention, the one PyTorch's SDPA picks on Hopper for these
shapes, forward and backward; on CPU, PyTorch's flash kernel for CPU (which SDPA runs there). The
backward is the kernel's own, on the very output and log-sum-exp of the forward, so the gradients
are those of a layer that kept its activations.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ftune.integrations.transformers import wrap_attention

logger = logging.getLogger(__name__)

_original_sdpa = None
# What the wrapper does now: record the next attention's output, or replay a parked one.
_recording: Recording | None = None
_replaying: AttentionOutput | None = None
# (device, dtype, head size) whose attention kernel refused the parked path: SDPA runs as usual there.
_refused: set[tuple] = set()


@dataclass
class AttentionOutput:
    """One attention call's output (batch, tokens, heads, head_dim), its log-sum-exp and what else
    its kernel's backward takes (`extras`: the kernel's other outputs and, for a padding-free
    batch, its rows; the engine carries them through host memory as they are)."""

    output: torch.Tensor
    logsumexp: torch.Tensor
    extras: tuple
    scale: float

    @property
    def rows(self) -> PackedRows | None:
        """A padding-free batch's rows; None: one causal sequence per batch entry."""
        return next((extra for extra in self.extras if isinstance(extra, PackedRows)), None)


@dataclass
class PackedRows:
    """The rows of a padding-free batch (batch 1): where each starts, then the token count
    (`cu_seq_lens`, int32, as TRL's collator and the flash kernels have it), and the longest row."""

    starts: torch.Tensor
    longest: int

    @classmethod
    def of_call(cls, query, kwargs) -> PackedRows | None:
        """The rows an attention call names (TRL's padding-free collator gives them to the model,
        which passes them on), or None for a call without them."""
        starts, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if starts is None or longest is None or kwargs.get("cu_seq_lens_k") is None or query.shape[0] != 1:
            return None
        if kwargs.get("max_length_k") != longest or starts.shape != kwargs["cu_seq_lens_k"].shape:
            return None
        return cls(starts.to(device=query.device, dtype=torch.int32), int(longest))

    def mask(self, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (tokens, tokens): 0 where a token sees a key (its own row, not later),
        -inf elsewhere."""
        lengths = self.starts.diff()
        row = torch.repeat_interleave(torch.arange(len(lengths), device=self.starts.device), lengths)
        position = torch.arange(tokens, device=self.starts.device)
        sees = (row[:, None] == row[None, :]) & (position[:, None] >= position[None, :])
        return torch.zeros(tokens, tokens, device=self.starts.device, dtype=dtype).masked_fill(~sees, float("-inf"))


class Recording:
    """Receives the output of the attention run inside `recording_attention`, if the parked path took it."""

    result: AttentionOutput | None = None


def install() -> None:
    """Wrap transformers' `sdpa` attention (once per process)."""
    wrap_attention("sdpa", _parking)


def _parking(original):
    global _original_sdpa
    _original_sdpa = original
    return _parked_sdpa


@contextlib.contextmanager
def recording_attention():
    """Within this block the attention's output and log-sum-exp are kept (`Recording.result`)."""
    global _recording
    outer, _recording = _recording, Recording()
    try:
        yield _recording
    finally:
        _recording = outer


@contextlib.contextmanager
def replaying_attention(parked: AttentionOutput):
    """Within this block the attention returns `parked` and differentiates through it."""
    global _replaying
    outer, _replaying = _replaying, parked
    try:
        yield
    finally:
        _replaying = outer


def _parked_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any):
    global _replaying

    def sdpa(query, key, value):  # transformers' own, unchanged
        return _original_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)

    if _recording is None and _replaying is None:
        return sdpa(query, key, value)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast runs SDPA: in its dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rows = PackedRows.of_call(query, kwargs)
    if not _takes(module, query, key, value, attention_mask, dropout, is_causal, kwargs, rows):
        return sdpa(query, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _replaying is not None:
        parked, _replaying = _replaying, None  # one attention per layer: the next call computes
        return _ReplayedAttention.apply(query, key, value, parked), None
    try:
        output, logsumexp, extras = _forward(query, key, value, scale, rows)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # a kernel that does not take these inputs: SDPA picks another
        _refused.add(_kind(query))
        logger.warning("attention outputs of %s are recomputed, not parked: %s", _kind(query),
                       str(error).splitlines()[0])
        return sdpa(query, key, value)
    output = output.transpose(1, 2)  # (batch, tokens, heads, head_dim), as transformers' sdpa returns it
    if not output.is_contiguous():
        output = output.contiguous()
    _recording.result = AttentionOutput(output, logsumexp, extras, scale)
    return output, None


def _kind(query) -> tuple:
    """What a kernel's refusal is remembered by: the device, the dtype and the head size."""
    return query.device.type, query.dtype, query.shape[-1]


def _takes(module, query, key, value, attention_mask, dropout, is_causal, kwargs, rows: PackedRows | None) -> bool:
    """Whether the parked path computes what transformers' sdpa would: causal self-attention over
    the whole sequence or, in a padding-free batch, over each of its rows; no other mask (so no
    padding), no dropout, no extra bias, one dtype; on CUDA a 16-bit one, with PyTorch's cuDNN
    attention (flash attention for rows) enabled and no deterministic algorithms asked for (their
    backwards are not deterministic)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # a padding-free batch's mask is the rows' block-diagonal one, which `rows` makes again
    unmasked = attention_mask is None or rows is not None
    if not (causal and unmasked and dropout == 0.0 and kwargs.get("position_bias") is None
            and query.shape[2] == key.shape[2] > 1 and query.shape[-1] == key.shape[-1]
            and query.dtype == key.dtype == value.dtype and _kind(query) not in _refused):
        return False
    if query.device.type == "cuda":
        backends = torch.backends.cuda
        enabled = backends.flash_sdp_enabled() if rows is not None else backends.cudnn_sdp_enabled()
        return (query.dtype in (torch.float16, torch.bfloat16) and enabled
                and not torch.are_deterministic_algorithms_enabled())
    return query.device.type == "cpu"


def _forward(query, key, value, scale, rows: PackedRows | None = None):
    """Attention's output (batch, heads, tokens, head_dim), log-sum-exp and the backward's extras."""
    if rows is not None:
        return _packed_forward(query, key, value, scale, rows)
    if query.device.type == "cuda":
        (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, seed, offset,
         _) = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False,
                                                                 scale=scale)
        return output, logsumexp, (cum_seq_q, cum_seq_k, max_q, max_k, seed, offset)
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True,
                                                                                   scale=scale)
    return output, logsumexp, ()


def _packed_forward(query, key, value, scale, rows: PackedRows):
    if query.device.type == "cuda":  # flash attention over (tokens, heads, head_dim), row by row
        output, logsumexp, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            *_token_major(query, key, value), rows.starts, rows.starts, rows.longest, rows.longest, 0.0, True, False,
            scale=scale)
        return output.transpose(0, 1).unsqueeze(0), logsumexp, (rng_state, unused, rows)
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=rows.mask(query.shape[2], query.dtype), scale=scale)
    return output, logsumexp, (rows,)


def _token_major(*tensors):
    """(1, heads, tokens, head_dim) as the flash kernel for rows takes them: (tokens, heads, head_dim)."""
    return [t[0].transpose(0, 1).contiguous() for t in tensors]


def _packed_backward(grad, query, key, value, parked: AttentionOutput):
    rows, output = parked.rows, parked.output.transpose(1, 2)
    if query.device.type == "cuda":
        rng_state, unused, _ = parked.extras
        grads = torch.ops.aten._flash_attention_backward(
            *_token_major(grad, query, key, value, output), parked.logsumexp, rows.starts, rows.starts, rows.longest,
            rows.longest, 0.0, True, rng_state, unused, scale=parked.scale)
        return tuple(g.transpose(0, 1).unsqueeze(0) for g in grads)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, output, parked.logsumexp, 0.0, False, attn_mask=rows.mask(query.shape[2], query.dtype),
        scale=parked.scale)


def _backward(grad, query, key, value, parked: AttentionOutput):
    if parked.rows is not None:
        return _packed_backward(grad, query, key, value, parked)
    output = parked.output.transpose(1, 2)
    if query.device.type == "cuda":
        cum_seq_q, cum_seq_k, max_q, max_k, seed, offset = parked.extras
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, query, key, value, output, parked.logsumexp, seed, offset, None, cum_seq_q, cum_seq_k,
            max_q, max_k, 0.0, True, scale=parked.scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, output, parked.logsumexp, 0.0, True, scale=parked.scale)


class _ReplayedAttention(torch.autograd.Function):
    """The parked output in place of attention's forward; the kernel's own backward."""

    @staticmethod
    def forward(ctx, query, key, value, parked: AttentionOutput):
        ctx.save_for_backward(query, key, value)
        ctx.parked = parked
        return parked.output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors
        parked, ctx.parked = ctx.parked, None
        try:
            grads = _backward(grad_output.transpose(1, 2), query, key, value, parked)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # a backward that refuses what its forward took: recompute
            _refused.add(_kind(query))
            logger.warning("attention of %s recomputed in the backward: %s", _kind(query), str(error).splitlines()[0])
            inputs = [t.detach().requires_grad_() for t in (query, key, value)]
            rows = parked.rows
            mask = rows.mask(query.shape[2], query.dtype) if rows is not None else None
            with torch.enable_grad():
                output = F.scaled_dot_product_attention(*inputs, attn_mask=mask, is_causal=rows is None,
                                                        scale=parked.scale, enable_gqa=query.shape[1] != key.shape[1])
            grads = torch.autograd.grad(output, inputs, grad_output.transpose(1, 2))
        grad_query, grad_key, grad_value = grads
        return grad_query, grad_key, grad_value, None
