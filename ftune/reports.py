"""What a run shows and writes while it trains: a live panel (or a plain line per log when the
output is not a terminal), and the same numbers per logging step in metrics.jsonl.

Evaluations (data.eval) are records of their own in metrics.jsonl, with the trainer's eval_*
names. ftune's own figures (tokens/s, memory, host offload) are added to each training log under
ftune/... before the trackers of training.report_to see it (common.finish_trainer runs their
callbacks after this one), so TensorBoard, W&B, MLflow and Trackio plot them beside the loss."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from transformers import TrainerCallback

from ftune.engine import CheckpointingEngine
from ftune.memory.monitor import MemorySnapshot, snapshot

METRICS_FILE = "metrics.jsonl"
_RECORDED = {"loss", "learning_rate", "grad_norm", "epoch", "num_input_tokens_seen", "num_tokens"}
# Workflow numbers worth a line on the panel, when the trainer logs them.
PANEL_METRICS = {"mean_token_accuracy": "token accuracy", "rewards/margins": "reward margin",
                 "rewards/accuracies": "reward accuracy", "reward": "mean reward",
                 # a mixture of experts' load-balancing loss (TRL's aux_loss), which the loss includes
                 "aux_loss": "router aux loss"}
# The evaluation's numbers on the panel: its loss, then the workflow's as above
EVAL_METRICS = {"eval_loss": "eval loss", **{f"eval_{key}": f"eval {label}" for key, label in PANEL_METRICS.items()}}
# The trainer's figures about the evaluation itself, left out of the records
_EVAL_TIMINGS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
# ftune's figures added to the logs the trackers receive (GiB, tokens/s)
TRACKED_FIGURES = {"tokens_per_s": "ftune/tokens_per_s", "mem_allocated_gib": "ftune/vram_allocated_gib",
                   "mem_reserved_gib": "ftune/vram_reserved_gib", "mem_peak_gib": "ftune/vram_peak_gib",
                   "mem_host_offload_gib": "ftune/host_offload_gib", "mem_rss_gib": "ftune/rss_gib"}


class LiveReporter(TrainerCallback):
    """Step, loss, learning rate, tokens/s, ETA and memory, live; one JSON line per log."""

    def __init__(self, output_dir: Path, engine: CheckpointingEngine, *, title: str, console: Console | None = None,
                 main_process: bool = True):
        self.metrics_path = Path(output_dir) / METRICS_FILE
        self.engine = engine
        self.title = title
        self.console = console or Console(stderr=True)
        self.live: Live | None = None
        self.started = 0.0
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._last_log = (0.0, 0)  # (time, tokens) at the previous log, for tokens/s
        self._eval_seconds = 0.0  # spent evaluating since the previous log: not training time
        self._memory: MemorySnapshot | None = None
        self.main_process = main_process  # other ranks only lend their memory readings
        self._ranks: list[dict[str, Any]] = []

    # -- trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self._last_log = (self.started, 0)
        if not self.main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", buffering=1)
        if self.console.is_terminal:
            self.live = Live(self._render(state), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.update(self._render(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        tracked = logs if logs is not None else {}  # the trackers' callbacks see this same dict next
        logs = dict(tracked)
        if "eval_loss" in logs or any(key.startswith("eval_") for key in logs if key not in _EVAL_TIMINGS):
            self._on_evaluation(state, logs)
            return
        if "loss" not in logs:
            return  # the end-of-training log (train_loss, runtime) goes to summary.json
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen or 0
        last_time, last_tokens = self._last_log
        self._last_log = (now, tokens)
        training_seconds = now - last_time - self._eval_seconds
        self._eval_seconds = 0.0
        self._memory = snapshot(self.engine.device, self.engine.host_bytes())
        self._ranks = _gather_ranks(self._memory)  # a collective: every rank calls on_log
        if not self.main_process:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": tokens,
            "tokens_per_s": round((tokens - last_tokens) / training_seconds, 1) if training_seconds > 0 else None,
            "elapsed_s": round(now - self.started, 3),
            # the workflow's own numbers: token accuracy (sft), reward margins (dpo), mean reward (grpo)
            **{k: v for k, v in logs.items() if k not in _RECORDED and isinstance(v, (int, float))},
            **self._memory.as_metrics(),
        }
        if len(self._ranks) > 1:
            record["ranks"] = self._ranks
        tracked.update({name: record[key] for key, name in TRACKED_FIGURES.items()
                        if isinstance(record.get(key), (int, float))})
        self.last = record
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        if self.live is not None:
            self.live.update(self._render(state))
        else:
            self.console.print(self._plain_line(state), highlight=False, soft_wrap=True)

    def _on_evaluation(self, state, logs: dict[str, Any]) -> None:
        """An evaluation's metrics: a record of their own, the panel's eval rows."""
        self._eval_seconds += float(logs.get("eval_runtime") or 0.0)
        if not self.main_process:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  **{k: v for k, v in logs.items() if k.startswith("eval_") and k not in _EVAL_TIMINGS
                     and isinstance(v, (int, float))},
                  "eval_runtime_s": logs.get("eval_runtime")}
        self.last_eval = record
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        if self.live is not None:
            self.live.update(self._render(state))
        else:
            parts = [f"eval at step {record['step']}"] + [
                f"{label} {record[key]:.4f}" for key, label in EVAL_METRICS.items() if record.get(key) is not None]
            self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close(state)

    def close(self, state=None) -> None:
        if self.live is not None:
            if state is not None:
                self.live.update(self._render(state))
            self.live.stop()
            self.live = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    # -- rendering ---------------------------------------------------------------------------
    def _eta(self, state) -> str:
        if not state.global_step or not state.max_steps:
            return "-"
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / state.global_step * (state.max_steps - state.global_step)
        return _duration(remaining)

    def _plain_line(self, state) -> str:
        record = self.last
        parts = [f"step {record['step']}/{state.max_steps}"]
        if record.get("loss") is not None:
            parts.append(f"loss {record['loss']:.4f}")
        if record.get("learning_rate") is not None:
            parts.append(f"lr {record['learning_rate']:.2e}")
        if record.get("tokens_per_s"):
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        for key, label in PANEL_METRICS.items():
            if record.get(key) is not None:
                parts.append(f"{label} {record[key]:.4f}")
        parts.append(f"eta {self._eta(state)}")
        if self._memory is not None:
            parts.append(self._memory.headline())
        return " | ".join(parts)

    def _render(self, state) -> Panel:
        record = self.last
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        total = state.max_steps or 0
        table.add_row("step", f"{state.global_step}/{total}")
        table.add_row("loss", _fmt(record.get("loss"), ".4f"))
        table.add_row("learning rate", _fmt(record.get("learning_rate"), ".2e"))
        table.add_row("tokens/s", _fmt(record.get("tokens_per_s"), ",.0f"))
        for key, label in PANEL_METRICS.items():
            if record.get(key) is not None:
                table.add_row(label, _fmt(record[key], ".4f"))
        for key, label in EVAL_METRICS.items():
            if self.last_eval.get(key) is not None:
                table.add_row(label, f"{self.last_eval[key]:.4f} (step {self.last_eval['step']})")
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        table.add_row("elapsed · eta", f"{_duration(elapsed)} · {self._eta(state)}")
        memory = self._memory or snapshot(self.engine.device, self.engine.host_bytes())
        table.add_row("memory", memory.headline())
        for entry in self._ranks[1:]:
            table.add_row(f"rank {entry['rank']}", entry["headline"])
        table.add_row("engine", self.engine.describe())
        bar = ProgressBar(total=max(total, 1), completed=state.global_step, width=50)
        return Panel(Group(bar, table), title=f"[bold]ftune · {self.title}", border_style="cyan", expand=False)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def is_evaluation(record: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl record is an evaluation's (else a training log's)."""
    return "loss" not in record and any(key.startswith("eval_") for key in record)


def steady_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """Tokens/s of training once it runs steadily: the median of the logged intervals, leaving out
    the first of each session (start-up, compilation, the first steps' allocations). Evaluation
    time is not in the intervals (LiveReporter subtracts it). None with fewer than two logs."""
    rates, previous = [], None
    for record in history:
        if is_evaluation(record) or record.get("tokens_per_s") is None:
            continue
        elapsed = record.get("elapsed_s", 0.0)
        if previous is not None and elapsed > previous:  # not the first log of a session
            rates.append(record["tokens_per_s"])
        previous = elapsed
    return round(statistics.median(rates), 1) if rates else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a line cut short by a crash is left out)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def set_metrics_aside(path: Path) -> Path | None:
    """Rename an earlier attempt's metrics.jsonl to metrics-interrupted-N.jsonl (N the first free)."""
    path = Path(path)
    if not path.is_file():
        return None
    number = 1
    while (target := path.with_name(f"metrics-interrupted-{number}.jsonl")).exists():
        number += 1
    path.rename(target)
    return target


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop the lines of steps after a checkpoint, which the resumed run logs again."""
    if not path.is_file():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= after_step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _gather_ranks(memory: MemorySnapshot) -> list[dict[str, Any]]:
    """Every rank's memory reading, on every rank (empty when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    mine = {"rank": dist.get_rank(), "headline": memory.headline(), **memory.as_metrics()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
