"""Tiny models for tests: a preset shape with fixed random weights, LoRA on all projections."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ftune.engine import install_checkpointing
from ftune.presets import preset_config

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@lru_cache(maxsize=None)
def _base(preset: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset_config(preset)
    config.num_hidden_layers = layers
    config.use_cache = False
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_lora_model(preset: str = "tiny-llama", mode: str = "none", *, layers: int = 3, dropout: float = 0.0,
                    target_modules=PROJECTIONS, layers_to_transform=None, mlp_chunk_bytes=None):
    """The same weights every call (base and LoRA, B non-zero so every gradient is exercised)."""
    model = copy.deepcopy(_base(preset, layers))
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=target_modules,
                                             layers_to_transform=layers_to_transform, task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    engine = install_checkpointing(model, mode, **({"mlp_chunk_bytes": mlp_chunk_bytes} if mlp_chunk_bytes else {}))
    return model, engine


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected|| in float64 (0 when both are zero, inf when only expected is)."""
    got, expected = got.detach().double(), expected.detach().double()
    difference, scale = (got - expected).norm().item(), expected.norm().item()
    return difference / scale if scale else (0.0 if difference == 0 else float("inf"))


def assert_relatively_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float) -> None:
    """Each tensor of `got` within `tol` of the same name's in `expected`, relative to that tensor's
    own norm. A zeroed tensor gives 1.0 whatever its scale, where an elementwise atol above a
    tensor's largest entry would let it pass; the caller writes beside `tol` the error it measured."""
    assert got.keys() == expected.keys() and expected, (sorted(got), sorted(expected))
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    over = {name: error for name, error in errors.items() if not error <= tol}
    assert not over, f"{len(over)} of {len(errors)} tensors beyond a relative error of {tol}: " + ", ".join(
        f"{name} {error:.3g}" for name, error in sorted(over.items(), key=lambda item: -item[1]))
