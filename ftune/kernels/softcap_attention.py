"""Attention with logit soft-capping (Gemma-2) that never holds a tokens x tokens score matrix.

Gemma-2 caps every attention logit as `cap * tanh(logit / cap)` (attn_logit_softcapping = 50)
and alternates full and sliding-window layers. SDPA has no soft cap, so transformers runs the
family on eager attention, which materializes the scores and their softmax in every layer: at
16384 tokens and 16 heads that is 16 GiB of fp32 softmax per layer. FlexAttention applies the
cap as a `score_mod` inside a fused, tiled kernel (the backward differentiates through it), and
a block mask skips the tiles that causality and the window exclude.

`softcap_attention` has the signature of transformers' AttentionInterface functions: the model
passes `scaling`, `softcap` and `sliding_window` per layer. On CUDA it runs FlexAttention
compiled; elsewhere the same masks and cap run densely (`attend_dense`), because FlexAttention
has no backward on CPU. Masks, in the order they are read:
- a BlockMask (transformers' `flex_attention_mask`) or a 4D boolean tensor (its `sdpa_mask`) is
  the whole mask: causality, the layer's window and padding are already in it;
- None (`softcap_attention_mask`, ftune_softcap's mask function, for a plain causal mask; no
  mask function registered; sdpa_mask skipping a plain causal mask): causal, plus the layer's
  window, built here; queries are the last `q_len` of `kv_len` positions (decoding).
Additive float masks (eager_mask) are refused: they could hold biases, not just visibility. A
query that sees no key (a left-padded position) gets zeros from FlexAttention and uniform weights
from the dense path, as from eager, and in neither a gradient into the scores (eager's additive
mask lets one through).

Where FlashAttention 4 is installed (`pip install flash-attn-4`, ftune's `fa4` extra) and the GPU
is a Hopper or Blackwell one, a layer without a mask (causal, within its window: what
`softcap_attention_mask` leaves for a batch without padding) runs on its CuTe DSL kernels instead,
which take the cap, the causal mask and the window themselves (`attend_flash4`). On an H200 one
Gemma-2-9B layer at 8192 tokens, forward + backward, takes 5.3 ms full and 4.1 ms sliding there,
13.1 and 9.9 ms on FlexAttention (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from transformers.masking_utils import flex_attention_mask

from ftune.kernels.utils import compiled_with_variants
from ftune.kernels.window_attention import FLASH_HEAD_DIMS, flash_bounds, hiding_window, is_plain_causal

logger = logging.getLogger(__name__)

# The compute capabilities (major) where FlashAttention 4 differentiates through a soft cap: Hopper
# and Blackwell's data-centre parts (its kernels for 8.x and 12.x take no score modifier backward)
FLASH4_CAPABILITIES = (9, 10)
# (device index, dtype, head size) whose FlashAttention 4 call failed: FlexAttention runs those
_flash4_refused: set[tuple] = set()

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask_mod(sliding_window: int | None = None, q_offset: int = 0) -> MaskMod:
    """Key kv_idx is visible to query q_idx (at position q_idx + q_offset) when it is not later and,
    with a window, fewer than `sliding_window` positions back (transformers' sliding window)."""

    def visible(batch, head, q_idx, kv_idx):
        q_position = q_idx + q_offset
        allowed = kv_idx <= q_position
        if sliding_window is not None:
            allowed = allowed & (q_position - kv_idx < sliding_window)
        return allowed

    return visible


def softcap_score_mod(softcap: float | None) -> Callable | None:
    """Gemma-2's `cap * tanh(score / cap)`, applied to the scaled logit before the mask."""
    if softcap is None:
        return None

    def capped(score, batch, head, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return capped


@functools.lru_cache(maxsize=16)
def causal_block_mask(q_len: int, kv_len: int, sliding_window: int | None, device: torch.device) -> BlockMask:
    """The block mask of `causal_mask_mod`, built once per shape and window: every layer of a step
    (and its recompute in backward) shares it."""
    return create_block_mask(causal_mask_mod(sliding_window, kv_len - q_len), B=None, H=None, Q_LEN=q_len,
                             KV_LEN=kv_len, device=device, _compile=_compile_masks(device))


def _compile_masks(device: torch.device) -> bool:
    # Uncompiled, create_block_mask evaluates the mask on every (query, key) pair at once: 256 MiB of
    # booleans at 16384 tokens. Compiled, it visits tiles (as transformers builds its masks); on CPU,
    # where only tests build block masks, compiling costs more than it saves.
    return torch.device(device).type == "cuda"


# Compiled variants of FlexAttention one process may need. A variant serves one grad mode, layer
# kind (full or sliding window: the mask's closure), set of kernel options (long queries' tiling,
# short queries' decoding kernel) and static or dynamic shapes: up to 2 x 2 x 2 x 2 in a Gemma-2
# run that trains, evaluates and generates, past dynamo's default limit of 8; padded batches,
# whose masks are closures over mask tensors, add more. A call beyond the limit runs
# flex_attention uncompiled, its dense reference: 147 ms and 33 GiB for one sliding Gemma-2-9B
# layer at 8192 tokens, where the compiled kernel takes 17 ms for a full one (H200, 2026-12-03,
# docs/benchmarks.md). The limit is a ceiling, not a count: a variant costs its compile once, when
# a new kind of call first comes, so it is set at four times what the kinds above need.
FLEX_VARIANTS = 64


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Uncompiled, flex_attention runs a dense reference implementation; compiled, the fused kernel.
    # Shapes are dynamic after the first recompile, so varying sequence lengths share one kernel.
    return compiled_with_variants(flex_attention, FLEX_VARIANTS)


# FlexAttention's tiling for 256-wide heads (Gemma-2) on Hopper, queries of at least 128 tokens.
# One full Gemma-2-9B layer at 8192 tokens, forward + backward, takes 17.2 ms on an H200 with
# Inductor's default (forward 64 x 32 tiles, 4 warps; backward 64 x 64, 4 warps), 15.7 ms with
# these forward tiles and 14.3 ms with this backward
# (benchmarks/kernels/bench_softcap_attention.py --kernel-options). With both, the 8192-token
# Gemma-2-9B training step ran 5,884 tok/s, the baseline 3,671 in the same call; calls before the
# tiling read 5,079-5,147 (docs/benchmarks.md).
HOPPER_HEAD_DIM_256 = dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=8, fwd_num_stages=2,
                           bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64, bwd_num_warps=8,
                           bwd_num_stages=2)
# Below this many queries Inductor runs FlexAttention's decoding kernel, which sizes its row blocks
# (and whether it checks their bounds) from the query length before it reads fwd_BLOCK_M.
FLEX_DECODING_QUERIES = 128


def flex_kernel_options(head_dim: int, capability: tuple[int, int] | None, dtype: torch.dtype,
                        queries: int) -> dict | None:
    """The kernel options ftune gives FlexAttention for `queries` queries with heads `head_dim` wide
    in `dtype` on a GPU of this compute capability (None: not CUDA); None leaves Inductor's choice.
    The tiles were timed in bf16 on long sequences; fp16 takes them untimed (elements of the same
    size, so the same shared memory); fp32 tiles of that size would not fit in shared memory, and
    short queries run another kernel."""
    if capability == (9, 0) and head_dim == 256 and dtype in (torch.bfloat16, torch.float16) and \
            queries >= FLEX_DECODING_QUERIES:
        return HOPPER_HEAD_DIM_256
    return None


def attend_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask | None,
                scaling: float, softcap: float | None, kernel_options: dict | None = None) -> torch.Tensor:
    """FlexAttention over [batch, heads, tokens, head_dim] inputs, key and value heads shared by
    groups of query heads; compiled on CUDA, with `flex_kernel_options` unless the caller gives
    its own. Returns [batch, heads, tokens, head_dim]."""
    attention = _compiled_flex_attention() if query.is_cuda else flex_attention
    if kernel_options is None and query.is_cuda:
        kernel_options = flex_kernel_options(query.shape[-1], torch.cuda.get_device_capability(query.device),
                                             query.dtype, query.shape[-2])
    return attention(query, key, value, score_mod=softcap_score_mod(softcap), block_mask=block_mask, scale=scaling,
                     enable_gqa=query.shape[1] != key.shape[1], kernel_options=kernel_options)


def attend_dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                 scaling: float, softcap: float | None) -> torch.Tensor:
    """The same attention with the scores held in full, as transformers' eager attention computes
    it (product and cap in the inputs' dtype, softmax in fp32); `visible` is a boolean mask that
    broadcasts to [batch, 1, q_len, kv_len]. Returns [batch, heads, tokens, head_dim]."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    # Query head h reads key head h // group (transformers' repeat_kv), without repeating keys
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    scores = grouped @ key.unsqueeze(2).transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    # the dtype's minimum, as eager's additive mask: a row that sees nothing (a padded query) gets
    # uniform weights instead of NaN
    scores = scores.masked_fill(~visible.unsqueeze(2), torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value.unsqueeze(2)).reshape(batch, heads, q_len, value.shape[-1])


def softcap_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                           attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
                           use_vmap: bool = False, **kwargs) -> BlockMask | None:
    """An AttentionMaskInterface function: None where the layer's mask is causal plus its window
    alone (`softcap_attention` knows both: FlashAttention 4 takes them as they are, FlexAttention
    from a block mask cached per shape), else transformers' FlexAttention mask."""
    if is_plain_causal(q_length, kv_length, q_offset, kv_offset, attention_mask, allow_is_causal_skip, use_vmap):
        return None
    return flex_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                               **kwargs)


@functools.cache
def _flash_attention_4() -> Callable | None:
    """FlashAttention 4's `flash_attn_func`, or None where it is not installed (or does not load)."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None
    except RuntimeError as error:  # installed, but its CUDA libraries do not load (the toolkit flavour)
        logger.warning("FlashAttention 4 does not load, soft-capped attention runs on FlexAttention: %s",
                       str(error).splitlines()[0])
        return None
    return flash_attn_func


def flash4_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether FlashAttention 4 runs this causal self-attention: installed, on a GPU of
    FLASH4_CAPABILITIES, in one 16-bit dtype, heads of one size it takes, key heads shared by
    whole groups of query heads, no deterministic algorithms asked for (its backward accumulates
    the query's gradient with atomics), and no earlier failure of the same kind."""
    if not (query.is_cuda and query.shape[2] == key.shape[2] and query.dtype in (torch.float16, torch.bfloat16)
            and query.dtype == key.dtype == value.dtype and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[-1] in FLASH_HEAD_DIMS and query.shape[1] % key.shape[1] == 0
            and not torch.are_deterministic_algorithms_enabled()):
        return False
    if (query.device.index, query.dtype, query.shape[-1]) in _flash4_refused:
        return False
    major, _ = torch.cuda.get_device_capability(query.device)
    if major not in FLASH4_CAPABILITIES:
        return False
    if _flash_attention_4() is None:
        _suggest_flash4()
        return False
    return True


@functools.cache
def _suggest_flash4() -> None:
    logger.warning("soft-capped attention runs on FlexAttention; FlashAttention 4 runs it on this GPU, 2.5x faster "
                   "on an H200: pip install 'ftune[fa4]' (beside a CUDA 13 build of torch; flash-attn-4 alone beside "
                   "a CUDA 12 one)")


def attend_flash4(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, softcap: float | None,
                  sliding_window: int | None) -> torch.Tensor | None:
    """FlashAttention 4's causal attention within the window over [batch, heads, tokens, head_dim]
    inputs (views of the [batch, tokens, heads, head_dim] its kernels read), capped; returns
    [batch, tokens, heads, head_dim], or None where its kernels refuse the call (remembered: the
    caller runs FlexAttention, then and after)."""
    try:
        output = _flash_attention_4()(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                      softmax_scale=scaling, causal=True, window_size=flash_bounds(sliding_window),
                                      softcap=softcap or 0.0)
    except torch.OutOfMemoryError:
        raise
    # its refusals, asserts among them; a TypeError: a release whose arguments moved (checked: 4.0.0b40)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError, TypeError) as error:
        kind = (query.device.index, query.dtype, query.shape[-1])
        _flash4_refused.add(kind)
        logger.warning("soft-capped attention of %s runs on FlexAttention, FlashAttention 4 refused it: %s", kind,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    return output[0] if isinstance(output, tuple) else output


def softcap_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: query [batch, heads, q_len, head_dim], key and value
    [batch, kv_heads, kv_len, head_dim] -> ([batch, q_len, heads, head_dim], None). The weights
    are never formed, so none are returned (as with SDPA)."""
    if dropout > 0:
        raise ValueError("softcap_attention has no attention dropout; set the config's attention_dropout to 0")
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"softcap_attention does not apply {unsupported}; use the model's eager attention")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype != torch.bool:
        raise TypeError("softcap_attention reads boolean masks or BlockMasks; register it with transformers' "
                        "sdpa_mask or flex_attention_mask, not eager_mask (an additive mask may hold biases)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]

    if query.is_cuda:
        if attention_mask is None and flash4_takes(query, key, value):  # self-attention: q_len == kv_len
            output = attend_flash4(query, key, value, scaling, softcap, hiding_window(sliding_window, kv_len))
            if output is not None:
                return output, None
        if isinstance(attention_mask, BlockMask):
            block_mask = attention_mask
        elif attention_mask is not None:
            mask = attention_mask

            def from_tensor(b, h, q_idx, kv_idx):
                return mask[b, 0, q_idx, kv_idx]

            block_mask = create_block_mask(from_tensor, B=mask.shape[0], H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                           device=query.device, _compile=_compile_masks(query.device))
        else:
            block_mask = causal_block_mask(q_len, kv_len, sliding_window, query.device)
        output = attend_flex(query, key, value, block_mask, scaling, softcap, kwargs.get("kernel_options"))
    else:
        if isinstance(attention_mask, BlockMask):
            visible = create_mask(attention_mask.mask_mod, batch, 1, q_len, kv_len, query.device)
        elif attention_mask is not None:
            visible = attention_mask
        else:
            visible = create_mask(causal_mask_mod(sliding_window, kv_len - q_len), 1, 1, q_len, kv_len, query.device)
        output = attend_dense(query, key, value, visible, scaling, softcap)
    return output.transpose(1, 2).contiguous(), None
