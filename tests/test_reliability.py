"""Nothing lost: a killed run resumes to the same result, SIGTERM saves, out-of-memory and NaN
losses end in a message with the last checkpoint intact, checkpoints are never half-written."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.checkpoints import checkpoints
from ftune.cli import main
from ftune.recipe import load_recipe
from tests import pausing_train
from tests.conftest import QUICKSTART, REPO

pytestmark = pytest.mark.slow

SHORT = ["training.max_steps=12", "training.save_steps=3", "training.save_total_limit=10", "training.logging_steps=1",
         "training.batch_size=4", "data.limit=200", "checkpointing.mode=unsloth"]


def ftune_command(out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "ftune", "train", str(QUICKSTART), "--set", f"training.output_dir={out}"]
    for item in [*SHORT, *extra]:
        args += ["--set", item]
    return args


def run(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(ftune_command(out, *extra), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=os.environ)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, trained in this process: the runs killed or stopped here, each in a
    process of its own, must end bit for bit as it does once resumed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["ftune", *ftune_command(out)[3:]])
        with pytest.raises(SystemExit) as caught:
            main()
    assert caught.value.code in (0, None)
    return out


def wait_for_checkpoint(out: Path, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [int(p.name.split("-")[1]) for p in checkpoints(out)]
        if done and max(done) >= at_least:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before checkpoint {at_least}: {process.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no checkpoint in time")


def assert_same_run(out: Path, reference: Path) -> None:
    assert losses(out) == losses(reference)
    expected, got = adapter(reference), adapter(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_sigkill_then_resume_gives_the_same_run(tmp_path, reference):
    out = tmp_path / "run"
    at_least = random.Random().choice([3, 6])  # a random point of the run
    process = subprocess.Popen(ftune_command(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out, process, at_least)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()
    result = run(out)  # the same command resumes
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    assert_same_run(out, reference)
    # summary.json covers the whole run: the killed process's part and the resumed one's
    whole, resumed = json.loads((reference / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert resumed["first_loss"] == whole["first_loss"] and resumed["final_loss"] == whole["final_loss"]
    assert resumed["tokens"] == whole["tokens"] and 0 < resumed["session"]["tokens"] < whole["tokens"]
    assert resumed["runtime_s"] > resumed["session"]["runtime_s"]


def test_sigterm_saves_then_resumes(tmp_path, reference, monkeypatch, capsys):
    out, paused = tmp_path / "run", tmp_path / "paused"
    command = [sys.executable, pausing_train.SCRIPT, *ftune_command(out)[3:]]  # waits after checkpoint 3
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=pausing_train.environment(3, paused))
    pausing_train.wait_until_paused(paused, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Run the same command again" in stderr and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    # the signal arrived in step 4's wait: that step finishes and is saved
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    # the same command, in this process (test_sigkill_then_resume_gives_the_same_run resumes in a new one)
    code, err = _run_in_process(monkeypatch, capsys, out)
    assert code in (0, None), err
    assert_same_run(out, reference)


def test_finished_run_is_not_rerun_or_overwritten(reference, monkeypatch, capsys):
    before = adapter(reference)
    code, err = _run_in_process(monkeypatch, capsys, reference)  # refused before any model loads: no process needed
    assert code == 2 and "finished run" in err
    assert all(torch.equal(before[k], v) for k, v in adapter(reference).items())


def test_resume_refuses_a_different_recipe(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for item in reference.iterdir():
        if item.name != "summary.json":
            os.system(f"cp -r '{item}' '{out}/'")
    code, err = _run_in_process(monkeypatch, capsys, out, "lora.r=8")
    assert code == 2
    assert "lora.r" in err and "different recipe" in err


def _run_in_process(monkeypatch, capsys, out: Path, *extra: str, overwrite: bool = False) -> tuple[int, str]:
    args = ["ftune", "train", str(QUICKSTART), "--set", f"training.output_dir={out}"]
    for item in [*SHORT, *extra]:
        args += ["--set", item]
    if overwrite:
        args.append("--overwrite")
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as caught:
        main()
    captured = capsys.readouterr()
    return caught.value.code, captured.err


def test_out_of_memory_gives_advice_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A simulated CUDA out-of-memory at step 8 (on CPU: the training step raises it)."""
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    out = tmp_path / "run"
    code, err = _run_in_process(monkeypatch, capsys, out)
    assert code == 4
    assert "out of memory at step 7" in err and "training.batch_size: 2" in err and "Traceback" not in err
    assert "estimate-vram predicts" in err
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    assert (out / "checkpoint-6" / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 4 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    code, err = _run_in_process(monkeypatch, capsys, out, "training.nan_patience=2")
    assert code == 5
    assert "NaN or infinite for 2" in err and "checkpoint-3" in err
    # steps 5 and 6 were NaN; the checkpoint due at step 6 was not written
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]


def test_a_crash_while_saving_leaves_no_partial_checkpoint(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 6:
            raise RuntimeError("disk full")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    out = tmp_path / "run"
    code, _ = _run_in_process(monkeypatch, capsys, out)
    assert code == 1
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]  # checkpoint-6 never appeared half-written


def test_host_memory_shortfall_is_reported_before_training(monkeypatch):
    from collections import namedtuple

    import ftune.guards as guards
    from ftune.recipe import load_recipe

    recipe = load_recipe(QUICKSTART)
    assert guards.host_memory_shortfall(recipe, cuda=True) is None  # the quickstart needs a few MiB
    memory = namedtuple("memory", "available total")
    monkeypatch.setattr(guards.psutil, "virtual_memory", lambda: memory(available=1024, total=2048))
    message = guards.host_memory_shortfall(recipe, cuda=True)
    assert "host memory is short" in message and "checkpointing.mode: true" in message
    assert guards.host_memory_shortfall(load_recipe(QUICKSTART, ["checkpointing.mode=true"]), cuda=True) is None


# -- nothing lost ------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_holding_files_ftune_did_not_write(tmp_path, monkeypatch, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    code, err = _run_in_process(monkeypatch, capsys, out, "training.max_steps=1", overwrite=True)
    assert code == 2 and "cat.jpg" in err and "Nothing was deleted" in err and "bug" not in err
    assert (out / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"


def test_overwrite_never_deletes_the_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "important.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    code, err = _run_in_process(monkeypatch, capsys, Path("."), "training.max_steps=1", overwrite=True)
    assert code == 2 and "current directory" in err and "bug" not in err
    assert (tmp_path / "important.txt").read_text() == "keep me"
    code, err = _run_in_process(monkeypatch, capsys, Path("."), "training.max_steps=1")
    assert code == 2 and "output_dir=.-2" not in err and "runs/" in err


def test_overwrite_deletes_an_earlier_run_and_only_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run_in_process(monkeypatch, capsys, out, "training.max_steps=2", "training.save_steps=1")[0] in (0, None)
    code, err = _run_in_process(monkeypatch, capsys, out, "training.max_steps=1", "lora.r=4", overwrite=True)
    assert code in (0, None), err
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def killing_command(out: Path, at_step: int, *extra: str) -> list[str]:
    """ftune_command whose process kills itself (SIGKILL: no handler, no cleanup) as step `at_step` begins."""
    kill = ("import os, signal, sys; from transformers import Trainer; step = Trainer.training_step\n"
            "def training_step(self, *a, **k):\n"
            f"    if self.state.global_step == {at_step}: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return step(self, *a, **k)\n"
            "Trainer.training_step = training_step\n"
            "from ftune.cli import main; sys.argv = ['ftune', *sys.argv[1:]]; main()\n")
    return [sys.executable, "-c", kill, *ftune_command(out, *extra)[3:]]


def test_sigkill_before_the_first_checkpoint_then_the_same_command_trains_to_the_end(tmp_path, reference, monkeypatch,
                                                                                     capsys):
    out = tmp_path / "run"
    killed = subprocess.run(killing_command(out, 2), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and not checkpoints(out)
    assert len(losses(out)) == 2  # the two steps it logged
    code, err = _run_in_process(monkeypatch, capsys, out)  # the same command, in this process
    assert code in (0, None), err
    assert "before its first checkpoint" in err and "metrics-interrupted-1.jsonl" in err
    assert (out / "metrics-interrupted-1.jsonl").is_file()
    assert_same_run(out, reference)


def _copy_run_to(reference: Path, out: Path, newest: int) -> None:
    """The reference run as it was when checkpoint `newest` had just been written."""
    out.mkdir()
    shutil.copy(reference / "recipe.yaml", out)
    for folder in checkpoints(reference):
        if int(folder.name.split("-")[1]) <= newest:
            shutil.copytree(folder, out / folder.name)
    kept = [line for line in (reference / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= newest]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def test_checkpoint_manifest_finds_any_damaged_file(tmp_path, reference):
    from ftune.checkpoints import checkpoint_problem

    source = checkpoints(reference)[0]
    assert checkpoint_problem(source) is None
    names = sorted(p.name for p in source.iterdir() if p.is_file() and p.name != "ftune-checkpoint.json")
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt"} <= set(names)
    for name in names:
        damaged = tmp_path / name
        shutil.copytree(source, damaged)
        data = (damaged / name).read_bytes()
        (damaged / name).write_bytes(data[: len(data) // 2])
        assert name in checkpoint_problem(damaged), name


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path, reference, monkeypatch, capsys):
    # any file of a checkpoint, found damaged by its manifest: test_checkpoint_manifest_finds_any_damaged_file
    damaged = "optimizer.pt"
    out = tmp_path / "run"
    _copy_run_to(reference, out, newest=9)
    path = out / "checkpoint-9" / damaged
    path.write_bytes(path.read_bytes()[:100])
    code, err = _run_in_process(monkeypatch, capsys, out)
    assert code in (0, None), err
    assert "passing over checkpoint-9" in err and "resuming from" in err
    assert "checkpoint-6" in err and "Traceback" not in err
    assert_same_run(out, reference)
    from ftune.checkpoints import checkpoint_problem

    assert checkpoint_problem(out / "checkpoint-9") is None  # written anew when the run passed step 9 again


def test_no_sound_checkpoint_is_a_clear_error_and_nothing_is_deleted(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    _copy_run_to(reference, out, newest=3)
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    code, err = _run_in_process(monkeypatch, capsys, out)
    assert code == 2 and "no checkpoint there can be resumed" in err
    assert "optimizer.pt" in err and "bug" not in err
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_after_a_diverged_run_a_lower_learning_rate_continues_from_a_finite_checkpoint(tmp_path, reference, monkeypatch,
                                                                                      capsys):
    out = tmp_path / "run"
    code, err = _run_in_process(monkeypatch, capsys, out, "training.learning_rate=1e10", "training.save_steps=2",
                                "training.nan_patience=2")
    assert code == 5, err
    named = re.search(r"finite weights is (\S+checkpoint-(\d+))\.", err)
    assert named, err
    from ftune.checkpoints import checkpoint_problem

    assert checkpoint_problem(Path(named.group(1))) is None
    step = int(named.group(2))
    # the fix the message advises: the same command with a lower learning rate continues the run
    code, err = _run_in_process(monkeypatch, capsys, out, "training.learning_rate=1e-4", "training.save_steps=2",
                                "training.nan_patience=2")
    assert code != 2 and "different recipe" not in err, err
    assert "training.learning_rate changed from 10000000000.0 to 0.0001" in err
    # at the schedule's same point as an uninterrupted run, scaled to the new rate
    quickstart_rate = load_recipe(QUICKSTART).training.learning_rate
    expected = {r["step"]: r["learning_rate"] * 1e-4 / quickstart_rate for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())}
    continued = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] > step]
    assert continued and all(r["learning_rate"] == pytest.approx(expected[r["step"]]) for r in continued)


def test_a_finished_run_continues_when_max_steps_is_raised(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run_in_process(monkeypatch, capsys, out, "training.max_steps=3", "training.save_steps=null")[0] in (0, None)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]  # the last step is always saved
    code, err = _run_in_process(monkeypatch, capsys, out, "training.max_steps=5", "training.save_steps=null")
    assert code in (0, None), err
    assert "resuming from" in err and "training.max_steps changed from 3 to 5" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


def test_the_saved_recipe_validates_in_its_run_folder(tmp_path, monkeypatch, capsys):
    from ftune.recipe import load_recipe

    out = tmp_path / "run"
    assert _run_in_process(monkeypatch, capsys, out, "training.max_steps=1")[0] in (0, None)
    monkeypatch.chdir(tmp_path)
    saved = load_recipe(out / "recipe.yaml")  # its input paths checked from there
    assert Path(saved.data.source).is_absolute() and Path(saved.model.tokenizer).is_dir()


@pytest.mark.parametrize("continues_an_adapter", [True, False], ids=["sft-adapter", "new-adapter"])
def test_a_dpo_run_resumes_its_trained_adapter(tmp_path, monkeypatch, capsys, continues_an_adapter):
    """A DPO run finished after 2 steps and continued to 4 ends as the run of 4 steps in one go:
    resumed with its trained adapter, not the one it started from. Continuing an adapter, each
    checkpoint holds TRL's frozen copy of it, `ref` (ref/), beside it; a new adapter's reference is
    the base model, and its run holds no copy."""

    def train(recipe: Path, out: Path, *extra: str) -> None:
        args = ["ftune", "train", str(recipe)]
        for item in (*extra, "training.save_steps=null", "training.batch_size=4", "training.logging_steps=1",
                     "data.limit=40", "model.dtype=float32", f"training.output_dir={out}"):
            args += ["--set", item]
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as caught:
            main()
        assert caught.value.code in (0, None), capsys.readouterr().err

    start = "null"
    if continues_an_adapter:
        start = str(tmp_path / "sft")
        train(QUICKSTART, tmp_path / "sft", "training.max_steps=2")
    recipe = REPO / "recipes" / "dpo-quickstart.yaml"
    straight, continued = tmp_path / "straight", tmp_path / "continued"
    train(recipe, straight, f"model.adapter={start}", "training.max_steps=4")
    train(recipe, continued, f"model.adapter={start}", "training.max_steps=2")
    assert (continued / "checkpoint-2" / "ref").is_dir() == continues_an_adapter
    train(recipe, continued, f"model.adapter={start}", "training.max_steps=4")
    assert losses(continued) == losses(straight)
    expected, got = adapter(straight), adapter(continued)
    assert expected.keys() == got.keys() and all(torch.equal(got[name], expected[name]) for name in expected)
