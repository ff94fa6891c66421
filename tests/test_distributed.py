"""Data parallel: two gloo processes under torchrun give the gradients of one process over the
same global batch, in every checkpointing mode (the engine's recompute and offload under DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.ddp_grads import BATCH
from tests.helpers import lora_grads, tiny_lora_model

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "ddp_grads.py")


@pytest.mark.parametrize("mode", ["none", "true", "unsloth"])
def test_two_processes_equal_one(mode, tmp_path):
    out = tmp_path / "grads.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             WORKER, mode, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(out)
    single, _ = tiny_lora_model("tiny-llama", mode)
    # One process, the same global batch: each micro-batch holds the two ranks' sequences.
    for ids in (BATCH[[0, 2]], BATCH[[1, 3]]):
        (single(input_ids=ids, labels=ids).loss / 2).backward()
    expected = lora_grads(single)
    assert distributed.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(distributed[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_ftune_train_under_torchrun_matches_one_process(tmp_path):
    """ftune train on 2 gloo processes (batch 2 each) logs the losses of 1 process with batch 4;
    only rank 0 writes the outputs, and metrics.jsonl holds every rank's memory."""
    common = ["--set", "training.max_steps=4", "--set", "training.logging_steps=1", "--set", "data.limit=64"]
    quickstart = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ftune", "train", quickstart, "--set", f"training.output_dir={tmp_path / 'two'}",
                          "--set", "training.batch_size=2", *common], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ftune", "train", quickstart, "--set",
                          f"training.output_dir={tmp_path / 'one'}", "--set", "training.batch_size=4", *common],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert [r["loss"] for r in records["two"]] == pytest.approx([r["loss"] for r in records["one"]], abs=1e-5)
    assert all(len(r["ranks"]) == 2 for r in records["two"])
    assert two.stderr.count("run finished") == 1  # rank 0 reports; rank 1 only trains
