"""Contract tests: what ftune relies on in upstream libraries still holds. Each failure names the
module of ftune/integrations/ to check against the new version."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import bitsandbytes.nn.modules as bnb_modules
import torch

from ftune.integrations import bitsandbytes as ftune_bnb


def _linear4bit() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    return layer.to("cpu")  # quantizes


def test_bitsandbytes_repacks_4bit_weights_on_avx512bf16_cpus_unless_ftune_turns_it_off(monkeypatch):
    moved = f"bitsandbytes {bnb.__version__} changed its CPU repack of 4-bit weights; check ftune/integrations/bitsandbytes.py"
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    calls = []

    def spy(weight, state, *args, **kwargs):  # records the repack without running its kernel
        calls.append(weight.shape)
        return weight, state

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", spy)
    x = torch.randn(3, 128)
    upstream = _linear4bit().eval()
    assert getattr(upstream, ftune_bnb.REPACK_ATTRIBUTE, None), moved
    with torch.no_grad():
        upstream(x)
    assert len(calls) == 1, moved  # eval mode, an input without gradient, the flag on: repacked

    kept = _linear4bit().eval()
    assert ftune_bnb.keep_4bit_layout(torch.nn.Sequential(kept)) == 1
    with torch.no_grad():
        out = kept(x)
    assert len(calls) == 1 and not ftune_bnb.is_repacked(kept)
    expected = x @ bnb.functional.dequantize_4bit(kept.weight.data, kept.weight.quant_state).t()
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------
# bitsandbytes: the facts ftune/integrations/bitsandbytes.py states besides the repack


def test_bitsandbytes_dequantizes_past_the_token_count_ftune_assumes():
    """Read from the source: the CUDA backend does not import on a CPU machine."""
    import importlib.util
    import re

    origin = importlib.util.find_spec("bitsandbytes.backends.cuda.ops").origin
    source = open(origin).read()
    found = re.search(r"if torch\.version\.hip is None:.*?_gemm_4bit_custom_max_m = (\d+)", source, re.S)
    assert found and int(found.group(1)) == ftune_bnb.FUSED_4BIT_MAX_TOKENS, (
        f"bitsandbytes {bnb.__version__} changed how many rows its CUDA 4-bit GEMM takes without "
        f"dequantizing; check FUSED_4BIT_MAX_TOKENS in ftune/integrations/bitsandbytes.py")


def test_bitsandbytes_restores_a_lost_quant_state():
    layer = _linear4bit()
    state = layer.weight.quant_state
    layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)  # as FSDP's gathering leaves it
    assert getattr(layer.weight, "quant_state", None) is None
    ftune_bnb.fix_quant_state(layer)
    assert layer.weight.quant_state is state, (
        f"bitsandbytes {bnb.__version__} no longer restores a 4-bit weight's quant state from its layer; "
        f"check fix_quant_state in ftune/integrations/bitsandbytes.py")


# ----------------------------------------------------------------------------------------------
# peft: what ftune's LoRA forward reads of a LoRA layer


def test_peft_lora_layers_hold_what_ftunes_lora_forward_reads():
    import peft

    from ftune.integrations import peft as ftune_peft
    from tests.helpers import tiny_lora_model

    moved = f"peft {peft.__version__} changed its LoRA layers; check ftune/integrations/peft.py"
    model, _ = tiny_lora_model("tiny-llama", layers=1)
    layers = ftune_peft.lora_layers(model)
    assert len(layers) == 7, moved
    layer = layers[0]
    for name in ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "disable_adapters",
                 "merged", "lora_variant"):
        assert hasattr(layer, name), f"{moved} (no {name})"
    assert set(layer.lora_A) == {"default"} and isinstance(layer.scaling["default"], float), moved
    assert ftune_peft.install_lora_forward(model) == 7
    x = torch.randn(2, 3, layer.in_features)
    # the addmm path gives peft's own forward's output
    torch.testing.assert_close(layer(x), layer._ftune_peft_forward(x), atol=1e-6, rtol=1e-5, msg=moved)


# ----------------------------------------------------------------------------------------------
# transformers: attention registry, the attention and decoder layer's calls, router logits


def test_transformers_attention_registry_and_sdpa_signature():
    import inspect

    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    moved = f"transformers {transformers.__version__} changed its attention registry; check wrap_attention in " \
            f"ftune/integrations/transformers.py and ftune/engine/attention.py"
    assert "sdpa" in ALL_ATTENTION_FUNCTIONS and callable(getattr(AttentionInterface, "register", None)), moved
    parameters = list(inspect.signature(ALL_ATTENTION_FUNCTIONS["sdpa"]).parameters)
    assert parameters[:8] == ["module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"], moved


def test_transformers_llama_layers_call_what_ftunes_patches_expect():
    """The grouped q, k and v take the attention's `hidden_states` argument, which the decoder layer
    passes by name; the RoPE patch rebinds `apply_rotary_pos_emb` in the attention's globals."""
    import inspect

    import transformers
    from transformers.models.llama import modeling_llama

    moved = f"transformers {transformers.__version__} changed Llama's layers; check ftune/integrations/transformers.py"
    attention = inspect.getsource(modeling_llama.LlamaAttention.forward)
    for call in ("self.q_proj(hidden_states)", "self.k_proj(hidden_states)", "self.v_proj(hidden_states)"):
        assert call in attention, f"{moved} ({call})"
    assert "apply_rotary_pos_emb" in modeling_llama.LlamaAttention.forward.__code__.co_names, moved
    assert "self.self_attn(\n            hidden_states=hidden_states" in inspect.getsource(
        modeling_llama.LlamaDecoderLayer.forward), moved


def test_transformers_passes_the_sliding_window_and_the_mask_arguments_ftune_window_reads():
    """ftune_window (ftune/kernels/window_attention.py) reads each layer's window from the attention
    call's `sliding_window`, and transformers' sign of a plain causal pattern (`allow_is_causal_skip`,
    `use_vmap`) from the mask interface's call."""
    import inspect

    import transformers
    from transformers import masking_utils
    from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
    from transformers.models.phi3.modeling_phi3 import Phi3Attention

    moved = f"transformers {transformers.__version__} changed how the window reaches attention; check " \
            "ftune/kernels/window_attention.py"
    assert "sliding_window=self.sliding_window" in inspect.getsource(Gemma3Attention.forward), moved
    phi3 = inspect.getsource(Phi3Attention.forward)
    assert 'sliding_window=getattr(self.config, "sliding_window", None)' in phi3, moved
    for create in (masking_utils.create_causal_mask, masking_utils.create_sliding_window_causal_mask):
        source = inspect.getsource(create)
        for argument in ("allow_is_causal_skip=allow_is_causal_skip", "use_vmap=use_vmap", "q_offset=q_offset"):
            assert argument in source, f"{moved} ({create.__name__}: {argument})"


def test_transformers_phi3_mlp_is_the_gated_layout_ftunes_kernel_reads():
    """ftune's gated-product kernel reads Phi-3's one projection as gate first, then up
    (GATED_MLP_LAYOUTS): transformers' own Phi3MLP computes the same."""
    import transformers
    from transformers.models.phi3.configuration_phi3 import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from ftune.integrations.transformers import GATED_MLP_LAYOUTS

    mlp = Phi3MLP(Phi3Config(hidden_size=16, intermediate_size=24))
    assert GATED_MLP_LAYOUTS[("gate_up_proj", "down_proj")] == "activation_fn" and hasattr(mlp, "activation_fn")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    expected = mlp.down_proj(torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(mlp(x), expected, msg=f"transformers {transformers.__version__} changed Phi3MLP; "
                               "check ftune/integrations/transformers.py _gated_mlp_forward")


def test_transformers_records_router_logits_through_a_context_variable():
    import transformers
    from transformers.utils import output_capturing

    from ftune.integrations import transformers as ftune_transformers

    moved = f"transformers {transformers.__version__} changed output capturing; check the router logits in " \
            f"ftune/integrations/transformers.py"
    collector = output_capturing._active_collector
    assert all(callable(getattr(collector, name, None)) for name in ("get", "set", "reset")), moved
    assert ftune_transformers.router_logits_being_recorded() is None
    with ftune_transformers.recording_router_logits_apart() as logits:
        assert ftune_transformers.router_logits_being_recorded() is logits


def _tiny_moe_asking_for_router_logits():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ftune.presets import PRESETS

    config = {key: value for key, value in PRESETS["tiny-qwen3-moe"].items() if key != "model_type"}
    assert config.get("output_router_logits")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen3MoeConfig(**config))


def _padded_prompts() -> dict:
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}


def test_transformers_moe_generation_fails_when_its_config_asks_for_router_logits():
    """transformers 5.17 computes the load-balancing loss in every decoding step, from that step's
    router logits and the whole sequence's mask, and fails. Passing, upstream mended it: ftune's
    generate_without_router_logits (ftune/integrations/transformers.py) can go."""
    import transformers

    model = _tiny_moe_asking_for_router_logits()
    with pytest.raises(RuntimeError, match="must match"):
        model.generate(**_padded_prompts())
    assert transformers.__version__.startswith("5.")


def test_moe_generation_through_peft_asks_its_forwards_for_no_router_logits():
    from peft import LoraConfig, get_peft_model

    from ftune.integrations.transformers import generate_without_router_logits

    model = _tiny_moe_asking_for_router_logits()
    expected = model.generate(**_padded_prompts(), output_router_logits=False)
    generate_without_router_logits(model)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert torch.equal(adapted.generate(**_padded_prompts()), expected)  # LoRA's B starts at zero
    with pytest.raises(RuntimeError, match="must match"):  # a caller that asks still gets them
        model.generate(**_padded_prompts(), output_router_logits=True)


def test_torch_takes_the_pinned_allocation_settings_ftune_makes(monkeypatch):
    """The allocator-settings entry point exists and takes ftune's pinning options, the call that
    empties the pinned cache exists, and a user's own pinning setting is left alone. (A CPU build of torch accepts any
    CUDA key; whether CUDA's parser knows them is the gpu test below.)"""
    from ftune.integrations import torch as torch_integration

    assert callable(getattr(torch._C, "_accelerator_setAllocatorSettings", None))
    assert callable(getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert torch_integration.fast_pinned_allocation()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_background_threads:True")
    assert not torch_integration.fast_pinned_allocation()
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_num_register_threads:4")
    assert not torch_integration.fast_pinned_allocation()
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")

    def refuses(settings):
        raise RuntimeError("Unrecognized key 'pinned_use_cuda_host_register' in Accelerator allocator config.")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuses)
    assert not torch_integration.fast_pinned_allocation()  # pinned the usual way, no traceback


@pytest.mark.gpu
def test_gpu_cuda_parses_the_pinning_options():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(RuntimeError):
        torch._C._accelerator_setAllocatorSettings("pinned_no_such_option:True")
    torch._C._accelerator_setAllocatorSettings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    assert torch.empty(4 * 2**20, dtype=torch.uint8, pin_memory=True).is_pinned()
    from ftune.integrations.torch import return_pinned_memory

    return_pinned_memory()


# ----------------------------------------------------------------------------------------------
# transformers + bitsandbytes + peft: 4-bit experts (ftune/integrations/experts.py)


def _tiny_moe(model_type: str, tmp_path=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(num_experts=4, moe_intermediate_size=64, head_dim=16) if model_type == "qwen3_moe" else \
        dict(num_local_experts=4)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)  # the hub's layout: one linear layer per expert
    return model


def test_transformers_bnb_quantizer_hands_ftune_one_layers_merged_experts(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    from ftune.integrations import experts

    moved = ("transformers' bitsandbytes quantizer or its loading changed (param_needs_quantization, "
             "get_quantize_ops, the op run after the experts are merged); check ftune/integrations/experts.py")
    reference = _tiny_moe("qwen3_moe", tmp_path)
    seen = []
    quantize = experts.quantize_experts

    def spy(module, name, stack, **kwargs):
        seen.append((name, tuple(stack.shape), kwargs))
        return quantize(module, name, stack, **kwargs)

    monkeypatch.setattr(experts, "quantize_experts", spy)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    originals = {name: Bnb4BitHfQuantizer.__dict__[name] for name in ("param_needs_quantization", "get_quantize_ops")}
    with experts.experts_in_4bit(("qwen3_moe",)):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=config,
                                                     device_map={"": "cpu"})
    assert all(Bnb4BitHfQuantizer.__dict__[name] is original for name, original in originals.items())  # restored
    # quantizing on the fly, transformers loads one tensor at a time (no thread pool reading ahead), so
    # one layer's 16-bit experts exist at a time
    import inspect

    from transformers import core_model_loading

    source = inspect.getsource(core_model_loading.convert_and_load_state_dict_in_model)
    assert "has_on_the_fly_quantization" in source and "thread_pool = None" in source, moved
    # one call per layer and stack, each with that layer's merged experts, with the recipe's settings
    assert sorted(seen, key=str) == sorted([(name, shape, dict(quant_type="nf4", double_quant=True,
                                                                compute_dtype=torch.float32, quant_storage=torch.uint8))
                                            for name, shape in (("gate_up_proj", (4, 128, 64)),
                                                                ("down_proj", (4, 64, 64)))] * 2, key=str), moved
    layer, original = model.model.layers[1].mlp.experts, reference.model.layers[1].mlp.experts
    assert experts.quantized_stacks(layer) == ["gate_up_proj", "down_proj"], moved
    assert layer.gate_up_proj_4bit.dtype == torch.uint8 and layer.gate_up_proj.untyped_storage().nbytes() == 4, moved
    with torch.no_grad():  # NF4 of the very weights of the checkpoint (NF4's error: about a tenth of the norm)
        error = (experts.dequantize(layer, "gate_up_proj") - original.gate_up_proj).norm() / \
            original.gate_up_proj.norm()
    assert 0 < error < 0.15, (error, moved)
    assert isinstance(model.model.layers[0].mlp.gate.weight, torch.nn.Parameter) and \
        model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router is no expert
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit), moved  # linear layers as before


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_transformers_experts_forward_reads_its_weights_through_self(model_type, implementation):
    """ftune's 4-bit forward calls the experts class's own forward on a view of the module whose
    weights are the dequantized ones: that forward must read them as `self.gate_up_proj` and
    `self.down_proj` and nothing else of them."""
    from ftune.integrations.experts import _ExpertsView

    model = _tiny_moe(model_type)
    model.set_experts_implementation(implementation)
    module = model.model.layers[0].mlp.experts
    x = torch.randn(10, 64)
    index = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(10, 2)
    other = {name: torch.randn_like(getattr(module, name)) for name in ("gate_up_proj", "down_proj")}
    through_view = type(module).forward(_ExpertsView(module, other), x, index, weights)
    with torch.no_grad():
        for name, value in other.items():
            getattr(module, name).copy_(value)
    torch.testing.assert_close(through_view, module(x, index, weights), msg=(
        f"transformers' {type(module).__name__} ({implementation}) reads its weights otherwise; "
        "check ftune/integrations/experts.py"))


def test_peft_adapts_a_3d_parameter_through_the_factors_ftune_reads(monkeypatch):
    """With one adapter, peft's parametrization of a 3D expert parameter is `_LoraFactorsProxy`:
    `baddbmm(W, lhs, rhs, alpha=scaling)`, which ftune's 4-bit forward runs on the dequantized
    stack itself (and runs again in the backward)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import _LoraFactorsProxy

    from ftune.integrations import experts

    moved = "peft changed how it adapts 3D parameters; check ftune/integrations/experts.py (_weight)"
    model = _tiny_moe("mixtral")
    module = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        setattr(module, name, experts.quantize_experts(module, name, getattr(module, name).data))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)
    seen = []
    weight = experts._weight

    def spy(module, name):
        proxies = module.parametrizations[name]
        seen.append([type(proxy) for proxy in proxies])
        built, rebuild = weight(module, name)
        proxy = proxies[0]
        expected = experts.dequantize(module, name) + getattr(module, name)  # zeros + peft's delta
        torch.testing.assert_close(built, expected, msg=moved)
        torch.testing.assert_close(torch.baddbmm(torch.zeros_like(expected), proxy.lhs, proxy.rhs, alpha=proxy.scaling),
                                   getattr(module, name), msg=moved)
        assert rebuild is not None
        return built, rebuild

    monkeypatch.setattr(experts, "_weight", spy)
    model(input_ids=torch.randint(0, 64, (1, 8))).logits.sum().backward()
    assert seen == [[_LoraFactorsProxy]] * 2, moved


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_transformers_moe_adds_the_load_balancing_loss_the_fused_loss_adds(model_type):
    """ftune's fused-loss forward adds the load-balancing loss as the class's forward does: the
    function `load_balancing_loss_func` of the model's module, on the backbone's router logits, with
    the model's num_experts, num_experts_per_tok and router_aux_loss_coef."""
    import sys

    model = _tiny_moe(model_type)
    model.config.output_router_logits = True
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    backbone = model.model(input_ids=ids, output_router_logits=True)
    aux = sys.modules[type(model).__module__].load_balancing_loss_func(
        backbone.router_logits, model.num_experts, model.num_experts_per_tok, None)
    moved = (f"transformers' {type(model).__name__} computes its load-balancing loss otherwise; check "
             "_causal_lm_forward in ftune/integrations/transformers.py")
    torch.testing.assert_close(out.aux_loss, aux, msg=moved)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, plain + model.router_aux_loss_coef * aux, msg=moved)


# ----------------------------------------------------------------------------------------------
# transformers: decode steps routed to ftune's CUDA-graph replay (route_decode_steps)


def test_transformers_generate_asks_the_instance_for_its_decode_step():
    """transformers 5.17's sampling loop asks `_valid_auto_compile_criteria` once per call and
    decodes through what `get_compiled_call` returns; the static cache's layers keep their length
    in a tensor, which a replayed graph advances (ftune/engine/decode_graphs.py relies on both)."""
    import inspect

    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
    from transformers.cache_utils import StaticLayer
    from transformers.generation.utils import GenerationMixin

    from ftune.integrations.transformers import route_decode_steps

    source = inspect.getsource(GenerationMixin._sample)
    assert "self._valid_auto_compile_criteria(model_kwargs, generation_config)" in source, \
        "transformers' _sample no longer asks _valid_auto_compile_criteria: check route_decode_steps"
    assert "self.get_compiled_call(generation_config.compile_config)" in source
    assert isinstance(StaticLayer(max_cache_len=4).cumulative_length, torch.Tensor), \
        "StaticLayer's length is no longer a tensor: a replayed graph would freeze it"

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    routed, plain = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(routed.state_dict())
    steps = []

    def step():
        def forward(**inputs):
            steps.append(inputs["input_ids"].shape)
            return routed(**inputs)
        return forward

    route_decode_steps(routed, accepts=lambda model_kwargs: True, step=step)
    ids = torch.tensor([[1, 2, 3]])
    tokens = routed.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(tokens, plain.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static"))
    assert steps == [torch.Size([1, 1])] * 3  # every step after the prefill, one token each
    # per instance: the class, and so every other model, keeps transformers' own methods
    assert "_valid_auto_compile_criteria" in vars(routed) and "get_compiled_call" in vars(routed)
    assert type(routed)._valid_auto_compile_criteria is GenerationMixin._valid_auto_compile_criteria
    assert type(routed).get_compiled_call is PreTrainedModel.get_compiled_call
