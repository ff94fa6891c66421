"""Every family trains correctly: tiny random models of each family built through `build_model`
give the loss and LoRA gradients of a plain transformers + peft model with the same weights, in
every checkpointing mode, 16-bit and 4-bit, kernels off and (where the family has them) on; and
`ftune train` runs on each.

Gemma-3 and Phi-3 slide a window of 8 tokens over the 24 of each row (Gemma-3 on one layer of
its two, Phi-3 on both), so that the window hides keys: ftune_window (ftune/kernels/window_attention.py)
against transformers' sdpa with its dense mask, the parked path included.

Tolerance: fp32 on CPU. The modes recompute the same operations in the same order, so they agree
to a few ulps (measured: at most 5e-7 of a gradient's norm); the Triton kernels under the
interpreter reorder sums (about 1e-6). 1e-4 of each tensor's norm leaves that a hundredfold margin
and is far below what a lost contribution gives (a router loss without gradient: 0.93; Gemma's
embedding without its scale: 0.46).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import ParamWrapper
from transformers import AutoConfig, AutoModelForCausalLM

from ftune.families import family_of
from ftune.engine import attention
from ftune.integrations.experts import dequantized_copy, has_4bit_experts, quantized_stacks
from ftune.integrations.transformers import KERNELS, WINDOW_ATTENTION
from ftune.model import build_model, quantization_config
from ftune.plan import lora_parameters, lora_targets
from ftune.recipe import validate_recipe
from tests.conftest import REPO

RELATIVE_TOLERANCE = 1e-4
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.1)
CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "gemma": dict(model_type="gemma", head_dim=32),
    "gemma2": dict(model_type="gemma2", head_dim=32, tie_word_embeddings=True),
    "gemma2-untied": dict(model_type="gemma2", head_dim=32, tie_word_embeddings=False),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=32, tie_word_embeddings=False, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(model_type="phi3", sliding_window=8),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                    router_aux_loss_coef=0.5),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                      output_router_logits=True, router_aux_loss_coef=0.5, head_dim=32),
    "olmo2": dict(model_type="olmo2"),  # a family ftune has no entry for: the generic path
}


@functools.cache
def model_folder(name: str, tmp_root) -> str:
    values = dict(TINY, **CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    path = tmp_root / name
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda name: model_folder(name, root)


def recipe_for(path: str, mode: str, quant: str, kernels: frozenset = frozenset(), **training):
    raw = {"model": {"name_or_path": path, "tokenizer": str(REPO / "data/quickstart/tokenizer")},
           "quantization": {"method": quant},
           "checkpointing": {"mode": mode, "host_embeddings": True,
                             **({"budget": "64GiB"} if mode == "smart" else {})},
           "kernels": {name: name in kernels for name in KERNELS},
           "data": {"source": str(REPO / "data/quickstart/sft.jsonl")}, "training": training}
    return validate_recipe(raw, base_dir=REPO / "recipes")


def _reference(path: str, recipe, built) -> torch.nn.Module:
    # ftune's sliding-window attention against transformers' sdpa with its dense masks; ftune_softcap
    # against itself (its own tests hold it to eager attention)
    attention = built.model.config._attn_implementation
    attention = "sdpa" if attention == WINDOW_ATTENTION else attention
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=quantization_config(recipe, torch.float32),
                                                device_map={"": "cpu"}, attn_implementation=attention)
    if has_4bit_experts(built.model):  # transformers + peft over 16-bit experts that hold the dequantized weights
        dequantized_copy(built.model, base)
    transformers.set_seed(0)
    family = family_of(base.config.model_type)
    reference = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=lora_targets(recipe, family),
                                                target_parameters=lora_parameters(recipe, family) or None,
                                                task_type="CAUSAL_LM"))
    adapter = {k: v for k, v in built.model.state_dict().items() if "lora_" in k}
    missing = set(adapter) - set(reference.state_dict())
    assert not missing, f"the adapters differ: {sorted(missing)[:3]}"
    reference.load_state_dict(adapter, strict=False)
    return reference


def _loss_and_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
_REFERENCES: dict = {}


def _case(folders, name, mode, quant, kernels=frozenset()):
    """The family's model built by ftune in this mode: its loss and LoRA gradients against the
    reference's."""
    path = folders(name)
    recipe = recipe_for(path, mode, quant, kernels)
    built = build_model(recipe, torch.device("cpu"), with_tokenizer=False)
    for parameter in built.model.parameters():  # B non-zero, so that every LoRA gradient is exercised
        if parameter.requires_grad and parameter.dim() == 2 and not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    out, grads = _loss_and_grads(built.model, IDS)
    if (path, quant) not in _REFERENCES:  # the same weights and adapter whatever the mode
        reference = _reference(path, recipe, built)
        expected_out, expected = _loss_and_grads(reference, IDS)
        _REFERENCES[path, quant] = expected_out.loss.detach(), expected
    expected_loss, expected = _REFERENCES[path, quant]
    torch.testing.assert_close(out.loss.detach(), expected_loss, rtol=RELATIVE_TOLERANCE, atol=0)
    assert grads.keys() == expected.keys() and grads
    for key in expected:
        error = ((grads[key] - expected[key]).norm() / expected[key].norm()).item()
        assert error <= RELATIVE_TOLERANCE, f"{key}: relative error {error:.2e}"
    return built, out


# Every mode in 16 and 4 bits; smart plans the same policies in both, so it runs in 4 bits only;
# the 4-bit unsloth case runs with the family's kernels (Triton's interpreter on CPU).
CASES = [(mode, quant) for quant in ("none", "nf4") for mode in ("none", "true", "unsloth")] + [("smart", "nf4")]


def _parked_windows(monkeypatch) -> list:
    """The window of each attention the parked path ran (None: causal over the whole row)."""
    windows = []
    forward = attention._forward

    def recorded(query, key, value, scale, rows=None, window=None):
        windows.append(window)
        return forward(query, key, value, scale, rows, window)

    monkeypatch.setattr(attention, "_forward", recorded)
    return windows


@pytest.mark.parametrize("mode,quant", CASES, ids=[f"{mode}-{quant}" for mode, quant in CASES])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_family_gives_the_reference_loss_and_gradients(folders, name, mode, quant, monkeypatch):
    family = family_of(CONFIGS[name]["model_type"])
    kernels = family.kernels if family is not None and (mode, quant) == ("unsloth", "nf4") else frozenset()
    parked = _parked_windows(monkeypatch)
    built, out = _case(folders, name, mode, quant, kernels)
    assert {k for k, on in built.kernels.items() if on} == set(kernels)
    if family is not None and family.experts:  # the router's load-balancing loss is in it, with its gradient
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        # the experts' weights adapted in every layer (their gradients compared above)
        adapted = [module.parameter_name for module in built.model.modules() if isinstance(module, ParamWrapper)]
        expected = [name.rpartition(".")[2] for name in family.expert_parameters] * TINY["num_hidden_layers"]
        assert sorted(adapted) == sorted(expected)
        # in 4 bits the experts hold 4-bit data alone: no 3D parameter keeps more than one element
        stacks = [name for module in built.model.modules() for name in quantized_stacks(module)]
        assert sorted(stacks) == (sorted(expected) if quant == "nf4" else [])
        sizes = {p.untyped_storage().nbytes() // p.element_size() for p in built.model.parameters() if p.dim() == 3}
        assert sizes and (sizes == {1} if quant == "nf4" else 1 not in sizes)
        # DDP's start, which copies rank 0's parameters into each rank's, leaves those placeholders alone
        assert len(getattr(built.model, "_ddp_params_and_buffers_to_ignore", ())) == len(stacks)
    if family is None:
        assert built.engine.residual_halves is None and not any(built.kernels.values())
    elif family.residual_halves and mode != "none":  # every recomputed layer runs as two halves
        wrapped = [layer.__dict__["forward"] for layer in built.engine.layers if "forward" in layer.__dict__]
        assert all(forward.halves is not None for forward in wrapped) and (wrapped or mode == "smart")
    if mode == "unsloth" and family is not None and family.attention == WINDOW_ATTENTION:
        # every offloaded layer parked its attention, the sliding ones within their window
        kinds = getattr(built.model.config, "layer_types", None) or ["sliding_attention"] * TINY["num_hidden_layers"]
        windows = [8 if kind == "sliding_attention" else None for kind in kinds]
        assert parked == windows and not attention._refused


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_target_parameters_the_model_lacks_are_an_error_naming_what_it_has(folders, name):
    """peft adapts the parameter names it finds and passes over the others without a word."""
    from ftune.errors import ModelError

    recipe = recipe_for(folders(name), "none", "none")
    recipe.lora.target_parameters = ["mlp.experts.up_proj"]
    has = "mlp.experts.down_proj, mlp.experts.gate_up_proj" if name == "mixtral" else "no 3D expert parameters"
    with pytest.raises(ModelError, match="mlp.experts.up_proj names no parameter") as raised:
        build_model(recipe, torch.device("cpu"), with_tokenizer=False)
    assert has in raised.value.hint


def test_a_mixture_of_experts_adapts_its_experts_and_says_they_load_in_4_bits(folders):
    from ftune.errors import RecipeError
    from ftune.families import MOE_EXPERTS
    from ftune.plan import Device, resolve

    recipe = recipe_for(folders("mixtral"), "true", "nf4")
    lines = resolve(recipe, Device()).describe_lines()
    assert "LoRA on parameters: mlp.experts.gate_up_proj, mlp.experts.down_proj" in lines
    assert "note: the experts' weights load in 4 bits (nf4, one layer's 16-bit experts at a time while loading) and " \
           "each layer's are dequantized to bfloat16 as it runs, their LoRA delta added to the dequantized weights: " \
           "`ftune estimate-vram` counts them so" in lines
    assert resolve(recipe, Device()).setting.lora_parameters == MOE_EXPERTS
    assert resolve(recipe, Device()).setting.quantized_experts
    recipe.distributed.strategy = "fsdp"  # FSDP would shard the placeholders whole: the experts stay 16-bit, as it says
    plan = resolve(recipe, Device())
    assert not plan.setting.quantized_experts and any("stay bfloat16 under 4-bit loading with FSDP" in note
                                                      for note in plan.notes)
    recipe.distributed.strategy = "ddp"
    recipe.lora.dropout = 0.1  # peft's parameter adapters take no dropout: auto leaves the experts, and says so
    plan = resolve(recipe, Device())
    assert plan.lora_parameters == [] and any("experts are not adapted" in note for note in plan.notes)
    assert any("dequantized to bfloat16 as it runs, not adapted" in note for note in plan.notes)
    recipe.lora.target_parameters = []
    assert not any("experts are not adapted" in note for note in resolve(recipe, Device()).notes)
    recipe.lora.dropout, recipe.lora.target_parameters = 0.0, "auto"
    recipe.lora.target_modules = ["q_proj", "v_proj"]  # modules named: those alone
    assert resolve(recipe, Device()).lora_parameters == []
    with pytest.raises(RecipeError, match="target_parameters takes no dropout"):
        validate_recipe({"model": {"preset": "mixtral-8x7b", "tokenizer": "x"}, "data": {"source": "x.jsonl"},
                         "lora": {"dropout": 0.1, "target_parameters": list(MOE_EXPERTS)}}, base_dir=REPO,
                        check_paths=False)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_4bit_experts_give_the_logits_of_their_dequantized_weights(folders, name):
    """Loaded in 4 bits, the experts hold NF4 data with the recipe's settings and no 16-bit copy;
    the model's logits and router loss are those of the 16-bit model whose experts hold the
    dequantized weights (and not those of the original weights: the experts are quantized)."""
    from ftune.model import load_base_model

    path = folders(name)
    recipe = recipe_for(path, "none", "nf4")
    model, _, _ = load_base_model(recipe, torch.device("cpu"))
    stacks = [(module, stack) for module in model.modules() for stack in quantized_stacks(module)]
    assert len(stacks) == 2 * TINY["num_hidden_layers"]
    for module, stack in stacks:
        weight = module._parameters[stack + "_4bit"]
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"
        assert weight.quant_state.nested == recipe.quantization.double_quant
        assert weight.numel() * 2 == module._parameters[stack].numel()  # two weights a byte
    assert {p.untyped_storage().nbytes() for p in model.parameters() if p.dim() == 3} == {4}  # one fp32 zero each
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                     quantization_config=quantization_config(recipe, torch.float32))
    with torch.no_grad():
        original = reference(input_ids=IDS)
        assert dequantized_copy(model, reference) == len(stacks)
        out, expected = model(input_ids=IDS), reference(input_ids=IDS)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    assert (original.logits - expected.logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ftune_train_runs_on_every_family(folders, name, tmp_path):
    from ftune.runner import train

    recipe = recipe_for(folders(name), "unsloth", "nf4", max_steps=1, batch_size=2, logging_steps=1,
                        output_dir=str(tmp_path / "run"), save_minutes=0)
    recipe.data.limit, recipe.data.max_length = 2, 32
    summary = train(recipe).summary
    assert summary["steps"] == 1 and summary["final_loss"] is not None
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    family = family_of(CONFIGS[name]["model_type"])
    # a mixture of experts' load-balancing loss is logged beside the loss it is part of
    assert ("aux_loss" in record) == (family is not None and family.experts), record
    if family is not None and family.experts:  # trained over 4-bit experts, its adapter loads with PEFT on the base
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
        assert any(".mlp.experts." in key for key in saved)
        base = AutoModelForCausalLM.from_pretrained(folders(name), dtype=torch.float32)
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, tmp_path / "run"))
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0)


def test_the_panel_shows_the_router_aux_loss(tmp_path):
    import io

    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from ftune.engine.recompute import CheckpointingEngine
    from ftune.reports import LiveReporter

    engine = CheckpointingEngine(mode="true", policies=[], device=torch.device("cpu"), copier=None)
    reporter = LiveReporter(tmp_path, engine, title="moe", console=Console(file=io.StringIO(), width=120))
    state = TrainerState(max_steps=10, global_step=1)
    reporter.on_train_begin(None, state, TrainerControl())
    reporter.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "aux_loss": 2.0313})
    frame = Console(file=io.StringIO(), width=120, color_system=None)
    frame.print(reporter._render(state))
    reporter.close(state)
    assert "router aux loss 2.0313" in reporter.console.file.getvalue()  # the plain line, off a terminal
    assert "router aux loss" in frame.file.getvalue() and "2.0313" in frame.file.getvalue()


def test_docs_models_page_holds_the_registry():
    from ftune.families import models_table

    assert models_table() in (REPO / "docs" / "models.md").read_text(), \
        "docs/models.md is out of date: rebuild its table with `python -m ftune.families`"


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_ftune_train_of_a_tiny_moe_preset_in_4_bits(preset, tmp_path):
    """The quickstart on a tiny mixture of experts: its experts load in 4 bits, it trains (the
    router's loss logged beside the loss), and the adapter, experts included, loads with PEFT on
    the preset's 16-bit weights."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from ftune.recipe import load_recipe
    from ftune.runner import train
    from tests.conftest import QUICKSTART

    out = tmp_path / "run"
    run = train(load_recipe(QUICKSTART, [f"model.preset={preset}", f"training.output_dir={out}", "training.max_steps=2",
                                         "training.batch_size=2", "data.max_length=32", "training.logging_steps=1",
                                         "training.save_minutes=0", "lora.target_modules=auto"]))
    assert run.built.plan.setting.quantized_experts and run.summary["steps"] == 2
    stacks = [name for module in run.built.model.modules() for name in quantized_stacks(module)]
    assert len(stacks) == 2 * 4  # both stacks of the 4 layers
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in records)
    assert all("aux_loss" in record for record in records if "loss" in record)
    saved = load_file(out / "adapter_model.safetensors")
    assert sum(".mlp.experts." in key for key in saved) == 2 * 2 * 4  # A and B of both stacks, every layer
    base = AutoModelForCausalLM.from_pretrained(run.built.source, dtype=torch.float32)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, out))
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], value.to(loaded[key].dtype)) for key, value in saved.items())
    assert any(value.abs().sum() > 0 for key, value in saved.items() if "experts.lora_B" in key)  # trained
    # generation over a padded batch (GRPO's, ftune generate's) asks for no router logits, whose
    # load-balancing loss transformers 5.17 cannot compute on a decoding step
    prompts = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0
    run.built.model.eval()
    with torch.no_grad():
        generated = run.built.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                             pad_token_id=0)
    assert generated.shape == (2, 8)


# One DDP step on one gloo rank, in a process of its own that leaves without gloo's teardown, which
# can deadlock right after a backward (ftune.cli's _leave_process_group says why): in the test's own
# process it hung 1 run of 2 here, and a CI run.
_DDP_STEP = """
import os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from ftune.model import build_model
from tests.test_families import IDS, recipe_for

built = build_model(recipe_for(sys.argv[1], "true", "nf4"), torch.device("cpu"), with_tokenizer=False)
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + sys.argv[2])
DistributedDataParallel(built.model)(input_ids=IDS, labels=IDS).loss.backward()
print("without gradients:", [n for n, p in built.model.named_parameters() if p.requires_grad and p.grad is None])
sys.stdout.flush()
os._exit(0)
"""


def test_ddp_leaves_the_4bit_experts_placeholders_alone(folders, tmp_path):
    """DDP's start copies rank 0's parameters into every rank's, which the 4-bit experts'
    placeholders (one element expanded to a stack's shape) refuse ("more than one element of the
    written-to tensor refers to a single memory location") unless ftune names them to it."""
    step = subprocess.run([sys.executable, "-c", _DDP_STEP, folders("qwen3_moe"), str(tmp_path / "rendezvous")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert step.returncode == 0, step.stderr[-3000:]
    assert "without gradients: []" in step.stdout, step.stdout


def test_a_checkpoint_quantized_before_keeps_its_experts_16_bit_and_says_so(folders, tmp_path, caplog):
    """A bitsandbytes 4-bit checkpoint (saved quantized, its experts 16-bit) loads as it was saved:
    transformers deserializes it, nothing quantizes on the fly, and ftune says the experts stay 16-bit."""
    from ftune.model import load_base_model

    path = folders("qwen3_moe")
    recipe = recipe_for(path, "none", "nf4")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                         quantization_config=quantization_config(recipe, torch.float32)
                                         ).save_pretrained(tmp_path / "prequantized")
    recipe.model.name_or_path = str(tmp_path / "prequantized")
    with caplog.at_level("WARNING", logger="ftune.model"):
        model, _, _ = load_base_model(recipe, torch.device("cpu"))
    assert not has_4bit_experts(model)
    assert any("stay torch.float32: the checkpoint comes quantized" in record.message for record in caplog.records)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "unsloth"])
def test_gemma2_on_flash_attention_4_trains_as_on_flexattention(mode, tmp_path, monkeypatch):
    """Gemma-2 built by ftune on a GPU where FlashAttention 4 runs (a Hopper or Blackwell with the
    `fa4` extra), in bf16 with Gemma-2's 256-wide heads and a window of 16 over rows of 128 tokens:
    every attention call runs on FlashAttention 4 (the recompute's too), and the loss and LoRA
    gradients are those of the same build on FlexAttention, within bf16's rounding: the kernels
    sum in other orders (measured on an H200: the losses within 1e-4, each gradient within 1.0e-2
    to 1.2e-2 of its norm, in both modes). The kernels' own tests hold each of them to fp32 eager
    attention, the cap included."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ftune.kernels import softcap_attention

    probe = torch.zeros(1, 4, 128, 256, device="cuda", dtype=torch.bfloat16)
    if not softcap_attention.flash4_takes(probe, probe[:, :2], probe[:, :2]):
        pytest.skip("FlashAttention 4 is not installed, or does not run soft-capped attention on this GPU")
    config = AutoConfig.for_model("gemma2", **dict(TINY, head_dim=256, sliding_window=16, tie_word_embeddings=True))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "gemma2")
    raw = {"model": {"name_or_path": str(tmp_path / "gemma2"), "tokenizer": str(REPO / "data/quickstart/tokenizer"),
                     "dtype": "bfloat16"},
           "quantization": {"method": "none"}, "checkpointing": {"mode": mode},
           "data": {"source": str(REPO / "data/quickstart/sft.jsonl")}}
    ids = torch.randint(3, 500, (2, 128), generator=torch.Generator().manual_seed(1)).cuda()
    calls = []
    flash4 = softcap_attention.attend_flash4
    monkeypatch.setattr(softcap_attention, "attend_flash4", lambda *args: calls.append(args[-1]) or flash4(*args))

    def run(adapter=None):
        built = build_model(validate_recipe(raw, base_dir=REPO / "recipes"), torch.device("cuda"),
                            with_tokenizer=False)
        if adapter is None:  # B non-zero, as in _case
            for parameter in built.model.parameters():
                if parameter.requires_grad and parameter.dim() == 2 and not parameter.any():
                    torch.nn.init.normal_(parameter, std=0.05,
                                          generator=torch.Generator(device="cuda").manual_seed(parameter.numel()))
        else:  # the same adapter on both kernels
            assert not built.model.load_state_dict(adapter, strict=False).unexpected_keys
        out, grads = _loss_and_grads(built.model, ids)
        return out, grads, {k: v.detach().clone() for k, v in built.model.state_dict().items() if "lora_" in k}

    out, grads, adapter = run()
    # two layers, sliding (window 16) then full; with recomputation each runs again in the
    # backward, the last layer first
    assert calls == ([16, None] if mode == "none" else [16, None, None, 16])
    monkeypatch.setattr(softcap_attention, "_flash4_refused", {(0, torch.bfloat16, 256)})  # FlexAttention runs
    flex_out, flex_grads, _ = run(adapter)
    assert len(calls) == (2 if mode == "none" else 4)
    torch.testing.assert_close(out.loss, flex_out.loss, rtol=1e-2, atol=0)
    assert grads.keys() == flex_grads.keys() and grads
    errors = {key: ((grads[key].float() - flex_grads[key].float()).norm() / flex_grads[key].float().norm()).item()
              for key in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 3e-2, f"{worst}: relative difference {errors[worst]:.2e}"
