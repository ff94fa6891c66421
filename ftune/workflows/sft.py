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
    """TRL's SFTTrainer with atomic checkpoints and, when patched in, ftune's fused loss.

    TRL computes the loss from its own chunked LM head (`fused_lm_head=True`); with ftune's
    fused cross-entropy kernel on, the model's forward computes the loss itself from the labels
    (one pass that never builds the logits) and returns the entropy and top-1 statistics that
    TRL logs.
    """

    use_ftune_loss = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.use_ftune_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        gather = self.accelerator.gather_for_metrics
        valid = gather(outputs.num_tokens.detach()).sum()
        if valid > 0:
            self._metrics[mode]["entropy"].append((gather(outputs.entropy_sum.detach()).sum() / valid).item())
            self._metrics[mode]["mean_token_accuracy"].append((gather(outputs.num_correct.detach()).sum() / valid).item())
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


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
    trainer.use_ftune_loss = built.kernels.get("fused_cross_entropy", False)
    return finish_trainer(trainer)
