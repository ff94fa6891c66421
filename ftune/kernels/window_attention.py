"""Sliding-window attention that never builds a tokens x tokens mask: PyTorch's flash kernel with its window.

Gemma-3 slides a 1024-token window on 5 of every 6 layers, Phi-3 a 2047-token one on every layer.
Under transformers' sdpa a layer longer than its window gets a dense boolean mask of tokens x
tokens (256 MiB at 16384 tokens), SDPA then runs a masked kernel that computes every tile of the
causal triangle and throws most of them away, and the engine's parked attention, which takes no
mask, recomputes those layers' attention in the backward. On an H200 that left gemma-3-4b at 1.47x
and phi-3-mini at 1.23x of transformers + peft at 16384 tokens, where Llama gets 1.75x. The flash
kernel takes the window as two bounds and visits only the tiles inside it: at 16384 tokens a
1024-token window is an eighth of the causal triangle. One layer's attention, forward and backward,
bf16, 16384 tokens, on an H200 (torch 2.11): gemma-3-4b's heads 35.0 ms under SDPA with the dense
mask (8.9 causal, without the window), 2.6 ms with the window; phi-3-mini's 49.2 (13.6) and 5.8 ms.

transformers' window (masking_utils `sliding_window_overlay` on the causal mask): query i sees key
j when j <= i and i - j < sliding_window. The flash kernel's: i - window_size_left <= j <= i +
window_size_right. So window_size_left = sliding_window - 1 and window_size_right = 0.

`window_attention` is an AttentionInterface function and `window_attention_mask` its mask function
(ftune_window, which ftune/families.py picks for Gemma-3 and Phi-3). The mask function builds no
mask where a layer's is causal plus its window and nothing else (no padding, no cache offset, no
packed rows, no extra mask function: what transformers itself signals by `allow_is_causal_skip`),
and otherwise exactly the mask transformers' sdpa gets. The attention function runs
- without a mask, causal, on CUDA in a 16-bit dtype: the flash kernel with the layer's window,
  differentiated by its own derivative;
- anything else (a mask: padding, packed rows, decoding with a cache; CPU, where the flash kernel
  does not run; dropout; deterministic algorithms; a head size the kernel does not take):
  transformers' sdpa, with the window's dense mask where the mask function built none.
So it computes what transformers' sdpa computes, by another kernel or by that very function.

The private ops, checked in torch 2.11 (on the H200) and 2.13:
`aten::_flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
is_causal, return_debug_mask, *, scale, window_size_left, window_size_right, ...)`, whose
derivative (FlashAttentionBackward0) passes the window on, and
`aten::_flash_attention_backward(grad_out, query, key, value, out, logsumexp,
cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale,
window_size_left, window_size_right)`. They take (batch, tokens, heads, head_dim), or a padding-free
batch's rows end to end, (tokens, heads, head_dim) with the rows' starts (cum_seq). The engine's
parked attention (ftune/engine/attention.py) calls them here, `flash_forward` and `flash_backward`.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, fast_all, prepare_padding_mask, sdpa_mask

logger = logging.getLogger(__name__)

# The head sizes the flash kernel takes: multiples of 8 up to 256 (Phi-3's 96, Gemma-3's 256)
FLASH_HEAD_DIMS = range(8, 257, 8)
# (dtype, head size) whose flash kernel refused a call: transformers' sdpa runs those
_refused: set[tuple] = set()


def hiding_window(sliding_window: int | None, tokens: int) -> int | None:
    """The window a layer passes (transformers' sliding_window) where it hides keys of a sequence
    of `tokens`; None where every key up to a query is within it (or the layer has none)."""
    return sliding_window if sliding_window is not None and sliding_window < tokens else None


def flash_bounds(window: int | None) -> tuple[int | None, int | None]:
    """The flash kernel's (window_size_left, window_size_right) for transformers' sliding window."""
    return (None, None) if window is None else (window - 1, 0)


def flash_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int | None = None,
                  starts: torch.Tensor | None = None, longest: int | None = None):
    """Causal attention, each query seeing the `window` keys up to itself where a window is given, of
    query (batch, heads, tokens, head_dim) with key and value (batch, kv_heads, tokens, head_dim).
    With `starts` (int32, where each row starts, then the token count) and `longest`: a padding-free
    batch (batch 1), each row attending within itself. Returns the output (batch, heads, tokens,
    head_dim), its log-sum-exp and what else `flash_backward` takes; differentiable."""
    left, right = flash_bounds(window)
    if starts is None:
        tokens = query.shape[2]
        output, logsumexp, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            *_token_major(query, key, value), None, None, tokens, tokens, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=right)
        return output.transpose(1, 2), logsumexp, (rng_state, unused)
    output, logsumexp, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        *_rows_major(query, key, value), starts, starts, longest, longest, 0.0, True, False, scale=scale,
        window_size_left=left, window_size_right=right)
    return output.transpose(0, 1).unsqueeze(0), logsumexp, (rng_state, unused)


def flash_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   output: torch.Tensor, logsumexp: torch.Tensor, state: tuple, scale: float,
                   window: int | None = None, starts: torch.Tensor | None = None, longest: int | None = None):
    """The gradients of query, key and value (batch, heads, tokens, head_dim) from the output's
    gradient, for `flash_forward`'s output, log-sum-exp and state, with its window and rows."""
    left, right = flash_bounds(window)
    rng_state, unused = state
    if starts is None:
        tokens = query.shape[2]
        grads = torch.ops.aten._flash_attention_backward(
            *_token_major(grad, query, key, value, output), logsumexp, None, None, tokens, tokens, 0.0, True,
            rng_state, unused, scale=scale, window_size_left=left, window_size_right=right)
        return tuple(g.transpose(1, 2) for g in grads)
    grads = torch.ops.aten._flash_attention_backward(
        *_rows_major(grad, query, key, value, output), logsumexp, starts, starts, longest, longest, 0.0, True,
        rng_state, unused, scale=scale, window_size_left=left, window_size_right=right)
    return tuple(g.transpose(0, 1).unsqueeze(0) for g in grads)


def _token_major(*tensors):
    """(batch, heads, tokens, head_dim) as the flash kernel takes them, (batch, tokens, heads,
    head_dim), its last dimension contiguous (transformers' projections lay them out so already)."""
    return [t.transpose(1, 2) if t.stride(-1) == 1 else t.transpose(1, 2).contiguous() for t in tensors]


def _rows_major(*tensors):
    """(1, heads, tokens, head_dim) as the flash kernel for rows takes them: (tokens, heads, head_dim)."""
    return [t[0].transpose(0, 1).contiguous() for t in tensors]


def visible_keys(tokens: int, window: int | None = None, starts: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The boolean mask (tokens, tokens) of the flash kernel's causal attention: query i sees key j
    when j <= i, i - j < window (with a window) and both are in one row (with rows' `starts`)."""
    position = torch.arange(tokens, device=device)
    sees = position[:, None] >= position[None, :]
    if window is not None:
        sees &= position[:, None] - position[None, :] < window
    if starts is not None:
        lengths = starts.diff().to(device)
        row = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        sees &= row[:, None] == row[None, :]
    return sees


def is_plain_causal(q_length: int, kv_length: int, q_offset, kv_offset, attention_mask: torch.Tensor | None,
                    allow_is_causal_skip: bool, use_vmap: bool) -> bool:
    """Whether a mask function's call asks for causal self-attention and nothing more (a layer's
    window aside, which the attention function gets on its own).

    transformers clears `allow_is_causal_skip` where it adds to the causal pattern (packed rows,
    blocks, a compiled cache's decoding) and sets `use_vmap` for extra mask functions; a cache
    offsets the queries (q_offset, kv_offset, q_length < kv_length); padding is in the 2D mask."""
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return (allow_is_causal_skip and not use_vmap and q_length == kv_length
            and not isinstance(q_offset, torch.Tensor) and not isinstance(kv_offset, torch.Tensor)
            and q_offset == 0 and kv_offset == 0
            and (padding is None or (padding.shape[-1] == kv_length and bool(fast_all(padding)))))


def window_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                          mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                          allow_is_causal_skip: bool = True, use_vmap: bool = False, **kwargs):
    """An AttentionMaskInterface function: None where the layer's mask is causal plus its window
    alone (`is_plain_causal`: the attention function knows both), else what transformers'
    `sdpa_mask` makes."""
    if is_plain_causal(q_length, kv_length, q_offset, kv_offset, attention_mask, allow_is_causal_skip, use_vmap):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap,
                     **kwargs)


def window_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, sliding_window: int | None = None, **kwargs):
    """An AttentionInterface function (transformers' sdpa's signature): query (batch, heads, q_len,
    head_dim), key and value (batch, kv_heads, kv_len, head_dim) -> ((batch, q_len, heads,
    head_dim), None). Without a mask the layer's attention is causal within `sliding_window` (the
    window the model passes per layer; None: no window)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    tokens = key.shape[2]
    window = hiding_window(sliding_window, tokens)
    if attention_mask is None and causal and window is not None and query.shape[2] == tokens:
        output = _flash_window_attention(query, key, value, dropout, scaling, window, kwargs)
        if output is not None:
            return output, None
        attention_mask = visible_keys(tokens, window, device=query.device)[None, None]  # the mask sdpa gets
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _flash_window_attention(query, key, value, dropout, scaling, window, kwargs) -> torch.Tensor | None:
    """The flash kernel's (batch, tokens, heads, head_dim) output, or None where it does not run."""
    device = query.device.type
    if device != "cuda" or dropout or any(kwargs.get(name) is not None for name in ("position_bias", "s_aux")):
        return None
    if torch.is_autocast_enabled(device):  # as autocast runs SDPA: in its dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    kind = (query.dtype, query.shape[-1])
    if not (query.dtype in (torch.float16, torch.bfloat16) and query.dtype == key.dtype == value.dtype
            and query.shape[-1] == key.shape[-1] == value.shape[-1] and query.shape[-1] in FLASH_HEAD_DIMS
            and query.shape[1] % key.shape[1] == 0 and torch.backends.cuda.flash_sdp_enabled()
            and not torch.are_deterministic_algorithms_enabled() and kind not in _refused):
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    try:
        output, _, _ = flash_forward(query, key, value, scale, window)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # a GPU the kernel does not run on: transformers' sdpa with the window's mask
        _refused.add(kind)
        logger.warning("sliding-window attention of %s runs on sdpa with a dense mask: %s", kind,
                       str(error).splitlines()[0])
        return None
    return output.transpose(1, 2)
