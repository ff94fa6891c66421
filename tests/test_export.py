"""`ftune export` on CPU: GGUF files that transformers' GGUF loader reads back as the merged model,
for each family written, at each precision; bad requests stopped before anything loads.

The run folders here are made, not trained: a preset's base, a LoRA adapter whose B matrices are
random (a fresh one would merge to the base itself), the tokenizer and recipe a run writes. The
export of a trained quickstart run is in tests/test_lifecycle.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.cli import main
from ftune.export import export_gguf, export_merged
from ftune.model import lora_config, materialize_preset
from ftune.recipe import load_recipe
from tests.conftest import QUICKSTART

TOKENIZER = QUICKSTART.parent.parent / "data" / "quickstart" / "tokenizer"
IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def made_run(folder: Path, preset: str = "tiny-llama") -> Path:
    """A run's folder: adapter (B random), tokenizer, recipe.yaml and summary.json naming the base."""
    recipe = load_recipe(QUICKSTART, [f"training.output_dir={folder}", f"model.preset={preset}"])
    base_dir = materialize_preset(preset, seed=recipe.training.seed, dtype=torch.float32, device=torch.device("cpu"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), lora_config(recipe))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    (folder / "recipe.yaml").write_text(recipe.to_yaml(absolute_inputs=True))
    (folder / "summary.json").write_text(json.dumps({"model": str(base_dir)}))
    return folder


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    run = made_run(tmp_path_factory.mktemp("runs") / "llama")
    merged = export_merged(run)
    return run, AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()


def gguf_model(path: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def greedy(model, count: int = 16) -> list[int]:
    prompt = IDS[:1, :8]
    return model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                          pad_token_id=0)[0, prompt.shape[1]:].tolist()


@pytest.mark.slow
def test_gguf_f16_gives_the_merged_models_logits_and_greedy_tokens(llama_run):
    run, merged = llama_run
    written = export_gguf(run, quant="f16")
    assert written.path == run.parent / "llama-gguf" / "llama-f16.gguf"
    loaded = gguf_model(written.path)
    with torch.no_grad():
        expected, got = merged(IDS).logits, loaded(IDS).logits
    # f16 keeps 11 significant bits (a relative rounding of at most 4.9e-4 per weight); through
    # four layers the logits moved by 1.3e-3 of their norm (measured), bf16's 8 bits give 1e-2
    assert relative_error(got, expected) < 2.5e-3
    assert greedy(loaded) == greedy(merged)


@pytest.mark.slow
def test_gguf_without_llamas_rotary_permutation_fails_that_check(llama_run, tmp_path, monkeypatch):
    """The tolerance above can fail: q and k rows left in transformers' order (llama.cpp's converter
    interleaves them; transformers' loader undoes it) put the logits far off."""
    import ftune.export

    run, merged = llama_run
    monkeypatch.setattr(ftune.export, "_permute", lambda weights, heads: weights)
    loaded = gguf_model(export_gguf(run, quant="f16", out=tmp_path).path)
    with torch.no_grad():
        assert relative_error(loaded(IDS).logits, merged(IDS).logits) > 0.05


@pytest.mark.slow
def test_gguf_q8_0_blocks_and_float32_norms(llama_run, tmp_path):
    from gguf import GGUFReader

    run, merged = llama_run
    written = export_gguf(run, quant="q8_0", out=tmp_path)
    kinds = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(written.path).tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    f16 = export_gguf(run, quant="f16", out=tmp_path)
    assert written.bytes < 0.6 * f16.bytes
    with torch.no_grad():
        # 8-bit blocks of 32 weights: 0.5% of each weight's norm, 3% of the logits' after four random layers
        assert relative_error(gguf_model(written.path)(IDS).logits, merged(IDS).logits) < 0.08


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_gguf_of_the_other_families_reads_back(preset, tmp_path):
    run = made_run(tmp_path / preset, preset)
    merged = AutoModelForCausalLM.from_pretrained(export_merged(run).path, dtype=torch.float32).eval()
    # transformers' GGUF loader takes Qwen3's head_dim from its config class (128, every released
    # Qwen3's), not from the file, where llama.cpp reads it: the tiny shape's 32 is passed along
    config = {"config": merged.config} if preset == "tiny-qwen3" else {}
    loaded = gguf_model(export_gguf(run, quant="f16").path, **config)
    # llama.cpp runs Mistral as Llama, and transformers reads it back as Llama: the same layers
    assert type(loaded).__name__ == {"tiny-mistral": "LlamaForCausalLM"}.get(preset, type(merged).__name__)
    with torch.no_grad():
        assert relative_error(loaded(IDS).logits, merged(IDS).logits) < 2.5e-3


@pytest.mark.slow
def test_gguf_holds_the_tokenizer_and_its_chat_template(llama_run, tmp_path):
    from gguf import GGUFReader

    run, _ = llama_run
    written = export_gguf(run, quant="f16", out=tmp_path)
    fields = GGUFReader(written.path).fields

    def text(key):
        field = fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("tokenizer.ggml.model") == "gpt2"
    assert text("tokenizer.chat_template") == (TOKENIZER / "chat_template.jinja").read_text()
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == AutoTokenizer.from_pretrained(run).eos_token_id
    assert len(fields["tokenizer.ggml.tokens"].data) == 512
    # the quickstart's tokenizer is no family's own: llama.cpp splits text its default way, said at export
    assert any("default pre-tokenizer" in notice for notice in written.notices)
    original = AutoTokenizer.from_pretrained(run)
    from_gguf = AutoTokenizer.from_pretrained(written.path.parent, gguf_file=written.path.name)
    for sample in ("What is 33 + 65?", "<|im_start|>user\nSpell the word garden.<|im_end|>\n"):
        assert from_gguf(sample)["input_ids"] == original(sample)["input_ids"]


@pytest.mark.slow
def test_merged_bf16_is_saved_in_bf16(llama_run, tmp_path):
    run, merged = llama_run
    written = export_merged(run, dtype="bf16", out=tmp_path / "bf16")
    with safe_open(written.path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}
    assert (written.path / "chat_template.jinja").is_file() and (written.path / "tokenizer.json").is_file()
    half = AutoModelForCausalLM.from_pretrained(written.path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative_error(half(IDS).logits, merged(IDS).logits) < 3e-2  # bf16's 8 bits


@pytest.mark.slow
def test_a_checkpoint_of_a_run_exports_with_the_runs_recipe(tmp_path):
    run = made_run(tmp_path / "run")
    checkpoint = run / "checkpoint-3"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).rename(checkpoint / name)
    written = export_merged(checkpoint)
    assert written.path == tmp_path / "run-checkpoint-3-merged" and (written.path / "tokenizer.json").is_file()


# -- bad requests: one paragraph, exit 2, nothing loaded -----------------------------------------

def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ftune", *args])
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    return caught.value.code or 0, captured.err


def recipe_only_run(folder: Path, preset: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"model: {{preset: {preset}, tokenizer: {TOKENIZER}}}\n"
                                        f"data: {{source: {TOKENIZER.parent / 'sft.jsonl'}}}\n")
    (folder / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("args, words", [
    (["--format", "gguf"], ["Llama, Mistral, Qwen2 / Qwen2.5 and Qwen3", "gemma2", "--format merged",
                            "convert_hf_to_gguf.py"]),
    (["--format", "onnx"], ["--format onnx", "merged or gguf"]),
    (["--format", "merged", "--quant", "q8_0"], ["--quant is for --format gguf"]),
], ids=["family-llama-cpp-gets-elsewhere", "unknown-format", "quant-for-merged"])
def test_requests_the_model_cannot_take(tmp_path, monkeypatch, capsys, args, words):
    run = recipe_only_run(tmp_path / "gemma", "gemma-2-2b")
    code, err = run_cli(monkeypatch, capsys, "export", str(run), *args)
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, word


def test_q4_k_m_names_llama_quantize(tmp_path, monkeypatch, capsys):
    run = recipe_only_run(tmp_path / "llama", "tiny-llama")
    code, err = run_cli(monkeypatch, capsys, "export", str(run), "--format", "gguf", "--quant", "q4_k_m")
    assert code == 2 and "Cannot export" in err
    assert "no quantizer for Q4_K_M" in err and "llama-quantize" in err and "--quant f16" in err


def test_an_unfinished_run_names_its_newest_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "unfinished"
    for step in (5, 10):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text("")
    code, err = run_cli(monkeypatch, capsys, "export", str(run))
    assert code == 2 and "has not finished" in err and str(run / "checkpoint-10") in err


@pytest.mark.slow
def test_an_export_never_writes_over_an_earlier_one(llama_run, monkeypatch, capsys):
    run, _ = llama_run
    target = run.parent / "llama-merged"  # the fixture's export
    before = (target / "model.safetensors").stat().st_mtime_ns
    code, err = run_cli(monkeypatch, capsys, "export", str(run))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (target / "model.safetensors").stat().st_mtime_ns == before
