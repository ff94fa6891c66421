"""apply_kernels on tiny models of each family, wrapped by PEFT LoRA: one patched copy against one
untouched copy of the same weights, in one process."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import ftune.integrations.transformers as patch
from ftune.integrations.transformers import CausalLMOutputWithStats, apply_kernels, kernel_support
from tests.kernels.common import DEVICE, gpu

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),  # q_norm/k_norm on the heads
}
# fp32 models: the kernels agree with eager to rounding; a few layers compound it
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def tiny_model(family, **config):
    config_class, model_class = FAMILIES[family] if family in FAMILIES else family
    torch.manual_seed(0)
    return model_class(config_class(**{**TINY, **config})).to(DEVICE)


def tiny_pair(family, **config):
    """(untouched, to-be-patched) PEFT LoRA models with identical weights, LoRA B non-zero."""
    model = tiny_model(family, **config)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False, task_type="CAUSAL_LM")
    reference = get_peft_model(model, lora)
    return reference, copy.deepcopy(reference)


def batch(seed=0, size=2, seq=8):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY["vocab_size"], (size, seq), generator=generator).to(DEVICE)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return input_ids, labels


def lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_step(reference, patched, **loss_kwargs):
    """Same loss and LoRA gradients with labels; the patched output has no logits but stats."""
    input_ids, labels = batch()
    out_ref = reference(input_ids=input_ids, labels=labels, **loss_kwargs)
    out = patched(input_ids=input_ids, labels=labels, **loss_kwargs)
    assert isinstance(out, CausalLMOutputWithStats) and out.logits is None
    assert out.num_tokens.item() == (labels[:, 1:] != -100).sum().item()
    torch.testing.assert_close(out.loss, out_ref.loss, **TOLERANCE)
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref, grads = lora_grads(reference), lora_grads(patched)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * TINY["num_hidden_layers"]
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    reference, patched = tiny_pair(family)
    report = apply_kernels(patched)
    layers = TINY["num_hidden_layers"]
    norms = 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)
    assert report == {"rms_norm": norms, "rope": layers, "swiglu": layers, "fused_cross_entropy": 1}

    # Per instance: the twin built from the same classes is untouched
    assert not any("forward" in vars(m) for m in reference.modules())

    input_ids, _ = batch()
    with torch.no_grad():  # no labels: the original forward, with logits
        logits, logits_ref = patched(input_ids=input_ids).logits, reference(input_ids=input_ids).logits
    torch.testing.assert_close(logits, logits_ref, **TOLERANCE)
    assert_same_training_step(reference, patched, num_items_in_batch=torch.tensor(9, device=DEVICE))

    # Generation: the forward's signature passes generate's kwarg validation; greedy tokens agree
    prompt = input_ids[:, :4]
    kwargs = dict(max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(patched.generate(input_ids=prompt, **kwargs), reference.generate(input_ids=prompt, **kwargs))


def test_gemma2_geglu():
    """Gemma 2: (1 + weight) norms, four per layer; the head's final logit softcapping in the loss;
    its tanh-GELU MLP through the gated-product kernel as GeGLU. A Gemma 2 whose config asks for
    another activation than its family's is refused, naming it."""
    family = (Gemma2Config, Gemma2ForCausalLM)
    reference, patched = tiny_pair(family, query_pre_attn_scalar=16, final_logit_softcapping=5.0)
    assert kernel_support(patched)["swiglu"] is None
    assert apply_kernels(patched) == {"rms_norm": 9, "rope": 2, "swiglu": 2, "fused_cross_entropy": 1}
    assert_same_training_step(reference, patched)
    _, relu = tiny_pair(family, query_pre_attn_scalar=16, hidden_activation="relu")
    assert "activation is relu" in kernel_support(relu)["swiglu"]
    with pytest.raises(ValueError, match="swiglu: gemma2's MLP activation is relu"):
        apply_kernels(relu)


def test_logits_to_keep_and_shift_labels():
    """With labels, `logits_to_keep` slices the hidden states before the loss as it slices the
    logits in the original; pre-shifted `shift_labels` take the labels' place."""
    reference, patched = tiny_pair("llama")
    apply_kernels(patched, rms_norm=False, rope=False, swiglu=False)
    input_ids, labels = batch()
    kept = labels[:, -5:]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    for kwargs in (dict(labels=kept, logits_to_keep=5), dict(labels=labels, shift_labels=shifted)):
        loss = patched(input_ids=input_ids, **kwargs).loss
        torch.testing.assert_close(loss, reference(input_ids=input_ids, **kwargs).loss, **TOLERANCE)


def test_return_dict_false():
    reference, patched = tiny_pair("llama")
    apply_kernels(patched, rms_norm=False, rope=False, swiglu=False)
    input_ids, labels = batch()
    loss = patched(input_ids=input_ids, labels=labels, return_dict=False)[0]
    torch.testing.assert_close(loss, reference(input_ids=input_ids, labels=labels).loss, **TOLERANCE)


@pytest.mark.parametrize("order", ["ours-first", "trl-first"])
def test_trl_fused_lm_head_call_path(order):
    """TRL's SFTTrainer patches `model(..., fused_lm_head=True)` onto the base model; either order of
    patching, that call gets TRL's head and a call with labels alone gets ours."""
    from trl.trainer.utils import add_fused_lm_head

    reference, patched = tiny_pair("llama")
    if order == "trl-first":
        add_fused_lm_head(patched.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        apply_kernels(patched)
    else:
        apply_kernels(patched)
        add_fused_lm_head(patched.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    input_ids, labels = batch()
    trl_out = patched(input_ids=input_ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(trl_out.loss, reference(input_ids=input_ids, labels=labels).loss, **TOLERANCE)
    assert isinstance(patched(input_ids=input_ids, labels=labels), CausalLMOutputWithStats)


def test_deepcopy_keeps_patches_on_the_copy():
    _, patched = tiny_pair("qwen3")
    apply_kernels(patched)
    twin = copy.deepcopy(patched)
    for module in twin.modules():
        if "forward" in vars(module):
            assert module.forward.__self__ is module


def test_refusals(monkeypatch):
    _, patched = tiny_pair("llama")
    apply_kernels(patched, rope=False)
    with pytest.raises(ValueError, match="rms_norm: already applied"):
        apply_kernels(patched, swiglu=False, fused_cross_entropy=False)
    assert apply_kernels(patched, rms_norm=False, swiglu=False, fused_cross_entropy=False) == {"rope": 2}

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no entry for model type 'gpt2'"):
        apply_kernels(gpt2)
    # asking for no kernel is no error, whatever the family (a KeyError once)
    assert apply_kernels(gpt2, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False) == {}

    # Not on a device Triton runs on (CPU without the interpreter): refused, nothing patched
    _, fresh = tiny_pair("llama")
    monkeypatch.setattr(patch, "runs_triton", lambda device: False)
    with pytest.raises(ValueError, match="need the model on CUDA"):
        apply_kernels(fresh)
    assert not any("forward" in vars(m) for m in fresh.modules())
    # ... unless it is told the GPU it will run on: fsdp loads the model in host memory and shards
    # it onto the GPUs after the kernels are applied
    monkeypatch.setattr(patch, "runs_triton", lambda device: device.type == "cuda")
    assert apply_kernels(fresh, device=torch.device("cuda", 0))["rms_norm"] > 0


def test_lora_on_the_head_is_refused():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=PROJECTIONS + ["lm_head"]))
    with pytest.raises(ValueError, match="fused_cross_entropy: the LM head is a Linear"):
        apply_kernels(model)


@gpu
@pytest.mark.parametrize("fused_lora", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_bf16_gpu(family, fused_lora, tmp_path, monkeypatch):
    """The user's path: bf16 weights saved, loaded in 4-bit NF4 with bitsandbytes, LoRA on all
    projections; patched and unpatched copies agree on the loss and LoRA gradients in bf16, with
    and without ftune's LoRA forward."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**{**TINY, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 1000})
    model_class(config).to(torch.bfloat16).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    models = []
    for _ in range(2):
        base = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map="cuda"
        )
        torch.manual_seed(1)
        lora = LoraConfig(r=8, target_modules=PROJECTIONS, init_lora_weights=False, task_type="CAUSAL_LM")
        models.append(get_peft_model(base, lora))
    reference, patched = models
    apply_kernels(patched, fused_lora=fused_lora)
    input_ids = torch.randint(0, 1000, (2, 256), device="cuda")
    labels = input_ids.clone()
    labels[:, :50] = -100
    out_ref, out = reference(input_ids=input_ids, labels=labels), patched(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=2e-2, rtol=2e-2)
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref, grads = lora_grads(reference), lora_grads(patched)
    for name, grad in grads.items():
        # bf16 gradients through two layers: compared as whole tensors, by relative norm
        error = (grad.float() - grads_ref[name].float()).norm() / grads_ref[name].float().norm()
        assert error < 5e-2, f"{name}: relative error {error:.3g}"
