"""The fused LoRA forward (addmm) against peft's own: outputs and every gradient, with a 16-bit base,
a bitsandbytes 4-bit base, under autocast, and the cases that must fall back to peft."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ftune.kernels import apply_kernels, kernel_support
from ftune.kernels import lora
from ftune.kernels.lora import lora_layers, overwritable, patch_lora
from ftune.model import materialize_preset
from tests.helpers import PROJECTIONS, assert_relatively_close, lora_grads, tiny_lora_model
from tests.kernels.common import DEVICE, gpu


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
    assert patch_lora(patched) == 3 * 7
    for layer in lora_layers(patched):  # every call must take the fused path here
        layer._ftune_peft_forward = None
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    _assert_same(reference, patched, ids, atol=1e-5, rtol=1e-5)


def test_fused_lora_under_bf16_autocast():
    reference, _ = tiny_lora_model("tiny-llama")
    patched = copy.deepcopy(reference)
    patch_lora(patched)
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
    """A tiny Llama (or `preset`) in NF4 with LoRA (B non-zero), and a copy of it with the fused forward."""
    path = materialize_preset(preset, seed=0, dtype=dtype, device=torch.device(device))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map={"": device})
    torch.manual_seed(0)
    reference = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    for name, parameter in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    patched = copy.deepcopy(reference)
    assert patch_lora(patched) == len(lora_layers(reference)) > 0
    return reference, patched


@pytest.mark.parametrize("fold", [False, True])
def test_fused_lora_on_a_4bit_base(fold, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", fold)
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    loss_ref, grads_ref = _step(reference, ids)
    loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_training_path_folds_the_adapters_input_gradient(dtype, tmp_path, monkeypatch):
    """Over a 4-bit base the training forward is one autograd Function whose backward adds the
    adapter's input gradient into the base's: output, input gradient and A, B gradients as peft's."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", True)
    reference, patched = _quantized_pair("cpu", dtype, r=4)
    results = []
    for model in (reference, patched):
        layer = [m for m in lora_layers(model) if m.in_features > m.out_features][0]  # a down projection
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(5), dtype=dtype)
        x.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as training runs
            y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=dtype))
        results.append((y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
        if model is patched:
            assert type(y.grad_fn).__name__ == "_LoRAOver4bitBackward"
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for expected, actual, name in zip(*results, ("output", "input grad", "A grad", "B grad")):
        torch.testing.assert_close(actual, expected, msg=name, **tolerance)


def test_folded_backward_writes_the_input_gradient_over_an_overwritable_input(tmp_path, monkeypatch):
    """A down projection's input marked overwritable (the SwiGLU product in the patched MLP) gets
    its gradient written over it: the gradients stay peft's, x's storage holds the gradient, and
    a second backward through the graph raises instead of reading it as x."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", True)
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    results = []
    for model in (reference, patched):
        layer = [m for m in lora_layers(model) if m.in_features > m.out_features][0]  # a down projection
        leaf = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(5), requires_grad=True)
        x = overwritable(leaf * 1.0)  # a non-leaf, as the SwiGLU's product is
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(6)), retain_graph=True)
        results.append((y, leaf.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for expected, actual, name in zip(*results, ("output", "input grad", "A grad", "B grad")):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(x, leaf.grad, atol=0, rtol=0)  # x's storage now holds its gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


def test_every_kernel_with_the_folded_backward_over_4bit_gives_pefts_gradients(tmp_path, monkeypatch):
    """The patched model end to end (RMSNorm, RoPE, SwiGLU writing over gate and up, the fused
    loss, and the folded LoRA path: forward and backward dequantizing its weights a block at a time,
    the input gradient written over the SwiGLU product): loss and every LoRA gradient as the
    unpatched peft model's, fp32."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", True)
    monkeypatch.setattr(lora, "DEQUANTIZED_BLOCK_BYTES", 32 * 1024)  # q_proj, o_proj: two forward blocks
    monkeypatch.setattr(lora, "BITSANDBYTES_FUSED_MAX_TOKENS", 0)  # the blockwise forward for any length
    reference, patched = _quantized_pair("cpu", torch.float32, r=4)
    apply_kernels(patched)  # the LoRA forward is already patched
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    loss_ref, grads_ref = _step(reference, ids)
    loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def _record_blocks(monkeypatch) -> list[dict]:
    """The keyword arguments (rows=, columns=) of every block the blockwise paths dequantize."""
    blocks = []
    dequantize = lora.dequantize_nf4
    monkeypatch.setattr(lora, "dequantize_nf4", lambda *args, **kwargs: blocks.append(kwargs) or dequantize(*args, **kwargs))
    return blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_through_4bit_equals_the_layers_own_forward(dtype, tmp_path, monkeypatch):
    """The blockwise 4-bit forward (weight dequantized a block of output rows at a time) gives the
    bitsandbytes layer's own output, for every projection shape of the tiny model."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "BITSANDBYTES_FUSED_MAX_TOKENS", 0)
    monkeypatch.setattr(lora, "DEQUANTIZED_BLOCK_BYTES", 24 * 128 * 4)  # 24 rows of 128 fp32 inputs
    reference, _ = _quantized_pair("cpu", dtype, r=4)
    layers = [m.base_layer for m in lora_layers(reference)][:7]
    assert {layer.in_features for layer in layers} == {128, 384}
    blocks = _record_blocks(monkeypatch)
    for layer in layers:
        x = torch.randn(2, 9, layer.in_features, generator=torch.Generator().manual_seed(4)).to(dtype)
        with torch.no_grad():
            actual = lora.linear_through_4bit(x, layer)
            expected = layer(x)
        # bf16: Triton's interpreter truncates the dequantized weight where bitsandbytes rounds
        # (tests/kernels/test_nf4.py), up to 2^-8 of each weight: 0.016 at most on these outputs
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(actual, expected, msg=str(layer), **tolerance)
    # blocks of 24 rows of 128 fp32 inputs (8 rows of down's 384; twice as many in bf16) for every
    # projection with more outputs than that
    size = torch.empty((), dtype=dtype).element_size()
    rows = {layer: 24 * 128 * 4 // (layer.in_features * size) for layer in layers}
    expected = sum(-(-layer.out_features // rows[layer]) for layer in layers if layer.out_features > rows[layer])
    assert expected > len(layers) and len(blocks) == expected and all(b["rows"] for b in blocks)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(98, 256), (70, 384), (70, 100)])
def test_grad_through_4bit_dequantizes_in_blocks(out_features, in_features, dtype, nested, monkeypatch):
    """The blockwise `grad @ W` equals the product with the whole weight dequantized: blocks of 128
    or 256 columns and a short last one, and rows that are not whole quantization blocks (taken whole)."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    packed.quant_state = state
    monkeypatch.setattr(lora, "DEQUANTIZED_BLOCK_BYTES", 128 * out_features * 4)
    columns = 128 * 4 // torch.empty((), dtype=dtype).element_size()
    in_blocks = in_features % 64 == 0 and columns < in_features
    # the weight as the blocks' kernel makes it (tests/kernels/test_nf4.py holds it to bitsandbytes'),
    # or bitsandbytes' own where the weight goes whole: rows not whole quantization blocks, or one block
    whole = lora.dequantize_nf4(packed, dtype) if in_blocks else bnb_functional.dequantize_4bit(packed, state).to(dtype)
    blocks = _record_blocks(monkeypatch)
    # the identity picks out W itself: every block's values must be the whole weight's, bit for bit
    eye = torch.eye(out_features, dtype=dtype)
    torch.testing.assert_close(lora.grad_through_4bit(eye, packed), whole, atol=0, rtol=0)
    assert len(blocks) == (-(-in_features // columns) if in_blocks else 0)
    grad = torch.randn(7, out_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    # each output element is one whole dot product, as in the one-shot product: equal, not close
    torch.testing.assert_close(lora.grad_through_4bit(grad, packed), grad @ whole, atol=0, rtol=0)


def test_disabled_adapter_and_merged_layers_take_pefts_path():
    reference, _ = tiny_lora_model("tiny-llama")
    patched = copy.deepcopy(reference)
    patch_lora(patched)
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
    from ftune.kernels.lora import fused_lora_forward

    fused_lora_forward(layer, torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert calls == [torch.bfloat16]


def test_kernel_support_and_apply_kernels_flag():
    model, _ = tiny_lora_model("tiny-llama")
    assert kernel_support(model)["fused_lora"] is None
    report = apply_kernels(model, rms_norm=False, rope=False, swiglu=False, fused_cross_entropy=False, fused_lora=True)
    assert report == {"fused_lora": 21}
    bare = AutoModelForCausalLM.from_config(model.get_base_model().config)
    assert "no LoRA layers" in kernel_support(bare)["fused_lora"]


def _count_down_projection_forwards(model, monkeypatch) -> list:
    """The GEMMs of the down projections' 4-bit bases: through the layer, or a reused 16-bit weight."""
    calls, bases = [], set()
    for name, module in model.named_modules():
        if name.endswith("down_proj.base_layer"):
            module.register_forward_hook(lambda *args: calls.append(1))
            bases.add(id(module))
    reused = lora._Base4bitReused.forward

    def counted(ctx, x, layer):
        if id(layer) in bases:
            calls.append(1)
        return reused(ctx, x, layer)

    monkeypatch.setattr(lora._Base4bitReused, "forward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_mlp_leaves_the_down_projections_gemm_to_the_backward(dtype, tmp_path, monkeypatch):
    """In a recomputed layer the MLP's output is only differentiated (the residual's gradient is
    known), so the down projection's 4-bit GEMM runs once per step, in the first forward; its
    input gradient comes from the backward alone. Loss and every LoRA gradient stay peft's."""
    from ftune.engine import decoder_layers, install_checkpointing

    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", dtype, r=4)
    install_checkpointing(patched, "true")
    forwards = _count_down_projection_forwards(patched, monkeypatch)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    assert len(forwards) == len(decoder_layers(patched))  # not again in the recompute
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(loss_new, loss_ref, **tolerance)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], msg=name, **tolerance)


@gpu
def test_recomputed_mlp_without_the_down_projections_forward_on_the_gpu(tmp_path, monkeypatch):
    """As above in bf16 on the GPU, against the same patched model recomputing the whole MLP:
    the same kernels on the same inputs, so equal to rounding."""
    from ftune.engine import decoder_layers, install_checkpointing

    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    _, whole = _quantized_pair(DEVICE, torch.bfloat16, r=8)
    skipping = copy.deepcopy(whole)
    for model in (whole, skipping):
        install_checkpointing(model, "true")
    forwards = _count_down_projection_forwards(skipping, monkeypatch)
    ids = torch.randint(0, 200, (2, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with monkeypatch.context() as patch:
            patch.setattr(lora, "output_unread", lambda layer: contextlib.nullcontext())
            loss_ref, grads_ref = _step(whole, ids)
        loss_new, grads_new = _step(skipping, ids)
    assert len(forwards) == len(decoder_layers(skipping))  # the first forward of each layer only
    torch.testing.assert_close(loss_new, loss_ref, atol=0, rtol=0)
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=1e-2 * scale + 1e-6, rtol=0, msg=name)


@gpu
@pytest.mark.parametrize("fold", [False, True])
def test_fused_lora_on_the_gpu_4bit_bf16(fold, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lora, "FOLD_ADAPTER_INPUT_GRADIENT", fold)
    reference, patched = _quantized_pair(DEVICE, torch.bfloat16, r=8)
    ids = torch.randint(0, 200, (2, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        loss_new, grads_new = _step(patched, ids)
    torch.testing.assert_close(loss_new, loss_ref, atol=2e-2, rtol=2e-2)
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], atol=2e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_mlp_dequantizes_each_weight_once_for_all_its_chunks(dtype, tmp_path, monkeypatch):
    """A recomputed layer's MLP runs in chunks of tokens; its backward dequantizes each of the three
    4-bit weights once, however many chunks, and loss and every LoRA gradient stay peft's."""
    from ftune.engine import decoder_layers, install_checkpointing

    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path))
    reference, patched = _quantized_pair("cpu", dtype, r=4)
    intermediate = patched.config.intermediate_size
    engine = install_checkpointing(patched, "true", mlp_chunk_bytes=intermediate * dtype.itemsize * 8)
    assert all(len(layer.forward.halves._chunks(torch.empty(2, 24, 1, dtype=dtype))) == 6 for layer in engine.layers)
    mlp_weights = {id(module.weight) for name, module in patched.named_modules()
                   if name.endswith(("gate_proj.base_layer", "up_proj.base_layer", "down_proj.base_layer"))}
    made = []  # the MLP's (the attention's projections go through lora_augmented.py, tested there)
    whole_weight = lora._whole_weight
    monkeypatch.setattr(lora, "_whole_weight", lambda weight, dtype: (id(weight) in mlp_weights and made.append(1))
                        or whole_weight(weight, dtype))
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss_ref, grads_ref = _step(reference, ids)
        assert not made  # outside the engine bitsandbytes dequantizes as always
        loss_new, grads_new = _step(patched, ids)
    # gate, up and down once in the backward (gate and up for the recompute, down for its input
    # gradient); the forward dequantizes per chunk, through bitsandbytes (not counted here)
    assert len(made) == 3 * len(decoder_layers(patched))
    assert lora._REUSED_WEIGHTS is None  # nothing outlives the layer
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(loss_new, loss_ref, **tolerance)
    assert grads_new.keys() == grads_ref.keys() and grads_ref
    for name in grads_ref:
        torch.testing.assert_close(grads_new[name], grads_ref[name], msg=name, **tolerance)
