"""The output directory of a run: what it holds, and the rule that an earlier run in it is never
overwritten silently. Files are written aside and renamed into place, so a crash leaves either
the old file or the new one, never half of one.

A finished run's directory holds the adapter in PEFT format (adapter_config.json,
adapter_model.safetensors; `PeftModel.from_pretrained(base, output_dir)` loads it), the
tokenizer, recipe.yaml (the resolved recipe), metrics.jsonl and summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ftune.errors import OutputDirError

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"


def check_output_dir(path: Path, *, overwrite: bool) -> None:
    """Raise if the output directory holds files that a run would overwrite (and overwrite is off)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(
            f"training.output_dir {path} is a file, not a directory.",
            hint="Choose another path with --set training.output_dir=runs/NAME.",
        )
    if not overwrite and path.is_dir() and any(path.iterdir()):
        earlier = "an earlier ftune run" if (path / RECIPE_FILE).exists() else "files"
        raise OutputDirError(
            f"training.output_dir {path} already holds {earlier}; ftune does not overwrite it silently.",
            hint=f"Choose another directory (--set training.output_dir={path}-2), or pass --overwrite "
            "to delete what is there.",
        )


def prepare_output_dir(path: Path, *, overwrite: bool) -> Path:
    """Create the output directory; with overwrite, delete what an earlier run left there."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    if overwrite and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def gather_sharded_adapter(model) -> dict[str, Any]:
    """The adapter's weights whole, on CPU, from a model whose weights FSDP sharded across ranks.

    Every rank must call it (each weight is all-gathered, in the same order on all ranks); rank 0
    saves the result. peft's own save would read the local shards' freed storage.
    """
    from torch.distributed.tensor import DTensor

    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            whole = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            weights[name] = whole.detach().to("cpu")
    return weights


def save_adapter(model, tokenizer, output_dir: Path, weights: dict[str, Any] | None = None) -> None:
    """Save the adapter (from `weights` when given: see gather_sharded_adapter) and tokenizer next
    to the run's files, each file renamed into place."""
    staging = output_dir / f".adapter.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=weights)
    tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()
