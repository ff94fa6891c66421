"""The shipped presets are the public models' shapes: each builds in transformers (on the meta
device: no memory, no weights) at the parameter count its makers publish, and estimate-vram reads
each."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftune.presets import PRESETS, preset_config
from tests.conftest import REPO
from tests.test_cli import run_cli

# Published totals, in billions. Gemma 3's are the text model's (embedding + non-embedding rows of
# Table 1 of the Gemma 3 technical report; the 4b/12b/27b checkpoints add a 0.42B vision tower).
PUBLISHED_BILLIONS = {
    "phi-3-mini": 3.8,  # Phi-3 technical report
    "phi-3-medium": 14.0,  # Phi-3 technical report
    "phi-4": 14.7,  # microsoft/phi-4 model card (the report's "14B")
    "gemma-3-1b": 1.0,  # 302M + 698M
    "gemma-3-4b": 3.884,  # 675M + 3,209M
    "gemma-3-12b": 11.771,  # 1,012M + 10,759M
    "gemma-3-27b": 27.016,  # 1,416M + 25,600M
    "mixtral-8x7b": 46.7,  # Mistral AI's announcement
    "qwen3-30b-a3b": 30.5,  # Qwen/Qwen3-30B-A3B model card
    "gemma-2-9b": 9.24,  # Gemma 2 technical report
    "llama-3.1-8b": 8.03,  # meta-llama/Llama-3.1-8B model card
}
# Parameters a token goes through in a mixture of experts: all but the experts its router skips
PUBLISHED_ACTIVE_BILLIONS = {"mixtral-8x7b": 12.9, "qwen3-30b-a3b": 3.3}
WITHIN = 0.03


def _meta_model(name):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(preset_config(name))


@pytest.mark.parametrize("name", PUBLISHED_BILLIONS)
def test_preset_builds_at_its_published_size(name):
    model = _meta_model(name)
    assert model.config.model_type == PRESETS[name]["model_type"]
    total = sum(parameter.numel() for parameter in model.parameters())  # tied embeddings once
    assert abs(total / 1e9 / PUBLISHED_BILLIONS[name] - 1) <= WITHIN, total


@pytest.mark.parametrize("name", PUBLISHED_ACTIVE_BILLIONS)
def test_moe_preset_activates_its_published_share(name):
    """The experts' count and the router's pick: each layer's expert weights are one tensor with
    the experts on the first dimension, of which a token uses `experts per token`."""
    config = PRESETS[name]
    experts = config.get("num_local_experts") or config["num_experts"]
    model = _meta_model(name)
    total = sum(parameter.numel() for parameter in model.parameters())
    expert_weights = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_weights > total / 2
    active = total - expert_weights * (experts - config["num_experts_per_tok"]) / experts
    assert abs(active / 1e9 / PUBLISHED_ACTIVE_BILLIONS[name] - 1) <= WITHIN, active


def test_gemma3_layers_alternate_five_sliding_to_one_full():
    config = preset_config("gemma-3-27b")
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.sliding_window == 1024 and config.query_pre_attn_scalar == 168
    assert config.rope_parameters["full_attention"]["factor"] == 8.0


def _estimate(monkeypatch, capsys, name, *overrides):
    recipe = REPO / "recipes" / "qlora-llama3-8b.yaml"
    code, out = run_cli(monkeypatch, capsys, "estimate-vram", str(recipe), "--set", f"model.preset={name}",
                        "--set", "model.name_or_path=null", "--set", "model.tokenizer=x", "--seq", "8192", "--json",
                        *[argument for override in overrides for argument in ("--set", override)])
    assert code in (0, None), out
    return {mode["mode"]: mode for mode in json.loads(out)["modes"]}


NEW_PRESETS = ["phi-3-mini", "phi-3-medium", "phi-4", "gemma-3-12b", "gemma-3-27b", "mixtral-8x7b", "qwen3-30b-a3b"]


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_estimate_vram_reads_the_preset(monkeypatch, capsys, name):
    modes = _estimate(monkeypatch, capsys, name)
    assert set(modes) == {"none", "true", "unsloth"}
    assert modes["none"]["peak"] > modes["true"]["peak"] > modes["unsloth"]["peak"] > 0


@pytest.mark.parametrize("name", PUBLISHED_ACTIVE_BILLIONS)
def test_estimate_vram_counts_every_expert(monkeypatch, capsys, name):
    """Every parameter of a mixture of experts counted as ftune's 4-bit loading leaves it: half a byte
    per weight of the linear layers, which bitsandbytes quantizes, and of the experts, which ftune
    quantizes as they load (ftune/integrations/experts.py); 16 bits for the rest, the router
    included; in mode unsloth, with the fused loss (which the MoE families take), the input
    embedding and the LM head in host memory."""
    model = _meta_model(name)
    linear = sum(module.weight.numel() for path, module in model.named_modules()
                 if type(module) is torch.nn.Linear and ".layers." in path)
    embedding = model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    rest = sum(parameter.numel() for parameter in model.parameters()) - linear - embedding - experts
    assert experts > 20 * rest
    unsloth = _estimate(monkeypatch, capsys, name)["unsloth"]
    assert abs(unsloth["quantized_weights"] / ((linear + experts) / 2) - 1) <= WITHIN, (unsloth["quantized_weights"],
                                                                                       linear, experts)
    head = model.get_output_embeddings().weight.numel()
    assert abs(unsloth["weights_16bit"] / (2 * (rest - head)) - 1) <= 0.001, (unsloth["weights_16bit"], rest)
    assert unsloth["embedding_host"] == 2 * (embedding + head)


@pytest.mark.parametrize("name", PUBLISHED_ACTIVE_BILLIONS)
def test_estimate_vram_counts_the_experts_adapters_as_peft_makes_them(monkeypatch, capsys, name):
    """LoRA on the attention and, through target_parameters, one adapter per expert: the parameters
    peft adds to the model (fp32) are the bytes the estimate counts."""
    from peft import LoraConfig, get_peft_model

    from ftune.families import family_of

    model = _meta_model(name)
    family = family_of(model.config.model_type)
    with torch.device("meta"):
        adapted = get_peft_model(model, LoraConfig(r=16, target_modules=family.lora_targets,
                                                   target_parameters=list(family.expert_parameters)))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    estimated = _estimate(monkeypatch, capsys, name, "lora.target_modules=auto")["unsloth"]["lora_parameters"]
    assert estimated == 4 * trainable
