"""Supervised fine-tuning on TRL's SFTTrainer."""

from __future__ import annotations

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback]) -> SFTTrainer:
    options = recipe.sft
    config = SFTConfig(
        **trainer_arguments(recipe, built),
        max_length=recipe.data.max_length,
        packing=options.packing,
        completion_only_loss=options.completion_only_loss,
        assistant_only_loss=options.assistant_only_loss,
    )
    trainer = SFTTrainer(
        model=built.model,
        args=config,
        train_dataset=dataset,
        processing_class=built.tokenizer,
        callbacks=callbacks,
    )
    return finish_trainer(trainer)
