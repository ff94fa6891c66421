"""`ftune compare RECIPE --ckpt none,true,unsloth`: the checkpointing modes side by side, measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from ftune.checks import load_checked_recipe
from ftune.cli.app import app, err_console
from ftune.errors import OutputDirError, RecipeError
from ftune.memory.estimate import estimate
from ftune.memory.units import format_bytes
from ftune.model_config import model_config
from ftune.plan import assumed_device, resolve

MODES = ("none", "true", "unsloth", "smart")


@app.command()
def compare(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe file.")],
    ckpt: Annotated[list[str], typer.Option(help="Modes to compare: a comma list, or repeat the option.")] = [],
    steps: Annotated[int, typer.Option(min=2, help="Training steps per mode (the first is not timed).")] = 5,
    seq: Annotated[int | None, typer.Option(help="Random token batches of this length (default: the data).")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: training.batch_size).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for compare.json and compare.png.")] = None,
    memory_cap: Annotated[float | None, typer.Option(help="Cap each mode's memory, in GiB (a smaller card).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON for scripts.")] = False,
    overrides: Annotated[list[str], typer.Option("--set", help="Override a recipe key.")] = [],
) -> None:
    """Run a few steps of the recipe in each checkpointing mode: VRAM, speed, loss agreement, a chart."""
    recipe = load_checked_recipe(recipe_path, overrides)
    modes = [m.strip() for item in (ckpt or ["none,true,unsloth"]) for m in item.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise RecipeError(f"--ckpt {', '.join(unknown) or '(empty)'}: the modes are {', '.join(MODES)}.",
                          hint="For example --ckpt none,true,unsloth")
    out = _output_dir(out, recipe)
    console = err_console
    rows = []
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as progress:
        for number, mode in enumerate(modes, 1):
            task = progress.add_task(f"mode {mode} ({number}/{len(modes)})", total=steps, info="loading the model")
            rows.append(_run_worker(recipe_path, mode, steps, seq, batch, memory_cap, overrides, progress, task))
    report = _report(recipe, modes, rows, seq, batch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    _chart(report, out / "compare.png")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report, Console())
        Console().print(f"[dim]written: {out / 'compare.json'}, {out / 'compare.png'}[/]")


def _output_dir(out: Path | None, recipe) -> Path:
    if out is not None:
        if out.exists() and any(p.name not in ("compare.json", "compare.png") for p in out.iterdir()):
            raise OutputDirError(f"--out {out} holds other files; compare writes only compare.json and compare.png.",
                                 hint="Choose an empty or new folder.")
        return out
    base = Path(recipe.training.output_dir + "-compare")
    candidate, number = base, 2
    while candidate.exists():  # never replace an earlier comparison
        candidate, number = Path(f"{base}-{number}"), number + 1
    return candidate


def _run_worker(recipe_path, mode, steps, seq, batch, memory_cap, overrides, progress, task) -> dict[str, Any]:
    command = [sys.executable, "-m", "ftune.compare", "--recipe", str(recipe_path), "--mode", mode,
               "--steps", str(steps)]
    for item in overrides + ([] if mode == "smart" else ["checkpointing.budget=null"]):
        command += ["--set", item]
    if seq:
        command += ["--seq", str(seq)]
    if batch:
        command += ["--batch", str(batch)]
    if memory_cap is not None:
        command += ["--memory-cap-gib", str(memory_cap)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    result: dict[str, Any] | None = None
    for line in process.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "step":
            progress.update(task, completed=event["step"], info=f"loss {event['loss']:.4f}")
        elif event.get("event") == "result":
            result = event
    stderr = process.stderr.read()
    process.wait()
    if result is None:
        last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "no output")
        result = {"status": "error", "error": f"the worker exited with {process.returncode}: {last[:300]}"}
    progress.update(task, info=result["status"] if result["status"] != "ok" else "done")
    result["mode"] = mode
    return result


def _report(recipe, modes, rows, seq, batch) -> dict[str, Any]:
    try:
        config = model_config(recipe)
    except Exception:  # no config reachable: the estimates are left out, the measurements stand
        config = None
    reference = next((r for r in rows if r["status"] == "ok"), None)
    for row in rows:
        if config is not None and row["mode"] != "smart":
            plan = resolve(recipe, assumed_device(), mode=row["mode"], config=config)
            # the workers train with torch's AdamW whatever the recipe names (fp32 moments), so the
            # estimate does too
            setting = replace(plan.setting, optimizer="adamw_torch", seq=seq or plan.setting.seq,
                              batch=batch or plan.setting.batch)
            row["estimated_peak_bytes"] = estimate(plan.shape, setting).peak
        if row["status"] == "ok" and reference is not None:
            n = min(len(row["losses"]), len(reference["losses"]))
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"][:n], reference["losses"][:n]))
            row["max_grad_norm_diff"] = max(abs(a - b) for a, b in zip(row["grad_norms"][:n], reference["grad_norms"][:n]))
    fitting = [r for r in rows if r["status"] == "ok"]
    fastest = max(fitting, key=lambda r: r["tokens_per_s"], default=None)
    smallest = min(fitting, key=lambda r: r["peak_bytes"], default=None)
    if fastest is None:
        verdict = "no mode ran: see the error of each row"
    else:
        verdict = (f"fastest: {fastest['mode']} ({fastest['tokens_per_s']:,.0f} tok/s, {format_bytes(fastest['peak_bytes'])}); "
                   f"least memory: {smallest['mode']} ({format_bytes(smallest['peak_bytes'])}, "
                   f"{smallest['tokens_per_s']:,.0f} tok/s)")
        failed = [r["mode"] for r in rows if r["status"] != "ok"]
        if failed:
            verdict += f"; did not fit or failed: {', '.join(failed)}"
    return {"recipe": recipe.name, "modes": modes, "reference_mode": reference["mode"] if reference else None,
            "seq": seq, "batch": batch or recipe.training.batch_size, "rows": rows, "verdict": verdict}


def _print(report: dict[str, Any], console: Console) -> None:
    rows = report["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    best_peak = min((r["peak_bytes"] for r in ok), default=None)
    best_speed = max((r["tokens_per_s"] for r in ok), default=None)
    kind = ok[0]["memory_kind"] if ok else "peak memory"
    # The memory model predicts a GPU's allocated memory; beside a CPU's RSS it would read as a
    # comparison it is not, so on CPU it stays in compare.json only.
    on_cpu = bool(ok) and all(r.get("memory_kind") == "peak RSS (CPU)" for r in ok)
    reference = f"; Δ = largest difference from {report['reference_mode']}" if report["reference_mode"] else ""
    table = Table(title=f"ftune compare · {report['recipe'] or ''} · peak = {kind}{reference}", title_justify="left")
    columns = ["mode", "peak", *([] if on_cpu else ["VRAM estimate"]), "reserved", "host", "step", "tok/s", "Δ loss",
               "Δ grad norm"]
    for column in columns:
        table.add_column(column, justify="right" if column != "mode" else "left", no_wrap=True)
    estimate = [] if on_cpu else None
    for row in rows:
        estimated = estimate if estimate is not None else [format_bytes(row.get("estimated_peak_bytes"))]
        if row["status"] != "ok":
            table.add_row(row["mode"], f"[red]{'out of memory' if row['status'] == 'oom' else 'failed'}",
                          *estimated, *[""] * 6)
            continue
        peak = format_bytes(row["peak_bytes"])
        speed = f"{row['tokens_per_s']:,.0f}"
        table.add_row(
            row["mode"],
            f"[bold green]{peak}" if row["peak_bytes"] == best_peak else peak,
            *estimated,
            format_bytes(row["reserved_bytes"]),
            format_bytes(row["host_bytes"]),
            f"{row['step_s'] * 1000:.0f} ms",
            f"[bold green]{speed}" if row["tokens_per_s"] == best_speed else speed,
            f"{row['max_loss_diff']:.2e}",
            f"{row['max_grad_norm_diff']:.2e}",
        )
    console.print(table)
    if on_cpu and any(r.get("estimated_peak_bytes") for r in rows):
        console.print("[dim]The memory model's estimates are of a GPU's allocated memory, not comparable with a "
                      "CPU's RSS: they are in compare.json (estimated_peak_bytes), not in this table.[/]")
    for row in rows:
        if row["status"] != "ok":
            console.print(f"[red]{row['mode']}:[/] {escape(row['error'])}", soft_wrap=True)
    console.print(f"[bold]verdict:[/] {report['verdict']}")


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["mode"] for r in rows]
    peaks = [r["peak_bytes"] / 1024**3 if r["status"] == "ok" else 0 for r in rows]
    speeds = [r["tokens_per_s"] if r["status"] == "ok" else 0 for r in rows]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(9, 3.5))
    memory.bar(names, peaks, color="#4c72b0")
    memory.set_title(rows[0].get("memory_kind", "peak memory") + " (GiB)" if rows else "peak memory")
    speed.bar(names, speeds, color="#55a868")
    speed.set_title("tokens/s")
    for axis, values in ((memory, peaks), (speed, speeds)):
        for index, (row, value) in enumerate(zip(rows, values)):
            label = f"{value:.2f}" if axis is memory else f"{value:,.0f}"
            axis.text(index, value, label if row["status"] == "ok" else row["status"], ha="center", va="bottom",
                      fontsize=8)
    figure.suptitle(f"ftune compare · {report['recipe'] or ''}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
