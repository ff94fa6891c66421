"""Run by tests/test_distributed.py under torchrun: each of two gloo ranks trains on its half of a
fixed batch, for each checkpointing mode named, under two strategies, and rank 0 saves the LoRA
gradients of each. One launch for all of them: starting the processes costs more than the steps.

- ddp: the tiny LoRA Llama of tests/helpers.py through DDP, two micro-batches accumulated;
  the averaged gradients.
- fsdp: the 4-bit LoRA model that ftune builds for distributed.strategy fsdp, sharded with FSDP2
  as accelerate shards it (each decoder layer its own unit, then the LM head's group, then the
  root); the gradients gathered whole.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_grads.py MODE[,MODE...] OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftune.engine.recompute import decoder_layers  # noqa: E402
from ftune.integrations.bitsandbytes import REPACK_ATTRIBUTE, is_4bit  # noqa: E402
from ftune.model import build_model  # noqa: E402
from ftune.recipe import validate_recipe  # noqa: E402
from tests.helpers import lora_grads, tiny_lora_model  # noqa: E402

BATCH = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(0))


def fsdp_model(mode: str):
    """ftune's 4-bit tiny Llama for fsdp, the fused loss on (Triton's interpreter on CPU), LoRA B
    drawn non-zero so that every gradient is exercised."""
    recipe = validate_recipe({
        "model": {"preset": "tiny-llama", "tokenizer": "(none)", "dtype": "float32"},
        "quantization": {"method": "nf4"},
        "lora": {"r": 4, "alpha": 8},
        "checkpointing": {"mode": mode},
        # the fused loss reads the LM head's weight without calling the head (FSDP's hooks)
        "kernels": {"fused_cross_entropy": True},
        "data": {"source": "(none)"},
        "distributed": {"strategy": "fsdp"},
    }, base_dir=Path(__file__).parent, check_paths=False)
    built = build_model(recipe, with_tokenizer=False)
    # The ranks (subprocesses, which tests/conftest.py's forced CPU check does not reach) and the
    # reference in the test's process must take one bitsandbytes kernel on any CPU: build_model
    # turns off the repack that AVX512-BF16 CPUs would otherwise do (ftune/integrations/bitsandbytes.py).
    layers = [m for m in built.model.modules() if is_4bit(m)]
    assert layers and not any(getattr(m, REPACK_ATTRIBUTE) for m in layers)
    torch.manual_seed(1)
    for name, parameter in built.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return built.model


def ddp_gradients(mode: str, half: torch.Tensor) -> dict[str, torch.Tensor]:
    model, _ = tiny_lora_model("tiny-llama", mode)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    # Two micro-batches accumulated, the first without DDP's all-reduce, as a trainer does.
    with ddp.no_sync():
        (ddp(input_ids=half[:1], labels=half[:1]).loss / 2).backward()
    (ddp(input_ids=half[1:], labels=half[1:]).loss / 2).backward()
    return lora_grads(model)


def fsdp_gradients(model, mesh, half: torch.Tensor) -> dict[str, torch.Tensor]:
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    base = model.get_base_model()
    fully_shard([base.model.norm, base.lm_head], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    model(input_ids=half, labels=half).loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.grad is not None:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
    return grads


def main(modes: str, out: str) -> None:
    """OUT holds {"ddp": {mode: gradients}, "fsdp": {mode: gradients}}."""
    torch.set_num_threads(1)
    modes = modes.split(",")
    # Before the process group: with one initialized, transformers' save_pretrained (building the
    # preset) writes its config from rank 0 only, and rank 1 could publish a folder without one.
    sharded = {mode: fsdp_model(mode) for mode in modes}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    half = BATCH[rank * 2:(rank + 1) * 2]
    grads = {"ddp": {mode: ddp_gradients(mode, half) for mode in modes}}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    grads["fsdp"] = {mode: fsdp_gradients(model, mesh, half) for mode, model in sharded.items()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Gloo's teardown (destroy_process_group, or the interpreter's exit) can deadlock after the
    # results are written, plain DDP with no ftune code included: see ftune.cli's
    # _leave_process_group. Leave without it.
    os._exit(0)
