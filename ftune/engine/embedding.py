"""The frozen input embedding kept in host memory.

An 8B Llama's input embedding is 128256 x 4096 bf16: 1 GiB of VRAM for what is, in a LoRA run,
a frozen row lookup. `HostEmbedding` keeps the table in pinned host memory, gathers the batch's
rows on the CPU and copies them to the GPU (64 MiB at 8192 tokens: about 1 ms on a 55 GB/s
link). Only for an untied, frozen table: a tied one is also the LM head, which needs the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
            return F.embedding(ids, self.host_weight).view(*input_ids.shape, self.embedding_dim)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the staging buffer is done
        if self._staging is None or self._staging.shape[0] < count:
            self._staging = torch.empty((count, self.embedding_dim), dtype=self.host_weight.dtype, pin_memory=True)
        rows = self._staging[:count]
        torch.index_select(self.host_weight, 0, ids, out=rows)
        on_device = rows.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


def move_embeddings_to_host(model: nn.Module, device: torch.device) -> int:
    """Replace a frozen, untied input embedding by a HostEmbedding; returns the bytes freed on the device."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    output = base.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or embedding.weight.requires_grad:
        return 0
    if output is not None and output.weight.data_ptr() == embedding.weight.data_ptr():
        return 0  # tied: the same table is the LM head
    freed = embedding.weight.numel() * embedding.weight.element_size()
    base.set_input_embeddings(HostEmbedding(embedding, device))
    return freed
