"""Memory and speed of one QLoRA training step, per stack, activation-checkpointing mode and sequence length.

Stacks (ftune/measure/stacks.py; each run in its own process, so memory numbers are clean and an
OOM ends only that row):
  hf        transformers + peft as usually set up: prepare_model_for_kbit_training (norms,
            embeddings and LM head upcast to fp32), LoRA, transformers' own non-reentrant
            checkpointing for mode `true`; the baseline of ../shared/GPU.md
  ftune     ftune's model building and engine, kernels off
  ftune+k   ftune with its Triton kernels on

Setup as GPU.md: a preset shape with random weights, NF4 double-quant 4-bit, bf16 compute, LoRA
r=16 alpha=16 on the family's linear projections, batch 1, AdamW, labels = inputs, random token ids, bf16
autocast; the steps are ftune/measure/step.py's: peak = torch.cuda.max_memory_allocated over the
timed steps (reset after the warm-up), the median of the timed steps. "held" is what the forward
leaves allocated for the backward (checkpoints and saved activations), measured right after the
forward.

  python benchmarks/bench_engine.py --preset llama-3.1-8b --seqs 2048,8192,16384 \
      --runs hf:none,hf:true,ftune:none,ftune:true,ftune:unsloth --out results.json

A run is stack:mode, or ftune[+k]:smart@GIB for the smart mode planning to a budget of GIB GiB.
--batches 1,4 measures each sequence at each batch size (the memory-model grid of issue 5); a
cell that runs out of memory skips the longer sequences of its batch size. Without --out the rows
are appended to benchmarks/results/<card>/<date>-engine.json. On a CPU the ftune stacks without
kernels run as a smoke test (the peak is then the largest RSS; a cell times at least 20k tokens):

  python benchmarks/bench_engine.py --preset tiny-llama --seqs 1024 --runs ftune:true,ftune:unsloth --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ftune.measure.results import installed_version, result_path  # noqa: E402
from ftune.measure.stacks import RunSpec, build_stack  # noqa: E402
from ftune.measure.step import GiB, train_steps  # noqa: E402

HOST_EMBEDDINGS = {"auto": "auto", "on": True, "off": False}


def measure(stack, seq: int, batch: int, steps: int, vocab: int, hidden: int, layers: int) -> dict:
    """One cell: a warm-up step and `steps` timed ones at batch x seq random tokens; its JSON row."""
    ids = torch.randint(0, vocab, (batch, seq), device=next(stack.model.parameters()).device)
    measured = train_steps(stack.model, [ids] * (1 + steps))
    return {
        "seq": seq,
        "batch": batch,
        "status": "ok",
        "peak_gib": round(measured.peak_bytes / GiB, 3),  # the largest RSS on a CPU
        "reserved_gib": _gib(measured.reserved_bytes),
        "held_after_forward_gib": _gib(measured.held_after_forward_bytes),
        "layer_inputs_gib": round(layers * batch * seq * hidden * 2 / GiB, 3),
        "host_pinned_gib": round(stack.host_bytes() / GiB, 3),
        "step_s": round(measured.step_s, 4),
        "step_times_s": [round(t, 4) for t in measured.step_times_s],
        "tokens_per_s": round(batch * seq / measured.step_s, 1),
        "loss": round(measured.losses[-1], 4),
        # where step times spread: collector pauses and cudaMalloc calls over the timed steps
        "collector_s_per_generation": [round(s, 4) for s in measured.collector_s],
        "collector_passes_per_generation": measured.collector_passes,
        "cuda_mallocs": measured.cuda_mallocs if steps else None,
    }


def _gib(count: int | None) -> float | None:
    return None if count is None else round(count / GiB, 3)


def worker(args) -> None:
    from ftune.presets import preset_config

    if args.cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total)
    config = preset_config(args.preset)
    run = RunSpec.parse(args.worker)
    seqs = [int(s) for s in args.seqs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.longest:
        seqs = _growing(seqs[0], args.longest_limit)
    stack = build_stack(run, args.preset, seq=seqs[0], batch=batches[0],
                        host_embeddings=HOST_EMBEDDINGS[args.host_embeddings],
                        expert_adapters=args.expert_adapters == "on")
    if stack.layer_plan is not None:
        print(stack.layer_plan.describe(), flush=True)
    for batch in batches:
        last_ok = None
        for seq in seqs:
            try:
                steps = 0 if args.longest else _timed_steps(args.steps, batch * seq)
                row = measure(stack, seq, batch, steps, config.vocab_size, config.hidden_size, config.num_hidden_layers)
                last_ok = seq
            except torch.OutOfMemoryError:
                row = {"seq": seq, "batch": batch, "status": "oom"}
            row.update(stack=run.stack, mode=run.label, preset=args.preset, cap_gib=args.cap_gib,
                       budget_gib=run.budget_gib, host_embeddings=args.host_embeddings,
                       expert_adapters=args.expert_adapters)
            if run.budget_gib is not None and row["status"] == "ok":
                row["plan"] = stack.layer_plan.counts()
                row["plan_peak_gib"] = round(stack.layer_plan.peak / GiB, 3)
            print("RESULT " + json.dumps(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            if row["status"] == "oom":
                if args.longest and last_ok is not None:
                    print("RESULT " + json.dumps({"stack": run.stack, "mode": run.label, "preset": args.preset,
                                                  "cap_gib": args.cap_gib, "longest_ok": last_ok,
                                                  "first_oom": seq, "status": "longest"}), flush=True)
                break  # the longer sequences of this batch size would not fit either


def _timed_steps(asked: int, tokens: int) -> int:
    """At least --steps; more for short steps, whose times spread by 30% from step to step (an H100
    at 2048 tokens: 0.28-0.40 s), so that the median of about 20k tokens settles."""
    return max(asked, -(-20480 // tokens)) if asked else 0


def _growing(start: int, limit: int) -> list[int]:
    """Sequence lengths from start, growing by a quarter, rounded to 1024, up to limit."""
    seqs, seq = [], start
    while seq <= limit:
        seqs.append(seq)
        seq = int(seq * 1.25) // 1024 * 1024
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seqs", default="2048,8192,16384")
    parser.add_argument("--runs", default="hf:none,hf:true,ftune:none,ftune:true,ftune:unsloth",
                        help="stack:mode pairs; stacks hf, ftune, ftune+k (kernels)")
    parser.add_argument("--batches", default="1", help="batch sizes, each measured at every sequence length")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--longest", action="store_true", help="grow the sequence from --seqs' first until OOM")
    parser.add_argument("--longest-limit", type=int, default=262144)
    parser.add_argument("--cap-gib", type=float, default=None, help="cap this process's GPU memory (a smaller card)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append JSON results here (default benchmarks/results/<card>/<date>-engine.json)")
    parser.add_argument("--host-embeddings", choices=sorted(HOST_EMBEDDINGS), default="auto",
                        help="ftune stacks: the input embedding table in host RAM (auto: as the mode decides)")
    parser.add_argument("--expert-adapters", choices=["on", "off"], default="on",
                        help="a mixture of experts: LoRA on its expert stacks too (on), or on the attention only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cuda = torch.cuda.is_available()
    if not cuda and any(RunSpec.parse(run).stack == "hf" for run in args.runs.split(",")):
        raise SystemExit("the hf stack runs on a CUDA machine; on a CPU, try ftune's stacks on a tiny preset")

    meta = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "preset": args.preset,
            "date": time.strftime("%Y-%m-%d"), "flash_attn_4": installed_version("flash-attn-4")}
    out = args.out or result_path("engine")
    for run in args.runs.split(","):
        command = [sys.executable, __file__, "--worker", run, "--preset", args.preset, "--seqs", args.seqs,
                   "--batches", args.batches, "--steps", str(args.steps), "--longest-limit", str(args.longest_limit),
                   "--host-embeddings", args.host_embeddings, "--expert-adapters", args.expert_adapters]
        if args.longest:
            command.append("--longest")
        if args.cap_gib:
            command += ["--cap-gib", str(args.cap_gib)]
        started = time.perf_counter()
        process = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        rows = [json.loads(line[7:]) for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0:
            rows.append({"stack": run.split(":")[0], "mode": run.split(":")[1], "status": "error",
                         "error": process.stderr.strip().splitlines()[-1:] })
            print(process.stderr[-3000:], file=sys.stderr)
        for line in process.stdout.splitlines():
            if line.startswith("smart plan"):
                print(line, flush=True)
        for row in rows:
            row.update(meta)
            print(_line(row), flush=True)
        print(f"  ({run}: {time.perf_counter() - started:.0f} s)", flush=True)
        # after every run, so that a call cut short keeps what it measured
        existing = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(existing + rows, indent=1))
    print(f"results: {out}", flush=True)


def _line(row: dict) -> str:
    if row["status"] == "ok":
        if row["reserved_gib"] is None:  # a CPU: the peak is the largest RSS
            return (f"{row['stack']:8s} {row['mode']:10s} b{row['batch']} seq {row['seq']:6d}: RSS {row['peak_gib']:6.2f} GiB  "
                    f"{row['tokens_per_s']:8.0f} tok/s  loss {row['loss']}")
        return (f"{row['stack']:8s} {row['mode']:10s} b{row['batch']} seq {row['seq']:6d}: peak {row['peak_gib']:6.2f} GiB "
                f"(reserved {row['reserved_gib']:6.2f}, held {row['held_after_forward_gib']:6.2f}, "
                f"host {row['host_pinned_gib']:5.2f})  {row['tokens_per_s']:8.0f} tok/s  loss {row['loss']}")
    if row["status"] == "longest":
        return f"{row['stack']:8s} {row['mode']:8s} longest that trains: {row['longest_ok']} (OOM at {row['first_oom']})"
    return f"{row.get('stack')} {row.get('mode')} b{row.get('batch')} seq {row.get('seq')}: {row['status']} {row.get('error', '')}"


if __name__ == "__main__":
    main()
