"""Where a GRPO step's time goes: generation, the forwards without gradients (reference or old
log-probabilities) and the training forward and backward, for ftune's stack and TRL's own trainer.

Both stacks are bench_workflows.py's, built from the same resolved recipe (its `recipe_overrides`
of recipes/grpo-llama3-8b.yaml: the preset with random weights, the quickstart prompts, one
prompt's group per step, grad_accum 1), each in its own process:
  ftune   ftune.model.build_model and ftune.workflows.grpo.make_trainer, as `ftune train` builds them
  trl     transformers + peft + TRL's GRPOTrainer with gradient_checkpointing=True (ftune.measure.stacks)

Each phase is timed around TRL's own methods of the trainer (CUDA events on the GPU, the clock on
CPU), summed per optimizer step:
  generation       GRPOTrainer._generate_single_turn (transformers' generate)
  no_grad_logps    _get_per_token_logps_and_entropies without gradients (the reference with beta > 0,
                   the old log-probabilities when a generation serves several optimizer steps)
  prepare          _prepare_inputs: the above, the rewards and the advantages
  train            training_step less prepare: the policy's forward and backward
  step             the optimizer step's wall time
The first step is not timed (warm-up, Triton compiles). Peak: torch.cuda.max_memory_allocated
after the model is built, over the run, and per step within generation (`generation_peak_gib`) and
within the training step outside generation (`training_step_peak_gib`).

  python benchmarks/profile_grpo.py --preset llama-3.1-8b --steps 3 --completion-length 256
  python benchmarks/profile_grpo.py --preset tiny-llama --steps 3 --num-generations 4 --completion-length 8
      # CPU: about 75 s for both stacks (TRL's 4-bit steps are slow there), --stacks ftune about 25 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_workflows import child_env, load, recipe_overrides, worker_result  # noqa: E402
from ftune.measure.results import card_name, result_path  # noqa: E402

GiB = 1024**3
PHASES = ("generation", "no_grad_logps", "prepare", "train", "step")


class PhaseTimer:
    """Time spent inside methods of one trainer, per phase, on the device's clock; on the GPU also
    each phase's peak allocation where asked. The peak is reset as such a phase begins and ends,
    after the step's peak so far is kept: a phase nested in another (generation inside TRL's
    training_step) is taken out of the outer one's peak."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.pending: list[tuple[str, object, object]] = []
        self.peaks: dict[str, float] = defaultdict(float)
        self.step_peak = 0

    def wrap(self, owner, name: str, phase, *, peak: bool = False) -> None:
        """Time owner.name under `phase` (a name, or a function of whether gradients are on); with
        `peak`, also its peak allocation."""
        method = getattr(owner, name)
        peak = peak and self.cuda

        def timed(*args, **kwargs):
            label = phase(self.torch.is_grad_enabled()) if callable(phase) else phase
            if label is None:
                return method(*args, **kwargs)
            if peak:
                self.step_peak = max(self.step_peak, self.torch.cuda.max_memory_allocated())
                self.torch.cuda.reset_peak_memory_stats()
            start = self._mark()
            try:
                return method(*args, **kwargs)
            finally:
                self.pending.append((label, start, self._mark()))
                if peak:
                    phase_peak = self.torch.cuda.max_memory_allocated()
                    self.peaks[f"{label}_peak_gib"] = max(self.peaks[f"{label}_peak_gib"], phase_peak / GiB)
                    self.step_peak = max(self.step_peak, phase_peak)
                    self.torch.cuda.reset_peak_memory_stats()

        setattr(owner, name, timed)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect."""
        if self.cuda:
            self.torch.cuda.synchronize()
        seconds: dict[str, float] = defaultdict(float)
        for label, start, end in self.pending:
            seconds[label] += (start.elapsed_time(end) / 1000) if self.cuda else end - start
        self.pending.clear()
        if self.cuda:
            seconds.update(self.peaks)
            seconds["peak_gib"] = max(self.step_peak, self.torch.cuda.max_memory_allocated()) / GiB
            self.peaks.clear()
            self.step_peak = 0
            self.torch.cuda.reset_peak_memory_stats()
        return dict(seconds)


def build_trainer(stack: str, recipe, cuda: bool, callbacks: list):
    """The stack's GRPOTrainer, as bench_workflows.py builds it."""
    from ftune.data import load_training_data
    from ftune.model import materialize_preset, pick_device, resolve_dtype, run_plan

    device = pick_device()
    dtype = resolve_dtype(recipe.model.dtype, device)
    path = materialize_preset(recipe.model.preset, seed=recipe.training.seed, dtype=dtype, device=device)
    dataset, _ = load_training_data(recipe)
    if stack == "ftune":
        from ftune.model import build_model
        from ftune.workflows.grpo import make_trainer

        built = build_model(recipe)
        return make_trainer(recipe, built, dataset, callbacks)
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from ftune.measure.stacks import hf_peft_model
    from ftune.workflows.common import trainer_arguments
    from ftune.workflows.grpo import grpo_config

    tokenizer = AutoTokenizer.from_pretrained(recipe.resolve_input(recipe.model.tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = hf_peft_model(path, recipe, dtype=dtype, device=device, attn_implementation=run_plan(recipe, device).attention,
                          prepare_for_checkpointing=True)
    arguments = trainer_arguments(recipe, SimpleNamespace(device=device, dtype=dtype))
    arguments["gradient_checkpointing"] = True
    config, rewards = grpo_config(recipe, arguments)
    return GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=callbacks)


def worker(stack: str, overrides: list[str], trace: bool = False) -> dict:
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    recipe = load("grpo", overrides)
    timer = PhaseTimer(cuda)
    steps: list[dict] = []

    tables: dict[str, str] = {}

    class StepTimes(TrainerCallback):
        profiler = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.started = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if trace and state.global_step == state.max_steps - 1:  # the last step, warm
                activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                averages = self.profiler.key_averages()
                device_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                tables["by_device_time"] = averages.table(sort_by=device_key, row_limit=30)
                tables["by_calls"] = averages.table(sort_by="count", row_limit=20)
                self.profiler = None
            seconds = timer.collect()
            now = time.perf_counter()
            seconds["step"], self.started = now - self.started, now
            seconds["train"] = seconds.pop("training_step", 0.0) - seconds.get("prepare", 0.0)
            steps.append(seconds)

    trainer = build_trainer(stack, recipe, cuda, [StepTimes()])
    timer.wrap(trainer, "_generate_single_turn", "generation", peak=True)
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", lambda grad: None if grad else "no_grad_logps")
    timer.wrap(trainer, "_prepare_inputs", "prepare")
    timer.wrap(trainer, "training_step", "training_step", peak=True)
    trainer.train()
    return {"steps": steps, "tables": tables}


def summarize(steps: list[dict]) -> dict:
    timed = steps[1:] or steps  # the first step warms up
    row = {phase: round(statistics.median(s.get(phase, 0.0) for s in timed), 4) for phase in PHASES}
    peaks = [s["peak_gib"] for s in steps if "peak_gib" in s]
    row["peak_gib"] = round(max(peaks), 3) if peaks else None  # None on CPU
    for phase in ("generation", "training_step"):
        phase_peaks = [s[f"{phase}_peak_gib"] for s in steps if f"{phase}_peak_gib" in s]
        row[f"{phase}_peak_gib"] = round(max(phase_peaks), 3) if phase_peaks else None
    row["generation_share"] = round(row["generation"] / row["step"], 3) if row["step"] else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--stacks", default="ftune,trl")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is not timed")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (both stacks)")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None, help="append rows here (default benchmarks/results/<card>/)")
    parser.add_argument("--trace", action="store_true",
                        help="profile the last step with torch.profiler and print its busiest ops and most frequent calls")
    parser.add_argument("--worker", choices=["ftune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.overrides), args.trace)), flush=True)
        return

    import torch

    cuda = torch.cuda.is_available()
    workdir = Path(tempfile.mkdtemp(prefix="profile_grpo-"))
    options = SimpleNamespace(preset=args.preset, steps=args.steps, num_generations=args.num_generations,
                              completion_length=args.completion_length, dpo_repeat=1, set=args.set)
    rows = []
    for stack in [s.strip() for s in args.stacks.split(",") if s.strip()]:
        overrides = recipe_overrides("grpo", options, workdir, cuda, workdir / stack)
        command = [sys.executable, __file__, "--worker", stack, "--overrides", json.dumps(overrides)]
        command += ["--trace"] if args.trace else []
        process = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO,
                                 timeout=args.timeout)
        result = worker_result(process.stdout)
        if process.returncode or result is None:
            print(process.stderr[-3000:], file=sys.stderr)
            rows.append({"stack": stack, "status": "error", "error": process.stderr.strip().splitlines()[-1:]})
            continue
        for name, table in result.get("tables", {}).items():
            print(f"--- {stack}, last step, {name.replace('_', ' ')}\n{table}", flush=True)
        row = {"stack": stack, "status": "ok", **summarize(result["steps"]), "steps": result["steps"],
               "preset": args.preset, "num_generations": args.num_generations,
               "completion_length": args.completion_length, "device": "cuda" if cuda else "cpu",
               "gpu": torch.cuda.get_device_name(0) if cuda else None, "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        print(f"{stack:5s} " + "  ".join(f"{p} {row[p]:.3f} s" for p in PHASES) +
              f"  peak {row['peak_gib']} GiB (generation {row['generation_peak_gib']}, training step"
              f" {row['training_step_peak_gib']})  generation {row['generation_share']:.0%} of the step", flush=True)
    out = args.out or result_path("profile-grpo", card=card_name(rows[0].get("gpu") or "cpu") if rows else "cpu")
    existing = json.loads(out.read_text()) if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing + rows, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
