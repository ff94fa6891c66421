"""transformers' Trainer as ftune's runs change it. Checked against transformers 5.17.0 (torch 2.13).

- `StagedCheckpoints` overrides the private `Trainer._save_checkpoint(model, trial)`: the trainer
  writes `checkpoint-N` into a staging folder, which is renamed into place once whole. It relies on
  `_save_checkpoint` writing into `args.output_dir/checkpoint-{state.global_step}` as it reads
  `args.output_dir` at the call, and rotating there only when `args.save_total_limit` is set.
- `BestCheckpoint` corrects `state.best_model_checkpoint`, which transformers records by the path
  it wrote (the staging folder's), and rotates as transformers' own rotation does.
- `ContinueWithNewLearningRate` rewrites the restored LambdaLR schedule (`lr_lambdas`,
  `base_lrs`, the private `_last_lr`) that transformers' `get_scheduler` makes.
- `load_optimizer_state_on_cpu_ranks` registers a torch storage location for `cpu:RANK`, the
  `map_location` transformers loads a checkpoint's optimizer state with under several processes.
- `run_trackers_last` moves transformers' tracker callbacks after ftune's and sets
  `TensorBoardCallback.logging_dir`, which its `on_train_begin` keeps when set.
- `EveryAdapterResumed` extends the private `Trainer._load_from_checkpoint(resume_from_checkpoint,
  model=None)`, which, for a peft model whose checkpoint holds adapters in sub-folders, loads those
  and not the adapter in the checkpoint's folder itself (where peft saves `default`).
- `ParameterCountOnce` overrides the public `Trainer.floating_point_ops(inputs)`, which
  transformers calls at every step for `total_flos`: 6 x the main input's numel x
  `model.num_parameters(exclude_embeddings=True)`, the last counted once per model and set of
  adapters instead of per step (SFT and DPO; GRPO's inputs hold no `input_ids`, so transformers
  counts nothing there).

tests/test_integrations_trainers.py holds a contract test for each.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

from ftune.integrations.peft import adapters_of

STAGING = ".staging"


class StagedCheckpoints:
    """Trainer mixin: `checkpoint-N` is written in `output_dir/.staging` and renamed into place, so a
    `checkpoint-N` folder is whole whenever it exists; the newest `save_total_limit` are kept.

    Two hooks for the class that mixes it in: `checkpoint_wanted()` (every rank calls it; False
    writes nothing) and `checkpoint_staged(folder)` (rank 0, the staged folder whole, before the
    rename). Under several processes every rank writes its part (its RNG state; under FSDP its
    optimizer shard) into the one staging folder: rank 0 clears it first and renames it only once
    every rank is done.
    """

    def checkpoint_wanted(self) -> bool:
        return True

    def checkpoint_staged(self, folder: Path) -> None:
        pass

    def _save_checkpoint(self, model, trial) -> None:
        if not self.checkpoint_wanted():
            return
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
        self.checkpoint_staged(Path(staging) / name)
        target = os.path.join(run_dir, name)
        if os.path.exists(target):  # saved again at the same step (a signal right after a save)
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        if limit:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, use_mtime=False)


class EveryAdapterResumed:
    """Trainer mixin: a checkpoint of a peft model with several adapters resumes each of them.

    peft saves the adapter `default` in the checkpoint's folder and every other one in a sub-folder
    of its name. transformers, finding sub-folders, loads their adapters and not the one in the
    folder itself, so a DPO run (TRL adds `ref`, a frozen copy of the adapter) resumed its trained
    adapter as it was when training started, with the optimizer state and step of the checkpoint.
    After transformers' load, the active adapter is loaded from the folder itself where the folder
    holds adapter weights and no sub-folder bears its name."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import PeftModel

        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        if not isinstance(model, PeftModel) or not folder.is_dir():
            return

        def holds_adapter(path: Path) -> bool:
            return any((path / name).is_file() for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME))

        in_sub_folders = {path.name for path in folder.iterdir() if path.is_dir() and holds_adapter(path)}
        active = model.active_adapters[0]
        if in_sub_folders and active not in in_sub_folders and holds_adapter(folder):
            model.load_adapter(str(folder), active, is_trainable=True)
            model.set_adapter(active)


class ParameterCountOnce:
    """Trainer mixin: the FLOPs transformers adds up per step (`total_flos` in trainer_state.json)
    from a parameter count taken once per model and set of adapters. transformers recounts every
    parameter at every step: a walk of every module, 15-19 ms of CPU for a 32-layer peft model on a
    2-core CPU, in a DPO step whose CPU time is eight times its GPU time (a traced 8B step on an
    H200, docs/benchmarks.md)."""

    # (the model, its adapters (peft.adapters_of), its parameters without the embeddings)
    _parameter_count: tuple[object, tuple, int] | None = None

    def floating_point_ops(self, inputs) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        adapters = adapters_of(self.model)
        count = self._parameter_count
        if count is None or count[0] is not self.model or count[1] != adapters:
            count = self._parameter_count = (self.model, adapters, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * count[2]


class BestCheckpoint(TrainerCallback):
    """training.keep_best beside StagedCheckpoints: transformers records the best checkpoint by its
    staging path, and StagedCheckpoints rotates without knowing which is best. After each save this
    points the record at the renamed folder and rotates to save_total_limit, the best kept (as
    transformers' own rotation does)."""

    def __init__(self, output_dir: Path, save_total_limit: int | None):
        self.output_dir = Path(output_dir)
        self.limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        if best and not Path(best).is_dir() and (self.output_dir / Path(best).name).is_dir():
            state.best_model_checkpoint = str(self.output_dir / Path(best).name)
        if self.limit and state.is_world_process_zero:
            rotate_checkpoints(output_dir=str(self.output_dir), save_total_limit=self.limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        return control


class ContinueWithNewLearningRate(TrainerCallback):
    """On resuming, the recipe's learning rate replaces the one the checkpoint's optimizer and
    schedule carry (transformers restores those as they were saved), at the same point of the
    schedule; the schedule's shape (warm-up, length) already follows the recipe."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if optimizer is None or lambdas is None or not state.global_step:
            return
        lr_scheduler.base_lrs = [args.learning_rate for _ in lr_scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, lambdas):
            group["initial_lr"] = args.learning_rate
            group["lr"] = args.learning_rate * factor(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


_CPU_RANKS_REGISTERED = False


def _restore_indexed_cpu(storage, location: str):
    return storage if location.startswith("cpu:") else None


def load_optimizer_state_on_cpu_ranks() -> None:
    """Under torchrun on CPU, transformers loads a checkpoint's optimizer state with
    map_location=args.device, which is cpu:RANK there: a location torch.load does not know. This
    teaches torch that `cpu:N` is the CPU (once per process)."""
    global _CPU_RANKS_REGISTERED
    if not _CPU_RANKS_REGISTERED:
        torch.serialization.register_package(9, lambda storage: None, _restore_indexed_cpu)
        _CPU_RANKS_REGISTERED = True


def run_trackers_last(trainer: Trainer) -> None:
    """Run the trackers' callbacks (report_to) after ftune's, so that each log they receive holds
    ftune's figures (added by reports.LiveReporter); transformers puts them first. TensorBoard writes
    to output_dir/tensorboard (TENSORBOARD_LOGGING_DIR, where set, wins), one folder per run that
    its resumed sessions append to, not transformers' runs/DATE_HOST."""
    from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks

    classes = tuple(get_reporting_integration_callbacks(trainer.args.report_to))
    handler = trainer.callback_handler
    for callback in [c for c in handler.callbacks if classes and isinstance(c, classes)]:
        handler.remove_callback(callback)
        handler.add_callback(callback)
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(trainer.args.output_dir) / "tensorboard")
