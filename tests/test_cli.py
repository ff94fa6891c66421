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


def test_an_attention_this_machine_cannot_run_is_named(tmp_path, monkeypatch, capsys):
    """flash_attention_2 without its package (or GPU): transformers' ImportError as a model problem
    that names the key, not as a bug in ftune."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    data = quickstart_dict()
    data["model"]["attn_implementation"] = "flash_attention_2"
    data["training"]["output_dir"] = str(tmp_path / "out")
    code, output = run_cli(monkeypatch, capsys, "train", str(write(tmp_path, data)))
    assert code == 3
    assert "model.attn_implementation" in output and "FlashAttention2" in output
    assert "bug in ftune" not in output and "Traceback" not in output


def test_a_package_the_models_loading_lacks_is_named(tmp_path, monkeypatch, capsys):
    """An ImportError while transformers loads the model (a remote code's or a quantizer's package)
    is an environment problem: named with the package, not reported as a bug in ftune."""
    import ftune.model

    def lacking(*args, **kwargs):
        raise ImportError("This modeling file requires the following packages that were not found: einops")

    monkeypatch.setattr(ftune.model.AutoModelForCausalLM, "from_pretrained", lacking)
    data = quickstart_dict()
    data["training"]["output_dir"] = str(tmp_path / "out")
    code, output = run_cli(monkeypatch, capsys, "train", str(write(tmp_path, data)))
    assert code == 3
    assert "model.name_or_path" in output and "needs a package this environment lacks" in output and "einops" in output
    assert "bug in ftune" not in output and "attn_implementation" not in output


def test_a_missing_packages_key_is_the_one_it_concerns():
    """An attention's package names model.attn_implementation, the 4-bit quantizer's
    quantization.method, any other the model's; a name a module lacks (versions that do not match)
    is not a missing package, and keeps its own report."""
    from ftune.model import _missing_package_key

    assert _missing_package_key(ImportError(
        "FlashAttention2 has been toggled on, but it cannot be used due to the following error: the package for "
        "FlashAttention2 doesn't seem to be installed.")) == "model.attn_implementation"
    assert _missing_package_key(ImportError(
        "Using `bitsandbytes` 4-bit quantization requires bitsandbytes: `pip install -U bitsandbytes`")) == \
        "quantization.method"
    assert _missing_package_key(ModuleNotFoundError("No module named 'einops'", name="einops")) == "model.name_or_path"
    assert _missing_package_key(ImportError(
        "cannot import name 'is_flash_attn_greater_or_equal_2_10' from 'transformers.utils'")) is None


def test_live_panel_renders_step_loss_and_memory(tmp_path):
    """On a terminal the reporter runs a rich Live panel; its content is what metrics.jsonl holds."""
    import io

    import torch
    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from ftune.engine.recompute import CheckpointingEngine
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


def test_help_names_every_workflow(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "--help")
    assert code in (0, None) and "SFT" in output and "DPO" in output and "GRPO" in output


@pytest.mark.parametrize("command", ["validate", "train", "estimate-vram"])
def test_a_folder_given_as_the_recipe_lists_the_recipes_in_it(monkeypatch, capsys, command):
    code, output = run_cli(monkeypatch, capsys, command, str(QUICKSTART.parent))
    assert code == 2 and "is a folder, not a recipe file" in output and "quickstart.yaml" in output
    assert "not found" not in output


def test_markup_in_a_users_value_is_printed_as_it_is(tmp_path, monkeypatch, capsys):
    data = quickstart_dict()
    data["checkpointing"]["mode"] = "[bold]x[/]"
    code, output = run_cli(monkeypatch, capsys, "validate", str(write(tmp_path, data)))
    assert code == 2 and "[bold]x[/]" in output and "bug in ftune" not in output


def test_bitsandbytes_missing_kernels_package_warning_is_silenced(caplog):
    """bitsandbytes logs it at import on CPUs with AVX512-BF16, on every run; its fallback is fine."""
    import logging

    from ftune.cli import _quiet_libraries

    _quiet_libraries()
    _quiet_libraries()  # idempotent: one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                       "No module named 'kernels'")
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
    # libraries with a handler of their own print each line once, not again through the root's
    assert not logging.getLogger("huggingface_hub").propagate and not logging.getLogger("datasets").propagate


def test_host_memory_warning_on_cpu_does_not_speak_of_a_gpu(monkeypatch):
    from collections import namedtuple

    import ftune.guards as guards
    from ftune.recipe import load_recipe

    memory = namedtuple("memory", "available total")
    monkeypatch.setattr(guards.psutil, "virtual_memory", lambda: memory(available=1024, total=2048))
    message = guards.host_memory_shortfall(load_recipe(QUICKSTART), cuda=False)
    assert "GPU" not in message and "RAM" in message and "data.max_length" in message
    assert "GPU" in guards.host_memory_shortfall(load_recipe(QUICKSTART), cuda=True)


def test_compare_table_on_cpu_sets_no_vram_estimate_beside_rss():
    import io

    from rich.console import Console

    from ftune.cli.compare import _print

    row = dict(status="ok", mode="none", memory_kind="peak RSS (CPU)", peak_bytes=2**30, estimated_peak_bytes=2**29,
               reserved_bytes=None, host_bytes=0, step_s=0.1, tokens_per_s=1000.0, max_loss_diff=0.0,
               max_grad_norm_diff=0.0)
    report = {"rows": [row], "recipe": "q", "reference_mode": "none", "verdict": "v"}
    for kind, shown in (("peak RSS (CPU)", False), ("peak allocated VRAM", True)):
        row["memory_kind"] = kind
        console = Console(file=io.StringIO(), width=200)
        _print(report, console)
        text = console.file.getvalue()
        assert ("VRAM estimate" in text) is shown and ("512.00 MiB" in text) is shown
        assert ("not comparable" in text) is not shown


def test_estimate_vram_names_the_modes_a_note_holds_for(monkeypatch, capsys):
    """The shipped MoE recipe's modes are extrapolated for different reasons: none and true were
    not measured on the shape, unsloth was (tests/fixtures/family_peaks.json) but not with the LM head
    streamed through the loss. Each note names the modes it holds for."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "qlora-qwen3-30b-a3b.yaml"
    monkeypatch.setenv("COLUMNS", "400")  # one line per note
    code, output = run_cli(monkeypatch, capsys, "estimate-vram", str(recipe))
    assert code in (0, None)
    notes = {line.split(": ")[0]: line for line in output.splitlines() if line.startswith("note")}
    assert set(notes) == {"note (none, true)", "note (unsloth)"}, notes
    assert "streamed" in notes["note (unsloth)"] and "streamed" not in notes["note (none, true)"]


# A rank of a gloo group (torchrun on CPU) meeting an error: the command's own exit, then the
# interpreter's, whose atexit hook says whether the teardown ran.
_GLOO_RANK = """
import atexit, sys
import torch.distributed as dist
if sys.argv[1] != "none":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
atexit.register(lambda: print("interpreter teardown", flush=True))
sys.argv = ["ftune", *sys.argv[2:]]
from ftune.cli import main
main()
"""


@pytest.mark.parametrize("debug", [False, True])
def test_an_error_under_a_gloo_group_exits_without_the_groups_teardown(tmp_path, debug):
    """gloo's teardown at interpreter exit can deadlock right after a backward (ftune.cli's
    _leave_process_group says why), and a rank that fails gets there as one that finishes does:
    it exits with the error's code and message (the traceback with --debug) and skips the
    teardown. Without a group the interpreter exits as usual."""
    missing = tmp_path / "missing.yaml"
    command = (["--debug"] if debug else []) + ["train", str(missing)]

    def rank(group: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _GLOO_RANK, group, *command], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    in_group = rank(str(tmp_path / "rendezvous"))
    output = in_group.stdout + in_group.stderr
    assert in_group.returncode == (1 if debug else 2), output
    assert ("Traceback" if debug else "Recipe file not found") in output and str(missing) in output
    assert "interpreter teardown" not in output
    if not debug:  # the hook itself runs where nothing skips the teardown
        alone = rank("none")
        assert alone.returncode == 2 and "interpreter teardown" in alone.stdout
