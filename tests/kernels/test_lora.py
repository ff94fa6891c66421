"""ftune's LoRA forward against peft's own: outputs and every gradient.

The addmm path over 16-bit bases and under autocast; the augmented paths over bitsandbytes 4-bit
bases (the gated MLP in three GEMMs, q, k and v in one group, any projection alone), in each
checkpointing mode, with uneven ranks and biases; what the engine's execution context changes
(matrices held through a layer, outputs left unread); and the cases that must take peft's path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ftune.engine import decoder_layers, install_checkpointing
from ftune.integrations import peft as ftune_peft
from ftune.integrations.peft import current_execution, install_lora_forward, lora_forward, lora_layers
from ftune.integrations.transformers import apply_kernels, kernel_support
from ftune.kernels import lora as lora_kernels
from ftune.model import materialize_preset
from tests.helpers import PROJECTIONS, assert_relatively_close, lora_grads, tiny_lora_model
from tests.kernels.common import DEVICE, gpu

FP32 = dict(atol=1e-5, rtol=1e-4)
# bf16 under the interpreter, which truncates where the GPU rounds: the loss elementwise, the
# gradients by their norm. ftune's usual path sits as far from peft's (8% of the worst gradient's
# norm on this model, where the fused and the usual path differ by 5%)
BF16 = dict(atol=3e-2, rtol=3e-2)
BF16_NORM = 0.15


def _assert_close_norms(expected: dict, actual: dict, limit: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        error = (actual[name].float() - expected[name].float()).norm() / expected[name].float().norm()
        assert error < limit, f"{name}: {error:.3g} of the gradient's norm"


def _assert_close_grads(expected: dict, actual: dict, tolerance: dict) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tolerance)

def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def _assert_same(reference, patched, ids, **tolerance):
    loss_ref, grads_ref = _step(reference, ids)
    loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, **tolerance)
    assert grads_new.keys() == grads_ref.keys() and len(grads_ref) == 3 * 7 * 2
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], msg=name, **tolerance)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_fused_lora_equals_peft_fp32(preset):
    reference, _ = tiny_lora_model(preset)
    patched = copy.deepcopy(reference)
    assert install_lora_forward(patched) == 3 * 7
    for layer in lora_layers(patched):  # every call must take the fused path here
        layer._ftune_peft_forward = None
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    _assert_same(reference, patched, ids, atol=1e-5, rtol=1e-5)


def test_fused_lora_under_bf16_autocast():
    reference, _ = tiny_lora_model("tiny-llama")
    patched = copy.deepcopy(reference)
    install_lora_forward(patched)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, atol=0, rtol=1e-3)  # measured: 1.5e-4
    # peft rounds the adapter's product, its scaled copy and the sum to bf16; addmm rounds once.
    # Per tensor, relative to its norm, the 42 LoRA gradients differ by 2.7e-2 at most (median
    # 1.8e-2; 3.0e-2 at most over two other batches), as much as peft's own bf16 gradients differ
    # from fp32 (3.7e-2): 8e-2 leaves room for that rounding, and a zeroed gradient gives 1.0, a
    # lost scaling (alpha / r = 2) 0.5. An elementwise atol of 2e-2 let 23 of them be zeroed.
    assert len(grads_ref) == 3 * 7 * 2
    assert_relatively_close(grads_new, grads_ref, tol=8e-2)


def _quantized_pair(device: str, dtype: torch.dtype, r: int, preset: str = "tiny-llama"):
    """A tiny Llama (or `preset`) in NF4 with LoRA (B non-zero), and a copy of it with ftune's LoRA
    forward (and q, k and v grouped), no other kernel."""
    path = materialize_preset(preset, seed=0, dtype=dtype, device=torch.device(device))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map={"": device})
    torch.manual_seed(0)
    reference = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    for name, parameter in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    patched = copy.deepcopy(reference)
    report = apply_kernels(patched, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False, fused_lora=True)
    assert report == {"fused_lora": len(lora_layers(reference))} and report["fused_lora"] > 0
    return reference, patched


def test_fused_lora_on_a_4bit_base(tmp_path, monkeypatch):
    """q, k and v through one augmented matrix, every other projection through its own (no kernel
    patches the MLP)."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    projected = _count_projections(monkeypatch)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    loss_ref, grads_ref = _step(reference, ids)
    loss_new, grads_new = _step(patched, ids)
    assert [size for size, _ in projected] == [3, 1, 1, 1, 1] * len(decoder_layers(patched))
    torch.testing.assert_close(loss_new, loss_ref, atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_disabled_adapter_and_merged_layers_take_pefts_path():
    reference, _ = tiny_lora_model("tiny-llama")
    patched = copy.deepcopy(reference)
    install_lora_forward(patched)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with reference.disable_adapter(), patched.disable_adapter():  # DPO's reference model
            torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
        adapted = patched(input_ids=ids).logits
        patched.merge_adapter()
        torch.testing.assert_close(patched(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
        patched.unmerge_adapter()


def test_bf16_input_with_fp32_adapter_and_no_autocast_falls_back():
    """peft casts such an input to the adapter's dtype; the fused path would not, so it defers."""
    reference, _ = tiny_lora_model("tiny-llama")
    layer = lora_layers(reference)[0]
    calls = []
    layer._ftune_peft_forward = lambda x, *a, **k: calls.append(x.dtype) or torch.zeros(1)
    lora_forward(layer, torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert calls == [torch.bfloat16]


def test_kernel_support_and_apply_kernels_flag():
    model, _ = tiny_lora_model("tiny-llama")
    assert kernel_support(model)["fused_lora"] is None
    report = apply_kernels(model, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False, fused_lora=True)
    assert report == {"fused_lora": 21}
    bare = AutoModelForCausalLM.from_config(model.get_base_model().config)
    assert "no LoRA layers" in kernel_support(bare)["fused_lora"]


def _count_projections(monkeypatch) -> list[tuple[int, bool]]:
    """Each augmented group's call: its size and whether its output was left unread."""
    calls = []
    project = lora_kernels._project
    monkeypatch.setattr(lora_kernels, "_project", lambda x, group, dtype, held, unread: calls.append(
        (len(group.members), unread)) or project(x, group, dtype, held, unread))
    return calls


def _count_fused_mlps(monkeypatch) -> list[bool]:
    """Each fused MLP's call: whether its output was left unread."""
    calls = []
    forward = lora_kernels._mlp_forward
    monkeypatch.setattr(lora_kernels, "_mlp_forward", lambda x, groups, dtype, held, unread, **kw: calls.append(
        unread) or forward(x, groups, dtype, held, unread, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_layers_leave_the_down_projections_gemm_to_the_backward(dtype, tmp_path, monkeypatch):
    """In a recomputed layer the MLP's output is only differentiated (the residual's gradient is
    known): the down projection's forward GEMM runs in the first forward only, its recompute
    leaves the output unread. Loss and every LoRA gradient stay peft's."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", dtype, r=4)
    install_checkpointing(patched, "true")
    projected = _count_projections(monkeypatch)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    layers = len(decoder_layers(patched))
    # q-k-v, o, gate, up and down in the forward and again in the recompute, only down's unread there
    assert sorted(projected) == sorted(([(3, False)] * 2 + [(1, False)] * 7 + [(1, True)]) * layers)
    tolerance = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(loss_new, loss_ref, **tolerance)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], msg=name, **tolerance)
    assert current_execution().held is None and not current_execution().unread  # nothing outlives the layer


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
    calls = _count_fused_mlps(monkeypatch)
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
    install_lora_forward(patched)
    apply_kernels(patched)
    return reference, patched


def test_one_mlp_with_uneven_ranks_matches_pefts_output_and_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _uneven_pair()
    calls = _count_fused_mlps(monkeypatch)
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


def test_q_k_v_in_one_function_within_the_attention_and_alone_outside_it(tmp_path, monkeypatch):
    """Within the attention's forward one Function computes q, k and v (o alone). Called outside
    it, or on another tensor than the attention's input, each projection computes alone and gets
    peft's output."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    projected = _count_projections(monkeypatch)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits, **FP32)
    assert [size for size, _ in projected] == [3, 1, 1, 1, 1] * len(decoder_layers(patched))
    projected.clear()
    attention = patched.get_base_model().model.layers[0].self_attn
    expected = reference.get_base_model().model.layers[0].self_attn
    x, other = torch.randn(2, 1, 5, patched.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(attention.k_proj(x), expected.k_proj(x), **FP32)  # k alone
        attention.q_proj(x)
        torch.testing.assert_close(attention.k_proj(other), expected.k_proj(other), **FP32)  # another input
        torch.testing.assert_close(attention.v_proj(x), expected.v_proj(x), **FP32)
    assert [size for size, _ in projected] == [1, 1, 1, 1]
    with torch.no_grad():  # within the attention, a projection of another tensor than its input
        hidden = torch.randn(1, 5, patched.config.hidden_size, generator=torch.Generator().manual_seed(9))
        attention._ftune_attention_forward = lambda hidden_states, **kwargs: attention.k_proj(other)
        torch.testing.assert_close(attention(hidden_states=hidden), expected.k_proj(other), **FP32)
    assert not current_execution().computed  # the group's outputs go when the attention returns


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
    projected = _count_projections(monkeypatch)
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(5))
    loss_ref, grads_ref = _step(reference, ids)
    loss, grads = _step(patched, ids)
    layers = len(decoder_layers(patched))
    assert sorted(size for size, _ in projected) == [1] * layers + [3] * layers  # o alone, q-k-v together, in every layer
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
    calls = _count_fused_mlps(monkeypatch)
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
    its chunks (held by the engine) and the attention's once, at its one call."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    intermediate = patched.config.intermediate_size
    install_checkpointing(patched, "unsloth", mlp_chunk_bytes=intermediate * 4 * 8)
    made = {"backward": [], "forward's chunks": [], "one call": []}
    init = lora_kernels.AugmentedWeight.__init__
    bases = {id(module.base_layer): name for name, module in patched.named_modules() if hasattr(module, "base_layer")}

    from ftune.engine.halves import ResidualHalves

    forwarding = []  # inside a recomputed layer's forward without a graph
    forward = ResidualHalves.forward
    monkeypatch.setattr(ResidualHalves, "forward", lambda *args, **kwargs: (
        forwarding.append(1), forward(*args, **kwargs), forwarding.pop())[1])

    def counted(self, group, dtype):
        held = current_execution().held is not None
        scope = "one call" if not held else "forward's chunks" if forwarding else "backward"
        made[scope].append("-".join(bases[id(m.projection.base)].rsplit(".", 1)[-1] for m in group.members))
        init(self, group, dtype)

    monkeypatch.setattr(lora_kernels.AugmentedWeight, "__init__", counted)
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
    found = ftune_peft.mlp_groups(mlp, x)
    assert found is not None
    groups, dtype = found
    events = []
    with_product, swiglu_forward = lora_kernels._with_product, lora_kernels.swiglu_forward
    monkeypatch.setattr(lora_kernels, "_with_product", lambda *a: events.append("input") or with_product(*a))
    monkeypatch.setattr(lora_kernels, "swiglu_forward", lambda gate, up, out, activation: events.append(
        "product over gate" if out.data_ptr() == gate.data_ptr() else "product") or swiglu_forward(
        gate, up, out=out, activation=activation))
    init = lora_kernels.AugmentedWeight.__init__
    monkeypatch.setattr(lora_kernels.AugmentedWeight, "__init__",
                        lambda self, group, dtype: events.append("down matrix" if group is groups.down else "gate-up matrix")
                        or init(self, group, dtype))
    with torch.no_grad():
        unrecorded = lora_kernels.lora_mlp(x, groups, dtype, held={})
    assert events == ["gate-up matrix", "down matrix", "input", "product over gate"]
    events.clear()
    with torch.no_grad():  # not held, the gate-up matrix is gone before the down one is made
        lora_kernels.lora_mlp(x, groups, dtype)
    assert events == ["gate-up matrix", "input", "product over gate", "down matrix"]
    events.clear()
    with torch.enable_grad():
        recorded = lora_kernels.lora_mlp(x.requires_grad_(), groups, dtype)
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

    def a_hook_on_up(model):
        mlp = model.get_base_model().model.layers[0].mlp
        mlp.up_proj.register_forward_hook(lambda *args: None)

    return {"dropout": dropout, "no adapter on down": no_adapter_on_down, "a hook on up": a_hook_on_up}


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_mlps_the_fused_path_does_not_cover_take_the_usual_path(case, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    _fallback_cases()[case](patched)
    calls = _count_fused_mlps(monkeypatch)
    mlp = patched.get_base_model().model.layers[0].mlp
    mlp(torch.randn(1, 5, patched.config.hidden_size))
    assert calls == []


def test_a_disabled_adapter_takes_the_usual_path(tmp_path, monkeypatch):
    """DPO's reference model: the adapters off, the base MLP's output."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)
    calls = _count_fused_mlps(monkeypatch)
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
    calls = _count_fused_mlps(monkeypatch)
    ids = torch.randint(0, 200, (2, 1024), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with monkeypatch.context() as patch:
            patch.setattr(ftune_peft, "mlp_groups", lambda mlp, x: None)
            patch.setattr(ftune_peft, "_group_outputs", lambda layers, x: None)
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


@gpu
def test_recomputed_mlp_without_the_down_projections_forward_on_the_gpu(tmp_path, monkeypatch):
    """As above in bf16 on the GPU, against the same patched model recomputing the whole MLP:
    the same kernels on the same inputs, so equal to rounding."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, whole = _quantized_pair(DEVICE, torch.bfloat16, r=8)
    skipping = copy.deepcopy(whole)
    for model in (whole, skipping):
        install_checkpointing(model, "true")
    ids = torch.randint(0, 200, (2, 1024), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with monkeypatch.context() as patch:
            patch.setattr("ftune.engine.halves.lora_execution",
                          lambda hold=False, unread=(): ftune_peft.lora_execution(hold=hold))
            loss_ref, grads_ref = _step(whole, ids)
        projected = _count_projections(monkeypatch)
        loss_new, grads_new = _step(skipping, ids)
    assert sum(unread for _, unread in projected) == len(decoder_layers(skipping))  # down, in each recompute
    torch.testing.assert_close(loss_new, loss_ref, atol=0, rtol=0)
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=1e-2 * scale + 1e-6, rtol=0, msg=name)


@gpu
def test_fused_lora_on_the_gpu_4bit_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair(DEVICE, torch.bfloat16, r=8)
    ids = torch.randint(0, 200, (2, 1024), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, atol=2e-2, rtol=2e-2)
    assert_relatively_close(grads_new, grads_ref, tol=8e-2)
