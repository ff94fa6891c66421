"""What each checkpointing mode costs for one recipe: a few training steps per mode, each mode in
its own process (clean memory numbers; an out-of-memory ends only its own row), the same seed and
the same batches for all.

`python -m ftune.compare --recipe R --mode M ...` is the worker: it builds the model as
`ftune train` does, runs the steps with AdamW, and prints one JSON line per event (`step`,
`result`). The command `ftune compare` starts one worker per mode and gathers their results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from typing import Any

import torch

GiB = 1024**3


def _emit(kind: str, **data: Any) -> None:
    print(json.dumps({"event": kind, **data}), flush=True)


def _batches(recipe, built, steps: int, seq: int | None, batch: int) -> list[torch.Tensor]:
    """The same token batches for every mode: random ids of a fixed seed at --seq, else the data."""
    generator = torch.Generator().manual_seed(recipe.training.seed)
    vocab = built.model.get_input_embeddings().num_embeddings
    if seq is not None or built.tokenizer is None:
        length = seq or recipe.data.max_length
        return [torch.randint(0, vocab, (batch, length), generator=generator) for _ in range(steps)]
    from ftune.data import load_training_data

    dataset, data_format = load_training_data(recipe)
    tokenizer = built.tokenizer
    texts = []
    for row in dataset:
        if data_format == "messages":
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif data_format == "prompt_completion":
            texts.append(row["prompt"] + row["completion"])
        else:
            texts.append(row["text"])
        if len(texts) == steps * batch:
            break
    while len(texts) < steps * batch:  # a tiny dataset: cycle it
        texts += texts[: steps * batch - len(texts)]
    encoded = tokenizer(texts, truncation=True, max_length=recipe.data.max_length, padding="longest",
                        return_tensors="pt")["input_ids"]
    return [encoded[i * batch:(i + 1) * batch] for i in range(steps)]


def run_mode(recipe, *, steps: int, seq: int | None, batch: int) -> dict[str, Any]:
    """Train `steps` steps in the recipe's mode; memory, speed, losses and gradient norms."""
    from ftune.memory.monitor import snapshot
    from ftune.model import build_model

    built = build_model(recipe, with_tokenizer=seq is None)
    model, device = built.model, built.device
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.training.learning_rate)
    batches = _batches(recipe, built, steps, seq, batch)
    pad = built.tokenizer.pad_token_id if built.tokenizer is not None else None
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=built.dtype, enabled=cuda and built.dtype != torch.float32)
    losses, grad_norms, times = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_peak = 0
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        labels = ids.masked_fill(ids == pad, -100) if pad is not None else ids
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, recipe.training.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        grad_norms.append(norm.item())
        rss_peak = max(rss_peak, snapshot(device).rss)
        _emit("step", step=step + 1, steps=steps, loss=losses[-1])
        del loss
    timed = times[1:] or times  # the first step pays for allocation and compilation
    memory = snapshot(device, built.engine.host_bytes())
    tokens = int(batches[0].numel())
    return {
        "status": "ok",
        "device": memory.device,
        "peak_bytes": memory.peak if cuda else rss_peak,
        "reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "memory_kind": "peak allocated VRAM" if cuda else "peak RSS (CPU)",
        "host_bytes": built.engine.host_bytes(),
        "step_s": statistics.median(timed),
        "tokens_per_s": tokens / statistics.median(timed),
        "tokens_per_step": tokens,
        "losses": losses,
        "grad_norms": grad_norms,
        "engine": built.engine.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="ftune compare's worker: one checkpointing mode")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--memory-cap-gib", type=float, default=None)
    args = parser.parse_args()

    from ftune.cli import _quiet_libraries
    from ftune.errors import FtuneError, first_line
    from ftune.recipe import load_recipe

    _quiet_libraries()
    if args.memory_cap_gib is not None:
        _cap_memory(args.memory_cap_gib)
    try:
        recipe = load_recipe(args.recipe, [*args.overrides, f"checkpointing.mode={args.mode}"])
        if args.seq:
            recipe.data.max_length = args.seq
        batch = args.batch or recipe.training.batch_size
        result = run_mode(recipe, steps=args.steps, seq=args.seq, batch=batch)
    except (torch.OutOfMemoryError, MemoryError) as error:
        result = {"status": "oom", "error": f"out of memory: {first_line(error)}"}
    except RuntimeError as error:  # torch's CPU allocator reports running out as a RuntimeError
        if "allocate" not in str(error) and "out of memory" not in str(error):
            raise
        result = {"status": "oom", "error": f"out of memory: {first_line(error)}"}
    except FtuneError as error:
        result = {"status": "error", "error": error.message}
    _emit("result", mode=args.mode, **result)
    gc.collect()
def _cap_memory(gib: float) -> None:
    """A memory cap for this process: a fraction of the GPU, or the address space on CPU."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GiB / total))
    else:
        import resource

        limit = int(gib * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


if __name__ == "__main__":
    sys.exit(main())
