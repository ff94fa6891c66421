"""`ftune train` with failures injected from outside, for the reliability checks on the GPU
(benchmarks/gpu_reliability.sh). Nothing in ftune knows of it: each injection wraps a library
function before ftune.cli.main runs.

  FTUNE_INJECT_OOM_AT_STEP=N     at the start of step N, ask CUDA for more memory than the card has
                                 (a real torch.OutOfMemoryError, raised inside the training loop)
  FTUNE_INJECT_HOST_AVAILABLE=B  psutil reports B bytes of host memory available (offload's check)
  FTUNE_TIME_SAVES=1             print how long each checkpoint took to write

    python benchmarks/instrumented_train.py train RECIPE --set ...
"""

from __future__ import annotations

import os
import sys
import time
from collections import namedtuple


def install() -> None:
    oom_step = os.environ.get("FTUNE_INJECT_OOM_AT_STEP")
    if oom_step is not None:
        import torch
        from transformers import Trainer

        step = Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == int(oom_step):
                total = torch.cuda.get_device_properties(0).total_memory
                torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # raises torch.OutOfMemoryError
            return step(self, *args, **kwargs)

        Trainer.training_step = training_step
    available = os.environ.get("FTUNE_INJECT_HOST_AVAILABLE")
    if available is not None:
        import psutil

        real = psutil.virtual_memory
        memory = namedtuple("memory", "total available percent used free")

        def virtual_memory():
            actual = real()
            return memory(actual.total, int(available), actual.percent, actual.used, actual.free)

        psutil.virtual_memory = virtual_memory
    if os.environ.get("FTUNE_TIME_SAVES"):
        from ftune.checkpoints import AtomicCheckpoints

        save = AtomicCheckpoints._save_checkpoint

        def timed_save(self, model, trial):
            started = time.perf_counter()
            save(self, model, trial)
            print(f"checkpoint at step {self.state.global_step} written in {time.perf_counter() - started:.2f} s",
                  file=sys.stderr, flush=True)

        AtomicCheckpoints._save_checkpoint = timed_save


if __name__ == "__main__":
    install()
    from ftune.cli import main

    sys.argv[0] = "ftune"
    main()
