"""Checkpoints that a crash cannot half-write, and resuming from them.

Every `save_steps` (and when a run is stopped by a signal) the trainer writes
`checkpoint-N/` with the adapter, optimizer, scheduler, RNG states and trainer state (the step,
hence the data position). It is written in a staging folder and renamed into place, so a
`checkpoint-N` folder is always complete; the newest `save_total_limit` are kept.

A run resumes from the newest checkpoint when the output directory holds one of the same
recipe (keys that only lengthen or report a run may differ: see RESUMABLE_CHANGES).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.trainer_utils import rotate_checkpoints

from ftune.errors import OutputDirError
from ftune.outputs import RECIPE_FILE, SUMMARY_FILE
from ftune.recipe import Recipe

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"


def _restore_indexed_cpu(storage, location: str):
    # Under torchrun on CPU, transformers loads a checkpoint's optimizer state with
    # map_location=args.device, which is cpu:RANK there: a location torch.load does not know.
    return storage if location.startswith("cpu:") else None


torch.serialization.register_package(9, lambda storage: None, _restore_indexed_cpu)
# Keys that may change between a run and its resumption: how long it runs and how it reports.
RESUMABLE_CHANGES = {
    "training.max_steps", "training.epochs", "training.save_steps", "training.save_total_limit",
    "training.logging_steps", "training.output_dir", "name",
}


class AtomicCheckpoints:
    """Trainer mixin: `checkpoint-N` is written aside and renamed into place.

    Under several processes every rank writes its part (its RNG state; under FSDP its optimizer
    shard) into the one staging folder: rank 0 clears it first and renames it only once every
    rank is done.
    """

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        is_writer = self.args.should_save  # rank 0
        if is_writer:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank writes into a folder rank 0 is still clearing
        limit = self.args.save_total_limit
        # transformers writes into args.output_dir/checkpoint-N and rotates there: point it at the
        # staging folder for the write, rotate the real folder after the rename.
        self.args.output_dir, self.args.save_total_limit = staging, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = run_dir, limit
        self.accelerator.wait_for_everyone()  # every rank's part is written
        if not is_writer:
            return
        name = f"checkpoint-{self.state.global_step}"
        target = os.path.join(run_dir, name)
        if os.path.exists(target):  # saved again at the same step (a signal right after a save)
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        if limit:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, use_mtime=False)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in the output directory, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    return int(state["global_step"])


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def recipe_differences(saved: dict[str, Any], current: Recipe) -> list[str]:
    """Keys whose values differ between a run's saved recipe and this one (resumable keys aside)."""
    before, after = _flatten(saved), _flatten(current.resolved())
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k) and k not in RESUMABLE_CHANGES]


def find_resume_checkpoint(recipe: Recipe, output_dir: Path, *, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; raise if that would lose a run."""
    output_dir = Path(output_dir)
    if overwrite or not (output_dir / RECIPE_FILE).is_file():
        return None
    found = checkpoints(output_dir)
    saved = yaml.safe_load((output_dir / RECIPE_FILE).read_text()) or {}
    differences = recipe_differences(saved, recipe)
    if differences:
        if not found:
            return None  # an earlier run without checkpoints: the occupied-directory check reports it
        raise OutputDirError(
            f"training.output_dir {output_dir} holds checkpoints of a different recipe (it differs in "
            f"{', '.join(differences)}), so ftune will neither resume from them nor overwrite them.",
            hint=f"Use the recipe that run used ({output_dir / RECIPE_FILE}), choose another output_dir, "
            "or pass --overwrite to delete that run.",
        )
    if (output_dir / SUMMARY_FILE).is_file():
        done = json.loads((output_dir / SUMMARY_FILE).read_text()).get("steps", 0)
        if recipe.training.max_steps is None or recipe.training.max_steps <= done:
            raise OutputDirError(
                f"training.output_dir {output_dir} holds a finished run of this recipe ({done} steps).",
                hint="Raise training.max_steps to continue it, choose another output_dir, or pass --overwrite.",
            )
    return found[-1] if found else None
