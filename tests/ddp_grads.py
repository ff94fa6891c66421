"""Run by tests/test_distributed.py under torchrun: each rank trains on its half of a fixed batch
through DDP (gloo), then rank 0 saves the averaged LoRA gradients, for each checkpointing mode
named (one launch for all of them: starting the processes costs more than the steps).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_grads.py MODE[,MODE...] OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import lora_grads, tiny_lora_model  # noqa: E402

BATCH = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def main(modes: str, out: str) -> None:
    """OUT holds {mode: {name: gradient}}."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    half = BATCH[rank * 2:(rank + 1) * 2]
    grads = {}
    for mode in modes.split(","):  # a new model and DDP wrapper for each mode
        model, _ = tiny_lora_model("tiny-llama", mode)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        # Two micro-batches accumulated, the first without DDP's all-reduce, as a trainer does.
        with ddp.no_sync():
            (ddp(input_ids=half[:1], labels=half[:1]).loss / 2).backward()
        (ddp(input_ids=half[1:], labels=half[1:]).loss / 2).backward()
        grads[mode] = lora_grads(model)
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Now and then gloo's teardown (destroy_process_group, or the interpreter's exit) hangs on this
    # 2-core machine, plain DDP with no ftune code included, after the results are written and
    # every rank passed the barrier: leave without it.
    os._exit(0)
