"""Supervised fine-tuning on TRL's SFTTrainer."""

from __future__ import annotations

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.data import truncate_tokenized
from ftune.integrations.transformers_trainer import ParameterCountOnce
from ftune.integrations.trl import LossFromModel
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments


class FtuneSFTTrainer(AtomicCheckpoints, ParameterCountOnce, LossFromModel, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints and, with ftune's fused cross-entropy kernel on, the
    loss computed by the model's forward (integrations.trl.LossFromModel)."""


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback],
                 eval_dataset: Dataset | None = None) -> SFTTrainer:
    options = recipe.sft
    padding_free = built.plan.batches != "padded"
    # TRL takes no max_length for padding-free rows that it does not pack: ftune cuts them below
    cut_here = padding_free and not options.packing
    config = SFTConfig(
        **trainer_arguments(recipe, built),
        max_length=None if cut_here else recipe.data.max_length,
        packing=options.packing,
        padding_free=padding_free,
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
    if cut_here:
        trainer.train_dataset = truncate_tokenized(trainer.train_dataset, recipe.data.max_length)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = truncate_tokenized(trainer.eval_dataset, recipe.data.max_length)
    trainer.loss_from_model = built.kernels.get("fused_cross_entropy", False)
    return finish_trainer(trainer)
