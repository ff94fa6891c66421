"""Supervised fine-tuning on TRL's SFTTrainer."""

from __future__ import annotations

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.integrations.trl import LossFromModel
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments


class FtuneSFTTrainer(AtomicCheckpoints, LossFromModel, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints and, with ftune's fused cross-entropy kernel on, the
    loss computed by the model's forward (integrations.trl.LossFromModel)."""


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback],
                 eval_dataset: Dataset | None = None) -> SFTTrainer:
    options = recipe.sft
    config = SFTConfig(
        **trainer_arguments(recipe, built),
        max_length=recipe.data.max_length,
        packing=options.packing,
        completion_only_loss=options.completion_only_loss,
        assistant_only_loss=options.assistant_only_loss,
    )
    trainer = FtuneSFTTrainer(
        model=built.model,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=built.tokenizer,
        callbacks=callbacks,
    )
    trainer.loss_from_model = built.kernels.get("fused_cross_entropy", False)
    return finish_trainer(trainer)
