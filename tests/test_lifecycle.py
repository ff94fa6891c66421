"""After training, on CPU: evaluation while training, TensorBoard through transformers'
integration, the model card, push_to_hub's failure that loses nothing, and talking to the run
(`ftune generate`, `ftune chat`). One quickstart run of 10 steps serves the module."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from rich.console import Console
from transformers import AutoTokenizer, TrainerControl, TrainerState

from ftune.cli import main
from ftune.data import eval_data
from ftune.errors import DataError, HubError, RecipeError
from ftune.recipe import load_recipe
from ftune.reports import LiveReporter, steady_tokens_per_s
from ftune.runner import train
from tests.conftest import QUICKSTART
from tests.helpers import tiny_lora_model

STEPS, EVAL_STEPS = 8, 3
REPO = "someone/ftune-quickstart"


def run_cli(monkeypatch, capsys, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["ftune", *args])
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    return caught.value.code or 0, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The quickstart with 5% of its rows held out, TensorBoard on, and a push to a hub that this
    offline test session cannot reach (conftest sets HF_HUB_OFFLINE): the push fails last."""
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    recipe = load_recipe(QUICKSTART, [
        f"training.output_dir={out}", f"training.max_steps={STEPS}", "training.batch_size=4", "data.limit=400",
        "training.logging_steps=2", "data.eval=0.05", f"training.eval_steps={EVAL_STEPS}",
        "training.keep_best=true", "training.report_to=[tensorboard]", f"training.push_to_hub={REPO}"])
    with pytest.raises(HubError) as caught:
        train(recipe)
    return recipe, out, caught.value


@pytest.mark.slow
def test_eval_loss_in_metrics_and_summary(finished):
    _, out, _ = finished
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [3, 6, 8]  # every eval_steps, and at the end
    assert all(r["eval_loss"] > 0 and 0 <= r["eval_mean_token_accuracy"] <= 1 for r in evaluations)
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]  # the held-out rows are learned too
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == evaluations[-1]["eval_loss"]
    assert summary["eval"]["step"] == STEPS and summary["eval_rows"] == 20  # 5% of 400
    assert summary["device"] == "cpu"
    assert summary["tokens_per_s_steady"] > 0 and summary["tokens_per_s"] > 0


@pytest.mark.slow
def test_keep_best_ends_with_the_adapter_of_the_lowest_eval_loss(finished):
    from safetensors.torch import load_file

    _, out, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    best = min(evaluations, key=lambda r: r["eval_loss"])
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{best['step']}"
    kept, final = load_file(Path(summary["best_checkpoint"]) / "adapter_model.safetensors"), \
        load_file(out / "adapter_model.safetensors")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)


def test_keep_best_saves_at_each_evaluation(tmp_path):
    from types import SimpleNamespace

    from trl import SFTConfig

    from ftune.workflows.common import trainer_arguments

    built = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    arguments = trainer_arguments(_recipe(tmp_path, "data.eval=0.1", "training.keep_best=true",
                                          "training.max_steps=50"), built)
    assert (arguments["eval_strategy"], arguments["eval_steps"], arguments["save_steps"]) == ("steps", 5, 5)
    SFTConfig(**arguments)  # transformers' own check: saves where it evaluates
    by_epoch = trainer_arguments(_recipe(tmp_path, "data.eval=0.1", "training.keep_best=true", "training.max_steps=null",
                                         "training.epochs=2"), built)
    assert by_epoch["eval_strategy"] == by_epoch["save_strategy"] == "epoch"
    SFTConfig(**by_epoch)
    assert trainer_arguments(_recipe(tmp_path), built)["eval_strategy"] == "no"


@pytest.mark.slow
def test_tensorboard_events_hold_train_and_eval_losses(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = finished
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(summary["eval_loss"], rel=1e-6)
    # ftune's own figures beside the trainer's (on a GPU also ftune/vram_*)
    assert {"train/ftune/tokens_per_s", "train/ftune/rss_gib", "train/ftune/host_offload_gib"} <= set(scalars)


@pytest.mark.slow
def test_model_card_describes_the_run(finished):
    _, out, _ = finished
    card = (out / "README.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: peft")
    for text in ("`tiny-llama` preset", "sft.jsonl", "380 rows trained on", "5% of the data held out (20 rows)",
                 f"{summary['eval_loss']:.4f}", f"{summary['final_loss']:.4f}", "peak memory (process RSS, on CPU)",
                 f"| {summary['tokens_per_s_steady']:,.0f} |", f"| {summary['tokens_per_s']:,.0f} |", "| device | cpu |",
                 "workflow: sft"):
        assert text in card, text


@pytest.mark.slow
def test_push_failure_names_the_fix_and_keeps_the_run(finished):
    _, out, error = finished
    assert REPO in error.message and str(out) in error.message and "HF_TOKEN" in error.hint
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "metrics.jsonl", "summary.json", "README.md"):
        assert (out / name).is_file(), name


def test_push_uploads_the_run_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub

    from ftune.model_card import push_run

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.update(repo=(repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.update(upload=kw))
    assert push_run(tmp_path, REPO) == f"https://huggingface.co/{REPO}"
    assert calls["repo"] == (REPO, {"exist_ok": True, "private": True, "repo_type": "model"})
    assert calls["upload"]["folder_path"] == str(tmp_path) and "checkpoint-*" in calls["upload"]["ignore_patterns"]


@pytest.fixture(scope="module")
def loaded(finished):
    """The run loaded for generation once (ftune.inference.load_for_generation: the 4-bit base
    through load_base_model with the run's recipe.yaml, the adapter on it); the CLI tests get it."""
    from ftune.inference import load_for_generation, open_folder

    return load_for_generation(open_folder(finished[1]))


@pytest.fixture
def cli_loads_once(loaded, monkeypatch):
    import ftune.inference

    monkeypatch.setattr(ftune.inference, "load_for_generation", lambda folder, device=None: loaded)
    return loaded


@pytest.mark.slow
def test_generate_prints_the_models_completion(finished, cli_loads_once, monkeypatch, capsys):
    _, out, _ = finished
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", str(out), "--prompt", "What is 12 + 7?", "--raw",
                                "--max-new-tokens", "8", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    # the same greedy tokens from transformers' generate on the run's model: PeftModel over the 4-bit base
    tokenizer, model = cli_loads_once.tokenizer, cli_loads_once.model
    assert isinstance(model, PeftModel) and not model.training
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ids = tokenizer("What is 12 + 7?", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
    assert result["new_tokens"] == len(expected) > 0
    assert result["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    code, plain, _ = run_cli(monkeypatch, capsys, "generate", str(out), "--prompt", "What is 12 + 7?", "--raw",
                             "--max-new-tokens", "8")
    assert code == 0 and plain == result["completion"] + "\n"


@pytest.mark.slow
def test_chat_answers_two_piped_turns_with_the_history(finished, cli_loads_once, monkeypatch, capsys):
    from ftune.inference import ChatSession, Sampling

    _, out, _ = finished
    turns = ["What is 2 + 2?", "Spell the word maple."]
    code, stdout, err = run_cli(monkeypatch, capsys, "chat", str(out), "--system", "Answer briefly.",
                                "--temperature", "0", "--max-new-tokens", "6", stdin="\n".join(turns) + "\n")
    assert code == 0, err
    session = ChatSession(cli_loads_once, Sampling(max_new_tokens=6, temperature=0), system="Answer briefly.")
    answers = [session.reply(turn).text for turn in turns]
    assert stdout == "".join(answer + "\n" for answer in answers)  # streamed, one answer a turn
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    second_prompt = session.loaded.tokenizer.apply_chat_template(session.messages[:4], tokenize=False,
                                                                 add_generation_prompt=True)
    assert "Answer briefly." in second_prompt and turns[0] in second_prompt  # the template, with the history


@pytest.mark.slow
def test_export_the_run_merged_and_as_gguf(finished, tmp_path, monkeypatch, capsys):
    """`ftune export RUN --format merged`: the logits of PeftModel over the 16-bit base (fp32 here);
    `--format gguf --quant f16`: the merged model's, to f16 rounding (tests/test_export.py goes further)."""
    from transformers import AutoModelForCausalLM

    _, out, _ = finished
    code, stdout, err = run_cli(monkeypatch, capsys, "export", str(out), "--format", "merged", "--json")
    assert code == 0, err
    merged_dir = Path(json.loads(stdout)["path"])
    assert merged_dir == out.parent / "quickstart-merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "summary.json").read_text())["model"],
                                                dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, merged(ids).logits
    assert (got - expected).abs().max() < 1e-4  # measured 1e-5
    code, stdout, err = run_cli(monkeypatch, capsys, "export", str(out), "--format", "gguf", "--json")
    assert code == 0, err
    gguf_file = Path(json.loads(stdout)["path"])
    assert gguf_file == out.parent / "quickstart-gguf" / "quickstart-f16.gguf"
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        assert ((from_gguf(ids).logits - got).norm() / got.norm()) < 2.5e-3


# -- without a training run --------------------------------------------------------------------

def test_eval_forward_keeps_nothing_for_backward(monkeypatch):
    """Trainer.evaluate runs the model under no_grad: the engine neither offloads nor sets up a recompute."""
    from ftune.engine import recompute

    recomputed = []
    apply = recompute._RecomputedLayer.apply
    monkeypatch.setattr(recompute._RecomputedLayer, "apply", lambda *args: recomputed.append(1) or apply(*args))
    model, engine = tiny_lora_model(mode="unsloth")
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert engine.host_bytes() == 0 and not recomputed
    assert all(pool.stats.peak_in_use == 0 for pool in engine.copier.pools)
    model(input_ids=ids, labels=ids).loss.backward()
    assert engine.host_bytes() > 0 and len(recomputed) == 3  # the same model offloads its 3 layers in training


def test_a_folder_without_an_adapter_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", str(tmp_path), "--prompt", "hi")
    assert code == 2 and not stdout
    assert "holds no adapter (adapter_config.json)" in err and "notes.txt" in err and "ftune train" in err
    assert "Traceback" not in err


def fake_run(folder: Path, preset: str) -> Path:
    """A run's folder as far as open_folder reads it: a recipe and an adapter's config, no weights."""
    folder.mkdir(parents=True)
    tokenizer = QUICKSTART.parent.parent / "data" / "quickstart" / "tokenizer"
    (folder / "recipe.yaml").write_text(f"model: {{preset: {preset}, tokenizer: {tokenizer}}}\n"
                                        f"data: {{source: {QUICKSTART.parent.parent / 'data/quickstart/sft.jsonl'}}}\n")
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_chat_on_a_cpu_too_small_for_the_model_stops_before_loading(tmp_path, monkeypatch, capsys):
    import ftune.inference
    import ftune.model

    run = fake_run(tmp_path / "big", "llama-3.1-70b")
    monkeypatch.setattr(ftune.model, "pick_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ftune.inference.psutil, "virtual_memory", lambda: type("M", (), {"available": 16 << 30})())
    loads = []
    monkeypatch.setattr(ftune.model, "load_base_model", lambda *a, **k: loads.append(a))
    code, stdout, err = run_cli(monkeypatch, capsys, "chat", str(run), stdin="hi\n")
    assert code == 4 and not loads and not stdout
    # 70B in 4 bits plus its float32 embeddings on the CPU: about 41 GiB
    assert "Not enough host memory" in err and "16.00 GiB free" in err and "--quant q8_0" in err
    assert "Traceback" not in err


def _recipe(tmp_path, *overrides: str):
    return load_recipe(QUICKSTART, [f"training.output_dir={tmp_path / 'run'}", *overrides])


def test_eval_fraction_is_held_out_with_the_seed(tmp_path):
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(200)]})
    recipe = _recipe(tmp_path, "data.eval=0.1")
    train_rows, held, report = eval_data(recipe, rows, "text", None)
    assert (len(train_rows), len(held), report) == (180, 20, None)
    assert not set(train_rows["text"]) & set(held["text"])
    assert eval_data(recipe, rows, "text", None)[1]["text"] == held["text"]  # the same rows every run
    other = eval_data(_recipe(tmp_path, "data.eval=0.1", "training.seed=7"), rows, "text", None)[1]
    assert other["text"] != held["text"]
    with pytest.raises(DataError, match="no eval or no training rows"):
        eval_data(_recipe(tmp_path, "data.eval=0.001"), rows, "text", None)


def test_eval_source_is_read_and_checked_like_the_training_data(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART.parent.parent / "data" / "quickstart" / "tokenizer")
    good = tmp_path / "eval.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    '{"messages": []}\n')
    recipe = _recipe(tmp_path, f"data.eval={good}")
    rows = Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]})
    train_rows, held, report = eval_data(recipe, rows, "messages", tokenizer)
    assert len(train_rows) == 1 and len(held) == 1 and report.empty_dropped == 1
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain"}\n')
    with pytest.raises(DataError, match="is text data, but data.source is messages"):
        eval_data(_recipe(tmp_path, f"data.eval={text}", "data.format=auto"), rows, "messages", tokenizer)


@pytest.mark.parametrize("overrides, key", [
    (["data.eval=1.5"], "data.eval"),
    (["data.eval=true"], "data.eval"),
    (["training.eval_steps=5"], "training.eval_steps"),
    (["training.keep_best=true"], "training.keep_best"),
    (["data.eval=0.1", "training.keep_best=true", "training.eval_steps=4", "training.save_steps=6"],
     "training.save_steps"),
    (["training.push_to_hub=not a repo"], "training.push_to_hub"),
    (["training.report_to=[neptune]"], "training.report_to"),
], ids=["fraction-above-1", "boolean", "eval-steps-without-data", "keep-best-without-data", "save-not-multiple",
        "bad-repo-id", "unknown-tracker"])
def test_eval_and_tracking_keys_are_checked(tmp_path, overrides, key):
    with pytest.raises(RecipeError) as caught:
        _recipe(tmp_path, *overrides)
    assert any(k.startswith(key) for k, _ in caught.value.problems), caught.value.problems


def test_a_tracker_without_its_package_is_a_recipe_error(tmp_path, monkeypatch):
    import importlib.util

    from ftune.workflows.common import tracking_arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match="wandb needs its package") as caught:
        tracking_arguments(_recipe(tmp_path, "training.report_to=[tensorboard, wandb]"))
    assert "pip install wandb" in caught.value.hint


def test_steady_tokens_per_s_leaves_out_each_sessions_first_log():
    history = [{"step": 2, "loss": 1.0, "tokens_per_s": 10.0, "elapsed_s": 5.0},   # compiling
               {"step": 4, "loss": 1.0, "tokens_per_s": 100.0, "elapsed_s": 6.0},
               {"step": 4, "eval_loss": 1.0},
               {"step": 6, "loss": 1.0, "tokens_per_s": 110.0, "elapsed_s": 7.0},
               {"step": 8, "loss": 1.0, "tokens_per_s": 20.0, "elapsed_s": 3.0},   # resumed: starting again
               {"step": 10, "loss": 1.0, "tokens_per_s": 90.0, "elapsed_s": 4.0}]
    assert steady_tokens_per_s(history) == 100.0
    assert steady_tokens_per_s(history[:1]) is None


def test_panel_shows_the_eval_loss(tmp_path):
    model, engine = tiny_lora_model()
    reporter = LiveReporter(tmp_path, engine, title="t", console=Console(file=io.StringIO()))
    state = TrainerState(global_step=4, max_steps=10)
    reporter.on_train_begin(None, state, TrainerControl())
    reporter.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-3})
    tracked = {"eval_loss": 2.25, "eval_mean_token_accuracy": 0.5, "eval_runtime": 1.0}
    reporter.on_log(None, state, TrainerControl(), logs=tracked)
    reporter.close()
    screen = Console(file=io.StringIO(), width=120)
    screen.print(reporter._render(state))
    text = screen.file.getvalue()
    assert "eval loss" in text and "2.2500 (step 4)" in text and "eval token accuracy" in text
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 4, "epoch": 0.0, "eval_loss": 2.25, "eval_mean_token_accuracy": 0.5,
                        "eval_runtime_s": 1.0}
