"""`ftune train [RECIPE]`: run a recipe end to end with a live VRAM panel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftune.checks import load_checked_recipe
from ftune.cli.app import app, err_console
from ftune.errors import FtuneError

# The embedded default: trains a tiny model on CPU in a few minutes, nothing downloaded.
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def launch_data_parallel(gpus: int) -> int:
    """Run this same command once per GPU under torchrun (the launcher users know); its exit code."""
    import torch

    available = torch.cuda.device_count()
    if available < gpus:
        raise FtuneError(f"--gpus {gpus}, but this machine has {available} CUDA device(s).",
                         hint="Lower --gpus, or set CUDA_VISIBLE_DEVICES to the cards you want.")
    arguments = [a for a in sys.argv[1:] if not a.startswith("--gpus")]
    if "--gpus" in sys.argv[1:]:
        index = sys.argv.index("--gpus")
        arguments = sys.argv[1:index] + sys.argv[index + 2:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "ftune", *arguments]
    err_console.print(f"[bold]ftune[/] data parallel on {gpus} GPUs: {' '.join(command[2:])}")
    return subprocess.call(command)


@app.command()
def train(
    recipe_path: Annotated[
        Path | None, typer.Argument(metavar="RECIPE", help="Recipe file (default: the shipped quickstart).")
    ] = None,
    overrides: Annotated[list[str], typer.Option("--set", help="Override a key: --set training.max_steps=20.")] = [],
    overwrite: Annotated[bool, typer.Option(
        help="Start again: delete the earlier ftune run in the output directory (never a folder holding other files).")] = False,
    gpus: Annotated[int, typer.Option(min=1, help="Data parallel over this many GPUs of this machine (torchrun).")] = 1,
) -> None:
    """Fine-tune a model as a recipe says: QLoRA through bitsandbytes and peft, on TRL's trainer."""
    from ftune.runner import train as run_training

    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(code=launch_data_parallel(gpus))

    if recipe_path is None:
        if not QUICKSTART.is_file():
            raise FtuneError("No recipe given and the shipped quickstart is not here.",
                             hint="Pass a recipe file: ftune train recipes/quickstart.yaml")
        recipe_path = QUICKSTART
    recipe = load_checked_recipe(recipe_path, overrides)
    summary = run_training(recipe, overwrite=overwrite, console=err_console).summary
    if "rank" in summary:  # not the main process: rank 0 reports
        return

    table = Table(title="ftune · run finished", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key in ("steps", "first_loss", "final_loss", "runtime_s", "tokens_per_s", "peak_memory_gib", "output_dir"):
        value = summary.get(key)
        text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) and "loss" in key else str(value)
        table.add_row(key.replace("_", " "), text)
    err_console.print(table)
