"""Peak VRAM and step time of the DPO and GRPO workflows: ftune against plain transformers + peft + TRL.

Two stacks per workflow, each in its own process (memory numbers start clean, and a crash or an
out-of-memory ends only its own row):
  ftune   `python -m ftune train recipes/{dpo,grpo}-llama3-8b.yaml --set ...`: the shipped 8B recipe
          as is (NF4 double-quant, bf16, LoRA r=16 alpha=16 on the seven projections, checkpointing
          mode unsloth, kernels auto = on with CUDA), retargeted at a preset with random weights and
          the repository's quickstart data. Numbers come from its OUTPUT_DIR/metrics.jsonl.
  trl     the usual set-up of the same run (ftune/measure/stacks.py's hf_peft_model):
          AutoModelForCausalLM.from_pretrained with a BitsAndBytesConfig of the recipe's
          quantization, prepare_model_for_kbit_training, peft's LoRA of the recipe, and TRL's
          DPOTrainer / GRPOTrainer with gradient_checkpointing=True (transformers' checkpointing).
          A callback logs the same numbers as ftune's metrics.jsonl.

Both stacks read one resolved recipe (the same --set overrides through ftune.recipe.load_recipe),
so batch size, lengths, learning rate, optimizer, beta, num_generations, max_completion_length,
reward functions (ftune.workflows.rewards) and the data agree; the TrainingArguments of the
baseline are ftune's own (ftune.workflows.common.trainer_arguments) with checkpointing turned on.
The preset's random weights are saved once, in a process of their own, before any run, so that
building them is in neither stack's peak and both load the very same folder.

Settings of every run: max_steps --steps (default 6), logging every step, grad_accum 1, no
checkpoints saved. DPO: the recipe's batch size (1) on data/quickstart/dpo.jsonl (about 30 tokens
per answer; --dpo-repeat K repeats each answer K times for longer sequences). GRPO: batch size =
num_generations (one prompt's group per step, default 4), max_completion_length default 64, on
data/quickstart/grpo.jsonl. A model with random weights rarely samples its end-of-sequence token,
so every completion runs to max_completion_length: the generation work is the same on both stacks.

Measured:
  peak_gib  torch.cuda.max_memory_allocated of the training process, read at every logged step,
            reset once the model is built (both stacks: the peak of training, not of loading)
  step_s    median wall time of a step, from the logged times of consecutive steps, without the
            first step (warm-up, Triton compiles, the first generation)

  python benchmarks/bench_workflows.py --preset llama-3.1-8b --workflows dpo,grpo --steps 6 --out results.json

On CPU (no CUDA) the same runs work on a tiny preset, for a smoke test: float32 instead of bf16,
adamw_torch instead of the 8-bit AdamW, kernels off; peak_gib is then null and rss_gib the largest
resident set size seen.

  python benchmarks/bench_workflows.py --preset tiny-llama --workflows dpo,grpo --steps 3 --out /tmp/wf.json

A step that the host's Python bounds (DPO's short rows) reads 25-40% faster or slower from one
run to the next on the same machine. `--rounds N` runs the stacks N times, taking turns (the order
reversed every other round), and prints each round's ratio and their median: each ratio is read
under the drift of its own round.

  python benchmarks/bench_workflows.py --preset llama-3.1-8b --workflows dpo --steps 12 --rounds 3

Where the host's time goes: `--python-profile DIR` runs each stack under cProfile (DIR/<workflow>-<stack>.prof,
for pstats or snakeviz); the profiler slows Python, so those runs' step times are for the profile only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ftune.measure.results import card_name, result_path  # noqa: E402

GiB = 1024**3
RECIPES = {"dpo": REPO / "recipes" / "dpo-llama3-8b.yaml", "grpo": REPO / "recipes" / "grpo-llama3-8b.yaml"}
QUICKSTART = REPO / "data" / "quickstart"
STACKS = ("ftune", "trl")


# --------------------------------------------------------------------------------------------
# The runs' recipe: the shipped 8B recipe with the benchmark's overrides (both stacks use these)


def recipe_overrides(workflow: str, args, workdir: Path, cuda: bool, output_dir: Path) -> list[str]:
    """`--set` overrides that turn the 8B recipe of a workflow into this benchmark's run."""
    data = QUICKSTART / f"{workflow}.jsonl"
    if workflow == "dpo" and args.dpo_repeat > 1:
        data = repeated_dpo_data(args.dpo_repeat, workdir)
    overrides = [
        f"model.preset={args.preset}",
        "model.name_or_path=null",
        # Absolute paths: relative ones would be resolved against the recipe's folder.
        f"model.tokenizer={QUICKSTART / 'tokenizer'}",
        f"data.source={data}",
        "data.split=train",
        f"training.max_steps={args.steps}",
        "training.logging_steps=1",  # one metrics record per step: the step times come from them
        "training.grad_accum=1",
        "training.save_steps=null",  # no checkpoints: their writing is not what is measured
        f"training.output_dir={output_dir}",
    ]
    if workflow == "grpo":
        g = args.num_generations
        overrides += [
            "data.subset=null",  # the recipe's GSM8K subset and column mapping do not apply to the quickstart data
            "data.fields={}",
            f"grpo.num_generations={g}",
            f"grpo.max_completion_length={args.completion_length}",
            f"training.batch_size={g}",  # one prompt's group of completions per step
        ]
    if not cuda:
        # The CPU smoke test: bf16 autocast and bitsandbytes' 8-bit AdamW are GPU things.
        overrides += ["model.dtype=float32", "quantization.compute_dtype=float32", "training.optimizer=adamw_torch"]
    for item in args.set:  # the user's own, last so they win; `dpo:key=value` applies to one workflow
        scope, sep, rest = item.partition(":")
        if sep and scope in RECIPES and "=" not in scope:
            if scope == workflow:
                overrides.append(rest)
        else:
            overrides.append(item)
    return overrides


def repeated_dpo_data(times: int, workdir: Path) -> Path:
    """The DPO quickstart data with each chosen and rejected answer repeated `times` times."""
    target = workdir / f"dpo-repeat{times}.jsonl"
    if target.exists():
        return target
    rows = [json.loads(line) for line in (QUICKSTART / "dpo.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        for key in ("chosen", "rejected"):
            for message in row[key]:
                message["content"] = " ".join([message["content"]] * times)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


def load(workflow: str, overrides: list[str]):
    from ftune.recipe import load_recipe

    return load_recipe(RECIPES[workflow], overrides)


def settings(recipe, cuda: bool) -> dict:
    """The numbers of a run that both stacks share, for the JSON rows."""
    training = recipe.training
    values = {
        "preset": recipe.model.preset,
        "dtype": recipe.model.dtype,
        "quantization": recipe.quantization.method,
        "lora_r": recipe.lora.r,
        "batch_size": training.batch_size,
        "grad_accum": training.grad_accum,
        "max_steps": training.max_steps,
        "learning_rate": training.learning_rate,
        "optimizer": training.optimizer,
        "max_length": recipe.data.max_length,
        "data": Path(recipe.data.source).name,
    }
    if recipe.workflow == "dpo":
        values.update(beta=recipe.dpo.beta, loss_type=recipe.dpo.loss_type)
    else:
        grpo = recipe.grpo
        values.update(num_generations=grpo.num_generations, max_completion_length=grpo.max_completion_length,
                      temperature=grpo.temperature, beta=grpo.beta, rewards=grpo.rewards)
    return values


# --------------------------------------------------------------------------------------------
# Workers (each in its own process)


def worker_materialize(workflow: str, overrides: list[str]) -> dict:
    """Save the preset's random weights where both stacks will load them from (cached by ftune)."""
    import torch

    from ftune.model import materialize_preset, pick_device, resolve_dtype

    recipe = load(workflow, overrides)
    device = pick_device()
    started = time.perf_counter()
    # The seed and dtype are what ftune's load_base_model passes: the same cache folder.
    path = materialize_preset(recipe.model.preset, seed=recipe.training.seed,
                              dtype=resolve_dtype(recipe.model.dtype, device), device=device)
    return {"path": str(path), "seconds": round(time.perf_counter() - started, 1),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}


def train_ftune_here(workflow: str, overrides: list[str]) -> None:
    """`ftune train` of the workflow's recipe with `overrides`, in this process (for the scripts that
    time or profile it from inside: trace_dpo_step.py, bench_dpo_alternating.py)."""
    from ftune.cli import main as ftune_main

    sys.argv = ["ftune", "train", str(RECIPES[workflow]), "--overwrite"]
    sys.argv += [part for item in overrides for part in ("--set", item)]
    try:
        ftune_main()
    except SystemExit as stop:
        if stop.code:
            raise


def worker_trl(workflow: str, overrides: list[str]) -> dict:
    """The baseline: the recipe's run as transformers + peft + TRL users set it up."""
    from types import SimpleNamespace

    import psutil
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from ftune.data import load_training_data
    from ftune.measure.stacks import hf_peft_model
    from ftune.model import materialize_preset, pick_device, resolve_dtype, run_plan
    from ftune.workflows.common import trainer_arguments

    recipe = load(workflow, overrides)
    device = pick_device()
    cuda = device.type == "cuda"
    dtype = resolve_dtype(recipe.model.dtype, device)
    path = materialize_preset(recipe.model.preset, seed=recipe.training.seed, dtype=dtype, device=device)

    tokenizer = AutoTokenizer.from_pretrained(recipe.resolve_input(recipe.model.tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, _ = load_training_data(recipe)  # the same rows and columns ftune trains on

    # the recipe's bitsandbytes settings and LoRA, as ftune's, and the attention ftune's plan settles on
    model = hf_peft_model(path, recipe, dtype=dtype, device=device, attn_implementation=run_plan(recipe, device).attention,
                          prepare_for_checkpointing=True)

    # ftune's TrainingArguments for this recipe (same batch, lr, optimizer, schedule, seed, precision),
    # with transformers' own checkpointing on, as the baseline.
    arguments = trainer_arguments(recipe, SimpleNamespace(device=device, dtype=dtype))
    arguments["gradient_checkpointing"] = True

    class StepLog(TrainerCallback):
        """The records ftune's metrics.jsonl holds, under the same keys, taken at the same event."""

        def __init__(self):
            self.records, self.started = [], 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            if cuda:  # as ftune train does: the peak of training, not of loading
                torch.cuda.reset_peak_memory_stats(device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" not in (logs or {}):
                return  # the end-of-training summary log
            record = {"step": state.global_step, "loss": logs["loss"], "tokens": state.num_input_tokens_seen or 0,
                      "elapsed_s": round(time.perf_counter() - self.started, 3)}
            if cuda:
                record["mem_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 4)
            else:
                record["mem_rss_gib"] = round(psutil.Process().memory_info().rss / GiB, 4)
            self.records.append(record)

    log = StepLog()
    # TRL's own trainers, with the configs ftune's workflows build from the same recipe
    if workflow == "dpo":
        from trl import DPOTrainer

        from ftune.workflows.dpo import dpo_config

        config = dpo_config(recipe, arguments)
        # No ref_model: TRL uses the PEFT model with its adapter off as the reference, as ftune does.
        trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[log])
    else:
        from trl import GRPOTrainer

        from ftune.workflows.grpo import grpo_config

        config, rewards = grpo_config(recipe, arguments)
        trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[log])
    trainer.train()
    return {"records": log.records}


def worker(args) -> None:
    overrides = json.loads(args.overrides)
    result = {"materialize": worker_materialize, "trl": worker_trl}[args.worker](args.workflow, overrides)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The driver


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["COLUMNS"] = "200"  # rich wraps ftune's messages at 80 columns otherwise
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_process(command: list[str], log_path: Path, timeout: int) -> tuple[int | None, str, str, float]:
    """Run a command; its return code (None on timeout), stdout, stderr and wall time. The output goes to log_path."""
    started = time.perf_counter()
    try:
        process = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=timeout)
        code, stdout, stderr = process.returncode, process.stdout, process.stderr
    except subprocess.TimeoutExpired as expired:
        code = None
        stdout = _text(expired.stdout)
        stderr = _text(expired.stderr) + f"\ntimed out after {timeout} s"
    wall = time.perf_counter() - started
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    return code, stdout, stderr, wall


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def worker_result(stdout: str) -> dict | None:
    lines = [line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1]) if lines else None


def summarize(records: list[dict]) -> dict:
    """Peak memory and step times from per-step records (ftune's metrics.jsonl, or the baseline's)."""
    elapsed = [r["elapsed_s"] for r in records]
    # A record is written after its step: the differences are the steps' durations, the first one
    # counted from the start of training.
    durations = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    timed = durations[1:]
    peaks = [r["mem_peak_gib"] for r in records if r.get("mem_peak_gib") is not None]
    rss = [r["mem_rss_gib"] for r in records if r.get("mem_rss_gib") is not None]
    return {
        "peak_gib": round(max(peaks), 3) if peaks else None,
        "rss_gib": round(max(rss), 3) if rss else None,
        "step_s": round(statistics.median(timed), 4) if timed else None,
        "first_step_s": round(durations[0], 4) if durations else None,
        "step_times_s": [round(d, 4) for d in durations],
        "steps": len(records),
        "tokens": records[-1].get("tokens") if records else None,
        "final_loss": records[-1].get("loss") if records else None,
    }


def error_row(code: int | None, stderr: str) -> dict:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit code {code}"
    oom = "out of memory" in stderr.lower() or "OutOfMemoryError" in stderr
    return {"status": "timeout" if code is None else "error", "error": last, "oom": oom, "stderr_tail": lines[-5:]}


def python_command(profile: Path | None) -> list[str]:
    """The interpreter, under cProfile writing to `profile` if given."""
    return [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])


def run_ftune(workflow: str, overrides: list[str], log_path: Path, timeout: int, output_dir: Path,
              profile: Path | None = None) -> dict:
    # --debug: an error ends in its traceback, whose last line names it (ftune's short form ends in a hint)
    command = python_command(profile) + ["-m", "ftune", "--debug", "train", str(RECIPES[workflow]), "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    metrics = output_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # a reused --workdir must not pass off an earlier run's numbers
    code, _, stderr, wall = run_process(command, log_path, timeout)
    if code != 0 or not metrics.exists():
        return {**error_row(code, stderr), "wall_s": round(wall, 1)}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"status": "ok", **summarize(records), "wall_s": round(wall, 1)}


def run_trl(workflow: str, overrides: list[str], log_path: Path, timeout: int, profile: Path | None = None) -> dict:
    command = python_command(profile) + [__file__, "--worker", "trl", "--workflow", workflow,
                                         "--overrides", json.dumps(overrides)]
    code, stdout, stderr, wall = run_process(command, log_path, timeout)
    result = worker_result(stdout)
    if code != 0 or result is None:
        return {**error_row(code, stderr), "wall_s": round(wall, 1)}
    return {"status": "ok", **summarize(result["records"]), "wall_s": round(wall, 1)}


def kernels_used(recipe, cuda: bool) -> str:
    """ftune's kernels as its plan resolves them for this machine (ftune.plan.resolve)."""
    from ftune.plan import assumed_device, resolve

    kernels = resolve(recipe, assumed_device(cpu=not cuda)).kernels
    on = [name for name, choice in kernels.items() if choice.on]
    return "on" if len(on) == len(kernels) else ",".join(on) or "off"


def line(row: dict) -> str:
    head = f"{row['workflow']:4s} {row['stack']:5s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('error')}  (wall {row.get('wall_s')} s)"
    memory = f"peak {_num(row['peak_gib'], '6.2f')} GiB" if cuda_row(row) else f"rss {_num(row['rss_gib'], '5.2f')} GiB (CPU)"
    return (f"{head} ok  {memory}  step {_num(row['step_s'], '.3f')} s (median of {row['steps'] - 1}, first "
            f"{_num(row['first_step_s'], '.2f')} s)  tokens {row['tokens']}  loss {_num(row['final_loss'], '.4f')}  "
            f"wall {row['wall_s']} s")


def cuda_row(row: dict) -> bool:
    return row.get("device") == "cuda"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_out(path: Path | None, existing: list, rows: list) -> None:
    """Rewrite --out after every row, so that a run cut short still leaves what it measured."""
    if path is None:
        return
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(existing + rows, indent=1))
    os.replace(staging, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--workflows", default="dpo,grpo")
    parser.add_argument("--stacks", default="ftune,trl", help="which of ftune, trl to run (each workflow)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run; the first is not timed")
    parser.add_argument("--num-generations", type=int, default=4, help="GRPO group size (= batch size)")
    parser.add_argument("--completion-length", type=int, default=64, help="GRPO max_completion_length")
    parser.add_argument("--dpo-repeat", type=int, default=1, help="repeat each DPO answer this many times (longer sequences)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for both stacks (repeatable); dpo:KEY=VALUE for one workflow")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the stacks this many times, taking turns (ftune, trl, ftune, trl, ...): the "
                             "host's speed drifts from run to run, and each round's ratio is read under one drift")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed to each run")
    parser.add_argument("--workdir", type=Path, default=None, help="runs' outputs (default: a new temp folder)")
    parser.add_argument("--logs", type=Path, default=None, help="each process's output, one .log per run (default: --workdir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append JSON rows to this list (default benchmarks/results/<card>/<date>-workflows.json)")
    parser.add_argument("--python-profile", type=Path, default=None, metavar="DIR",
                        help="run each stack under cProfile, writing DIR/<workflow>-<stack>.prof (where the host's "
                             "time goes; the profiler slows Python, so these runs' step times are not comparable)")
    parser.add_argument("--worker", choices=["materialize", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workflow", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: the first step is not timed")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    import torch  # the driver only asks whether there is a GPU; it allocates nothing on it

    cuda = torch.cuda.is_available()
    workflows = [w.strip() for w in args.workflows.split(",") if w.strip()]
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    for name, known in ((workflows, RECIPES), (stacks, STACKS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            raise SystemExit(f"unknown {unknown}; choose from {', '.join(known)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_workflows-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = (args.logs or workdir).resolve()
    print(f"runs in {workdir}, logs in {logs}", flush=True)

    # Resolve every run's recipe first: a bad override fails here, before any GPU time is spent.
    plans = {}
    for workflow in workflows:
        for stack in stacks:
            output_dir = workdir / f"{workflow}-{stack}"
            overrides = recipe_overrides(workflow, args, workdir, cuda, output_dir)
            plans[workflow, stack] = (overrides, load(workflow, overrides), output_dir)

    meta = {"device": "cuda" if cuda else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import peft
        import transformers
        import trl

        meta.update(transformers=transformers.__version__, peft=peft.__version__, trl=trl.__version__)
    except ImportError:
        pass
    # The preset's weights, built once per (preset, seed, dtype): the 8B recipes share theirs.
    built = set()
    for workflow in workflows:
        overrides, recipe, _ = plans[workflow, stacks[0]]
        key = (recipe.model.preset, recipe.training.seed, recipe.model.dtype)
        if key in built:
            continue
        built.add(key)
        command = [sys.executable, __file__, "--worker", "materialize", "--workflow", workflow,
                   "--overrides", json.dumps(overrides)]
        code, stdout, stderr, wall = run_process(command, logs / f"materialize-{workflow}.log", args.timeout)
        result = worker_result(stdout)
        if code != 0 or result is None:
            # Nothing can run without the weights: one error row per planned run, then stop.
            print(stderr[-3000:], file=sys.stderr)
            failed = {**error_row(code, stderr), "wall_s": round(wall, 1)}
            failed["error"] = f"building preset {args.preset}: {failed['error']}"
            existing = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
            write_out(args.out, existing, [{"workflow": w, "stack": s, **failed, **meta} for w, s in plans])
            raise SystemExit(failed["error"])
        meta["gpu"] = result["gpu"]
        print(f"preset {args.preset}: {result['path']} ({result['seconds']} s)", flush=True)

    args.out = args.out or result_path("workflows", card=card_name(meta.get("gpu") or "cpu"))
    print(f"results: {args.out}", flush=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    rows = []
    for workflow, round_, stack in turns(workflows, args.rounds, stacks):
        overrides, recipe, output_dir = plans[workflow, stack]
        log_path = logs / (f"{workflow}-{stack}.log" if args.rounds == 1 else f"{workflow}-{stack}-{round_}.log")
        profile = None
        if args.python_profile:
            args.python_profile.mkdir(parents=True, exist_ok=True)
            profile = args.python_profile.resolve() / f"{workflow}-{stack}.prof"
        if stack == "ftune":
            result = run_ftune(workflow, overrides, log_path, args.timeout, output_dir, profile)
            how = {"checkpointing": recipe.checkpointing.mode, "kernels": kernels_used(recipe, cuda)}
        else:
            result = run_trl(workflow, overrides, log_path, args.timeout, profile)
            how = {"checkpointing": "transformers gradient_checkpointing (non-reentrant)", "kernels": "none"}
        row = {"workflow": workflow, "stack": stack, **result, **how, "settings": settings(recipe, cuda),
               "log": str(log_path), **meta}
        if args.rounds > 1:
            row["round"] = round_
        if profile:
            row["python_profile"] = str(profile)
        rows.append(row)
        print(line(row), flush=True)
        if row["status"] != "ok":
            print("\n".join(row["stderr_tail"]), file=sys.stderr, flush=True)
        write_out(args.out, existing, rows)
    for text in round_ratios(rows):
        print(text, flush=True)


def turns(workflows: list[str], rounds: int, stacks: list[str]) -> list[tuple[str, int, str]]:
    """(workflow, round, stack) in the order they run: each round runs the stacks in turn, in the
    reverse order every other round (ftune, TRL, TRL, ftune, ...), so that a drift across the call
    slows neither stack more than the other."""
    return [(workflow, round_, stack) for workflow in workflows for round_ in range(1, rounds + 1)
            for stack in (stacks if round_ % 2 else stacks[::-1])]


def round_ratios(rows: list[dict]) -> list[str]:
    """Per workflow with rounds: each round's TRL step over ftune's (ftune's speed-up), and their median."""
    lines = []
    for workflow in dict.fromkeys(row["workflow"] for row in rows):
        steps = {}
        for row in rows:
            if row["workflow"] == workflow and "round" in row and row["status"] == "ok":
                steps.setdefault(row["round"], {})[row["stack"]] = row["step_s"]
        ratios = [pair["trl"] / pair["ftune"] for _, pair in sorted(steps.items()) if {"ftune", "trl"} <= pair.keys()]
        if ratios:
            lines.append(f"{workflow}: ftune's speed-up by round {', '.join(f'{r:.2f}x' for r in ratios)}; "
                         f"median {statistics.median(ratios):.2f}x")
    return lines


if __name__ == "__main__":
    main()
