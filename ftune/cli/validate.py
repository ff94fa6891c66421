"""`ftune validate FILE...`: check recipes without loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ftune.checks import data_problem, recipe_warnings
from ftune.cli.app import app, err_console, report_error
from ftune.errors import FtuneError
from ftune.recipe import load_recipe


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    overrides: Annotated[list[str], typer.Option("--set", help="Override a key: --set training.max_steps=20.")] = [],
) -> None:
    """Check recipes (keys, types, combinations, input paths, the output folder, GRPO rewards, LoRA
    targets against the model's config, a local JSON data file's lines and columns) without loading
    weights; warn about values that are legal but almost surely wrong."""
    failed = 0
    for path in files:
        try:
            recipe = load_recipe(path, overrides)
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
        print_warnings(recipe_warnings(recipe))
    if failed:
        raise typer.Exit(code=2)


def print_warnings(warnings: list[str]) -> None:
    """Each warning on its own line(s), as `ftune train` prints them."""
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, markup=True)
