"""Supervised fine-tuning on TRL's SFTTrainer."""

from __future__ import annotations

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments


class FtuneSFTTrainer(AtomicCheckpoints, SFTTrainer):
    """TRL's SFTTrainer whose checkpoints are written aside and renamed into place."""


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback]) -> SFTTrainer:
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
        processing_class=built.tokenizer,
        callbacks=callbacks,
    )
    return finish_trainer(trainer)
