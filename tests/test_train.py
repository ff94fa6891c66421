"""End to end on CPU: a 4-bit QLoRA run of the quickstart trains, the loss falls, and what it
writes loads with plain PEFT and gives the logits of the model in memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ftune.cli import main
from ftune.integrations.bitsandbytes import is_4bit, is_repacked
from ftune.integrations.transformers import KERNELS
from ftune.model import load_base_model, quantization_config
from ftune.recipe import load_recipe
from ftune.runner import train
from tests.conftest import CPU_HAS_AVX512BF16, QUICKSTART

pytestmark = pytest.mark.slow


# quickstart_run (tests/conftest.py): the quickstart's 250 steps, shared with tests/test_workflows.py


def test_loss_falls(quickstart_run):
    _, run = quickstart_run
    summary = run.summary
    assert summary["steps"] == 250
    assert summary["final_loss"] < summary["first_loss"] - 1.0, summary


def test_base_is_4bit_and_adapter_fp32(quickstart_run):
    _, run = quickstart_run
    model = run.built.model
    projection = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(projection).__name__ == "Linear4bit"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_output_dir_holds_the_run(quickstart_run):
    recipe, run = quickstart_run
    out = Path(run.summary["output_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml",
                 "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging leftovers"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [50, 100, 150, 200, 250]
    for line in lines:
        assert line["loss"] > 0 and line["mem_rss_gib"] > 0 and line["tokens_per_s"] > 0
    assert load_recipe(out / "recipe.yaml", check_paths=False).training.logging_steps == 50  # the run's own recipe
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpointing"]["offload"] == 4
    assert summary["batches"] == "padding-free"  # the quickstart's rows are shorter than max_length


def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(quickstart_run):
    recipe, run = quickstart_run
    built = run.built
    out = run.summary["output_dir"]
    base = AutoModelForCausalLM.from_pretrained(
        built.source, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=quantization_config(recipe, torch.float32),
    )
    loaded = PeftModel.from_pretrained(base, out).eval()
    trained = built.model.eval()
    saved = load_file(f"{out}/adapter_model.safetensors")
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in saved.items())
    ids = built.tokenizer(["What is 12 + 7?", "Spell the word maple."], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trained(**ids).logits
        got = loaded(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_trained_adapter_generates_in_eval_mode_whatever_the_cpu(quickstart_run, bitsandbytes_avx512bf16):
    """The base as ftune loads it, with the run's adapter: eval mode generates what train mode (no
    dropout) does, and no 4-bit weight is repacked, whether or not the CPU has AVX512-BF16."""
    recipe, run = quickstart_run
    base, _, _ = load_base_model(recipe, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, run.summary["output_dir"])
    tokenizer = run.built.tokenizer
    expected = _greedy(model.train(), tokenizer, "Spell the word maple.")
    assert _greedy(model.eval(), tokenizer, "Spell the word maple.") == expected
    assert expected and not any(is_repacked(m) for m in model.modules() if is_4bit(m))


@pytest.mark.skipif(not CPU_HAS_AVX512BF16, reason="runs bitsandbytes' AVX512-BF16 kernel, which this CPU lacks")
def test_plain_peft_generates_through_bitsandbytes_avx512bf16_kernel(quickstart_run, monkeypatch):
    """The adapter loaded with plain transformers + peft, on a CPU where bitsandbytes repacks 4-bit
    weights for its bf16 kernel in eval mode: the tiny shapes are ones that kernel takes."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    recipe, run = quickstart_run
    base = AutoModelForCausalLM.from_pretrained(run.built.source, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(recipe, torch.float32))
    model = PeftModel.from_pretrained(base, run.summary["output_dir"]).eval()
    assert _greedy(model, run.built.tokenizer, "Spell the word maple.")
    assert all(is_repacked(m) for m in model.modules() if is_4bit(m))


def test_cli_train_then_refuse_to_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli-run"
    args = ["ftune", "train", str(QUICKSTART), "--set", f"training.output_dir={out}", "--set", "training.max_steps=3",
            "--set", "checkpointing.mode=true"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code in (0, None)
    assert (out / "adapter_model.safetensors").is_file()
    before = (out / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_kernels_in_the_training_path_give_the_same_losses(tmp_path):
    """The recipe's kernels (Triton's interpreter on CPU) through SFTTrainer: same losses as without."""
    results = []
    for on in (False, True):
        overrides = [f"training.output_dir={tmp_path / str(on)}", "training.max_steps=3", "training.batch_size=2",
                     "data.max_length=24", "training.logging_steps=1"]
        overrides += [f"kernels.{name}={str(on).lower()}" for name in KERNELS]
        run = train(load_recipe(QUICKSTART, overrides))
        assert run.built.kernels == dict.fromkeys(KERNELS, on)
        assert run.trainer.loss_from_model is on
        lines = (tmp_path / str(on) / "metrics.jsonl").read_text().splitlines()
        results.append([json.loads(line)["loss"] for line in lines])
    assert len(results[0]) == 3
    for a, b in zip(*results):
        assert abs(a - b) < 1e-4
