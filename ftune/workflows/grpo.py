"""Group relative policy optimization on TRL's GRPOTrainer.

Generation runs under no_grad, so the activation-checkpointing engine stands aside and the KV cache works;
the policy's training forward goes through the engine as in SFT.

With grpo.beta > 0 the KL term's reference is the policy as training starts: given a PEFT model,
TRL adds a frozen copy of the adapter named `ref` (trl's grpo_trainer.py), the adapter of
model.adapter or a new one (zero B matrices: the base model). PEFT saves it in `ref/` of the
output folder and its checkpoints, as for DPO; the trained adapter is the folder's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.errors import RecipeError
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments
from ftune.workflows.rewards import reward_functions


class FtuneGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """TRL's GRPOTrainer whose checkpoints are written aside and renamed into place."""


def grpo_config(recipe: Recipe, arguments: dict[str, Any]) -> tuple[GRPOConfig, list[Callable]]:
    """TRL's GRPOConfig (the TrainingArguments `arguments` and the recipe's grpo options) and the
    recipe's reward functions."""
    options = recipe.grpo
    config = GRPOConfig(**arguments, num_generations=options.num_generations,
                        max_completion_length=options.max_completion_length, temperature=options.temperature,
                        beta=options.beta, reward_weights=options.reward_weights)
    rewards = reward_functions(options.rewards, format_pattern=options.format_pattern,
                               max_length=options.max_completion_length)
    return config, rewards


def make_trainer(recipe: Recipe, built: BuiltModel, dataset: Dataset, callbacks: list[TrainerCallback],
                 eval_dataset: Dataset | None = None) -> GRPOTrainer:
    options, training = recipe.grpo, recipe.training
    if (training.batch_size * training.grad_accum) % options.num_generations:
        raise RecipeError(
            f"grpo.num_generations {options.num_generations} must divide training.batch_size x grad_accum "
            f"({training.batch_size} x {training.grad_accum}): each prompt's group of completions is one unit.",
            hint=f"For example training.batch_size: {options.num_generations * 2}.",
        )
    if "exact_answer" in options.rewards and "answer" not in dataset.column_names:
        raise RecipeError("grpo.rewards: exact_answer needs an 'answer' column in the data.",
                          hint=f"Its columns are {dataset.column_names}; map yours with data.fields: {{answer: ...}}.")
    config, rewards = grpo_config(recipe, trainer_arguments(recipe, built))
    trainer = FtuneGRPOTrainer(model=built.model, reward_funcs=rewards, args=config, train_dataset=dataset,
                               eval_dataset=eval_dataset, processing_class=built.tokenizer, callbacks=callbacks)
    return finish_trainer(trainer)
