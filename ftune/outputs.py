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
import re
import shutil
from pathlib import Path
from typing import Any

from ftune.errors import OutputDirError

RECIPE_FILE = "recipe.yaml"
SUMMARY_FILE = "summary.json"


# What ftune writes in a run's output directory. `--overwrite` deletes these and nothing else: a
# folder that holds anything more is not a run's, and is refused.
_RUN_ENTRIES = re.compile(
    r"^(recipe\.yaml|summary\.json|metrics(-interrupted-\d+)?\.jsonl|README\.md|adapter_config\.json"
    r"|adapter_model\.safetensors|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
    r"|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)|merges\.txt|checkpoint-\d+|\.staging"
    # DPO's reference adapter (TRL's frozen copy), the trackers' local stores (training.report_to)
    r"|ref|tensorboard|mlruns|wandb|trackio"
    r"|\.adapter\.tmp\d+|\..+\.tmp\d+)$"
)


def foreign_entries(path: Path) -> list[str]:
    """What a folder holds beyond what an ftune run writes (sorted names)."""
    return sorted(p.name for p in Path(path).iterdir() if not _RUN_ENTRIES.match(p.name))


def _protected(path: Path, recipe_dir: Path | None) -> str | None:
    """Why `path` must never be deleted as an output directory, or None."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory or one of its parents"
    if resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        return "it is your home or the file system's root"
    if recipe_dir is not None and (resolved == Path(recipe_dir).resolve() or resolved in Path(recipe_dir).resolve().parents):
        return "it holds the recipe file"
    return None


def _another_dir_hint(path: Path) -> str:
    name = path.resolve().name
    alternative = f"runs/{name}-2" if path.name in ("", ".", "..") or _protected(path, None) else f"{path}-2"
    return f"--set training.output_dir={alternative}"


def check_output_dir(path: Path, *, overwrite: bool, recipe_dir: Path | None = None) -> None:
    """Raise if the output directory holds files that a run would overwrite (and overwrite is
    off), or, with overwrite, anything ftune did not write there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(
            f"training.output_dir {path} is a file, not a directory.",
            hint="Choose another path with --set training.output_dir=runs/NAME.",
        )
    if not path.is_dir() or not any(path.iterdir()):
        return
    protected = _protected(path, recipe_dir)
    foreign = foreign_entries(path)
    if overwrite and (protected or foreign):
        why = protected or ("it holds files ftune did not write: " + ", ".join(foreign[:5])
                            + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""))
        raise OutputDirError(
            f"--overwrite would delete training.output_dir {path}, but {why}; ftune deletes only a folder that "
            "holds nothing but an earlier ftune run. Nothing was deleted.",
            hint=f"Choose an output directory of its own ({_another_dir_hint(path)}), or move those files away.",
        )
    if not overwrite:
        earlier = "an earlier ftune run" if (path / RECIPE_FILE).exists() and not foreign else "files"
        remedy = "" if protected or foreign else ", or pass --overwrite to delete that run"
        raise OutputDirError(
            f"training.output_dir {path} already holds {earlier}; ftune does not write over it.",
            hint=f"Choose another directory ({_another_dir_hint(path)}){remedy}.",
        )


def prepare_output_dir(path: Path, *, overwrite: bool, recipe_dir: Path | None = None) -> Path:
    """Create the output directory; with overwrite, delete what an earlier run wrote there (and
    nothing else: check_output_dir refuses a folder with anything more)."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite, recipe_dir=recipe_dir)
    if overwrite and path.is_dir():
        for entry in path.iterdir():
            if _RUN_ENTRIES.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
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
    to the run's files, each file renamed into place: in sub-folders too (peft saves each adapter
    but `default` in one of its name, DPO's `ref`), which a continued run finds there already."""
    staging = output_dir / f".adapter.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=weights)
    tokenizer.save_pretrained(staging)
    _move_into(staging, output_dir)


def _move_into(folder: Path, target: Path) -> None:
    """Rename each file of `folder` to the same place under `target` (folders made as needed), then
    remove `folder`."""
    target.mkdir(exist_ok=True)
    for item in folder.iterdir():
        if item.is_dir() and not item.is_symlink():
            _move_into(item, target / item.name)
        else:
            os.replace(item, target / item.name)
    folder.rmdir()
