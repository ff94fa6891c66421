"""Decoder layers as two residual halves, the MLP half run in chunks of tokens.

Llama, Mistral, Qwen2 and Qwen3 decoder layers ("pre_norm") compute

    h = x + attn(input_layernorm(x))          attention half
    y = h + mlp(post_attention_layernorm(h))  MLP half (per token)

and Gemma 2 and 3 ("sandwich_norm") norm each branch's output too:

    h = x + post_attention_layernorm(attn(input_layernorm(x)))
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

The MLP's intermediates are `tokens x intermediate` wide (14336 for an 8B Llama: 224 MiB per
tensor at 8192 tokens, 4 GiB at 150k), so they set the longest context a recomputed layer can
train. Because the MLP half works token by token, its recompute can run a chunk of tokens at a
time, each chunk's backward right after its forward: the gradient of the MLP's output is the
layer's output gradient (the residual passes it through unchanged), known before the chunk
runs. Only one chunk's intermediates exist at once, at no extra compute. The forward without a
graph chunks the MLP the same way and adds into `h` in place.

An offloaded layer can park its attention half (attention.py): its backward then starts with
the MLP half, from the parked residual, and reruns the attention half last, for its graph only.

Which families have such layers, and which layout, is in ftune/families.py (`residual_halves`).
Phi-3's layers are pre-norm with a dropout on each branch, an identity while it is off. Layers
that draw random numbers (a dropout on, LoRA dropout: chunking would change the order of the
draws) run whole through the generic recompute.

In a pre-norm layer each branch's last projection (o_proj, down_proj) feeds the residual stream
alone, whose gradient is known: the recompute leaves their forward GEMMs out (`unread`). In a
sandwich layer a norm reads them, so they run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ftune.engine.attention import AttentionOutput, recording_attention, replaying_attention
from ftune.integrations.peft import lora_execution
from ftune.memory.estimate import MLP_CHUNK_BYTES  # the largest MLP intermediate a chunk may create


# The modules each layout's layers have, by transformers' names
LAYOUTS = {
    "pre_norm": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    "sandwich_norm": ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "mlp", "post_feedforward_layernorm"),
}


class ResidualHalves:
    """Runs one decoder layer half by half, the MLP chunked over tokens."""

    def __init__(self, layer: nn.Module, chunk_bytes: int = MLP_CHUNK_BYTES, layout: str = "pre_norm"):
        self.layer = layer
        self.chunk_bytes = chunk_bytes
        self.intermediate = _intermediate_size(layer.mlp)
        self.sandwich = layout == "sandwich_norm"
        # the projections whose output only the residual stream reads (see the module's docstring)
        self.attention_unread = () if self.sandwich else (getattr(layer.self_attn, "o_proj", None),)
        self.mlp_unread = () if self.sandwich else (getattr(layer.mlp, "down_proj", None),)

    @staticmethod
    def supports(layer: nn.Module, uses_randomness: bool, layout: str | None) -> bool:
        return (
            layout in LAYOUTS
            and not uses_randomness
            and all(hasattr(layer, part) for part in LAYOUTS[layout]) and _intermediate_size(layer.mlp) is not None
        )

    def chunk_tokens(self, element_size: int) -> int:
        tokens = max(1, self.chunk_bytes // (self.intermediate * element_size))
        return tokens // 256 * 256 if tokens >= 512 else tokens  # whole GEMM tiles when large

    def attention(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return x + self._attention_branch(x, kwargs)

    def _attention_branch(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        layer = self.layer
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        return layer.post_attention_layernorm(attended) if self.sandwich else attended

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.sandwich:
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return layer.mlp(layer.post_attention_layernorm(h))

    def _chunks(self, h: torch.Tensor):
        # autocast runs the MLP in its dtype; size the chunks by what the intermediates will be
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        size = self.chunk_tokens(torch.empty((), dtype=dtype).element_size())
        rows = h.numel() // h.shape[-1]
        # As few chunks as the cap allows, made equal: 8192 tokens of the 8B shape run as 2 x 4096
        # rather than 4608 + 3584, the same two passes with a 14 MiB smaller peak per intermediate.
        count = -(-rows // size)
        size = -(-rows // count)
        if size >= 512:
            size = -(-size // 256) * 256  # whole GEMM tiles; never above the cap, itself a multiple of 256
        return [(start, min(start + size, rows)) for start in range(0, rows, size)]

    def forward(self, x: torch.Tensor, kwargs: dict[str, Any],
                park: Callable[[torch.Tensor, AttentionOutput], bool] | None = None) -> torch.Tensor:
        """The layer's output, without a graph. With `park`, the attention's output and the residual
        after attention are offered to it (ftune/engine/attention.py); once it has taken them, the
        residual is left as it is for its copy to host memory, and the output is a new tensor."""
        parked = False
        if park is None:
            h = self.attention(x, kwargs)
        else:
            with recording_attention() as recording:
                h = self.attention(x, kwargs)
            parked = recording.result is not None and park(h, recording.result)
        # The fused LoRA MLP's matrices are made once for all chunks
        output = torch.empty_like(h) if parked else h
        flat_h, flat_out = h.view(-1, h.shape[-1]), output.view(-1, h.shape[-1])
        with lora_execution(hold=True):
            for start, end in self._chunks(h):
                # Each chunk reads only its own rows before they are written (over h when not parked).
                torch.add(flat_h[start:end], self.mlp(flat_h[start:end]), out=flat_out[start:end])
        return output

    def backward(self, x: torch.Tensor, kwargs: dict[str, Any], grad_output: torch.Tensor,
                 wrt: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Recompute and backpropagate; the gradients of `wrt` (x if it needs one, then parameters)."""
        # the attention's matrices made once for its recompute and its backward; they stay through
        # the MLP's backward in between (81 MiB for the 8B shape's q-k-v and o matrices)
        with lora_execution(hold=True):
            with torch.enable_grad():
                h = self.attention(x, kwargs)
            params = [t for t in wrt if t is not x]
            grad_h, totals = self._mlp_backward(h.detach(), grad_output, params)
            # nothing to differentiate when the attention half has no trainable parameter and x needs
            # no gradient (LoRA on the MLP only, the first layer)
            attention_grads = (torch.autograd.grad(h, wrt, grad_h, allow_unused=True) if h.requires_grad
                               else [None] * len(wrt))
        # wrt = [x?] + params: x's gradient comes from the attention half alone
        offset = len(wrt) - len(params)
        return list(attention_grads[:offset]) + [_add(total, grad) for total, grad in
                                                 zip(totals, attention_grads[offset:])]

    def backward_parked(self, residual: torch.Tensor, fetch_input: Callable[[], torch.Tensor],
                        fetch_attention: Callable[[], AttentionOutput], kwargs: dict[str, Any],
                        grad_output: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Backpropagate a layer whose forward parked the residual after attention and the attention's
        output: the MLP half from the residual first, then the attention half rerun for its graph
        only, with the parked output in place of the attention forward and the output projection's
        GEMM skipped. `fetch_input` and `fetch_attention` wait for their copies back, which run
        meanwhile. The gradients of the input (None when it needs none), then of `params`."""
        grad_h, totals = self._mlp_backward(residual, grad_output, params)
        del residual
        x = fetch_input()
        wrt = ([x] if x.requires_grad else []) + params
        # the attention's matrices made once for its recompute and backward; the parked output
        # stands in for o's input, and in a pre-norm layer o's own output goes only to the residual,
        # whose gradient is known
        with lora_execution(hold=True, unread=self.attention_unread):
            with torch.enable_grad(), replaying_attention(fetch_attention()):
                attended = self._attention_branch(x, kwargs)
            grads = (list(torch.autograd.grad(attended, wrt, grad_h, allow_unused=True)) if attended.requires_grad
                     else [None] * len(wrt))
        grad_x = None
        if x.requires_grad:  # the residual passes grad_h to x unchanged, beside the attention's part
            branch = grads.pop(0)
            grad_x = grad_h if branch is None else grad_h.add_(branch)
        return [grad_x] + [_add(total, grad) for total, grad in zip(totals, grads)]

    def _mlp_backward(self, h: torch.Tensor, grad_output: torch.Tensor, params: list[torch.Tensor]):
        """The MLP half recomputed chunk by chunk from its input h (no graph): the gradient reaching h
        (through the residual and the MLP) and the parameters' gradients (None where unused)."""
        flat_h = h.view(-1, h.shape[-1])
        flat_grad_out = grad_output.reshape(-1, h.shape[-1])
        grad_h = grad_output.clone()  # the residual passes the output gradient straight to h
        flat_grad_h = grad_h.view(-1, h.shape[-1])
        totals: list[torch.Tensor | None] = [None] * len(params)
        # In a pre-norm layer the MLP's output goes to the residual stream, whose gradient is already
        # known: only its graph is needed, so the down projection's 4-bit GEMM is left to the backward.
        # The MLP's matrices are made once for every chunk's recompute and backward.
        with lora_execution(hold=True, unread=self.mlp_unread):
            for start, end in self._chunks(h):
                chunk = flat_h[start:end].detach().requires_grad_()
                with torch.enable_grad():
                    out = self.mlp(chunk)
                grad_chunk, *grad_params = torch.autograd.grad(out, [chunk, *params], flat_grad_out[start:end],
                                                               allow_unused=True)
                flat_grad_h[start:end] += grad_chunk
                totals = [_add(total, grad) for total, grad in zip(totals, grad_params)]
                del out, chunk, grad_chunk, grad_params
        return grad_h, totals


def _intermediate_size(mlp: nn.Module) -> int | None:
    """The MLP's intermediate width: its own attribute, or its config's (Phi-3's MLP keeps only that)."""
    size = getattr(mlp, "intermediate_size", None) or getattr(getattr(mlp, "config", None), "intermediate_size", None)
    return None if size is None else int(size)


def _add(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return total
    return grad if total is None else total + grad
