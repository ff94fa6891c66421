"""Group relative policy optimization on TRL's GRPOTrainer.

Generation runs under no_grad, so the activation-checkpointing engine stands aside and the KV cache works;
the policy's training forward goes through the engine as in SFT. On a GPU, the decode steps of a
dense family replay as CUDA graphs over a static cache (the plan's decode_graphs,
ftune/engine/decode_graphs.py). TRL generates a generation batch
(training.batch_size x grpo.steps_per_generation completions) in one call, whose KV cache
`ftune estimate-vram` counts as a phase of the step (ftune.memory.estimate.generation_bytes).

With grpo.beta > 0 the KL term's reference is the policy as training starts: given a PEFT model,
TRL adds a frozen copy of the adapter named `ref` (trl's grpo_trainer.py). For the adapter of
model.adapter PEFT saves it in `ref/` of the output folder and its checkpoints, as for DPO; the
trained adapter is the folder's own. A new adapter, whose zero B matrices make it the base model,
needs no copy: its reference pass runs with the adapters off (integrations.trl.use_base_as_reference),
as TRL's own path for a new adapter does, and its run has no `ref/`.
"""

from __future__ import annotations

from collections.abc import Callable
from math import ceil
from typing import Any

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from ftune.checkpoints import AtomicCheckpoints
from ftune.engine.decode_graphs import replay_decode_steps
from ftune.errors import RecipeError
from ftune.integrations.trl import restore_the_adapter_after_paged_generation, use_base_as_reference
from ftune.memory.estimate import PAGED_BATCH_TOKENS, PAGED_BLOCK_TOKENS
from ftune.model import BuiltModel
from ftune.recipe import Recipe
from ftune.workflows.common import finish_trainer, trainer_arguments
from ftune.workflows.rewards import reward_functions


class FtuneGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """TRL's GRPOTrainer whose checkpoints are written aside and renamed into place."""


def grpo_config(recipe: Recipe, arguments: dict[str, Any], cache: str | None = None) -> tuple[GRPOConfig, list[Callable]]:
    """TRL's GRPOConfig (the TrainingArguments `arguments`, the recipe's grpo options and the KV
    `cache`) and the recipe's reward functions. `cache`: the plan's (plan.generation_plan, which
    settles auto and what the machine can run); without a plan (TRL's own stack in the benchmarks)
    the recipe's named cache, dynamic for auto."""
    options = recipe.grpo
    if cache is None:
        cache = "dynamic" if options.cache_implementation == "auto" else options.cache_implementation
    config = GRPOConfig(**arguments, num_generations=options.num_generations,
                        max_completion_length=options.max_completion_length, temperature=options.temperature,
                        top_p=options.top_p, beta=options.beta, reward_weights=options.reward_weights,
                        steps_per_generation=options.steps_per_generation,
                        mask_truncated_completions=options.mask_truncated_completions,
                        cache_implementation=None if cache in ("dynamic", "paged") else cache,
                        **paged_generation(recipe))
    rewards = reward_functions(options.rewards, format_pattern=options.format_pattern,
                               max_length=options.max_completion_length)
    return config, rewards


def paged_generation(recipe: Recipe) -> dict[str, Any]:
    """TRL's continuous-batching generation with transformers' pool of KV blocks sized to the
    generation batch (every sequence's prompt and completion in whole blocks) and a forward of at
    most PAGED_BATCH_TOKENS tokens: what the memory model counts, where transformers would otherwise
    take half the free memory (TRL's default) for its pool."""
    options, training = recipe.grpo, recipe.training
    if not options.paged_generation:
        return {}
    sequences = training.batch_size * (options.steps_per_generation or training.grad_accum)
    blocks = sequences * ceil((recipe.data.max_length + options.max_completion_length) / PAGED_BLOCK_TOKENS)
    return {"use_transformers_continuous_batching": True, "transformers_continuous_batching_config": {
        "block_size": PAGED_BLOCK_TOKENS, "num_blocks": blocks, "max_batch_tokens": PAGED_BATCH_TOKENS}}


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
    config, rewards = grpo_config(recipe, trainer_arguments(recipe, built), cache=built.plan.setting.generation_cache)
    trainer = FtuneGRPOTrainer(model=built.model, reward_funcs=rewards, args=config, train_dataset=dataset,
                               eval_dataset=eval_dataset, processing_class=built.tokenizer, callbacks=callbacks)
    if not built.plan.setting.reference_adapter:  # the plan's rule (plan.workflow_phases), which memory counts
        use_base_as_reference(built.model)
    if built.plan.decode_graphs:
        replay_decode_steps(built.model)
    if options.paged_generation:  # TRL casts the model to the run's dtype before each paged generation
        restore_the_adapter_after_paged_generation(built.model, built.dtype)
    return finish_trainer(trainer)
