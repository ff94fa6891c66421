"""ftune.plan.resolve: each "auto" of a recipe settled once, from the family table and the device's
facts, and read as decided by estimate-vram, validate and model building."""

from __future__ import annotations

import pytest

from ftune.families import KERNEL_NAMES
from ftune.memory.estimate import allocatable, estimate
from ftune.memory.policy import NoPlanFits
from ftune.model_config import ModelConfig
from ftune.plan import Device, assumed_device, resolve
from ftune.presets import PRESETS
from ftune.recipe import load_recipe, parse_bytes
from tests.conftest import QUICKSTART
from tests.test_cli import run_cli

CUDA = Device(kind="cuda")
CPU = Device(kind="cpu", triton=False, ranks=1)


def recipe(*overrides: str):
    return load_recipe(QUICKSTART, list(overrides), check_paths=False)


def test_auto_kernels_are_on_with_cuda_for_the_familys_kernels_only():
    plan = resolve(recipe(), CUDA)
    assert all(plan.kernels[name].on for name in KERNEL_NAMES)
    assert "llama family" in plan.kernels["rms_norm"].reason
    gemma = resolve(recipe("model.preset=gemma-2-2b"), CUDA)
    assert gemma.kernels["swiglu"].on and gemma.attention == "ftune_softcap"  # GeGLU; soft-capping on FlexAttention
    # only attention through sdpa or ftune_window parks its output (ftune/engine/attention.py): the memory model knows
    assert not gemma.setting.parked_attention and plan.setting.parked_attention
    # nor layers that recompute whole: a mixture of experts', or any under LoRA dropout
    assert not resolve(recipe("model.preset=tiny-qwen3-moe"), CUDA).setting.parked_attention
    assert not resolve(recipe("lora.dropout=0.05"), CUDA).setting.parked_attention
    # Gemma's tied table leaves the GPU with the head, under the fused loss only
    assert gemma.host_embeddings and gemma.host_lm_head
    unfused = resolve(recipe("model.preset=gemma-2-2b", "kernels.fused_cross_entropy=false"), CUDA)
    assert not unfused.host_embeddings and "embeddings in host RAM" not in unfused.describe()
    phi = resolve(recipe("model.preset=phi-3-mini"), CUDA)  # fused gate_up_proj: the kernel reads its halves
    assert phi.kernels["swiglu"].on
    off = resolve(recipe(), CPU)
    assert not any(off.kernel_flags().values()) and "CUDA" in off.kernels["rope"].reason
    assert off.dtype == "float32" and plan.dtype == "bfloat16"
    assert resolve(recipe(), Device(kind="cuda", bf16=False)).dtype == "float16"


def test_a_kernel_the_recipe_names_is_as_the_recipe_says():
    plan = resolve(recipe("kernels.rms_norm=false", "kernels.rope=true"), CPU)
    assert not plan.kernels["rms_norm"].on and plan.kernels["rms_norm"].reason == "kernels.rms_norm: false"
    assert plan.kernels["rope"].on and "Triton cannot run here" in plan.kernels["rope"].reason


def test_a_model_whose_config_is_not_here_plans_the_generic_defaults():
    plan = resolve(recipe("model.preset=null", "model.name_or_path=some-org/not-cached",
                          "lora.target_modules=auto"), CUDA)
    assert plan.config is None and plan.shape is None and plan.family is None
    assert plan.lora_targets == "all-linear" and plan.attention == "sdpa"
    assert not any(plan.kernel_flags().values()) and "not known before it loads" in plan.kernels["rope"].reason


def test_host_embeddings_and_the_lm_head_follow_mode_device_and_loss():
    assert resolve(recipe(), CUDA).host_lm_head  # unsloth on CUDA with the fused loss
    assert not resolve(recipe(), CUDA, mode="true").host_embeddings
    assert not resolve(recipe(), CPU).host_embeddings
    plan = resolve(recipe("kernels.fused_cross_entropy=false"), CUDA)
    assert plan.host_embeddings and not plan.host_lm_head and not plan.setting.fused_loss
    fsdp = resolve(recipe("distributed.strategy=fsdp"), CUDA)  # sharded across its ranks: the head stays
    assert fsdp.host_embeddings and not fsdp.host_lm_head and not fsdp.setting.host_lm_head
    assert resolve(recipe("distributed.strategy=fsdp"), Device(kind="cuda", ranks=1)).host_lm_head


def test_smart_budget_is_bytes_once_and_the_layers_are_planned():
    plan = resolve(recipe("checkpointing.mode=smart", "checkpointing.budget=1GiB"), CUDA)
    assert plan.budget == allocatable(parse_bytes("1GiB")) and plan.layers is not None
    assert len(plan.layers.policies) == plan.shape.layers and plan.layers.peak <= plan.budget
    assert plan.host_embeddings == plan.layers.host_embeddings == plan.setting.host_embeddings
    card = resolve(recipe("checkpointing.mode=smart"), assumed_device(vram=parse_bytes("24GiB")))
    assert card.budget == allocatable(parse_bytes("24GiB"))
    measured = resolve(recipe("checkpointing.mode=smart"), Device(kind="cuda", free_bytes=20 * 2**30))
    assert measured.budget == 20 * 2**30 - max(2**30, 20 * 2**30 // 12)
    unknown = resolve(recipe("checkpointing.mode=smart"), CUDA)
    assert unknown.layers is None and "--vram" in unknown.notes[0]
    with pytest.raises(NoPlanFits):
        resolve(recipe("checkpointing.mode=smart", "checkpointing.budget=10MiB"), CUDA)


def test_the_memory_setting_is_the_plans():
    plan = resolve(recipe(), CUDA, mode="true")
    setting = plan.setting
    assert (setting.mode, setting.seq, setting.batch, setting.lora_r) == ("true", 64, 16, 16)
    assert setting.fused_loss and not setting.host_embeddings
    assert estimate(plan.shape, setting).peak > 0


@pytest.mark.parametrize("preset", ["gemma-3-4b", "phi-3-mini"])
def test_sliding_window_families_run_ftune_window_which_parks_and_builds_no_mask(preset):
    """At batch 1 (no padding) under sdpa each step holds the sliding layers' tokens x tokens mask;
    ftune_window holds none and parks its attention as sdpa does."""
    from ftune.memory.estimate import parks_attention

    plan = resolve(recipe(f"model.preset={preset}", "data.max_length=16384", "training.batch_size=1"), CUDA)
    assert plan.attention == "ftune_window" and plan.batches == "padded"
    assert plan.setting.parked_attention and not plan.setting.dense_window_mask
    assert parks_attention(plan.shape, 16384, 125 * 1024**3)
    sdpa = resolve(recipe(f"model.preset={preset}", "data.max_length=16384", "training.batch_size=1",
                          "model.attn_implementation=sdpa"), CUDA)
    assert sdpa.setting.parked_attention and sdpa.setting.dense_window_mask
    ours, theirs = estimate(plan.shape, plan.setting), estimate(sdpa.shape, sdpa.setting)
    assert theirs.checkpoints_gpu - ours.checkpoints_gpu == 16384 ** 2  # 256 MiB of booleans
    # padded rows: every row's mask, per kind of layer, under both
    padded = resolve(recipe(f"model.preset={preset}", "training.batch_size=4", "sft.padding_free=false"), CUDA)
    assert padded.setting.padded_masks
    # GRPO's paged generation runs transformers' paged sdpa, which has no ftune_window twin
    grpo = resolve(load_recipe(QUICKSTART.parent / "grpo-quickstart.yaml", [f"model.preset={preset}",
                                                                            "grpo.paged_generation=true"],
                               check_paths=False), CUDA)
    assert grpo.attention == "sdpa"


def test_validate_prints_the_plan(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "validate", str(QUICKSTART))
    assert not code
    assert "kernel swiglu: on (auto: on with CUDA for the llama family)" in output
    assert "LoRA targets: q_proj, k_proj" in output and "attention sdpa" in output and "checkpointing unsloth" in output
    code, output = run_cli(monkeypatch, capsys, "validate", str(QUICKSTART), "--cpu", "--set",
                           "checkpointing.mode=smart")
    assert not code and "plan for CPU" in output and "smart plan for a" in output


def test_validate_of_a_hub_model_not_on_this_machine_still_validates(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "validate", str(QUICKSTART), "--set", "model.preset=null",
                           "--set", "model.name_or_path=some-org/not-cached")
    assert not code and "✓" in output and "shape and family are unknown" in output


def test_a_kernel_auto_turned_on_that_the_loaded_model_cannot_take_goes_off_with_a_notice(caplog):
    """The family says GeGLU; a Gemma-2 whose config asks for relu keeps its own MLP, the other
    kernels apply, and the plan as applied says why. Asked for by name, it is an error."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from transformers import Gemma2Config

    from ftune.errors import ModelError
    from ftune.model import patch_kernels

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, hidden_activation="relu"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    plan = resolve(recipe("model.preset=gemma-2-2b"), CUDA)
    assert plan.kernels["swiglu"].on
    applied = patch_kernels(model, plan, torch.device("cpu"))
    assert not applied.kernels["swiglu"].on and "activation is relu" in applied.kernels["swiglu"].reason
    assert "kernels.swiglu is off" in caplog.text
    assert applied.kernels["rms_norm"].on and base._ftune_kernels == {"rms_norm", "rope", "fused_cross_entropy",
                                                                      "fused_lora"}
    asked = resolve(recipe("model.preset=gemma-2-2b", "kernels.swiglu=true"), CUDA)
    with pytest.raises(ModelError, match="kernels.swiglu: gemma2's MLP activation is relu"):
        patch_kernels(get_peft_model(AutoModelForCausalLM.from_config(base.config), LoraConfig(r=4)), asked,
                      torch.device("cpu"))


def test_a_family_without_an_entry_plans_on_cuda_without_llama_sized_keys():
    """gpt2 names its sizes n_embd, n_head: the plan reads whether its table is tied without them
    (it built the memory model's Shape, a KeyError, where embeddings move and the head does not)."""
    config = ModelConfig("gpt2", {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128,
                                  "tie_word_embeddings": True})
    plan = resolve(recipe("checkpointing.mode=unsloth"), CUDA, config=config)
    assert plan.family is None and not plan.host_lm_head and not plan.host_embeddings  # the tied table stays
    grpo = resolve(recipe("workflow=grpo", "data.format=prompt"), CUDA, config=config)
    assert not grpo.decode_graphs and grpo.setting.generation_cache == "dynamic"  # no entry: decoded eagerly


def test_grpo_decodes_through_cuda_graphs_on_a_gpu_for_dense_families_without_windows():
    """generation_plan: graphs over the static cache on CUDA for a dense family whose layers slide
    no window; auto's cache follows them; a cache or device that cannot replay decodes eagerly."""
    grpo = ("workflow=grpo", "data.format=prompt")
    plan = resolve(recipe(*grpo), CUDA)
    assert plan.decode_graphs and plan.setting.generation_cache == "static"
    assert "static KV cache, decode steps replayed as CUDA graphs" in "\n".join(plan.describe_lines())
    for overrides, device in [((), CPU), (("model.preset=gemma-3-4b",), CUDA), (("model.preset=tiny-mixtral",), CUDA),
                              (("grpo.cuda_graphs=false",), CUDA)]:
        eager = resolve(recipe(*grpo, *overrides), device)
        assert not eager.decode_graphs and eager.setting.generation_cache == "dynamic", overrides
    assert resolve(recipe(*grpo, "grpo.cache_implementation=dynamic"), CUDA).decode_graphs is False
    offloaded = resolve(recipe(*grpo, "grpo.cache_implementation=offloaded"), CUDA)
    assert not offloaded.decode_graphs and offloaded.setting.generation_cache == "offloaded"
    # without a GPU the cache is in host memory already: transformers' offloaded one needs CUDA
    assert resolve(recipe(*grpo, "grpo.cache_implementation=offloaded"), CPU).setting.generation_cache == "dynamic"
    paged = resolve(recipe(*grpo, "grpo.paged_generation=true"), CUDA)
    assert not paged.decode_graphs and paged.setting.generation_cache == "paged"
    assert not resolve(recipe(), CUDA).decode_graphs  # SFT generates nothing


def test_grpo_decodes_eagerly_where_rotary_frequencies_follow_the_length():
    """Dynamic and longrope scaling choose the rotary frequencies in Python from the longest
    position so far (per layer type too), which a replayed graph would freeze."""
    grpo = recipe("workflow=grpo", "data.format=prompt")
    llama = PRESETS["tiny-llama"]
    for scaling in [{"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                    {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "rope_theta": 10000.0},
                    {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "dynamic"}}]:
        config = ModelConfig("tiny-llama", {**llama, "rope_parameters": scaling})
        plan = resolve(grpo, CUDA, config=config)
        assert not plan.decode_graphs and plan.setting.generation_cache == "dynamic", scaling
    for scaling in [{"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}, {"rope_type": "default"}]:
        assert resolve(grpo, CUDA, config=ModelConfig("tiny-llama", {**llama, "rope_parameters": scaling})).decode_graphs


def test_short_steps_keep_their_layers_within_the_longest_steps_peak():
    """On a GPU, modes true and unsloth let a step of at most keep_up_to tokens keep every layer's
    activations with the head streamed (memory.estimate.keeps_layers): the largest such step peaks
    no higher than the run's longest in its own mode, and a step one row-length longer runs the
    mode (in smart, than its budget). Not where a step's loss cannot stream the head (GRPO, a router
    loss beside TRL's DPO loss), in mode none, in smart without a budget, nor on a CPU."""
    from dataclasses import replace

    from ftune.memory.estimate import Shape, estimate, keep_bytes_per_layer, keeps_layers
    from ftune.presets import PRESETS

    shape = Shape.from_config(PRESETS["llama-3.1-8b"])
    for mode in ("unsloth", "true"):
        for workflow in (("workflow=sft",), ("workflow=dpo", "data.format=preference", "model.adapter=null")):
            setting = resolve(recipe("model.preset=llama-3.1-8b", f"checkpointing.mode={mode}", "data.max_length=2048",
                                     *workflow), CUDA).setting
            keep = setting.keep_up_to
            planned = estimate(shape, replace(setting, keep_up_to=0)).peak
            longest = next(step for step in (replace(setting, seq=seq) for seq in range(setting.seq, 0, -1))
                           if step.training_tokens <= keep)
            assert keep > 0 and keeps_layers(longest) and longest.training_tokens == keep, (mode, workflow)
            kept = estimate(shape, longest)
            assert kept.peak <= planned
            assert kept.checkpoints_gpu >= shape.layers * keep_bytes_per_layer(shape, keep)
            assert not keeps_layers(replace(longest, seq=longest.seq + 1))
    # smart: within its budget, which its plan for the longest step may leave room in
    smart = resolve(recipe("model.preset=llama-3.1-8b", "checkpointing.mode=smart", "checkpointing.budget=12GiB",
                           "data.max_length=4096", "training.batch_size=1"), CUDA)
    keep = smart.setting.keep_up_to
    assert keep > 0 and smart.layers.peak <= smart.budget
    longest = replace(smart.setting, seq=keep)
    assert keeps_layers(longest) and estimate(shape, longest).peak <= smart.budget
    assert estimate(shape, replace(longest, seq=keep + 1, keep_up_to=keep + 1)).peak > smart.budget
    assert resolve(recipe("model.preset=llama-3.1-8b", "checkpointing.mode=smart"), CUDA).setting.keep_up_to == 0
    dpo = ("workflow=dpo", "data.format=preference", "model.adapter=null")
    assert resolve(recipe(*dpo), CPU).setting.keep_up_to == 0
    assert resolve(recipe("workflow=grpo", "data.format=prompt"), CUDA).setting.keep_up_to == 0
    assert resolve(recipe(*dpo, "model.preset=qwen3-30b-a3b"), CUDA).setting.keep_up_to == 0
    assert resolve(recipe(*dpo, "model.preset=qwen3-30b-a3b", "workflow=sft", "data.format=auto"),
                   CUDA).setting.keep_up_to > 0  # ftune's own loss streams beside a router loss
    assert resolve(recipe("checkpointing.mode=none"), CUDA).setting.keep_up_to == 0
