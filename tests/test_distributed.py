"""Data parallel: two gloo processes under torchrun give the gradients of one process over the
same global batch, in every checkpointing mode (the engine's recompute and offload under DDP)."""

from __future__ import annotations

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
