"""ftune/measure on CPU: the training steps that `ftune compare` and benchmarks/ time, the stacks they
build, and the rows and paths the scripts write."""

from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch

from ftune.measure.results import RESULTS, card_name, installed_version, result_path
from ftune.families import family_of
from ftune.measure.stacks import RunSpec, build_stack, preset_recipe
from ftune.plan import lora_targets
from ftune.measure.step import train_steps
from tests.conftest import REPO
from tests.helpers import tiny_lora_model


def _batches(count: int, seq: int = 16, vocab: int = 256) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (2, seq), generator=generator) for _ in range(count)]


def test_steps_measure_losses_times_and_memory():
    model, _ = tiny_lora_model()
    batch = _batches(1)[0]
    seen = []
    measured = train_steps(model, [batch] * 5, learning_rate=1e-2, max_grad_norm=float("inf"),
                           on_step=lambda step, loss: seen.append((step, loss)))
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5] and [loss for _, loss in seen] == measured.losses
    assert measured.losses[-1] < measured.losses[0] - 0.1  # the same batch five times: it is learned
    assert len(measured.step_times_s) == 5 and measured.timed_s == measured.step_times_s[1:]
    assert measured.step_s == statistics.median_high(measured.step_times_s[1:])  # a step that was measured
    assert measured.tokens_per_step == batch.numel() == 32
    assert measured.tokens_per_s == pytest.approx(32 / measured.step_s)
    assert len(measured.grad_norms) == 5 and all(norm > 0 for norm in measured.grad_norms)
    assert measured.memory_kind == "peak RSS (CPU)" and measured.peak_bytes > 0 and measured.device == "cpu"
    assert measured.reserved_bytes is None and measured.held_after_forward_bytes is None


def test_steps_clip_only_when_asked_and_mask_the_padding():
    batches = _batches(3)
    batches[0][:, -4:] = 0  # padding at the end of the first batch
    model, _ = tiny_lora_model()
    reference, _ = tiny_lora_model()
    labels = batches[0].masked_fill(batches[0] == 0, -100)
    expected = reference(input_ids=batches[0], labels=labels).loss.item()
    measured = train_steps(model, batches, pad_id=0)
    assert measured.grad_norms == []
    assert measured.losses[0] == pytest.approx(expected, rel=1e-6)

    clipped, _ = tiny_lora_model()
    with_norms = train_steps(clipped, batches, pad_id=0, max_grad_norm=1e-3)
    # the same first step; clipped to 1e-3, the second starts from nearly the same weights
    assert with_norms.losses[0] == pytest.approx(measured.losses[0], rel=1e-6)
    assert with_norms.grad_norms[0] > 1e-3


@pytest.mark.parametrize("text, stack, mode, budget, kernels, label", [
    ("hf:true", "hf", "true", None, False, "true"),
    ("ftune:unsloth", "ftune", "unsloth", None, False, "unsloth"),
    ("ftune+k:smart@16", "ftune+k", "smart", 16.0, True, "smart@16"),
    ("ftune+k:smart@20.5", "ftune+k", "smart", 20.5, True, "smart@20.5"),
])
def test_runs_name_a_stack_a_mode_and_a_budget(text, stack, mode, budget, kernels, label):
    run = RunSpec.parse(text)
    assert (run.stack, run.mode, run.budget_gib, run.kernels, run.label) == (stack, mode, budget, kernels, label)


@pytest.mark.parametrize("text", ["hf:unsloth", "ftune+k+fold:true", "torch:none"])
def test_unknown_runs_are_refused(text):
    with pytest.raises(ValueError, match="stack"):
        RunSpec.parse(text)


def test_preset_recipe_is_the_benchmarks_setup():
    recipe = preset_recipe("llama-3.1-8b", "smart", kernels=True, budget_gib=16, seq=8192, batch=2)
    assert recipe.model.preset == "llama-3.1-8b" and recipe.quantization.method == "nf4"
    assert recipe.quantization.double_quant and recipe.lora.r == recipe.lora.alpha == 16
    assert list(lora_targets(recipe, family_of("llama"))) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]
    phi = preset_recipe("phi-3-mini", "unsloth")
    assert list(lora_targets(phi, family_of("phi3"))) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert set(recipe.kernels.model_dump().values()) == {True}
    assert (recipe.checkpointing.mode, recipe.checkpointing.budget) == ("smart", "16GiB")
    assert (recipe.data.max_length, recipe.training.batch_size) == (8192, 2)
    moe = preset_recipe("qwen3-30b-a3b", "unsloth", kernels=True)  # the family's kernels: none it would refuse
    assert {name for name, on in moe.kernels.model_dump().items() if on} == family_of("qwen3_moe").kernels


@pytest.mark.slow
def test_bench_engine_rows_from_an_ftune_stack():
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "benchmarks" / "bench_engine.py")
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)
    stack = build_stack(RunSpec.parse("ftune:unsloth"), "tiny-llama", seq=32)
    assert stack.mode == "unsloth" and stack.layer_plan is None
    row = bench_engine.measure(stack, 32, 1, 2, vocab=256, hidden=64, layers=2)
    assert row["status"] == "ok" and (row["seq"], row["batch"]) == (32, 1)
    assert len(row["step_times_s"]) == 3 and row["step_s"] in row["step_times_s"][1:]
    assert row["tokens_per_s"] == pytest.approx(32 / row["step_s"], rel=1e-3)
    assert row["peak_gib"] > 0 and row["reserved_gib"] is None and row["loss"] > 0
    assert row["layer_inputs_gib"] == round(2 * 32 * 64 * 2 / 1024**3, 3)
    assert set(row) >= {"held_after_forward_gib", "host_pinned_gib", "collector_s_per_generation",
                        "collector_passes_per_generation", "cuda_mallocs"}


@pytest.mark.parametrize("name, count, card", [
    ("NVIDIA H100 80GB HBM3", 1, "h100"), ("NVIDIA H200", 1, "h200"), ("NVIDIA H100 80GB HBM3", 2, "2xh100"),
    ("NVIDIA A100-SXM4-80GB", 1, "a100"), ("NVIDIA GeForce RTX 4090", 1, "rtx-4090"), ("cpu", 1, "cpu"),
])
def test_result_folders_are_named_by_card(name, count, card):
    assert card_name(name, count) == card


def test_results_name_the_optional_packages_that_ran():
    assert installed_version("torch") == torch.__version__
    assert installed_version("no-such-package-ftune-test") is None


def test_result_files_are_named_by_date_and_topic(monkeypatch, tmp_path):
    import ftune.measure.results as results

    monkeypatch.setattr(results, "RESULTS", tmp_path)
    path = result_path("engine", card="h200")
    assert path.parent == tmp_path / "h200" and path.parent.is_dir()
    assert path.name.endswith("-engine.json") and len(path.name) == len("2026-12-02-engine.json")
    assert RESULTS == REPO / "benchmarks" / "results"
    for legacy in RESULTS.glob("*.*"):  # every result sits in its card's folder
        pytest.fail(f"{legacy.name} is not in benchmarks/results/<card>/")
