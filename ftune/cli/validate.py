"""`ftune validate FILE...`: check recipes, and show the plan each resolves to, without torch or weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ftune.checks import data_problem, load_checked_recipe, recipe_warnings
from ftune.cli.app import app, err_console, parse_vram, report_error
from ftune.errors import FtuneError
from ftune.memory.policy import NoPlanFits
from ftune.plan import Device, assumed_device, resolve
from ftune.recipe import Recipe


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    overrides: Annotated[list[str], typer.Option("--set", help="Override a key: --set training.max_steps=20.")] = [],
    vram: Annotated[str | None, typer.Option(
        help="Plan for a GPU of this memory, e.g. 24GiB (mode smart's layers need it).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Plan for training on this machine's CPU, not a CUDA GPU.")] = False,
) -> None:
    """Check recipes (keys, types, combinations, input paths, the output folder, GRPO rewards, LoRA
    targets against the model's config, a local JSON data file's lines and columns) without loading
    weights; warn about values that are legal but almost surely wrong; show the resolved plan
    (kernels and why, LoRA targets, attention, checkpointing)."""
    device = assumed_device(cpu=cpu, vram=parse_vram(vram))
    failed = 0
    for path in files:
        try:
            recipe = load_checked_recipe(path, overrides)
        except FtuneError as error:
            failed += 1
            report_error(error)
            continue
        data = data_problem(recipe)  # a local JSON file's lines and columns, as training will read them
        if data is not None:
            failed += 1
            report_error(data)
            continue
        what = recipe.model.preset or recipe.model.name_or_path
        err_console.print(f"[green]✓[/] {escape(str(path))}: {recipe.workflow} on {escape(str(what))}, checkpointing {recipe.checkpointing.mode}",
                          highlight=False)
        print_plan(recipe, device)
        print_warnings(recipe_warnings(recipe))
    if failed:
        raise typer.Exit(code=2)


def print_plan(recipe: Recipe, device: Device) -> None:
    """The plan's few lines, indented under the recipe's."""
    try:
        lines = resolve(recipe, device).describe_lines()
    except NoPlanFits as error:
        lines = [f"smart: {error}: lower data.max_length or training.batch_size, or plan for a larger --vram"]
    for line in lines:
        err_console.print(f"  [dim]{escape(line)}[/]", highlight=False)


def print_warnings(warnings: list[str]) -> None:
    """Each warning on its own line(s), as `ftune train` prints them."""
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, markup=True)
