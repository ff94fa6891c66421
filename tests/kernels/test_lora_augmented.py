"""The fused LoRA MLP (adapters inside the 4-bit base GEMMs) against peft's MLP: loss, outputs and
every gradient, in each checkpointing mode, with uneven ranks, and the cases that keep the usual path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ftune.engine import decoder_layers, install_checkpointing
from ftune.kernels import apply_kernels, lora
from ftune.kernels import lora_augmented
from ftune.kernels.lora import patch_lora
from ftune.model import materialize_preset
from tests.helpers import PROJECTIONS
from tests.kernels.common import DEVICE, gpu
from tests.kernels.test_lora import _quantized_pair, _step

FP32 = dict(atol=1e-5, rtol=1e-4)
# bf16 under the interpreter, which truncates where the GPU rounds: the loss elementwise, the
# gradients by their norm. ftune's usual path sits as far from peft's (8% of the worst gradient's
# norm on this model, where the fused and the usual path differ by 5%)
BF16 = dict(atol=3e-2, rtol=3e-2)
BF16_NORM = 0.15


def _count_fused_calls(monkeypatch) -> list:
    calls = []
    forward = lora_augmented._forward
    monkeypatch.setattr(lora_augmented, "_forward",
                        lambda *args, **kwargs: calls.append(args[2]) or forward(*args, **kwargs))
    return calls


def _assert_close_norms(expected: dict, actual: dict, limit: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        error = (actual[name].float() - expected[name].float()).norm() / expected[name].float().norm()
        assert error < limit, f"{name}: {error:.3g} of the gradient's norm"


def _assert_close_grads(expected: dict, actual: dict, tolerance: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)


@pytest.mark.parametrize("mode,dtype", [("none", torch.float32), ("true", torch.float32), ("unsloth", torch.float32),
                                        ("none", torch.bfloat16), ("unsloth", torch.bfloat16)])
def test_fused_mlp_gives_pefts_loss_and_gradients(mode, dtype, tmp_path, monkeypatch):
    """Every kernel on, the MLPs and the attention's projection groups through the augmented
    matrices (in `true` and `unsloth` the MLP recomputed in three chunks of tokens, the down
    projection's output unread, the matrices made once per layer backward): loss and every LoRA
    gradient as the unpatched peft model's."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", dtype, r=4)
    apply_kernels(patched)  # the LoRA forward is already patched
    intermediate = patched.config.intermediate_size
    install_checkpointing(patched, mode, mlp_chunk_bytes=intermediate * dtype.itemsize * 16)
    calls = _count_fused_calls(monkeypatch)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    layers = len(decoder_layers(patched))
    if mode == "none":
        assert calls == [False] * layers
    else:  # the forward's chunks, then the backward's, whose outputs are unread
        assert calls.count(False) == 3 * layers and calls.count(True) == 3 * layers
    if dtype == torch.float32:
        torch.testing.assert_close(loss_new, loss_ref, **FP32)
        _assert_close_grads(grads_ref, grads_new, FP32)
    else:  # whole gradients: most elements are smaller than any elementwise bf16 tolerance
        torch.testing.assert_close(loss_new, loss_ref, **BF16)
        _assert_close_norms(grads_ref, grads_new, BF16_NORM)


def _uneven_pair():
    """A tiny NF4 Llama with LoRA of rank 3 on gate, 5 on up and 4 on down (not multiples of the
    rank padding), and a copy with ftune's LoRA forward and kernels."""
    path = materialize_preset("tiny-llama", seed=0, dtype=torch.float32, device=torch.device(DEVICE))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                device_map={"": DEVICE})
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=PROJECTIONS, rank_pattern={"gate_proj": 3, "up_proj": 5},
                        task_type="CAUSAL_LM")
    reference = get_peft_model(base, config)
    for name, parameter in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    patched = copy.deepcopy(reference)
    patch_lora(patched)
    apply_kernels(patched)
    return reference, patched


def test_one_mlp_with_uneven_ranks_matches_pefts_output_and_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _uneven_pair()
    calls = _count_fused_calls(monkeypatch)
    results = []
    for model in (reference, patched):
        mlp = model.get_base_model().model.layers[1].mlp
        x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = mlp(x * 1.0)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        adapters = [p.grad for name, p in mlp.named_parameters() if "lora_" in name]
        assert len(adapters) == 6 and all(g is not None for g in adapters)
        results.append([y, x.grad, *adapters])
    assert calls == [False]
    for index, (expected, actual) in enumerate(zip(*results)):
        torch.testing.assert_close(actual, expected, msg=f"tensor {index}", **FP32)


def test_q_k_v_in_one_function_and_a_call_out_of_order_goes_the_usual_way(tmp_path, monkeypatch):
    """The attention's forward calls q, k, v on one input: one Function computes the three (and
    o alone). k called by itself, or on another tensor than q was, gets peft's output anyway."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    projected = []
    project = lora_augmented._project
    monkeypatch.setattr(lora_augmented, "_project",
                        lambda x, group, *args: projected.append(len(group.members)) or project(x, group, *args))
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, **FP32)
    assert projected == [3, 1] * len(decoder_layers(patched))
    projected.clear()
    attention = patched.get_base_model().model.layers[0].self_attn
    expected = reference.get_base_model().model.layers[0].self_attn
    x, other = torch.randn(2, 1, 5, patched.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(attention.k_proj(x), expected.k_proj(x), **FP32)  # k alone
        attention.q_proj(x)
        torch.testing.assert_close(attention.k_proj(other), expected.k_proj(other), **FP32)  # another input
        torch.testing.assert_close(attention.v_proj(x), expected.v_proj(x), **FP32)  # after the order broke
    assert projected == [3]


def _random_biases(model) -> None:
    """The base layers' biases (zeros as transformers makes them) drawn at random, the same for
    every model, so that a path that dropped them would show."""
    generator = torch.Generator().manual_seed(4)
    biases = [m.base_layer.bias for m in model.modules() if hasattr(m, "base_layer") and m.base_layer.bias is not None]
    assert biases and not any(b.requires_grad for b in biases)
    for bias in biases:
        bias.data.copy_(torch.randn(bias.shape, generator=generator))


def test_biased_q_k_v_in_one_function_give_pefts_loss_and_gradients(tmp_path, monkeypatch):
    """Qwen2's q, k and v carry frozen biases: the group adds them in its GEMMs, as bitsandbytes
    does, and the loss and every LoRA gradient are peft's."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4, preset="tiny-qwen2")
    for model in (reference, patched):
        _random_biases(model)
    apply_kernels(patched)
    grouped = []
    project = lora_augmented._project
    monkeypatch.setattr(lora_augmented, "_project",
                        lambda x, group, *a: grouped.append(len(group.members)) or project(x, group, *a))
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(5))
    loss_ref, grads_ref = _step(reference, ids)
    loss, grads = _step(patched, ids)
    layers = len(decoder_layers(patched))
    assert sorted(grouped) == [1] * layers + [3] * layers  # o alone, q-k-v together, in every layer
    torch.testing.assert_close(loss, loss_ref, **FP32)
    _assert_close_grads(grads_ref, grads, FP32)


def test_per_row_adapters_and_an_adapter_made_again_take_pefts_weights(tmp_path, monkeypatch):
    """peft's `adapter_names` (a different adapter per row, through hooks on the layers' calls)
    takes the usual path; an adapter deleted and added again under its name is read afresh."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        patched(input_ids=ids)  # the groups are made and kept
    for model in (reference, patched):
        torch.manual_seed(11)  # the same A and B in both
        model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))
        for name, parameter in model.named_parameters():
            if "lora_B.other" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    for model in (reference, patched):
        model.eval()  # peft takes adapter_names only outside training
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids, adapter_names=["default", "other"]).logits,
                                   reference(input_ids=ids, adapter_names=["default", "other"]).logits, **FP32)
    for model in (reference, patched):
        model.delete_adapter("default")
        torch.manual_seed(12)
        model.add_adapter("default", LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))
        model.set_adapter("default")
        for name, parameter in model.named_parameters():
            if "lora_B.default" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, **FP32)
    assert calls  # through the fused path, with the new adapter's weights


def test_outputs_may_be_modified_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    layer = patched.get_base_model().model.layers[0]
    x = torch.randn(1, 5, patched.config.hidden_size, requires_grad=True)
    y = layer.mlp(x).mul_(2) + layer.self_attn.o_proj(x).mul_(2)
    y.sum().backward()
    assert x.grad is not None


def test_the_projections_keep_their_input_itself_for_the_backward(tmp_path, monkeypatch):
    """o's input is attention's output, which SDPA keeps too: the fused projections keep that
    tensor, not a copy of it, and its gradients are still peft's."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    o_proj = patched.get_base_model().model.layers[0].self_attn.o_proj
    x = torch.randn(1, 7, o_proj.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = o_proj(x)
    assert type(y.grad_fn).__name__ == "_LoRAProjectionsBackward"
    assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]
    y.square().sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    reference_o = reference.get_base_model().model.layers[0].self_attn.o_proj
    reference_o(expected_x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad, **FP32)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(o_proj, name)["default"].weight.grad,
                                   getattr(reference_o, name)["default"].weight.grad, msg=name, **FP32)


def test_an_input_of_another_dtype_under_autocast_keeps_the_copy_the_gemm_read(tmp_path, monkeypatch):
    """Under autocast an fp32 input (fp32 norms in a bf16 model) reaches the projections: the group
    keeps the bf16 copy its GEMM read, and its gradients are peft's to bf16 rounding."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.bfloat16, r=4)
    o_proj = patched.get_base_model().model.layers[0].self_attn.o_proj
    reference_o = reference.get_base_model().model.layers[0].self_attn.o_proj
    x = torch.randn(1, 7, o_proj.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    expected_x = x.detach().clone().requires_grad_()
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = o_proj(x)
        expected = reference_o(expected_x)
    assert type(y.grad_fn).__name__ == "_LoRAProjectionsBackward"
    assert [(t.dtype, t.shape[-1]) for t in saved] == [(torch.bfloat16, o_proj.in_features + 8)]  # rank 4, padded
    y.float().square().sum().backward()
    expected.float().square().sum().backward()
    grads = {name: getattr(o_proj, name)["default"].weight.grad for name in ("lora_A", "lora_B")}
    grads_ref = {name: getattr(reference_o, name)["default"].weight.grad for name in ("lora_A", "lora_B")}
    _assert_close_norms({**grads_ref, "x": expected_x.grad}, {**grads, "x": x.grad}, 0.02)


def test_the_backward_through_one_graph_twice_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    mlp = patched.get_base_model().model.layers[0].mlp
    y = mlp(torch.randn(1, 5, patched.config.hidden_size, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()


def test_each_layer_makes_each_groups_matrix_once_per_pass(tmp_path, monkeypatch):
    """Recomputed in three chunks of tokens, a layer's backward makes each group's matrix once (the
    MLP's gate-up and down, the attention's q-k-v and o), and its forward the MLP's once for all
    its chunks (`matrices_once`) and the attention's once, at its one call."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    intermediate = patched.config.intermediate_size
    install_checkpointing(patched, "unsloth", mlp_chunk_bytes=intermediate * 4 * 8)
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in patched.named_modules()}
    made = {"backward": [], "forward's chunks": [], "one call": []}
    init = lora_augmented.AugmentedWeight.__init__

    def counted(self, group, dtype):
        scope = ("backward" if lora._REUSED_WEIGHTS is not None else
                 "forward's chunks" if lora_augmented._REUSED_MATRICES is not None else "one call")
        made[scope].append("-".join(names[id(m.layer)] for m in group.members))
        init(self, group, dtype)

    monkeypatch.setattr(lora_augmented.AugmentedWeight, "__init__", counted)
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(5))
    _step(patched, ids)
    layers = len(decoder_layers(patched))
    mlp, attention = ["gate_proj-up_proj", "down_proj"], ["q_proj-k_proj-v_proj", "o_proj"]
    assert sorted(made["backward"]) == sorted((mlp + attention) * layers)
    assert sorted(made["forward's chunks"]) == sorted(mlp * layers)
    assert sorted(made["one call"]) == sorted(attention * layers)


def test_the_forward_without_a_graph_makes_no_buffer_beside_gate_and_up(tmp_path, monkeypatch):
    """Without a graph the MLP writes the SwiGLU's product over gate and, where the matrices are
    held through the chunks, makes the down projection's matrix before gate and up exist: beside
    those matrices, a buffer more would set the forward's peak. With a graph the product has its
    own buffer (the backward reads gate and up). The outputs agree."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    mlp = patched.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 24, patched.config.hidden_size, generator=torch.Generator().manual_seed(3))
    parts = lora_augmented.lora_mlp_parts(mlp, x)
    assert parts is not None
    events = []
    with_product, swiglu_forward = lora_augmented._with_product, lora_augmented.swiglu_forward
    monkeypatch.setattr(lora_augmented, "_with_product", lambda *a: events.append("input") or with_product(*a))
    monkeypatch.setattr(lora_augmented, "swiglu_forward", lambda gate, up, out: events.append(
        "product over gate" if out.data_ptr() == gate.data_ptr() else "product") or swiglu_forward(gate, up, out=out))
    init = lora_augmented.AugmentedWeight.__init__
    monkeypatch.setattr(lora_augmented.AugmentedWeight, "__init__",
                        lambda self, group, dtype: events.append("down matrix" if group is parts.down else "gate-up matrix")
                        or init(self, group, dtype))
    with torch.no_grad(), lora_augmented.matrices_once():
        unrecorded = lora_augmented.lora_mlp(mlp, x, parts)
    assert events == ["gate-up matrix", "down matrix", "input", "product over gate"]
    events.clear()
    with torch.no_grad():  # outside a reuse block the gate-up matrix is gone before the down one is made
        lora_augmented.lora_mlp(mlp, x, parts)
    assert events == ["gate-up matrix", "input", "product over gate", "down matrix"]
    events.clear()
    with torch.enable_grad():
        recorded = lora_augmented.lora_mlp(mlp, x.requires_grad_(), parts)
    assert events == ["gate-up matrix", "input", "product", "down matrix"]
    torch.testing.assert_close(unrecorded, recorded.detach(), atol=1e-6, rtol=1e-6)


def _fallback_cases():
    def dropout(model):
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = torch.nn.Dropout(0.1)

    def no_adapter_on_down(model):
        mlp = model.get_base_model().model.layers[0].mlp
        mlp.down_proj.lora_A.pop("default")

    def folded(model):
        lora.FOLD_ADAPTER_INPUT_GRADIENT = True

    return {"dropout": dropout, "no adapter on down": no_adapter_on_down, "folded path": folded}


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_mlps_the_fused_path_does_not_cover_take_the_usual_path(case, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", False)
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    _fallback_cases()[case](patched)
    calls = _count_fused_calls(monkeypatch)
    mlp = patched.get_base_model().model.layers[0].mlp
    mlp(torch.randn(1, 5, patched.config.hidden_size))
    assert calls == []


def test_a_disabled_adapter_takes_the_usual_path(tmp_path, monkeypatch):
    """DPO's reference model: the adapters off, the base MLP's output."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    calls = _count_fused_calls(monkeypatch)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), reference.disable_adapter(), patched.disable_adapter():
        expected = reference(input_ids=ids).logits
        actual = patched(input_ids=ids).logits
    assert calls == []
    torch.testing.assert_close(actual, expected, **FP32)


@gpu
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode", ["none", "unsloth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_and_projections_on_the_gpu(preset, mode, dtype, tmp_path, monkeypatch):
    """Compiled, 2 x 1024 tokens (past bitsandbytes' short-input kernels, where the paths apply on
    CUDA): loss and gradients as the same patched model's usual MLP and projections (Qwen2's q, k
    and v with biases). In fp32 equal to rounding; in bf16 the two orders of rounding drift apart
    through four layers (up to 5% of a gradient's norm on an H100), so there it is a check that
    nothing is lost or mixed up."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, usual = _quantized_pair(DEVICE, dtype, r=8, preset=preset)
    if preset == "tiny-qwen2":
        _random_biases(usual)
    apply_kernels(usual)
    fused = copy.deepcopy(usual)
    for model in (usual, fused):
        install_checkpointing(model, mode)
    calls = _count_fused_calls(monkeypatch)
    ids = torch.randint(0, 200, (2, 1024), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with monkeypatch.context() as patch:
            patch.setattr("ftune.kernels.patch.lora_mlp_parts", lambda mlp, x: None)
            patch.setattr(lora_augmented.ProjectionGroup, "forward", lambda self, layer, x: None)
            loss_ref, grads_ref = _step(usual, ids)
        loss_new, grads_new = _step(fused, ids)
    assert calls
    limit = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(loss_new, loss_ref, atol=limit, rtol=limit)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    errors = {name: ((grads_new[name].float() - grads_ref[name].float()).norm()
                     / grads_ref[name].float().norm().clamp_min(1e-12)).item() for name in grads_ref}
    worst = max(errors, key=errors.get)
    assert errors[worst] < limit, f"{worst}: relative error {errors[worst]:.3g}"
