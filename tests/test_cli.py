"""The command line: bad input exits non-zero with the key named and no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
import yaml

from ftune.cli import main
from tests.conftest import QUICKSTART
from tests.test_recipe import quickstart_dict, write


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ftune", *args])
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    return caught.value.code, captured.out + captured.err


def test_validate_ok(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "validate", str(QUICKSTART))
    assert code in (0, None)
    assert "✓" in output


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda d: d["lora"].__setitem__("rank", 8), "lora.rank"),
        (lambda d: d["training"].__setitem__("batch_size", "four"), "training.batch_size"),
        (lambda d: d["checkpointing"].__setitem__("mode", "offload"), "checkpointing.mode"),
        (lambda d: (d["model"].pop("preset"), d["model"].__setitem__("name_or_path", "./nowhere/model")),
         "model.name_or_path"),
    ],
    ids=["unknown-key", "wrong-type", "bad-mode", "missing-model-path"],
)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_broken_recipe_names_the_key_without_traceback(tmp_path, monkeypatch, capsys, change, key, command):
    data = quickstart_dict()
    change(data)
    code, output = run_cli(monkeypatch, capsys, command, str(write(tmp_path, data)))
    assert code == 2
    assert key in output
    assert "Traceback" not in output


def test_validate_reports_every_file(tmp_path, monkeypatch, capsys):
    bad = quickstart_dict()
    bad["lora"]["rank"] = 8
    code, output = run_cli(monkeypatch, capsys, "validate", str(QUICKSTART), str(write(tmp_path, bad)))
    assert code == 2
    assert "✓" in output and "lora.rank" in output


def test_missing_recipe_file(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "train", "no-such-recipe.yaml")
    assert code == 2 and "no-such-recipe.yaml" in output and "Traceback" not in output


def test_bad_set_override(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "train", str(QUICKSTART), "--set", "training.max_steps")
    assert code == 2 and "key.path=value" in output


def test_occupied_output_dir_is_not_overwritten(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("precious")
    data = quickstart_dict()
    data["training"]["output_dir"] = str(out)
    code, output = run_cli(monkeypatch, capsys, "train", str(write(tmp_path, data)))
    assert code == 2
    assert "earlier ftune run" in output and "--overwrite" in output
    assert (out / "recipe.yaml").read_text() == "precious"


def test_missing_data_field_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "a", "answer": "b"}\n')
    data = quickstart_dict()
    data["data"]["source"] = str(rows)
    data["data"]["format"] = "prompt_completion"
    data["training"]["output_dir"] = str(tmp_path / "out")
    code, output = run_cli(monkeypatch, capsys, "train", str(write(tmp_path, data)))
    assert code == 3
    assert "'prompt'" in output and "question" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_entry_point_runs_as_a_module(tmp_path):
    bad = quickstart_dict()
    bad["checkpointing"]["mode"] = "sometimes"
    result = subprocess.run([sys.executable, "-m", "ftune", "validate", str(write(tmp_path, bad))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "checkpointing.mode" in result.stderr and "Traceback" not in result.stderr


def test_presets_lists_the_8b_shape(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "presets")
    assert code in (0, None)
    assert "llama-3.1-8b" in output and "14336" in output


def test_hub_model_without_network_is_a_clear_error(tmp_path, monkeypatch, capsys):
    data = quickstart_dict()
    data["model"].pop("preset")
    data["model"]["name_or_path"] = "some-org/a-model-that-is-not-cached"
    data["training"]["output_dir"] = str(tmp_path / "out")
    code, output = run_cli(monkeypatch, capsys, "train", str(write(tmp_path, data)))
    assert code == 3
    assert "model.name_or_path" in output and "could not load" in output and "Traceback" not in output


def test_live_panel_renders_step_loss_and_memory(tmp_path):
    """On a terminal the reporter runs a rich Live panel; its content is what metrics.jsonl holds."""
    import io

    import torch
    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from ftune.engine.checkpoint import CheckpointingEngine
    from ftune.reports import LiveReporter

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    engine = CheckpointingEngine(mode="unsloth", policies=[], device=torch.device("cpu"), copier=None)
    reporter = LiveReporter(tmp_path, engine, title="panel", console=console)
    state = TrainerState(max_steps=10, global_step=0)
    reporter.on_train_begin(None, state, TrainerControl())
    assert reporter.live is not None
    state.global_step, state.num_input_tokens_seen = 4, 4096
    reporter.on_log(None, state, TrainerControl(), logs={"loss": 1.2345, "learning_rate": 1e-4})
    frame = Console(file=io.StringIO(), width=120, color_system=None)
    frame.print(reporter._render(state))
    reporter.close(state)
    text = frame.file.getvalue()
    for expected in ("ftune · panel", "step", "4/10", "loss", "1.2345", "1.00e-04", "tokens/s", "RSS"):
        assert expected in text, expected
    line = (tmp_path / "metrics.jsonl").read_text()
    assert '"loss": 1.2345' in line and "mem_rss_gib" in line
