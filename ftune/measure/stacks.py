"""The stacks that benchmarks compare, each built once per process:

  hf        transformers + peft as their docs set up QLoRA: `prepare_model_for_kbit_training`
            (norms, embeddings and LM head upcast to fp32), peft's LoRA, and transformers' own
            non-reentrant activation checkpointing for mode `true`: the baseline of ../shared/GPU.md
  ftune     ftune's model building (ftune.model.build_model) in an activation-checkpointing mode, kernels off
  ftune+k   the same with the family's kernels on (ftune/families.py: a MoE family takes no SwiGLU,
            which a recipe asking for it is refused)

A run names a stack and a mode, `stack:mode`, or `ftune[+k]:smart@GIB` for the smart mode planning
to a budget of GIB GiB (`RunSpec.parse`). The shapes are the presets' (random weights saved once
and loaded through the same 4-bit path a user's model takes); the recipe of a run is
`preset_recipe`: NF4 double-quant, bf16, LoRA r=16 alpha=16 on the family's linear projections
(Llama's seven; Phi-3's fused four).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftune.recipe import KernelsSection, Recipe, validate_recipe

REPO = Path(__file__).resolve().parents[2]
# the recipes' default seed: every benchmark (and `ftune train` on a preset) shares one cached preset
PRESET_SEED = 42
STACKS = ("hf", "ftune", "ftune+k")
HF_MODES = ("none", "true")


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run: a stack in an activation-checkpointing mode (and, for smart, a budget)."""

    stack: str
    mode: str
    budget_gib: float | None = None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        stack, _, mode = text.partition(":")
        mode, _, budget = mode.partition("@")
        if stack not in STACKS:
            raise ValueError(f"run {text!r}: the stacks are {', '.join(STACKS)}")
        if stack == "hf" and mode not in HF_MODES:
            raise ValueError(f"run {text!r}: the hf stack has modes {' and '.join(HF_MODES)}, not {mode}")
        return cls(stack, mode, float(budget) if budget else None)

    @property
    def kernels(self) -> bool:
        return self.stack == "ftune+k"

    @property
    def label(self) -> str:
        """The mode as results name it: `smart@16` for a budget of 16 GiB."""
        return f"{self.mode}@{self.budget_gib:g}" if self.budget_gib is not None else self.mode


def preset_recipe(preset: str, mode: str = "true", *, kernels: bool = False, budget_gib: float | None = None,
                  host_embeddings: bool | str = "auto", seq: int | None = None, batch: int = 1,
                  expert_adapters: bool = True) -> Recipe:
    """The benchmarks' recipe: a preset shape with random weights, trained on random token ids;
    `expert_adapters`: LoRA on a mixture of experts' expert stacks too (lora.target_parameters auto)."""
    from ftune.families import family_of
    from ftune.presets import PRESETS

    family = family_of(PRESETS.get(preset, {}).get("model_type"))  # an unknown preset: the recipe names it
    checkpointing: dict[str, Any] = {"mode": mode, "host_embeddings": host_embeddings}
    if budget_gib is not None:
        checkpointing["budget"] = f"{budget_gib}GiB"
    raw = {
        "model": {"preset": preset, "tokenizer": "(none: random token ids)", "dtype": "bfloat16"},
        "quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        # every linear projection of the family (Llama's seven; Phi-3's fused four): a list of Llama's
        # names would leave Phi-3 with o_proj and down_proj alone, as the 2026-12-02 Phi-3 rows had
        "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": "auto",
                 "target_parameters": "auto" if expert_adapters else []},
        "checkpointing": checkpointing,
        "kernels": {name: kernels and name in family.kernels for name in KernelsSection.model_fields},
        "data": {"source": "(none: random token ids)"},
        "training": {"seed": PRESET_SEED, "batch_size": batch},
    }
    recipe = validate_recipe(raw, base_dir=REPO, check_paths=False)
    if seq is not None:  # smart plans for the recipe's sequence and batch, as `ftune train` does for its data
        recipe.data.max_length = seq
    return recipe


class FtuneStack:
    """ftune's own model building for a recipe, as `ftune train` builds it."""

    def __init__(self, recipe: Recipe, *, with_tokenizer: bool = False):
        from ftune.model import build_model

        self.recipe = recipe
        self.built = build_model(recipe, with_tokenizer=with_tokenizer)
        self.model = self.built.model
        self.engine = self.built.engine
        self.layer_plan = self.built.plan.layers  # smart's policy per decoder layer; None in other modes
        self.mode = self.engine.mode

    def host_bytes(self) -> int:
        return self.engine.host_bytes()


class HFStack:
    """transformers + peft on a preset's shape, in mode none or true."""

    layer_plan = None

    def __init__(self, preset: str, mode: str, *, expert_adapters: bool = True):
        from ftune.model import materialize_preset

        if mode not in HF_MODES:
            raise ValueError(f"the hf stack has modes {' and '.join(HF_MODES)}, not {mode}")
        recipe = preset_recipe(preset, mode, expert_adapters=expert_adapters)
        path = materialize_preset(preset, seed=PRESET_SEED, dtype=torch.bfloat16, device=torch.device("cuda"))
        self.model = hf_peft_model(path, recipe, dtype=torch.bfloat16, device=torch.device("cuda", 0),
                                   attn_implementation="sdpa", prepare_for_checkpointing=False)
        self.model.config.use_cache = False
        self.mode = mode
        if mode == "true":
            self.model.enable_input_require_grads()
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def host_bytes(self) -> int:
        return 0


def hf_peft_model(path: Path, recipe: Recipe, *, dtype: torch.dtype, device: torch.device, attn_implementation: str,
                  prepare_for_checkpointing: bool):
    """The baseline's model: from_pretrained with the recipe's bitsandbytes settings, then
    `prepare_model_for_kbit_training` (asked to set up transformers' activation checkpointing or
    not) and peft's LoRA of the recipe."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from ftune.integrations.transformers import register_attention
    from ftune.model import lora_config, quantization_compute_dtype, quantization_config

    register_attention(attn_implementation)  # the plan's may be one of ftune's (ftune_softcap, ftune_window)
    quantization = quantization_config(recipe, quantization_compute_dtype(recipe, dtype))
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": device}, attn_implementation=attn_implementation)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=prepare_for_checkpointing)
    return get_peft_model(model, lora_config(recipe))


def build_stack(run: RunSpec, preset: str, *, seq: int, batch: int = 1,
                host_embeddings: bool | str = "auto", expert_adapters: bool = True) -> FtuneStack | HFStack:
    """A run's stack on a preset's shape; ftune's smart mode plans for `seq` x `batch`."""
    if run.stack == "hf":
        return HFStack(preset, run.mode, expert_adapters=expert_adapters)
    recipe = preset_recipe(preset, run.mode, kernels=run.kernels, budget_gib=run.budget_gib,
                           host_embeddings=host_embeddings, seq=seq, batch=batch, expert_adapters=expert_adapters)
    return FtuneStack(recipe)
