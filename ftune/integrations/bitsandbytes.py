"""bitsandbytes' 4-bit layers as ftune uses them. Checked against bitsandbytes 0.50.2.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks the layer's weight in place
into a layout of its CPU GEMM kernel the first time it runs with the layer in eval mode and an
input that needs no gradient (generation, an evaluation pass, a model fresh from
`from_pretrained`). The condition is its attribute `support_avx512bf16_for_cpu`, set at
construction from the CPU's feature check. After the repack:
- the weight is no longer NF4 blocks in the usual order, so everything that reads them
  (dequantization, ftune's fused LoRA paths, training again after generation) reads another
  layout;
- the repack needs in_features to be a multiple of the quantization block (64) and out_features
  a multiple of 32: any other shape fails inside it ("shape '[128, 5]' is invalid");
- the matmul goes through a bf16 kernel whatever the compute dtype, so the same input gives
  other numbers (differences of about 3e-3 on the tiny shapes) in eval than in train mode.

ftune keeps the canonical layout on every model it builds: one path, the same numbers in train
and eval mode, on every CPU. (bitsandbytes' own dequantizing path is what every non-AVX512-BF16
CPU runs anyway.)

Two more facts of bitsandbytes that ftune's fused LoRA (ftune/integrations/peft.py) relies on:
- on CUDA, past `FUSED_4BIT_MAX_TOKENS` rows of input a 4-bit layer dequantizes the whole weight
  and calls one GEMM, which is what the fused paths do with the adapter beside it; up to it, it
  picks by GPU and shape between its own 4-bit GEMM (one kernel, no 16-bit copy of the weight)
  and the same dequantizing path (on an H200, the latter for every weight of the 8B shape at the
  60 to 120 rows of DPO's quickstart steps);
- a 4-bit weight that FSDP gathers loses its quantization state, which the layer still holds
  (`fix_quant_state`).
"""

from __future__ import annotations

from torch import nn

CHECKED_VERSIONS = ("0.50.2",)
# The attribute of Linear4bit that allows the in-place repack (set from has_avx512bf16()).
REPACK_ATTRIBUTE = "support_avx512bf16_for_cpu"
# bitsandbytes.backends.cuda.ops._gemm_4bit_custom_max_m on CUDA
FUSED_4BIT_MAX_TOKENS = 1536


def is_4bit(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def keep_4bit_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repack (see the module docstring) on every 4-bit layer of
    `model`; the number of layers."""
    count = 0
    for module in model.modules():
        if is_4bit(module):
            setattr(module, REPACK_ATTRIBUTE, False)
            count += 1
    return count


def is_repacked(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked this 4-bit layer's weight for its CPU kernel."""
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def fix_quant_state(module: nn.Module) -> None:
    """Give a 4-bit layer's weight back its quantization state where FSDP's gathering dropped it."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(module)
