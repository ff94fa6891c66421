"""The model card (README.md) of a run's output directory, and its push to the Hugging Face hub.

The card says what the adapter is (base model, workflow, data, recipe), how it did (final and eval
metrics) and what it cost (peak memory, tokens/s steady and over the whole run, on which card),
from the run's summary.json and recipe: what a reader of the hub page needs before downloading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ftune.errors import HubError, first_line
from ftune.outputs import write_text_atomic
from ftune.recipe import Recipe, looks_like_local_path

CARD_FILE = "README.md"
_TRAINERS = {"sft": "TRL's SFTTrainer", "dpo": "TRL's DPOTrainer", "grpo": "TRL's GRPOTrainer"}
# What a run's folder holds that a hub repository should not: checkpoints (optimizer states),
# earlier attempts' metrics, staging leftovers.
HUB_IGNORE = ["checkpoint-*", ".*", "metrics-interrupted-*.jsonl"]


def _base_model(recipe: Recipe) -> tuple[str, str | None]:
    """(how the card names the base, its hub id for the card's metadata or None)."""
    model = recipe.model
    if model.preset is not None:
        return f"the `{model.preset}` preset (its shape with random weights, built by ftune)", None
    name = model.name_or_path
    if looks_like_local_path(name) or Path(name).is_absolute():
        return f"`{name}` (a local folder)", None
    return f"[{name}](https://huggingface.co/{name})", name


def _trained_rows(recipe: Recipe, summary: dict[str, Any]) -> int | None:
    """The rows left for training: the checked rows, less those held out for evaluation."""
    rows = (summary.get("data") or {}).get("rows")
    held_out = (summary.get("eval_rows") or 0) if isinstance(recipe.data.eval, float) else 0
    return rows - held_out if rows is not None else None


def _figure(value: Any, spec: str = "", unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{format(value, spec)}{unit}"


def model_card(recipe: Recipe, summary: dict[str, Any]) -> str:
    """The card's Markdown, with the hub's metadata block first."""
    base_text, base_id = _base_model(recipe)
    quantized = recipe.quantization.method != "none"
    metadata: dict[str, Any] = {"library_name": "peft", "pipeline_tag": "text-generation",
                                "tags": ["ftune", "qlora" if quantized else "lora", recipe.workflow, "trl"]}
    if base_id:
        metadata["base_model"] = base_id
    source = recipe.data.source
    if not (looks_like_local_path(source) or Path(source).is_absolute()):
        metadata["datasets"] = [source]
    name = recipe.name or Path(summary.get("output_dir", "run")).name
    data = summary.get("data") or {}
    evaluation = summary.get("eval") or {}
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"A LoRA adapter for {base_text}, trained with ftune "
             f"({recipe.workflow.upper()} on {_TRAINERS[recipe.workflow]}"
             f"{', the base in 4-bit ' + recipe.quantization.method.upper() if quantized else ''}).", "",
             "## Use it", "", "```bash",
             "ftune chat THIS_FOLDER                           # talk to it (the base in 4 bits, as it trained)",
             "ftune export THIS_FOLDER --format merged         # merged into the 16-bit base, for any server",
             "ftune export THIS_FOLDER --format gguf --quant q8_0   # one file for llama.cpp",
             "```", "", "or with PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
             "THIS_FOLDER)`.", "",
             "## Training", "", "| | |", "|---|---|",
             f"| base model | {base_text} |",
             f"| data | `{source}` ({data.get('format', recipe.data.format)}; "
             f"{_figure(_trained_rows(recipe, summary), ',')} rows trained on) |"]
    if recipe.data.eval is not None:
        held = (f"{recipe.data.eval:.0%} of the data held out" if isinstance(recipe.data.eval, float)
                else f"`{recipe.data.eval}`")
        lines.append(f"| eval data | {held} ({_figure(summary.get('eval_rows'))} rows) |")
    lora = recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    training = recipe.training
    lines += [
        f"| LoRA | r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {targets} |",
        f"| quantization | {recipe.quantization.method}{' (double)' if quantized and recipe.quantization.double_quant else ''} |",
        f"| steps | {summary.get('steps')} (batch {training.batch_size} x {training.grad_accum} accumulated, "
        f"{recipe.data.max_length} tokens at most) |",
        f"| learning rate | {training.learning_rate:g}, {training.lr_scheduler}, {training.optimizer} |",
        f"| checkpointing | {summary.get('checkpointing', {}).get('mode', recipe.checkpointing.mode)} |",
        "", "## Results", "", "| | |", "|---|---|",
        f"| train loss (first → final logged) | {_figure(summary.get('first_loss'), '.4f')} → "
        f"{_figure(summary.get('final_loss'), '.4f')} |",
    ]
    for key, label in (("eval_loss", "eval loss"), ("eval_mean_token_accuracy", "eval token accuracy"),
                       ("eval_rewards/accuracies", "eval reward accuracy"), ("eval_rewards/margins", "eval reward margin"),
                       ("eval_reward", "eval mean reward")):
        if evaluation.get(key) is not None:
            lines.append(f"| {label} (step {evaluation.get('step')}) | {evaluation[key]:.4f} |")
    device = summary.get("device") or "-"
    peak_label = "peak VRAM (allocated)" if device != "cpu" else "peak memory (process RSS, on CPU)"
    lines += [
        f"| {peak_label} | {_figure(summary.get('peak_memory_gib'), '.2f', ' GiB')} |",
        f"| tokens/s, steady (median of the logged intervals after the first) | "
        f"{_figure(summary.get('tokens_per_s_steady'), ',.0f')} |",
        f"| tokens/s, whole run (wall clock, start-up and evaluation included) | "
        f"{_figure(summary.get('tokens_per_s'), ',.0f')} |",
        f"| tokens | {summary.get('tokens', 0):,} in {_figure(summary.get('runtime_s'), ',.0f', ' s')} |",
        f"| device | {device} |",
        "", "## Recipe", "", "The recipe as this run trained it (`recipe.yaml` beside this card):", "",
        "```yaml", recipe.to_yaml().strip(), "```", "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    path = Path(output_dir) / CARD_FILE
    write_text_atomic(path, model_card(recipe, summary))
    return path


def push_run(output_dir: Path, repo_id: str, *, private: bool = True, commit_message: str | None = None) -> str:
    """Upload a finished run's folder (adapter, tokenizer, card, recipe, metrics, summary; no
    checkpoints) to a hub model repository, created if missing, with huggingface_hub's
    upload_folder, the call transformers' Trainer.push_to_hub makes. The run's files stay as they are
    whatever happens; a failure is a HubError that says how to push them later."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=HUB_IGNORE,
                          commit_message=commit_message or f"ftune run {Path(output_dir).name}")
    except Exception as error:  # the network, the token, the hub's answer: none may lose the run
        raise HubError(
            f"training.push_to_hub: could not push {output_dir} to {repo_id} ({type(error).__name__}: "
            f"{first_line(error)}). The run is complete and its files are all in {output_dir}.",
            hint=f"Check the network, HF_TOKEN (a token with write access) and HF_HUB_OFFLINE; then push it with "
            f"`hf upload {repo_id} {output_dir} --exclude 'checkpoint-*'`.",
        ) from None
    return str(url)
