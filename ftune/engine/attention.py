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
entry and ftune's sliding-window one, `ftune_window` (ftune/integrations/transformers.py
`wrap_attention`). Outside a recording or a replay, and for any call the parked path does not
cover (a padding mask, dropout, cached keys), the wrapper calls the implementation's own function
unchanged. Whether a step parks at all is the memory model's rule (ftune/memory/estimate.py
`parks`): within a share of host memory and a number of tokens.

A sliding-window layer (Gemma-3's, Phi-3's: the model passes `sliding_window` to the attention)
parks where its call has no mask: under `ftune_window` (ftune/kernels/window_attention.py), whose
mask function builds none for causal attention within the window, or where the sequence is no
longer than the window (transformers' sdpa then builds none either). On CUDA the flash kernel runs
it with the window, forward and backward; on CPU the flash kernel for CPU with the window's mask.

A padding-free batch (TRL's collator: the batch's rows end to end in one sequence, positions
restarting at each row) parks too. Its rows are the collator's `cu_seq_lens_q` (where each row
starts), which reach the attention beside the block-diagonal causal mask that transformers built
from the same positions. The parked path reads the rows and not the mask: on CUDA it runs
PyTorch's flash-attention kernel for rows of varying length, which skips the blocks between rows
(a dense mask makes SDPA compute them and throw them away), within the layer's window if it has
one; on CPU the flash kernel for CPU with the block-diagonal mask made from the rows.

The kernels: on CUDA, cuDNN's fused attention, the one PyTorch's SDPA picks on Hopper for these
shapes, forward and backward (PyTorch's flash kernel for rows and windows, which cuDNN's takes
neither of); on CPU, PyTorch's flash kernel for CPU (which SDPA runs there). The
backward is the kernel's own, on the very output and log-sum-exp of the forward, so the gradients
are those of a layer that kept its activations.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn import functional as F

from ftune.integrations.transformers import WINDOW_ATTENTION, register_attention, wrap_attention
from ftune.kernels.window_attention import flash_backward, flash_forward, hiding_window, visible_keys
from ftune.memory.estimate import PARKING_ATTENTION

logger = logging.getLogger(__name__)

# Each wrapped implementation's own function (transformers' sdpa, ftune's sliding-window attention)
_originals: dict[str, Callable] = {}
# What the wrapper does now: record the next attention's output, or replay a parked one.
_recording: Recording | None = None
_replaying: AttentionOutput | None = None
# (device, dtype, head size, kernel) whose attention kernel refused the parked path: the
# implementation's own function runs as usual there.
_refused: set[tuple] = set()


@dataclass
class AttentionOutput:
    """One attention call's output (batch, tokens, heads, head_dim), its log-sum-exp and what else
    its kernel's backward takes (`extras`: the kernel's other outputs and, for a padding-free
    batch, its rows, for a sliding-window layer, its window; the engine carries them through host
    memory as they are)."""

    output: torch.Tensor
    logsumexp: torch.Tensor
    extras: tuple
    scale: float

    @property
    def rows(self) -> PackedRows | None:
        """A padding-free batch's rows; None: one causal sequence per batch entry."""
        return next((extra for extra in self.extras if isinstance(extra, PackedRows)), None)

    @property
    def window(self) -> int | None:
        """The keys each query sees, up to itself (transformers' sliding_window); None: all before it."""
        return next((extra.size for extra in self.extras if isinstance(extra, SlidingWindow)), None)


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


@dataclass(frozen=True)
class SlidingWindow:
    """A sliding-window layer's window: each query sees the `size` keys up to itself."""

    size: int


def _window(kwargs, rows: PackedRows | None, tokens: int) -> int | None:
    """The window the model passes for the layer where it hides keys: shorter than the sequence
    (than the longest row of a padding-free batch); None where the layer attends to all before."""
    return hiding_window(kwargs.get("sliding_window"), rows.longest if rows is not None else tokens)


def _mask(tokens: int, dtype: torch.dtype, device, rows: PackedRows | None, window: int | None) -> torch.Tensor:
    """The additive mask (tokens, tokens) of the rows and the window, for the CPU kernel: 0 where a
    token sees a key (in its own row, not later, within the window), -inf elsewhere."""
    sees = visible_keys(tokens, window, rows.starts if rows is not None else None, device=device)
    return torch.zeros(tokens, tokens, device=device, dtype=dtype).masked_fill(~sees, float("-inf"))


class Recording:
    """Receives the output of the attention run inside `recording_attention`, if the parked path took it."""

    result: AttentionOutput | None = None


def install() -> None:
    """Wrap transformers' `sdpa` attention and ftune's sliding-window attention (once per process)."""
    register_attention(WINDOW_ATTENTION)
    for name in PARKING_ATTENTION:
        wrap_attention(name, _parking(name))


def _parking(name: str):
    def make_wrapper(original):
        _originals[name] = original

        def parked(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any):
            return _parked_attention(name, module, query, key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, is_causal=is_causal, **kwargs)

        return parked

    return make_wrapper


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


def _parked_attention(name: str, module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any):
    global _replaying

    def original(query, key, value):  # the implementation's own, unchanged
        return _originals[name](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal, **kwargs)

    if _recording is None and _replaying is None:
        return original(query, key, value)
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast runs SDPA: in its dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rows = PackedRows.of_call(query, kwargs)
    window = _window(kwargs, rows, key.shape[2])
    if not _takes(module, query, key, value, attention_mask, dropout, is_causal, kwargs, rows, window):
        return original(query, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _replaying is not None:
        parked, _replaying = _replaying, None  # one attention per layer: the next call computes
        return _ReplayedAttention.apply(query, key, value, parked), None
    try:
        output, logsumexp, extras = _forward(query, key, value, scale, rows, window)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # a kernel that does not take these inputs: the implementation's own runs
        kind = _kind(query, rows, window)
        _refused.add(kind)
        logger.warning("attention outputs of %s are recomputed, not parked: %s", kind, str(error).splitlines()[0])
        return original(query, key, value)
    output = output.transpose(1, 2)  # (batch, tokens, heads, head_dim), as transformers' sdpa returns it
    if not output.is_contiguous():
        output = output.contiguous()
    _recording.result = AttentionOutput(output, logsumexp, extras, scale)
    return output, None


def _kind(query, rows: PackedRows | None, window: int | None) -> tuple:
    """What a kernel's refusal is remembered by: the device, the dtype, the head size and, on CUDA,
    the kernel (flash for rows and windows, cuDNN's otherwise)."""
    kernel = "flash" if rows is not None or window is not None else "cudnn"
    return query.device.type, query.dtype, query.shape[-1], kernel if query.device.type == "cuda" else None


def _takes(module, query, key, value, attention_mask, dropout, is_causal, kwargs, rows: PackedRows | None,
           window: int | None = None) -> bool:
    """Whether the parked path computes what the implementation would: causal self-attention over
    the whole sequence or, in a padding-free batch, over each of its rows, within the layer's
    window if it has one; no other mask (so no padding), no dropout, no extra bias, one dtype; on
    CUDA a 16-bit one, with PyTorch's cuDNN attention (flash attention for rows and windows)
    enabled and no deterministic algorithms asked for (their backwards are not deterministic)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # a padding-free batch's mask is the rows' block-diagonal one (within the window), which `rows` makes again
    unmasked = attention_mask is None or rows is not None
    if not (causal and unmasked and dropout == 0.0 and kwargs.get("position_bias") is None
            and query.shape[2] == key.shape[2] > 1 and query.shape[-1] == key.shape[-1]
            and query.dtype == key.dtype == value.dtype and _kind(query, rows, window) not in _refused):
        return False
    if query.device.type == "cuda":
        backends = torch.backends.cuda
        flash = rows is not None or window is not None
        enabled = backends.flash_sdp_enabled() if flash else backends.cudnn_sdp_enabled()
        return (query.dtype in (torch.float16, torch.bfloat16) and enabled
                and not torch.are_deterministic_algorithms_enabled())
    return query.device.type == "cpu"


def _forward(query, key, value, scale, rows: PackedRows | None = None, window: int | None = None):
    """Attention's output (batch, heads, tokens, head_dim), log-sum-exp and the backward's extras."""
    marks = tuple(mark for mark in (rows, SlidingWindow(window) if window is not None else None) if mark is not None)
    if query.device.type == "cuda":
        if marks:  # flash attention, over the rows (tokens, heads, head_dim) if any, within the window
            output, logsumexp, state = flash_forward(query, key, value, scale, window,
                                                     *((rows.starts, rows.longest) if rows is not None else ()))
            return output, logsumexp, (*state, *marks)
        (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, seed, offset,
         _) = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False,
                                                                 scale=scale)
        return output, logsumexp, (cum_seq_q, cum_seq_k, max_q, max_k, seed, offset)
    mask = _mask(query.shape[2], query.dtype, query.device, rows, window) if marks else None
    output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, mask is None, attn_mask=mask, scale=scale)
    return output, logsumexp, marks


def _backward(grad, query, key, value, parked: AttentionOutput):
    rows, window, output = parked.rows, parked.window, parked.output.transpose(1, 2)
    marked = rows is not None or window is not None
    if query.device.type == "cuda":
        if marked:
            state = parked.extras[:2]
            return flash_backward(grad, query, key, value, output, parked.logsumexp, state, parked.scale, window,
                                  *((rows.starts, rows.longest) if rows is not None else ()))
        cum_seq_q, cum_seq_k, max_q, max_k, seed, offset = parked.extras
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, query, key, value, output, parked.logsumexp, seed, offset, None, cum_seq_q, cum_seq_k,
            max_q, max_k, 0.0, True, scale=parked.scale)
    mask = _mask(query.shape[2], query.dtype, query.device, rows, window) if marked else None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, query, key, value, output, parked.logsumexp, 0.0, mask is None, attn_mask=mask, scale=parked.scale)


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
            rows, window = parked.rows, parked.window
            kind = _kind(query, rows, window)
            _refused.add(kind)
            logger.warning("attention of %s recomputed in the backward: %s", kind, str(error).splitlines()[0])
            inputs = [t.detach().requires_grad_() for t in (query, key, value)]
            marked = rows is not None or window is not None
            mask = _mask(query.shape[2], query.dtype, query.device, rows, window) if marked else None
            with torch.enable_grad():
                output = F.scaled_dot_product_attention(*inputs, attn_mask=mask, is_causal=not marked,
                                                        scale=parked.scale, enable_gqa=query.shape[1] != key.shape[1])
            grads = torch.autograd.grad(output, inputs, grad_output.transpose(1, 2))
        grad_query, grad_key, grad_value = grads
        return grad_query, grad_key, grad_value, None
