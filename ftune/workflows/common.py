"""What every workflow's trainer shares: TrainingArguments from the recipe, the adapter's dtype, the
callbacks ftune changes on every trainer TRL builds, and the trackers' session around it (report_to)."""

from __future__ import annotations

import importlib.util
import netrc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from ftune.engine.recompute import decoder_layers
from ftune.errors import RecipeError
from ftune.integrations.transformers_trainer import run_trackers_last
from ftune.model import BuiltModel, shards_with_fsdp
from ftune.recipe import Recipe


def trainer_arguments(recipe: Recipe, built: BuiltModel) -> dict[str, Any]:
    """Keyword arguments of transformers.TrainingArguments (and TRL's configs) for a recipe."""
    training = recipe.training
    on_cuda = built.device.type == "cuda"
    if training.max_steps is not None:
        length = {"max_steps": training.max_steps}
    else:
        length = {"max_steps": -1, "num_train_epochs": training.epochs or 1.0}
    arguments = dict(
        output_dir=training.output_dir,
        **length,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accum,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        optim=training.optimizer,
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        logging_steps=training.logging_steps,
        # Saved every save_steps, at the last step, and by time (checkpoints.SaveEveryMinutes)
        save_strategy="steps",
        save_steps=training.save_steps or 10**9,
        save_total_limit=training.save_total_limit,
        # Mixed precision only on a GPU; the CPU path computes in float32.
        bf16=on_cuda and built.dtype == torch.bfloat16,
        fp16=on_cuda and built.dtype == torch.float16,
        use_cpu=not on_cuda,
        # ftune's engine does the activation checkpointing; transformers' own would wrap the layers twice.
        gradient_checkpointing=False,
        include_num_input_tokens_seen="all",
        **tracking_arguments(recipe),
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_first_step=False,
        # transformers hides NaN/inf losses from the logs by default; the NaN guard must see them.
        logging_nan_inf_filter=False,
        **fsdp_arguments(recipe, built),
    )
    arguments.update(evaluation_arguments(recipe))  # keep_best saves at each evaluation
    return arguments


def evaluation_arguments(recipe: Recipe) -> dict[str, Any]:
    """Evaluation every eval_steps and at the end (transformers adds the last step) when data.eval is set;
    with keep_best, a checkpoint at each evaluation and the best one's adapter at the end."""
    training = recipe.training
    if recipe.data.eval is None:
        return {"eval_strategy": "no"}
    arguments: dict[str, Any] = dict(per_device_eval_batch_size=training.eval_batch_size or training.batch_size)
    if training.eval_steps is None and training.max_steps is None:  # by epochs: once an epoch
        arguments.update(eval_strategy="epoch")
        every = None
    else:
        every = training.eval_steps or max(1, training.max_steps // 10)
        arguments.update(eval_strategy="steps", eval_steps=every)
    if training.keep_best:
        # save_total_limit: BestCheckpoint rotates, keeping the best (the staged checkpoints' rotation cannot)
        arguments.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                         save_total_limit=None)
        if every is None:
            arguments.update(save_strategy="epoch")
        else:
            arguments.update(save_steps=training.save_steps or every)
    return arguments


# Each tracker: the modules transformers' integration imports, and the pip package that provides them
_TRACKER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
                     "mlflow": (("mlflow",), "mlflow-skinny"), "trackio": (("trackio",), "trackio")}
# The project (W&B, Trackio) every run is filed under unless WANDB_PROJECT says otherwise
TRACKING_PROJECT = "ftune"


def tracking_arguments(recipe: Recipe) -> dict[str, Any]:
    """transformers' own integrations for training.report_to, the run named after the recipe (or its
    output folder). Where each one writes is tracking_session's."""
    trackers = list(dict.fromkeys(recipe.training.report_to))
    if not trackers:
        return {"report_to": "none"}
    missing = [name for name in trackers
               if not any(importlib.util.find_spec(module) for module in _TRACKER_PACKAGES[name][0])]
    if missing:
        packages = " ".join(_TRACKER_PACKAGES[name][1] for name in missing)
        raise RecipeError(f"training.report_to: {', '.join(missing)} needs its package, which is not installed.",
                          hint=f"pip install {packages} (or pip install 'ftune[tracking]' for every tracker)")
    output_dir = Path(recipe.training.output_dir)
    return {"report_to": trackers, "run_name": recipe.name or output_dir.resolve().name, "project": TRACKING_PROJECT}


@contextmanager
def tracking_session(recipe: Recipe) -> Iterator[dict[str, str]]:
    """Around a run's trainer, from its making to the end of training: the environment that keeps
    training.report_to's trackers local, each writing under the run's output folder and reaching
    no network unless the user's environment says otherwise (a variable the user set always wins).

    - wandb: `OUTPUT_DIR/wandb`, offline unless WANDB_MODE is set or W&B holds credentials
      (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes): a logged-in user's run goes
      online as W&B's own would; a fresh machine's never waits on the network (`wandb sync` uploads
      it later). transformers leaves the W&B run open after training; it is finished here, so that
      its files are whole and a next run in the process starts its own.
    - mlflow: a file store in `OUTPUT_DIR/mlruns` unless MLFLOW_TRACKING_URI is set, the experiment
      named after the run. Reading it needs MLFLOW_ALLOW_FILE_STORE=true too (MLflow 3 asks for it).
    - trackio: its database in `OUTPUT_DIR/trackio` unless TRACKIO_DIR is set. Trackio reads the
      folder once, when first imported: a second run in the same process writes into the first's.

    The environment is restored afterwards. Yields the variables it set.
    """
    trackers = set(recipe.training.report_to)
    output_dir = Path(recipe.training.output_dir).resolve()
    defaults: dict[str, str] = {}
    if "wandb" in trackers:
        defaults.update(WANDB_DIR=str(output_dir), WANDB_PROJECT=TRACKING_PROJECT)
        if not _wandb_has_credentials():
            defaults["WANDB_MODE"] = "offline"
    if "mlflow" in trackers:
        defaults["MLFLOW_EXPERIMENT_NAME"] = recipe.name or output_dir.name
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # MLflow 3 keeps its file store for those who opt in. Its SQLite store needs SQLAlchemy
            # and Alembic beyond mlflow-skinny, and puts artifacts in ./mlruns of the working folder.
            defaults.update(MLFLOW_TRACKING_URI=(output_dir / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    if "trackio" in trackers:
        defaults["TRACKIO_DIR"] = str(output_dir / "trackio")
    chosen = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(chosen)
    wandb_run_before = sys.modules["wandb"].run if "wandb" in sys.modules else None
    failed = True
    try:
        yield chosen
        failed = False
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None and wandb.run is not wandb_run_before:
            wandb.finish(exit_code=1 if failed else 0)
        for name in chosen:
            os.environ.pop(name, None)
        if "MLFLOW_TRACKING_URI" in chosen and "mlflow" in sys.modules:
            # MLflow keeps the URI it was given for the process: the next run sets its own
            sys.modules["mlflow"].set_tracking_uri(None)


def _wandb_has_credentials() -> bool:
    """Whether W&B would find credentials without asking: in the environment, or in the .netrc
    entry for its host (WANDB_BASE_URL, by default api.wandb.ai) that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def fsdp_arguments(recipe: Recipe, built: BuiltModel) -> dict[str, Any]:
    """FSDP2 through accelerate, under several processes with distributed.strategy fsdp.

    Each decoder layer is one FSDP unit: its weights (the 4-bit ones in their bf16 storage, see
    model.quantization_config) are gathered just before it runs, forward and recompute alike,
    and freed after; its LoRA gradients are reduce-scattered as its backward ends. ftune's engine
    does the activation checkpointing, so FSDP's own stays off. The adapter is saved whole (gathered to rank 0),
    as a PEFT folder like any other run's.
    """
    if not shards_with_fsdp(recipe):
        return {}
    layer_classes = sorted({type(layer).__name__ for layer in decoder_layers(built.model)})
    return dict(fsdp=True, fsdp_config={
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": layer_classes,
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": False,
        "cpu_ram_efficient_loading": False,
    })


def keep_adapter_in_fp32(model: torch.nn.Module) -> None:
    """Trainable parameters in float32, as mixed precision expects.

    TRL casts a quantized model's adapter to bfloat16; AdamW updates smaller than bfloat16's
    resolution (about 0.4% of the weight) would then be lost. Autocast still runs the adapter's
    matmuls in the compute dtype, so this costs no speed, and the adapter is a few MiB.
    """
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def finish_trainer(trainer: Trainer) -> Trainer:
    """What ftune changes on every trainer after TRL built it."""
    keep_adapter_in_fp32(trainer.model)
    trainer.remove_callback(PrinterCallback)  # the live panel shows the logs
    run_trackers_last(trainer)
    return trainer
