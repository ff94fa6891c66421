"""`ftune estimate-vram RECIPE`: will it fit? The memory model's answer, without a GPU or weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ftune.cli.app import app, parse_vram
from ftune.errors import RecipeError
from ftune.memory.estimate import (RESERVED_OVER_ALLOCATED, Estimate, Setting, Shape, allocatable, estimate, largest_batch,
                                   longest_sequence)
from ftune.memory.policy import NoPlanFits
from ftune.memory.units import format_bytes
from ftune.model_config import model_config
from ftune.plan import assumed_device, resolve
from ftune.recipe import load_recipe

FIXED_MODES = ("none", "true", "unsloth")
ROWS = [
    ("4-bit weights", "quantized_weights"), ("quantization constants", "quant_constants"),
    ("16-bit modules", "weights_16bit"), ("LoRA parameters", "lora_parameters"), ("LoRA gradients", "lora_gradients"),
    ("optimizer states", "optimizer_states"), ("checkpoints on the GPU", "checkpoints_gpu"),
    ("busiest layer / loss working set", "working_set"), ("beyond it: logits, or fetched LM head", "loss"),
    ("beyond training: generation", "generation"), ("beyond training: no-grad pass", "reference"),
    ("beyond training: evaluation", "evaluation"),
]


@app.command("estimate-vram")
def estimate_vram(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe file.")],
    seq: Annotated[int | None, typer.Option(help="Sequence length (default: data.max_length).")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: training.batch_size).")] = None,
    vram: Annotated[str | None, typer.Option(help="A card's memory, e.g. 24GiB: report what fits in it.")] = None,
    modes: Annotated[list[str], typer.Option("--mode", help="Checkpointing mode(s) to show (default: all).")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    overrides: Annotated[list[str], typer.Option("--set", help="Override a recipe key.")] = [],
) -> None:
    """Predict peak VRAM per checkpointing mode, and the longest sequence that fits a card."""
    for option, value in (("--seq", seq), ("--batch", batch)):
        if value is not None and value < 1:
            what = "tokens per sequence" if option == "--seq" else "examples per batch"
            raise RecipeError(f"{option} {value}: the {what} must be at least 1.",
                              hint=f"Leave {option} out for the recipe's own value, or give e.g. {option} "
                              f"{4096 if option == '--seq' else 1}.")
    # --seq and --batch are the recipe's own keys; the smart row plans for --vram, not for the recipe's budget
    sizes = [f"data.max_length={seq}"] * (seq is not None) + [f"training.batch_size={batch}"] * (batch is not None)
    # the estimate reads the model's shape, never text: a preset needs no tokenizer here
    recipe = load_recipe(recipe_path, [*overrides, *sizes, "checkpointing.budget=null"], check_paths=False,
                         needs_tokenizer=False)
    seq, batch = recipe.data.max_length, recipe.training.batch_size
    budget = parse_vram(vram)
    wanted = [m for item in modes for m in item.split(",") if m] or list(FIXED_MODES)
    unknown = sorted(set(wanted) - set(FIXED_MODES))
    if unknown:
        raise RecipeError(f"--mode {', '.join(unknown)}: estimate-vram shows the fixed modes {', '.join(FIXED_MODES)}.",
                          hint="smart plans to a budget: see its plan at the start of `ftune train`.")
    config = model_config(recipe)  # from the hub (online) where it is not on this machine
    device = assumed_device(vram=budget)  # a CUDA card, of --vram where given
    shape = Shape.from_config(config.values)
    # what a card of --vram holds at the peak, less what the allocator reserves beyond it
    usable = allocatable(budget) if budget is not None else None
    results = []
    for mode in wanted:
        setting = resolve(recipe, device, mode=mode, config=config).setting
        parts = estimate(shape, setting)
        row = {"mode": mode, **parts.as_dict()}
        if usable is not None:
            row["fits"] = parts.peak <= usable
            row["longest_seq"] = longest_sequence(shape, setting, usable)
            row["largest_batch"] = largest_batch(shape, setting, usable)
        results.append((row, parts))
    report = {"model": recipe.model.preset or recipe.model.name_or_path, "shape": shape.__dict__,
              "seq": seq, "batch": batch, "workflow": _workflow_line(setting),
              "vram": budget, "modes": [row for row, _ in results], "smart": None}
    if budget is not None:
        try:
            layers = resolve(recipe, device, mode="smart", config=config).layers
            report["smart"] = {"plan": layers.counts(), "peak": layers.peak, "host": layers.host,
                               "text": layers.describe()}
        except NoPlanFits as error:
            report["smart"] = {"plan": None, "text": f"smart: {error}"}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_table(report, results, budget)
    if report["workflow"]:
        Console().print(report["workflow"])
    if report["smart"] is not None:
        Console().print(report["smart"]["text"])


def _workflow_line(setting: Setting) -> str | None:
    """What a DPO or GRPO step runs besides the training forward, in the sizes the estimate counts."""
    parts = []
    if setting.generations:
        parts.append(f"generation of {setting.generations} sequences x ({setting.seq} prompt + {setting.completion} "
                     f"completion) tokens at once, {setting.generation_cache} cache")
    if setting.reference_riding:
        parts.append("the reference's rows (the base model) in the training forward, beside the chosen and "
                     "rejected ones")
    elif setting.reference_pass:
        parts.append("a forward without gradients over the training rows")
    if not parts:
        return None
    rows = setting.training_rows
    return f"{'; '.join(parts)}; training on {rows} rows x {setting.seq + setting.completion} tokens"


def _print_table(report: dict, results: list[tuple[dict, Estimate]], budget: int | None) -> None:
    console = Console()
    title = f"{report['model']} · batch {report['batch']} × {report['seq']} tokens"
    table = Table(title=f"Estimated VRAM: {title}", title_justify="left")
    table.add_column("")
    for row, _ in results:
        table.add_column(row["mode"], justify="right")
    for label, key in ROWS:
        values = [parts.as_dict()[key] for _, parts in results]
        if any(values):
            table.add_row(label, *[format_bytes(v) for v in values])
    table.add_row("[bold]peak", *[f"[bold]{format_bytes(parts.peak)}" for _, parts in results])
    if any(parts.kv_cache for _, parts in results):
        table.add_row("  generation's KV cache", *[format_bytes(parts.kv_cache) for _, parts in results])
    table.add_row("host memory (offload)", *[format_bytes(parts.required_host) for _, parts in results])
    if any(parts.parked_host for _, parts in results):
        table.add_row("  + parked attention, if room", *[format_bytes(parts.parked_host) for _, parts in results])
    if budget is not None:
        table.add_row(f"fits {format_bytes(budget)}", *["[green]yes" if r["fits"] else "[red]no" for r, _ in results])
        table.add_row("longest sequence that fits", *[f"{r['longest_seq']:,}" if r["longest_seq"] else "[red]none"
                                                      for r, _ in results])
        table.add_row(f"largest batch at {report['seq']} tokens", *[str(r["largest_batch"]) for r, _ in results])
    console.print(table)
    if budget is not None and not any(r["longest_seq"] for r, _ in results):
        static = min(p.peak - p.working_set - p.checkpoints_gpu - p.loss for _, p in results)
        console.print(f"[red]Even the weights and optimizer states ({format_bytes(static)}) exceed "
                      f"{format_bytes(budget)}:[/] a smaller model or a larger card is needed.")
    notes = sorted({note for _, parts in results for note in parts.notes})
    for note in notes:
        # a note that holds for some columns only names them (a measured mode beside extrapolated ones)
        modes = [row["mode"] for row, parts in results if note in parts.notes]
        which = "" if len(modes) == len(results) else f" ({', '.join(modes)})"
        console.print(f"[dim]note{which}: {note}[/]")
    reserve = 1 - 1 / RESERVED_OVER_ALLOCATED
    fit = f" What fits --vram leaves {reserve:.0%} of it to the allocator's reserve." if budget is not None else ""
    console.print("[dim]GiB = 2^30 bytes; peak is allocated memory (the allocator reserves "
                  f"5-15% more); CUDA's context (~0.5 GiB) comes on top.{fit}[/]")
