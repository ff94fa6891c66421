"""Where a DPO step's host time goes: torch.profiler over a few training steps of one stack.

The stacks and their recipe are bench_workflows.py's (the shipped DPO recipe on a preset with random
weights and the quickstart data; `ftune` as `ftune train` runs it, `trl` transformers + peft + TRL's
DPOTrainer with checkpointing on). transformers' `Trainer.training_step` is wrapped so that the
profiler runs from step --first to step --last (the optimizer steps between them included), after
the warm-up steps; the summary goes to stdout and to --out:

- the profiler's table by self CPU time (an autograd Function's self time holds the Python it runs,
  Triton's launches among it)
- kernel launches and summed kernel time per step
- the calls that can block the host (synchronizations, copies), grouped by the Python that made them
- the attention calls, by the Python that made them

With --python, cProfile replaces torch.profiler over the same steps: the functions by cumulative
and by own time (pstats), and the raw profile beside --out (.prof, for pstats or snakeviz).

  python benchmarks/trace_dpo_step.py --stack ftune --out trace-ftune.txt
  python benchmarks/trace_dpo_step.py --stack trl --out trace-trl.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import types
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_workflows  # noqa: E402  (puts the repository on sys.path)

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize",
            "Command Buffer Full")


def summary(prof, steps: int) -> str:
    events = prof.key_averages()
    lines = [events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)]
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    # the kernels themselves: an operator's device time counts its kernels a second time
    kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    lines.append(f"per step: {launches / steps:.0f} kernel launches, {kernel_ms / steps:.1f} ms of kernel time")
    by_stack = prof.key_averages(group_by_stack_n=10)
    for title, chosen in (("blocking calls", lambda key: key in BLOCKING),
                          ("attention", lambda key: key.startswith("aten::scaled_dot") or "cudnn" in key)):
        lines.append(f"{title}, ms of CPU per step, calls per step:")
        for e in sorted((e for e in by_stack if chosen(e.key)), key=lambda e: -e.cpu_time_total)[:10]:
            lines.append(f"  {e.cpu_time_total / 1000 / steps:8.2f} ms  x{e.count / steps:6.1f}  {e.key}")
            lines += [f"        {frame}" for frame in e.stack[:8]]
    return "\n".join(lines)


def python_summary(profiler: cProfile.Profile, steps: int) -> str:
    lines = [f"cProfile over {steps} steps"]
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(60)
        lines.append(text.getvalue())
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", choices=bench_workflows.STACKS, required=True)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--first", type=int, default=6, help="first traced step (the ones before warm up)")
    parser.add_argument("--last", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--python", action="store_true", help="cProfile instead of torch.profiler")
    args = parser.parse_args()
    if not 1 <= args.first <= args.last:
        raise SystemExit("--first and --last: 1 <= first <= last")
    cuda = torch.cuda.is_available()
    state = {"step": 0, "profiler": None}
    training_step = transformers.Trainer.training_step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def traced(self, *step_args, **step_kwargs):
        state["step"] += 1
        if state["step"] == args.first:
            sync()
            if args.python:
                state["profiler"] = cProfile.Profile()
                state["profiler"].enable()
            else:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                state["profiler"] = profile(activities=activities, with_stack=True)
                state["profiler"].__enter__()
        result = training_step(self, *step_args, **step_kwargs)
        if state["step"] == args.last:
            sync()
            steps = args.last - args.first + 1
            if args.python:
                state["profiler"].disable()
                text = python_summary(state["profiler"], steps)
                if args.out:
                    state["profiler"].dump_stats(str(args.out.with_suffix(".prof")))
            else:
                state["profiler"].__exit__(None, None, None)
                text = summary(state["profiler"], steps)
            print(text, flush=True)
            if args.out:
                args.out.write_text(text + "\n")
        return result

    transformers.Trainer.training_step = traced  # DPOTrainer.training_step calls it through super()
    workdir = Path(tempfile.mkdtemp(prefix="trace_dpo-"))
    options = types.SimpleNamespace(preset=args.preset, steps=args.last + 2, dpo_repeat=1, set=[])
    overrides = bench_workflows.recipe_overrides("dpo", options, workdir, cuda, workdir / args.stack)
    bench_workflows.worker_materialize("dpo", overrides)
    if args.stack == "trl":
        bench_workflows.worker_trl("dpo", overrides)
        return
    bench_workflows.train_ftune_here("dpo", overrides)


if __name__ == "__main__":
    main()
