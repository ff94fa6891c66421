"""Trainer checkpoints that a crash cannot half-write or silently spoil, and resuming from them.

Every `save_steps`, every `save_minutes` of training, at the last step, and when a run is stopped
by a signal, the trainer writes `checkpoint-N/` with the adapter, optimizer, scheduler, RNG states
and trainer state (the step, hence the data position). It is written in a staging folder and
renamed into place, so a `checkpoint-N` folder is always whole when it appears; the newest
`save_total_limit` are kept. Each carries a manifest (MANIFEST) of its files' sizes and SHA-256,
checked before resuming: a checkpoint damaged later (a full disk, a copy cut short) or holding
non-finite weights is passed over for the newest sound one, and nothing is deleted.

The output directory of a run resumes when it holds a run of the same recipe: keys that only
lengthen, report or steer the rest of a run may differ (RESUMABLE_CHANGES), and each difference is
named when the run continues.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback

from ftune.errors import OutputDirError
from ftune.integrations.transformers_trainer import EveryAdapterResumed, StagedCheckpoints
from ftune.outputs import RECIPE_FILE, SUMMARY_FILE
from ftune.recipe import Recipe

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "ftune-checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Keys that may change between a run and its continuation: how long it runs, how it reports and
# saves, and the optimizer's step size and clipping (the usual fix after a loss that diverged).
RESUMABLE_CHANGES = {
    "training.max_steps", "training.epochs", "training.save_steps", "training.save_minutes",
    "training.save_total_limit", "training.logging_steps", "training.output_dir", "training.nan_patience",
    "training.learning_rate", "training.lr_scheduler", "training.warmup_steps", "training.max_grad_norm", "name",
}


def _agree(flag: bool, *, every: bool) -> bool:
    """Under several processes, one decision for all: any rank's flag (every=False) or all ranks'."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX)
    return bool(value.item())


def trainable_weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters() if p.requires_grad)


class AtomicCheckpoints(StagedCheckpoints, EveryAdapterResumed):
    """Trainer mixin: `checkpoint-N` is written aside with a manifest and renamed into place
    (integrations.transformers_trainer.StagedCheckpoints); a checkpoint whose trainable weights are
    not finite is not written at all; a resumed checkpoint restores every adapter it holds
    (EveryAdapterResumed)."""

    # Training seconds of the run before this process (read from the checkpoint it resumed).
    run_seconds_before = 0.0
    # The steps whose checkpoint was not written because the weights were not finite.
    skipped_non_finite: list[int]

    def train(self, *args, **kwargs):
        self._ftune_started = time.perf_counter()
        self.skipped_non_finite = []
        return super().train(*args, **kwargs)

    def run_seconds(self) -> float:
        return self.run_seconds_before + time.perf_counter() - getattr(self, "_ftune_started", time.perf_counter())

    def checkpoint_wanted(self) -> bool:
        if _agree(trainable_weights_finite(self.model), every=True):
            return True
        self.skipped_non_finite.append(self.state.global_step)
        return False

    def checkpoint_staged(self, folder: Path) -> None:
        write_manifest(folder, run_seconds=self.run_seconds(), tokens=self.state.num_input_tokens_seen or 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, *, run_seconds: float, tokens: int) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"files": files, "run_seconds": round(run_seconds, 3), "tokens": tokens}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (damaged or non-finite), or None when it is sound."""
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, OSError):
            return f"its {MANIFEST} is unreadable"
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{name} has {size:,} bytes where {expected['bytes']:,} were written"
            if _sha256(path) != expected["sha256"]:
                return f"{name} differs from what was written (checksum)"
    else:  # written before ftune kept manifests: the files must at least read
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (ValueError, OSError) as error:
            return f"trainer_state.json is unreadable ({type(error).__name__})"
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types for a damaged file
            return f"{ADAPTER_WEIGHTS} is unreadable ({type(error).__name__})"
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            return "its adapter weights are NaN or infinite"
    return None


def manifest_figures(folder: Path) -> dict[str, Any]:
    """The whole-run figures a checkpoint's manifest recorded (training seconds, tokens)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (ValueError, OSError):
        return {}


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in the output directory, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def newest_sound_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that is whole and finite, and a line for each newer one passed over."""
    passed_over = []
    for folder in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, passed_over
        passed_over.append(f"{folder.name}: {problem}")
    return None, passed_over


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


def recipe_changes(saved: dict[str, Any], current: Recipe) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between a run's saved recipe and this one: (before, after).

    Input paths compare by the place they name: a saved recipe holds them absolute (runs saved by
    earlier versions of ftune, as written in the recipe).
    """
    before = _flatten(saved)
    after, written = _flatten(current.resolved(absolute_inputs=True)), _flatten(current.resolved())
    keys = sorted(set(before) | set(after))
    return {k: (before.get(k), after.get(k)) for k in keys
            if before.get(k) != after.get(k) and before.get(k) != written.get(k)}


@dataclass
class Continuation:
    """How a run starts in its output directory: afresh, from a checkpoint, or again from step 0
    after a run that stopped before its first checkpoint."""

    checkpoint: Path | None = None
    restart: bool = False
    notices: list[str] = field(default_factory=list)


def plan_continuation(recipe: Recipe, output_dir: Path, *, overwrite: bool) -> Continuation | None:
    """None for a fresh run; else where to continue. Raise if going on would lose or mix runs."""
    output_dir = Path(output_dir)
    if overwrite or not (output_dir / RECIPE_FILE).is_file():
        return None
    try:
        saved = yaml.safe_load((output_dir / RECIPE_FILE).read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        return None  # not an ftune run's recipe: the occupied-directory check reports the folder
    changes = recipe_changes(saved, recipe)
    fixed = sorted(k for k in changes if k not in RESUMABLE_CHANGES)
    found = checkpoints(output_dir)
    if fixed:
        raise OutputDirError(
            f"training.output_dir {output_dir} holds {'checkpoints' if found else 'an earlier run'} of a different "
            f"recipe (it differs in {', '.join(fixed)}), so ftune will neither continue it nor overwrite it.",
            hint=f"Use the recipe that run used ({output_dir / RECIPE_FILE}), choose another output_dir, "
            "or pass --overwrite to delete that run.",
        )
    notices = [f"continuing with {key} changed from {before} to {after}"
               for key, (before, after) in changes.items() if key not in ("training.output_dir", "name")]
    finished = output_dir / SUMMARY_FILE
    if finished.is_file():
        try:
            done = int(json.loads(finished.read_text()).get("steps", 0))
        except (ValueError, OSError, TypeError):
            done = 0
        if recipe.training.max_steps is None or recipe.training.max_steps <= done:
            raise OutputDirError(
                f"training.output_dir {output_dir} holds a finished run of this recipe ({done} steps).",
                hint=f"Raise training.max_steps above {done} to continue it, choose another output_dir, "
                "or pass --overwrite.",
            )
    checkpoint, passed_over = newest_sound_checkpoint(output_dir)
    for line in passed_over:
        notices.append(f"passing over {line}")
    if checkpoint is not None:
        return Continuation(checkpoint=checkpoint, notices=notices)
    if found:
        raise OutputDirError(
            f"training.output_dir {output_dir}: no checkpoint there can be resumed from ("
            + "; ".join(passed_over) + "). Nothing was deleted.",
            hint="Restore a checkpoint from a backup, or pass --overwrite to start the run again from step 0.",
        )
    if finished.is_file():
        raise OutputDirError(
            f"training.output_dir {output_dir} holds a finished run without a checkpoint to continue from "
            "(it was trained by an earlier version of ftune, which kept none at the end).",
            hint="Start a new run that continues its adapter: --set model.adapter=" + str(output_dir)
            + " with another output_dir.",
        )
    notices.append("the earlier run stopped before its first checkpoint; starting again from step 0")
    return Continuation(restart=True, notices=notices)


class SaveEveryMinutes(TrainerCallback):
    """A checkpoint after each `minutes` of training (at the end of the step that crosses them),
    beside those every save_steps: a crash loses at most that much."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None:
            return control
        if _agree(time.perf_counter() - self.last >= self.seconds, every=False):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = time.perf_counter()
