"""The frozen embedding tables kept in host memory: the input embedding and the LM head.

An 8B Llama's input embedding is 128256 x 4096 bf16: 1 GiB of VRAM for what is, in a LoRA run,
a frozen row lookup. `HostEmbedding` keeps the table in pinned host memory, gathers the batch's
rows on the CPU and copies them to the GPU (64 MiB at 8192 tokens: about 1 ms on a 55 GB/s
link).

The LM head is the same size and, with the fused cross-entropy, needed only once per training
step: the loss computes the hidden states' gradient in the forward pass, so the backward never
reads the head. `HostLMHead` keeps it in pinned host memory, copies it to the GPU on a side stream
when the first decoder layer starts (1 GiB, about 20 ms, beside the layers' compute) and drops the
copy once the loss is done with it (after ftune's fused loss, or after the loss's own backward for
TRL's chunked heads): the layers' backward, where the step's peak is, runs without it.

Only for untied, frozen tables: a tied table is both, and the LM head keeps it on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class HostEmbedding(nn.Module):
    """Drop-in for a frozen nn.Embedding whose table lives in host memory.

    The table is a plain attribute, not a parameter or buffer: `model.to()`, `model.device` and
    the state dict (an adapter never holds it) do not see it, so the rest of the model stays on
    the GPU and reports the GPU as its device.
    """

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        if embedding.weight.requires_grad:
            raise ValueError("HostEmbedding is for frozen embeddings; this one is trainable")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        # Gemma's embedding multiplies its rows by sqrt(hidden), rounded to the table's dtype as its
        # own forward rounds it (transformers' *ScaledWordEmbedding)
        scale = getattr(embedding, "embed_scale", None)
        self.scale = None if scale is None else torch.as_tensor(scale).to(embedding.weight.dtype).item()
        self.device = device
        pin = device.type == "cuda"
        self.host_weight = embedding.weight.detach().to("cpu").contiguous()
        if pin:
            self.host_weight = self.host_weight.pin_memory()
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.host_weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).to("cpu")
        count = ids.numel()
        if self.device.type != "cuda":
            return self._scaled(F.embedding(ids, self.host_weight).view(*input_ids.shape, self.embedding_dim))
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the staging buffer is done
        if self._staging is None or self._staging.shape[0] < count:
            self._staging = torch.empty((count, self.embedding_dim), dtype=self.host_weight.dtype, pin_memory=True)
        rows = self._staging[:count]
        torch.index_select(self.host_weight, 0, ids, out=rows)
        on_device = rows.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return self._scaled(on_device.view(*input_ids.shape, self.embedding_dim))

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.scale is None else rows * self.scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


class HostLMHead(nn.Module):
    """Drop-in for a frozen nn.Linear LM head whose weight lives in host memory.

    `weight` is a copy on the device, made on demand (or ahead, by `prefetch`) and dropped by
    `release`: by a forward of this module with gradients (autograd keeps what the backward
    needs), by ftune's fused loss once it has its gradient, and otherwise when the backward
    reaches the decoder's output, past whatever loss read the head (TRL's own chunked heads for
    DPO and GRPO read `weight` directly). A forward without gradients (evaluation, generation)
    keeps it, so decoding does not copy the head for every token.
    """

    def __init__(self, head: nn.Linear, device: torch.device):
        super().__init__()
        if head.weight.requires_grad:
            raise ValueError("HostLMHead is for a frozen LM head; this one is trainable")
        self.out_features, self.in_features = head.weight.shape
        self.device = device
        self.host_weight = head.weight.detach().to("cpu").contiguous()
        self.bias = head.bias  # small: it stays with the model, wherever the model goes
        self._stream = None
        if device.type == "cuda":
            self.host_weight = self.host_weight.pin_memory()
            self._stream = torch.cuda.Stream(device)
        self._on_device: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start copying the weight to the device on the side stream (no wait)."""
        if self._on_device is not None:
            return
        if self._stream is None:
            self._on_device = self.host_weight
            return
        # Allocated on the compute stream, which frees it: the side stream writes it only after the
        # compute work queued so far, which may still use that memory's previous owner. A normal
        # tensor even when fetched under inference mode (generation): the training forward that
        # reuses it may save it for backward.
        with torch.inference_mode(False):
            target = torch.empty_like(self.host_weight, device=self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                target.copy_(self.host_weight, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(self._stream)
            target.record_stream(self._stream)  # dropped mid-copy, its memory waits for the copy
        self._on_device = target

    @property
    def weight(self) -> torch.Tensor:
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        return self._on_device

    def release(self) -> None:
        """Drop the device copy (its memory returns to the allocator once no one else holds it)."""
        if self._ready is not None:  # fetched but never read: its copy must end before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None
        self._on_device = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        if torch.is_grad_enabled():
            self.release()
        return logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in host memory"


def move_embeddings_to_host(model: nn.Module, device: torch.device) -> int:
    """Replace a frozen, untied input embedding by a HostEmbedding; returns the bytes freed on the device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    output = base.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or embedding.weight.requires_grad:
        return 0
    if type(embedding) is not nn.Embedding and not _scaled_embedding(embedding):
        return 0  # a forward of its own that HostEmbedding would not reproduce
    if output is not None and output.weight.data_ptr() == embedding.weight.data_ptr():
        return 0  # tied: the same table is the LM head
    freed = embedding.weight.numel() * embedding.weight.element_size()
    base.set_input_embeddings(HostEmbedding(embedding, device))
    return freed


def _scaled_embedding(embedding: nn.Module) -> bool:
    """transformers' scaled word embeddings (Gemma): an nn.Embedding whose forward multiplies by
    `embed_scale` and does nothing else."""
    return type(embedding).__name__.endswith("ScaledWordEmbedding") and hasattr(embedding, "embed_scale")


def move_lm_head_to_host(model: nn.Module, device: torch.device) -> int:
    """Replace a frozen, untied nn.Linear LM head by a HostLMHead, fetched as the first decoder
    layer starts and dropped before the layers' backward; returns the bytes freed on the device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embedding = base.get_input_embeddings()
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return 0
    if embedding is not None and getattr(embedding, "weight", None) is not None and \
            embedding.weight.data_ptr() == head.weight.data_ptr():
        return 0  # tied: the same table is the input embedding
    freed = head.weight.numel() * head.weight.element_size()
    host_head = HostLMHead(head, device)
    base.set_output_embeddings(host_head)
    # The copy starts with the first decoder layer and runs beside the layers. Not earlier: queued
    # ahead of the input embedding's rows (a host-to-device copy too), the rows would wait for it.
    backbone = getattr(base, base.base_model_prefix)
    layers = [m for m in backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    (layers[0] if layers else backbone).register_forward_pre_hook(lambda module, args: host_head.prefetch())

    def release_when_the_layers_backward_starts(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if torch.is_grad_enabled() and hidden.requires_grad:
            # the gradient of the decoder's output is complete: every loss that read the head is done
            hidden.register_hook(lambda grad: host_head.release())

    backbone.register_forward_hook(release_when_the_layers_backward_starts)
    return freed
