"""Run a recipe end to end: data, model, the workflow's TRL trainer, reports, outputs.

Each workflow module (sft, and dpo / grpo) has one `make_trainer(recipe, built, dataset,
callbacks)`; everything around it is shared here.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from rich.console import Console
from transformers import Trainer

from ftune.data import load_training_data
from ftune.memory.monitor import GiB, snapshot
from ftune.model import BuiltModel, build_model
from ftune.outputs import (
    RECIPE_FILE,
    SUMMARY_FILE,
    check_output_dir,
    prepare_output_dir,
    save_adapter,
    write_json_atomic,
    write_text_atomic,
)
from ftune.recipe import Recipe
from ftune.reports import METRICS_FILE, LiveReporter


@dataclass
class TrainingRun:
    """A finished run: its summary (also in summary.json) and the trained model, still in memory."""

    summary: dict[str, Any]
    built: BuiltModel
    trainer: Trainer


def train(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> TrainingRun:
    """Train a recipe end to end and write its outputs."""
    console = console or Console(stderr=True)
    output_dir = Path(recipe.training.output_dir)
    check_output_dir(output_dir, overwrite=overwrite)  # before any slow work
    workflow = importlib.import_module(f"ftune.workflows.{recipe.workflow}")

    console.print(f"[bold]ftune[/] {recipe.workflow} · loading data from {recipe.data.source}")
    dataset, data_format = load_training_data(recipe)
    console.print(f"[bold]ftune[/] {len(dataset)} examples ({data_format}) · building the model")
    transformers.set_seed(recipe.training.seed)
    built = build_model(recipe)
    console.print(f"[bold]ftune[/] {built.source} on {built.device} · {built.engine.describe()}")

    output_dir = prepare_output_dir(output_dir, overwrite=overwrite)
    write_text_atomic(output_dir / RECIPE_FILE, recipe.to_yaml())
    reporter = LiveReporter(output_dir, built.engine, title=recipe.name or output_dir.name, console=console)
    trainer = workflow.make_trainer(recipe, built, dataset, [reporter])
    started = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        reporter.close()
    runtime = time.perf_counter() - started

    save_adapter(trainer.model, built.tokenizer, output_dir)
    history = reporter.history
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    tokens = trainer.state.num_input_tokens_seen or 0
    summary = {
        "name": recipe.name,
        "workflow": recipe.workflow,
        "model": built.source,
        "device": history[-1].get("mem_device") if history else str(built.device),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "runtime_s": round(runtime, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "checkpointing": {"mode": built.engine.mode, **built.engine.counts()},
        "host_offload_bytes": built.engine.host_bytes(),
        "peak_memory_gib": _peak_gib(built, history),
        "output_dir": str(output_dir),
        "files": {"adapter": "adapter_model.safetensors", "recipe": RECIPE_FILE, "metrics": METRICS_FILE},
    }
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    return TrainingRun(summary=summary, built=built, trainer=trainer)


def _peak_gib(built: BuiltModel, history: list[dict[str, Any]]) -> float:
    """Peak allocated VRAM on a GPU; on CPU the largest RSS seen."""
    now = snapshot(built.device, built.engine.host_bytes())
    if now.peak is not None:
        return round(now.peak / GiB, 3)
    return round(max([now.rss / GiB] + [r.get("mem_rss_gib", 0) for r in history]), 3)
