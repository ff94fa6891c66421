"""What each activation-checkpointing mode costs for one recipe: a few training steps per mode, each mode in
its own process (clean memory numbers; an out-of-memory ends only its own row), the same seed and
the same batches for all.

`python -m ftune.compare --recipe R --mode M ...` is the worker: it builds the model as
`ftune train` does, runs the steps with AdamW (ftune/measure/step.py: the first a warm-up, the peak
and the median step time over the others), and prints one JSON line per event (`step`, `result`)
on stdout; its stderr is read only for the last line of a crash. The command `ftune compare`
(ftune/cli/compare.py) starts one worker per mode and gathers their results; this module imports
nothing of the CLI.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from typing import Any

import torch

from ftune.measure.stacks import FtuneStack
from ftune.measure.step import GiB, train_steps


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
    stack = FtuneStack(recipe, with_tokenizer=seq is None)
    built = stack.built
    batches = _batches(recipe, built, steps, seq, batch)
    measured = train_steps(
        stack.model, batches, learning_rate=recipe.training.learning_rate,
        autocast_dtype=built.dtype if built.dtype != torch.float32 else None,
        pad_id=built.tokenizer.pad_token_id if built.tokenizer is not None else None,
        max_grad_norm=recipe.training.max_grad_norm or math.inf,
        on_step=lambda step, loss: _emit("step", step=step, steps=steps, loss=loss),
    )
    return {
        "status": "ok",
        "device": measured.device,
        "peak_bytes": measured.peak_bytes,
        "reserved_bytes": measured.reserved_bytes,
        "memory_kind": measured.memory_kind,
        "host_bytes": stack.host_bytes(),
        "step_s": measured.step_s,
        "tokens_per_s": measured.tokens_per_s,
        "tokens_per_step": measured.tokens_per_step,
        "losses": measured.losses,
        "grad_norms": measured.grad_norms,
        "engine": stack.engine.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="ftune compare's worker: one activation-checkpointing mode")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--memory-cap-gib", type=float, default=None)
    args = parser.parse_args()

    from ftune.errors import FtuneError, first_line
    from ftune.recipe import load_recipe

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
