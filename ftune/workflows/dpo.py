"""Direct preference optimization on TRL's DPOTrainer.

The reference is the policy as training starts, without a second copy of the base weights. For
the adapter of model.adapter (the SFT quickstart's, for the DPO quickstart), given a PEFT model
and no ref_model, TRL adds a frozen copy of it named `ref` (trl's dpo_trainer.py) and runs the
reference pass through it. PEFT saves every adapter a model holds, non-default ones in a folder of
their name: hence `ref/` in the output folder and its checkpoints, the reference the run measured
against. The trained adapter is the one in the output folder itself; `ref/` is not needed to use
it. A new adapter, whose zero B matrices make it the base model, needs no copy: its reference pass
runs with the adapters off (integrations.trl.use_base_as_reference), and its run has no `ref/`; in
short steps its reference's rows ride the training forward instead, the adapter gated off them
(integrations.trl.ReferenceRidesTraining). Where the plan lets short steps keep their layers
(memory.estimate.keeps_layers), their loss reads the host LM head in blocks through TRL's fused
head (integrations.trl.stream_the_fused_head).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.integrations.transformers_trainer import ParameterCountOnce
from ftune.integrations.trl import (ReferenceAdapterSwitch, ReferenceRidesTraining, stream_the_fused_head,
                                   use_base_as_reference)
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments


class FtuneDPOTrainer(AtomicCheckpoints, ParameterCountOnce, ReferenceAdapterSwitch, ReferenceRidesTraining,
                      DPOTrainer):
    """TRL's DPOTrainer whose checkpoints are written aside and renamed into place, whose reference
    pass switches adapters without re-marking their parameters, and whose short steps run a base
    reference's rows in the training forward (integrations.trl)."""


def dpo_config(recipe: Recipe, arguments: dict[str, Any]) -> DPOConfig:
    """TRL's DPOConfig: the TrainingArguments `arguments` and the recipe's dpo options."""
    options = recipe.dpo
    return DPOConfig(**arguments, max_length=recipe.data.max_length, beta=options.beta,
                     loss_type=[options.loss_type], label_smoothing=options.label_smoothing)


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback],
                 eval_dataset: Dataset | None = None) -> DPOTrainer:
    config = dpo_config(recipe, trainer_arguments(recipe, built))
    trainer = FtuneDPOTrainer(model=built.model, ref_model=None, args=config, train_dataset=dataset,
                              eval_dataset=eval_dataset,
                              processing_class=built.tokenizer, callbacks=callbacks)
    setting = built.plan.setting  # the plan's rules (plan.workflow_phases), which memory counts
    if not setting.reference_adapter:
        use_base_as_reference(built.model)
    trainer.reference_may_ride = setting.reference_rides_up_to > 0
    if setting.keep_up_to and not stream_the_fused_head(built.model):
        built.keep_no_short_steps()  # TRL's head would fetch the whole head beside the kept layers
    return finish_trainer(trainer)
