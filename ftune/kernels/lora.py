"""LoRA's update added inside one GEMM: `base(x) + s * (x A^T) B^T` as `addmm(base(x), x A^T, B^T, alpha=s)`.

peft's LoRA forward (for a 4-bit base layer) makes three passes over each projection's output
after the base GEMM: a defensive `clone` of it, the `* scaling` of the adapter's product, and the
`+` of the two. Each pass reads and writes a tensor of tokens x out_features (14336 wide for the
MLP): for the 8B shape at 8192 tokens, 45 GB of memory traffic per forward, ~15 ms per pass
on an H100. `addmm` folds the scaling and the sum into the GEMM's epilogue (it reads the base
output once while writing the result), so the three passes disappear; the backward is addmm's
own (the incoming gradient passes through to the base output unchanged).

Numerically it rounds once where peft rounds three times (product, scaled product, sum); in fp32
the two agree to the last bits (tests/kernels/test_lora.py).

The fast path covers what training uses: one or more plain LoRA adapters, active, unmerged, without
DoRA-style variants or per-row adapter names, with the input already in the adapter's dtype or
autocast on (so that peft would not cast). Anything else calls peft's own forward, unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A bound `forward` for a peft LoRA layer; `self._ftune_peft_forward` is peft's."""
    if not _fast_path_applies(self, x, kwargs):
        return self._ftune_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    out_shape = result.shape
    result = result.reshape(-1, out_shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        down = F.linear(self.lora_dropout[name](x), lora_a.weight).reshape(-1, lora_a.weight.shape[0])
        result = torch.addmm(result, down, lora_b.weight.t(), alpha=self.scaling[name])
    return result.reshape(out_shape)


def _fast_path_applies(layer, x: torch.Tensor, kwargs: dict) -> bool:
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return False
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active or any(name in getattr(layer, "lora_variant", {}) for name in active):
        return False
    if any(layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None for name in active):
        return False
    # peft casts x to the adapter's dtype when autocast is off; the fast path would not, so it
    # takes only inputs that need no cast
    autocast = torch.is_autocast_enabled(x.device.type)
    return autocast or all(layer.lora_A[name].weight.dtype == x.dtype for name in active)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers around linear projections (plain, bitsandbytes 4-bit or 8-bit) in `model`."""
    from peft.tuners.lora import LoraLayer

    # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses; embeddings and convolutions are not
    return [m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), nn.Linear)]


def patch_lora(model: nn.Module) -> int:
    """Give each LoRA layer of `model` the fused forward; returns how many were patched."""
    layers = lora_layers(model)
    for layer in layers:
        layer._ftune_peft_forward = layer.forward
        layer.forward = types.MethodType(fused_lora_forward, layer)
    return len(layers)
