"""Nothing lost: a killed run resumes to the same result, SIGTERM saves, out-of-memory and NaN
losses end in a message with the last checkpoint intact, checkpoints are never half-written."""

from __future__ import annotations

import json
import os
import random
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
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run(out)
    assert result.returncode == 0, result.stderr
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


def test_sigterm_saves_then_resumes(tmp_path, reference):
    out = tmp_path / "run"
    process = subprocess.Popen(ftune_command(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(out, process, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Run the same command again" in stderr and "Traceback" not in stderr
    if (out / "summary.json").exists():
        pytest.skip("the run finished before the signal arrived")
    stopped_at = max(int(p.name.split("-")[1]) for p in checkpoints(out))
    assert stopped_at >= 3
    result = run(out)
    assert result.returncode == 0, result.stderr
    assert_same_run(out, reference)


def test_finished_run_is_not_rerun_or_overwritten(reference):
    before = adapter(reference)
    result = run(reference)
    assert result.returncode == 2 and "finished run" in result.stderr
    assert all(torch.equal(before[k], v) for k, v in adapter(reference).items())


def test_resume_refuses_a_different_recipe(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    for item in reference.iterdir():
        if item.name != "summary.json":
            os.system(f"cp -r '{item}' '{out}/'")
    result = run(out, "lora.r=8")
    assert result.returncode == 2
    assert "lora.r" in result.stderr and "different recipe" in result.stderr


def _run_in_process(monkeypatch, capsys, out: Path, *extra: str) -> tuple[int, str]:
    args = ["ftune", "train", str(QUICKSTART), "--set", f"training.output_dir={out}"]
    for item in [*SHORT, *extra]:
        args += ["--set", item]
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
