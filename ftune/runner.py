"""A run's lifecycle: a recipe trained end to end, its outputs written.

    output folder (start, continue from a trainer checkpoint, or refuse) → data → model
    → the workflow's TRL trainer (ftune/workflows/) → train → stop on a signal or a NaN loss
    → adapter, summary.json, model card → push to the hub

The workflow modules only make their trainer; everything around it is here. Under torchrun every
rank runs all of it, and rank 0 alone writes and prints.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from transformers import Trainer

from ftune.checkpoints import (
    Continuation,
    SaveEveryMinutes,
    checkpoint_step,
    manifest_figures,
    newest_sound_checkpoint,
    plan_continuation,
)
from ftune.checks import recipe_warnings
from ftune.data import RowReport, check_rows, eval_data, load_training_data
from ftune.errors import Interrupted, NonFiniteLoss
from ftune.guards import (EvaluationCacheReturned, GracefulStop, NonFiniteLossGuard, host_memory_shortfall,
                          out_of_memory)
from ftune.integrations.transformers_trainer import (
    BestCheckpoint,
    ContinueWithNewLearningRate,
    load_optimizer_state_on_cpu_ranks,
)
from ftune.memory.monitor import GiB, snapshot
from ftune.model import BuiltModel, build_model, load_tokenizer, loads_in_host_memory, run_plan, shards_with_fsdp
from ftune.model_card import push_run, write_model_card
from ftune.outputs import (
    RECIPE_FILE,
    SUMMARY_FILE,
    check_output_dir,
    gather_sharded_adapter,
    prepare_output_dir,
    save_adapter,
    write_json_atomic,
    write_text_atomic,
)
from ftune.recipe import Recipe
from ftune.reports import (METRICS_FILE, LiveReporter, is_evaluation, read_metrics, set_metrics_aside,
                           steady_tokens_per_s, truncate_metrics)
from ftune.workflows.common import tracking_session


@dataclass
class TrainingRun:
    """A finished run: its summary (also in summary.json) and the trained model, still in memory."""

    summary: dict[str, Any]
    built: BuiltModel
    trainer: Trainer


@dataclass
class _Data:
    dataset: Any
    eval_dataset: Any
    format: str
    rows: RowReport  # what check_rows found


def train(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> TrainingRun:
    """Train a recipe end to end and write its outputs; continue if its output holds a run of it."""
    console = console or Console(stderr=True)
    output_dir = Path(recipe.training.output_dir)
    continuation = _continue_or_start(recipe, output_dir, overwrite, console)  # before any slow work
    workflow = importlib.import_module(f"ftune.workflows.{recipe.workflow}")
    data, tokenizer = _load_data(recipe, console)
    built = _build_model(recipe, tokenizer, console)

    main_process = is_main_process()  # under torchrun/accelerate only rank 0 writes and prints
    resume_from = continuation.checkpoint if continuation is not None else None
    run_seconds_before, tokens_before = _prepare_output(recipe, output_dir, continuation, overwrite, console,
                                                        main_process)
    reporter = LiveReporter(output_dir, built.engine, title=recipe.name or output_dir.name, console=console,
                            main_process=main_process)
    stop, nan_guard = GracefulStop(), NonFiniteLossGuard(recipe.training.nan_patience)
    callbacks = [reporter, stop, nan_guard, SaveEveryMinutes(recipe.training.save_minutes)]
    if resume_from is not None:
        callbacks.append(ContinueWithNewLearningRate())
        load_optimizer_state_on_cpu_ranks()
    if data.eval_dataset is not None:
        callbacks.append(EvaluationCacheReturned())
    if recipe.training.keep_best:
        callbacks.append(BestCheckpoint(output_dir, recipe.training.save_total_limit))
    with tracking_session(recipe):  # report_to's trackers write under output_dir, offline unless told
        trainer = workflow.make_trainer(recipe, built, data.dataset, callbacks, eval_dataset=data.eval_dataset)
        trainer.run_seconds_before = run_seconds_before
        started = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError:
            raise out_of_memory(recipe, trainer.state.global_step, built.device, output_dir) from None
        finally:
            reporter.close()
            stop.restore()
    session_runtime, runtime = time.perf_counter() - started, trainer.run_seconds()
    _raise_if_stopped(trainer, stop, nan_guard, output_dir)

    adapter_weights = gather_sharded_adapter(trainer.model) if trainer.is_fsdp_enabled else None
    if not main_process:
        return TrainingRun(summary={"steps": trainer.state.global_step, "rank": _rank()}, built=built, trainer=trainer)
    save_adapter(trainer.model, built.tokenizer, output_dir, adapter_weights)
    history = read_metrics(output_dir / METRICS_FILE) or reporter.history  # the whole run's, resumed or not
    summary = _summary(recipe, built, trainer, result.training_loss, data, history, resume_from, runtime=runtime,
                       session_runtime=session_runtime, tokens_before=tokens_before, output_dir=output_dir)
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    write_model_card(output_dir, recipe, summary)
    if recipe.training.push_to_hub:  # last: a failure leaves the run whole
        console.print(f"[bold]ftune[/] pushing {output_dir} to the hub as {recipe.training.push_to_hub}")
        url = push_run(output_dir, recipe.training.push_to_hub, private=recipe.training.hub_private)
        console.print(f"[bold]ftune[/] pushed to {url}")
    return TrainingRun(summary=summary, built=built, trainer=trainer)


def _continue_or_start(recipe: Recipe, output_dir: Path, overwrite: bool, console: Console) -> Continuation | None:
    """None for a fresh run, else where to continue; raises for a folder that would lose or mix runs."""
    continuation = plan_continuation(recipe, output_dir, overwrite=overwrite)
    if continuation is None and is_main_process():
        # Rank 0 alone decides (it alone writes): under torchrun a rank that starts late would
        # otherwise find the directory rank 0 has just begun, and refuse it as an earlier run's.
        # When rank 0 refuses, torchrun stops the other ranks.
        check_output_dir(output_dir, overwrite=overwrite, recipe_dir=recipe.base_dir)
    for notice in continuation.notices if continuation is not None else []:
        console.print(f"[yellow]notice:[/] {escape(notice)}", highlight=False)
    if is_main_process():
        for warning in recipe_warnings(recipe):  # legal values that are almost surely a mistake
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    return continuation


def _load_data(recipe: Recipe, console: Console):
    """The training (and evaluation) rows, checked against the tokenizer; and the tokenizer."""
    console.print(f"[bold]ftune[/] {recipe.workflow} · loading data from {recipe.data.source}")
    dataset, data_format = load_training_data(recipe)
    tokenizer = load_tokenizer(recipe)
    dataset, rows = check_rows(dataset, data_format, tokenizer, recipe)
    dataset, eval_dataset, _ = eval_data(recipe, dataset, data_format, tokenizer)
    console.print(f"[bold]ftune[/] {data_format} data: {rows.describe(recipe.data.max_length)}"
                  + (f" · eval: {len(eval_dataset)} rows" if eval_dataset is not None else "") + " · building the model")
    return _Data(dataset, eval_dataset, data_format, rows), tokenizer


def _build_model(recipe: Recipe, tokenizer, console: Console) -> BuiltModel:
    shortfall = host_memory_shortfall(recipe, cuda=torch.cuda.is_available())
    if shortfall:
        console.print(f"[yellow]warning:[/] {shortfall}")
    plan = run_plan(recipe)  # every decision of the run, taken before loading (smart's may fail here)
    console.print(f"[bold]ftune[/] {plan.describe()}")
    built = build_model(recipe, tokenizer=tokenizer, plan=plan)
    console.print(f"[bold]ftune[/] {built.source} on {built.device} · {built.engine.describe()}")
    if loads_in_host_memory(recipe, built.device):
        console.print("[bold]ftune[/] fsdp: the model was loaded in host memory; each decoder layer moves to the "
                      "GPUs as it is sharded")
    elif shards_with_fsdp(recipe) and is_main_process():
        console.print("[yellow]warning:[/] distributed.strategy: fsdp shards only on GPUs (accelerate has no FSDP on "
                      "CPU); these CPU processes each hold the whole model and train as ddp.")
    if built.device.type == "cuda":
        # The panel's peak is the training's: loading (or building a preset's random weights, 15 GiB
        # for the 8B shape) passes through the GPU once, before the first step
        torch.cuda.reset_peak_memory_stats(built.device)
    return built


def _prepare_output(recipe: Recipe, output_dir: Path, continuation: Continuation | None, overwrite: bool,
                    console: Console, main_process: bool) -> tuple[float, int]:
    """The output folder made ready (fresh, restarted, or resumed with its metrics cut at the
    checkpoint's step) and the recipe written in it; the training seconds and tokens before."""
    run_seconds_before, tokens_before = 0.0, 0
    resume_from = continuation.checkpoint if continuation is not None else None
    if continuation is None and main_process:
        prepare_output_dir(output_dir, overwrite=overwrite, recipe_dir=recipe.base_dir)
    elif continuation is not None and continuation.restart and main_process:
        kept = set_metrics_aside(output_dir / METRICS_FILE)
        if kept is not None:
            console.print(f"[bold]ftune[/] the earlier attempt's metrics are kept in {kept}")
    elif resume_from is not None:
        step = checkpoint_step(resume_from)
        figures = manifest_figures(resume_from)
        run_seconds_before, tokens_before = figures.get("run_seconds", 0.0), figures.get("tokens", 0)
        console.print(f"[bold]ftune[/] resuming from {resume_from} (step {step})")
        if main_process:
            truncate_metrics(output_dir / METRICS_FILE, after_step=step)
    if main_process:  # the recipe as this run trains it, with input paths that hold from its folder
        write_text_atomic(output_dir / RECIPE_FILE, recipe.to_yaml(absolute_inputs=True))
    return run_seconds_before, tokens_before


def _raise_if_stopped(trainer: Trainer, stop: GracefulStop, nan_guard: NonFiniteLossGuard, output_dir: Path) -> None:
    if stop.signal_number is not None:
        raise Interrupted(
            f"Stopped by {signal.Signals(stop.signal_number).name} at step {trainer.state.global_step}; "
            f"a checkpoint of that step is in {output_dir}.",
            hint="Run the same command again to resume from it.",
            signal_number=stop.signal_number,
        )
    if nan_guard.stopped_at is not None:
        last, _ = newest_sound_checkpoint(output_dir)
        raise NonFiniteLoss(
            f"The loss was NaN or infinite for {nan_guard.patience} logged step(s) in a row, up to step "
            f"{nan_guard.stopped_at}; training stopped. "
            + (f"The last checkpoint with finite weights is {last}." if last else "No checkpoint with finite "
               "weights was saved."),
            hint="Lower training.learning_rate (a continued run may change it), keep training.max_grad_norm on, or "
            "check the data for empty or broken rows; then run the same command to continue from that checkpoint.",
        )


def _summary(recipe: Recipe, built: BuiltModel, trainer: Trainer, train_loss: float, data: _Data,
             history: list[dict[str, Any]], resume_from: Path | None, *, runtime: float, session_runtime: float,
             tokens_before: int, output_dir: Path) -> dict[str, Any]:
    """summary.json: the whole run's figures (a resumed run's include its earlier sessions)."""
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    evaluations = [r for r in history if is_evaluation(r)]
    tokens = trainer.state.num_input_tokens_seen or 0  # restored from the checkpoint: the whole run's
    return {
        "name": recipe.name,
        "workflow": recipe.workflow,
        "model": built.source,
        "device": snapshot(built.device).device,  # the card's name on a GPU
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": train_loss,
        "resumed_from": str(resume_from) if resume_from else None,
        "data": {"format": data.format, **asdict(data.rows)},
        "runtime_s": round(runtime, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "tokens_per_s_steady": steady_tokens_per_s(history),
        "eval_loss": evaluations[-1].get("eval_loss") if evaluations else None,
        "eval": evaluations[-1] if evaluations else None,
        "eval_rows": len(data.eval_dataset) if data.eval_dataset is not None else None,
        "best_checkpoint": trainer.state.best_model_checkpoint if recipe.training.keep_best else None,
        "session": {"runtime_s": round(session_runtime, 2), "tokens": tokens - tokens_before},
        "checkpointing": {"mode": built.engine.mode, **built.engine.counts()},
        "batches": built.plan.batches,  # padded, padding-free or packed
        "host_offload_bytes": built.engine.host_bytes(),
        "peak_memory_gib": _peak_gib(built, history),
        "peak_memory_bytes": snapshot(built.device).peak,  # allocated VRAM's exact peak; None on CPU
        "output_dir": str(output_dir),
        "files": {"adapter": "adapter_model.safetensors", "recipe": RECIPE_FILE, "metrics": METRICS_FILE,
                  "model_card": "README.md"},
    }


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return _rank() == 0


def _peak_gib(built: BuiltModel, history: list[dict[str, Any]]) -> float:
    """Peak allocated VRAM on a GPU; on CPU the largest RSS seen."""
    now = snapshot(built.device, built.engine.host_bytes())
    if now.peak is not None:
        return round(now.peak / GiB, 3)
    return round(max([now.rss / GiB] + [r.get("mem_rss_gib", 0) for r in history]), 3)
