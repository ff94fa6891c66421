"""A recipe checked against what it names, and warnings for legal values that are almost surely wrong.

`load_checked_recipe` loads a recipe with `environment_problems` beside the schema's, so `ftune
validate` and the start of `ftune train` both report, with their key: an output folder that
cannot be written, a GRPO reward that cannot be imported or cannot take TRL's call, and LoRA target
modules that the model does not have. `data_problem` reads a local JSON data file as training will
(`ftune validate` only: training reports the same when it loads the data). `recipe_warnings`
lists values that are legal but almost surely a mistake (a rank above the hidden size, a learning
rate of 10); `ftune validate` and `ftune train` print them and go on.

Nothing here loads weights or a tokenizer, or reaches the network: the model's sizes and family
come from its config when that is on this machine (ftune.model_config); target names outside the
family's projections are looked up in a skeleton of the model built on the meta device (torch).
Without the config the module checks are skipped and loading the model reports what it finds.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ftune.errors import DataError, RecipeError, first_line
from ftune.families import family_of
from ftune.formats import FORMAT_COLUMNS, LARGEST_SCANNED_DATA, detect_format, read_json_rows
from ftune.memory.estimate import estimate
from ftune.memory.units import format_bytes
from ftune.model_config import local_model_config
from ftune.plan import assumed_device, attention_implementation, resolve
from ftune.recipe import BUILTIN_REWARDS, Problem, Recipe, expand_user, load_recipe

# What TRL's GRPOTrainer passes to every reward function by keyword (trl/trainer/grpo_trainer.py,
# _calculate_rewards), besides one keyword per data column.
TRL_REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
REWARD_CALL = "f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)"
REWARD_SHAPE = "def my_reward(prompts, completions, **kwargs) -> list[float]"

# Past these, a legal value is almost surely a mistake (see recipe_warnings).
LARGEST_LORA_SCALE = 64.0  # alpha / r; LoRA's usual scale is 1 to 4
LARGEST_ADAMW_LR = 0.1  # LoRA fine-tuning uses 1e-5 to 1e-3; the quickstart's tiny model 3e-3
UNCLIPPED_LR = 1e-2
MOST_TOKENS_PER_FORWARD = 2**20  # an 8B model's 150k-token step is the largest ftune has measured
SHORTEST_MAX_LENGTH = 8


def load_checked_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """load_recipe with the recipe's problems against this machine and its model: every problem
    in one RecipeError."""
    return load_recipe(path, overrides, environment_checks=environment_problems)


def environment_problems(recipe: Recipe) -> list[Problem]:
    """Problems of the recipe against this machine and the model it names, with their keys."""
    problems = []
    output = output_dir_problem(recipe.training.output_dir)
    if output:
        problems.append(("training.output_dir", output))
    if recipe.workflow == "grpo":
        problems += reward_problems(recipe.grpo.rewards)
    problems += lora_target_problems(recipe)
    problems += paged_generation_problems(recipe)
    return problems


# The attention implementations transformers' paged engine has a paged twin of (its
# continuous_batching switch_to_cb_friendly_attn sets paged|<implementation>; transformers 5.17)
PAGED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def paged_generation_problems(recipe: Recipe) -> list[Problem]:
    """grpo.paged_generation with an attention the paged engine cannot run: Gemma-2's soft-capped
    attention (ftune_softcap) has no paged twin, and sdpa's would drop the cap. Without a local
    config the family is unknown and loading says what it finds."""
    if recipe.workflow != "grpo" or not recipe.grpo.paged_generation:
        return []
    config = local_model_config(recipe)
    family = family_of(config.model_type) if config is not None else None
    attention = attention_implementation(recipe, family)
    if attention in PAGED_ATTENTION:
        return []
    return [("grpo.paged_generation", f"transformers' paged generation runs {', '.join(PAGED_ATTENTION)}, not "
             f"{config.model_type}'s {attention} attention; set grpo.paged_generation: false (generation then "
             "runs on the model's own attention)")]


# --------------------------------------------------------------------------------------------
# The output folder


def output_dir_problem(value: str) -> str | None:
    """Why ftune could not write its outputs at `value`, or None.

    Creates and removes an empty folder in the output folder (or in its nearest existing parent):
    permissions alone do not tell, since root may write anywhere that a read-only or immutable
    folder, or a file system like /proc, still refuses.
    """
    path, parent = expand_user(value), None
    try:
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder; name a folder for the run's outputs"
        parent = path.absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{path} cannot be created: {parent} is a file, not a folder"
        probe = tempfile.mkdtemp(prefix=".ftune-write-check-", dir=parent)
        os.rmdir(probe)
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        if parent is not None and parent != path.absolute():
            reason = f"creating a folder in {parent} failed: {reason}"
        return (f"{path} cannot be written ({reason}); choose a folder you can write, "
                "e.g. runs/NAME under your working directory")
    return None


# --------------------------------------------------------------------------------------------
# A local JSON data file


def data_problem(recipe: Recipe) -> DataError | None:
    """What makes a local .jsonl/.json data file unusable, with its line: a line that is not a
    JSON object, columns that fit no format of the workflow, or a row whose needed column is
    missing beside one of a close name ('promt'). The checks of ftune.data, made on the raw JSON
    so that `ftune validate` needs no datasets cache; files over 64 MiB are left to training,
    which makes the same checks as it loads the data."""
    path = Path(recipe.resolve_input(recipe.data.source))
    try:
        if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file() or \
                path.stat().st_size > LARGEST_SCANNED_DATA:
            return None
        problem, columns, rows = read_json_rows(path)
    except (OSError, ValueError):
        return None  # unreadable: the path checks or loading report it
    if problem is not None:
        return DataError(f"data.source {path}, {problem[0]}: {problem[1]}.",
                         hint="Fix or delete that line: each line of a .jsonl file is one JSON object, "
                         'e.g. {"text": "..."}.')
    renames = {column: name for name, column in recipe.data.fields.items() if column != name}
    if not rows or set(renames) - set(columns):
        return None  # no rows known, or renames of columns it lacks: loading names them
    try:
        data_format = detect_format([renames.get(c, c) for c in columns], recipe.data.format, source=str(path),
                                    workflow=recipe.workflow)
    except DataError as error:
        return error
    needed = FORMAT_COLUMNS[data_format]
    for index, (line, row) in enumerate(rows[:recipe.data.limit or len(rows)]):
        row = {renames.get(c, c) for c in row}
        for name in needed:
            close = [c for c in row if name not in row and c not in needed and c not in ("prompt", "answer")
                     and difflib.get_close_matches(name, [c], n=1, cutoff=0.6)]
            if close:
                where = f"row {index}" + (f" (line {line})" if line else "")
                return DataError(f"data.source {path}, {where}: no '{name}' but a column '{close[0]}' — a "
                                 f"misspelling of '{name}'? {data_format} rows need "
                                 f"{' and '.join(repr(c) for c in needed)}.",
                                 hint=f"Rename '{close[0]}' to '{name}' in that row; a row without '{name}' "
                                 "would be dropped as empty.")
    return None


# --------------------------------------------------------------------------------------------
# GRPO rewards


def reward_problems(names: list[str]) -> list[Problem]:
    problems = []
    for name in names:
        if name in BUILTIN_REWARDS:
            continue
        try:
            import_reward(name)
        except RecipeError as error:
            problems.append(("grpo.rewards", error.message.removeprefix("grpo.rewards: ")
                             + (f" {error.hint}" if error.hint else "")))
    return problems


def import_reward(spec: str) -> Callable:
    """The function that `module:function` names, checked to take TRL's reward call; RecipeError if not.

    Imports the module, which runs the user's code (the recipe's grpo.rewards says so).
    """
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"grpo.rewards: cannot import module '{module_name}' for reward '{spec}': {error}.",
                          hint=_import_hint(module_name)) from None
    except Exception as error:  # the user's module raised while it was imported
        raise RecipeError(f"grpo.rewards: importing module '{module_name}' for reward '{spec}' failed: "
                          f"{type(error).__name__}: {first_line(error)}.",
                          hint="Fix the module so that it imports (`python -c 'import MODULE'` shows the traceback).") from None
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        what = "has no function" if function is None else f"has '{attribute}', a {type(function).__name__}, not"
        raise RecipeError(f"grpo.rewards: '{module_name}' {what} '{attribute}'." if function is None else
                          f"grpo.rewards: '{module_name}' {what} a function.",
                          hint=f"Name a function of this shape: {REWARD_SHAPE}.")
    problem = reward_signature_problem(function)
    if problem:
        raise RecipeError(f"grpo.rewards: '{spec}' {problem}.",
                          hint=f"TRL calls every reward as {REWARD_CALL}; write it as {REWARD_SHAPE}.")
    return function


def reward_signature_problem(function: Callable) -> str | None:
    """Why `function` cannot take TRL's reward call, or None."""
    if inspect.isclass(function):
        return f"is a class ({function.__name__}); TRL would construct it instead of getting rewards"
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "has a signature Python cannot read (a built-in?), so it cannot be checked to take TRL's keywords"
    parameters = list(signature.parameters.values())
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        return f"takes {', '.join(positional_only)} by position only ({signature}), but TRL passes everything by keyword"
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return (f"takes {getattr(function, '__name__', 'f')}{signature}: it has no **kwargs, so TRL's call with "
                f"{', '.join(TRL_REWARD_KEYWORDS)} and the data's columns would fail")
    return None


def _import_hint(module_name: str) -> str:
    top, here = module_name.split(".")[0], Path.cwd()
    if ((here / f"{top}.py").is_file() or (here / top).is_dir()) and not {"", ".", str(here)} & set(sys.path):
        return (f"{top} is in the working directory but not on Python's import path: run with "
                f"PYTHONPATH={here} (or install it as a package).")
    return "Make the module importable (on PYTHONPATH, or installed), or fix its name."


# --------------------------------------------------------------------------------------------
# The model's modules, from its config on the meta device


@dataclass(frozen=True)
class ModelModules:
    """What the checks need of a model: its linear layers, its output layer, its sizes."""

    label: str  # the preset or path the config came from, for messages
    linear: tuple[str, ...]  # full names of the linear layers that can take an adapter
    head: str | None  # the output layer's name (lm_head): a linear layer TRL refuses to adapt
    kinds: dict[str, str]  # every other module's name -> its class name
    hidden: int
    config: dict[str, Any]
    whole: bool = True  # False where the config describes the text part of a larger model only

    def linear_names(self) -> list[str]:
        """The distinct last parts of the linear layers' names, in model order (q_proj, ...)."""
        return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.linear))


def model_modules(recipe: Recipe) -> ModelModules | None:
    """The recipe's model skeleton's modules, or None when its config is not on this machine or
    transformers cannot build it (remote code, an architecture without a causal LM class)."""
    if recipe.model.trust_remote_code:
        return None  # building it would run the repository's code
    config = local_model_config(recipe)
    if config is None or "auto_map" in config.values:
        return None
    return _skeleton(config.label, json.dumps(config.values, sort_keys=True), config.whole)


@lru_cache(maxsize=32)
def _skeleton(label: str, config_json: str, whole: bool) -> ModelModules | None:
    config = json.loads(config_json)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        values = dict(config)
        model_type = values.pop("model_type")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))
    except Exception:  # an architecture transformers cannot build here: loading will report it
        return None
    head = model.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), None) if head is not None else None
    linear, kinds = [], {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, torch.nn.Linear) and name != head_name:
            linear.append(name)
        elif name != head_name:
            kinds[name] = type(module).__name__
    text = config.get("text_config", config)
    return ModelModules(label=label, linear=tuple(linear), head=head_name, kinds=kinds,
                        hidden=int(text.get("hidden_size", 0)), config=config, whole=whole)


def lora_target_problems(recipe: Recipe) -> list[Problem]:
    """lora.target_modules names the model does not have as linear layers (peft would ignore them)."""
    targets = recipe.lora.target_modules
    if recipe.model.adapter is not None or not isinstance(targets, list):
        return []
    config = local_model_config(recipe)
    family = family_of(config.model_type) if config is not None else None
    if family is not None and set(targets) <= set(family.lora_targets):
        return []  # the family's own projection names: no skeleton (and no torch) needed
    modules = model_modules(recipe)
    if modules is None or not modules.whole:
        return []
    names = modules.linear_names()
    problems = []
    for target in targets:
        def matches(name: str) -> bool:  # peft's rule for a list of names: the whole name or its last parts
            return name == target or name.endswith("." + target)

        if any(matches(name) for name in modules.linear):
            continue
        if modules.head is not None and matches(modules.head):
            problems.append(f"'{target}' is the output layer: TRL computes the log-probabilities from its weight "
                            "directly, so an adapter there would never be trained (TRL refuses it)")
            continue
        kind = next((kind for name, kind in modules.kinds.items() if matches(name)), None)
        if kind is not None:
            problems.append(f"'{target}' is {'an' if kind[0] in 'AEIOU' else 'a'} {kind}, not a linear layer")
            continue
        close = difflib.get_close_matches(target, names, n=1)
        problems.append(f"'{target}' matches no module of {modules.label}"
                        + (f" (did you mean '{close[0]}'?)" if close else ""))
    if not problems:
        return []
    return [("lora.target_modules", ". ".join(problems) + f". LoRA adapts linear layers, and this model's are "
             f"{', '.join(names)}: name some of them, or all-linear for every one")]


# --------------------------------------------------------------------------------------------
# Warnings


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Legal values that are almost surely wrong, each as 'key: what, and the fix'.

    For `ftune validate` and the start of `ftune train`, which print them and go on. Uses the
    model's config where it is on this machine (ftune.model_config), nothing else.
    """
    warnings = []
    lora, training, data = recipe.lora, recipe.training, recipe.data
    config = local_model_config(recipe)
    hidden = int(config.values.get("text_config", config.values).get("hidden_size", 0)) if config is not None else 0
    if recipe.model.adapter is None:
        if hidden and lora.r > hidden:
            warnings.append(f"lora.r: {lora.r} is larger than {config.label}'s hidden size {hidden}: a "
                            "projection's update cannot have a rank above its smaller side, so the extra rank "
                            "is only cost. Ranks of 8 to 64 are usual.")
        scale = lora.alpha / (lora.r ** 0.5 if lora.use_rslora else lora.r)
        if scale > LARGEST_LORA_SCALE:
            ratio = "alpha / sqrt(r)" if lora.use_rslora else "alpha / r"
            warnings.append(f"lora.alpha: {lora.alpha:g} scales every adapter update by {ratio} = {scale:.3g} "
                            "(usual: 1 to 4); the gradients grow by as much and soon overflow. Set lora.alpha "
                            f"to r or 2 x r ({lora.r} or {2 * lora.r}).")
    if training.learning_rate > LARGEST_ADAMW_LR:
        warnings.append(f"training.learning_rate: {training.learning_rate:g} is far above what AdamW fine-tunes "
                        "with (LoRA: 1e-5 to 1e-3); the loss will most likely become NaN within a few steps. "
                        "Try 2e-4.")
    if training.max_grad_norm == 0 and training.learning_rate >= UNCLIPPED_LR:
        warnings.append(f"training.max_grad_norm: 0 turns gradient clipping off while training.learning_rate is "
                        f"{training.learning_rate:g}: one large gradient can throw the adapter off for good. "
                        "Keep max_grad_norm at 1.0, or lower the learning rate.")
    tokens = training.batch_size * data.max_length
    if tokens > MOST_TOKENS_PER_FORWARD:
        warnings.append(f"training.batch_size: {training.batch_size:,} examples of up to {data.max_length:,} tokens "
                        f"are {tokens:,} tokens in one forward{_memory_of(recipe)}, far beyond what one device "
                        "holds. Use a smaller batch_size and raise training.grad_accum for the same "
                        "effective batch.")
    if training.max_steps is not None and training.warmup_steps >= training.max_steps:
        warnings.append(f"training.warmup_steps: {training.warmup_steps} is not shorter than max_steps "
                        f"{training.max_steps}: the learning rate never reaches {training.learning_rate:g}. "
                        "Warm up for a tenth of the run or less.")
    elif training.warmup_steps and training.lr_scheduler == "constant":
        warnings.append(f"training.warmup_steps: {training.warmup_steps}, but lr_scheduler constant has no "
                        "warm-up (transformers ignores it). Use lr_scheduler: constant_with_warmup.")
    if data.max_length < SHORTEST_MAX_LENGTH:
        warnings.append(f"data.max_length: at most {data.max_length} token{'s' if data.max_length != 1 else ''} per "
                        "example leaves almost nothing to learn (a chat template alone is longer; with one token there "
                        "is no next token to predict and the loss is 0). Use at least a few hundred.")
    return warnings


def _memory_of(recipe: Recipe) -> str:
    """' (the memory model: about X of VRAM and Y of host memory)' when the shape is known locally."""
    try:
        mode = "unsloth" if recipe.checkpointing.mode == "smart" else recipe.checkpointing.mode
        plan = resolve(recipe, assumed_device(), mode=mode)
        if plan.shape is None:
            return ""
        parts = estimate(plan.shape, plan.setting)
    except Exception:  # the warning stands without the figures
        return ""
    host = f" and {format_bytes(parts.required_host)} of host memory" if parts.required_host else ""
    return f" (estimated: {format_bytes(parts.peak)} of GPU memory{host})"
