"""Contract tests: what ftune relies on in upstream libraries still holds. Each failure names the
module of ftune/integrations/ to check against the new version."""

from __future__ import annotations

import bitsandbytes as bnb
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
