"""Data parallel on two GPUs against one: tokens/s, per-GPU peak VRAM and the loss curve.

Both runs are `ftune train` on the same recipe and the same global batch, so their losses should
follow the same curve:
  one GPU   batch 1 x grad_accum 2       (CUDA_VISIBLE_DEVICES=0)
  two GPUs  batch 1 x grad_accum 1 x 2   (`ftune train --gpus 2`, torchrun underneath)
Each GPU therefore holds one sequence at a time in both runs, and its peak should be the same.
The data is synthetic text, every row longer than --seq and truncated to it, so every micro-batch
has exactly --seq tokens. Speed is the median over the logged steps after the first two (the first
ones build the pinned pool and compile the kernels), from metrics.jsonl's elapsed_s.

  python benchmarks/bench_ddp.py --preset llama-3.1-8b --seq 8192 --steps 20 --out ddp.json
  python benchmarks/bench_ddp.py --preset tiny-llama --seq 256 --steps 4 --gpus 2   # CPU (gloo) smoke run

--strategies ddp,fsdp runs the several-GPU case once per distributed.strategy. Under fsdp each GPU
holds 1/N of the weights (loaded in host memory, moved to the GPUs layer by layer as they are
sharded), so its peak should come out below the one-GPU run's. All runs use adamw_torch, the
optimizer fsdp requires.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ftune.measure.results import card_name, result_path  # noqa: E402

WORDS = "the a of to and in is for on with as by at from that this it be are was or an not".split()


def write_data(path: Path, rows: int, seq: int) -> None:
    """Rows of random words, each at least 1.3x --seq characters (the quickstart tokenizer gives
    about one token per character), so truncation makes every row exactly --seq tokens."""
    rng = random.Random(0)
    with path.open("w") as file:
        for _ in range(rows):
            words, length = [], 0
            while length < seq * 1.3:
                word = rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(10_000))
                words.append(word)
                length += len(word) + 1
            file.write(json.dumps({"text": " ".join(words)}) + "\n")


def train(args, name: str, gpus: int, grad_accum: int, data: Path, out: Path) -> dict:
    overrides = {
        "model.preset": args.preset, "model.name_or_path": "null",
        "model.tokenizer": str(REPO / "data/quickstart/tokenizer"),
        "data.source": str(data), "data.format": "text", "data.split": "train", "data.max_length": str(args.seq),
        "data.too_long": "truncate", "training.max_steps": str(args.steps), "training.batch_size": "1",
        "training.grad_accum": str(grad_accum), "training.logging_steps": "1", "training.save_steps": "100000",
        "training.output_dir": str(out / name), "checkpointing.mode": args.mode,
        "training.optimizer": "adamw_torch", "distributed.strategy": args.strategy,
    }
    command = [sys.executable, "-m", "ftune", "train", str(REPO / "recipes/qlora-llama3-8b.yaml")]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = dict(os.environ)
    if gpus > 1 and torch.cuda.is_available():
        command += ["--gpus", str(gpus)]
    elif gpus > 1:  # CPU smoke run: the same processes under torchrun, on gloo
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "-m"]
    elif "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        print(process.stderr[-4000:], file=sys.stderr)
        return {"run": name, "gpus": gpus, "status": "error", "error": process.stderr.strip().splitlines()[-1:]}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    step_times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records, records[1:])][2:]
    step_s = statistics.median(step_times)
    ranks = records[-1].get("ranks") or [{"rank": 0, "mem_peak_gib": records[-1].get("mem_peak_gib")}]
    tokens_per_step = args.seq * 2  # the global batch: two sequences per optimizer step in both runs
    return {
        "run": name, "gpus": gpus, "grad_accum": grad_accum, "status": "ok", "seq": args.seq,
        "mode": args.mode, "preset": args.preset, "steps": args.steps, "wall_s": round(wall, 1),
        "strategy": args.strategy if gpus > 1 else None,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_step / step_s, 1),
        "losses": [r["loss"] for r in records],
        "peak_gib_per_rank": [r.get("mem_peak_gib") for r in ranks],
        "rss_gib_per_rank": [r.get("mem_rss_gib") for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="unsloth")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--strategies", default="ddp", help="distributed.strategy of the several-GPU runs: ddp, fsdp "
                        "or both (ddp,fsdp); every run uses adamw_torch, which fsdp requires")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftune-ddp"))
    parser.add_argument("--out", type=Path, default=None,
                        help="append the JSON results here (default benchmarks/results/<N>x<card>/<date>-ddp.json)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run_dir = args.work / time.strftime("%H%M%S")
    run_dir.mkdir()
    data = run_dir / "long.jsonl"
    write_data(data, rows=args.steps * 2 + 8, seq=args.seq)
    args.strategy = "ddp"  # one GPU: nothing to shard
    one = train(args, "one-gpu", 1, 2, data, run_dir)
    print(json.dumps(one), flush=True)
    rows = [one]
    for strategy in args.strategies.split(","):
        args.strategy = strategy
        many = train(args, f"{args.gpus}-gpus-{strategy}", args.gpus, 1, data, run_dir)
        print(json.dumps(many), flush=True)
        rows.append(many)
        if one["status"] == many["status"] == "ok":
            gaps = [abs(a - b) for a, b in zip(one["losses"], many["losses"])]
            peak_one = one["peak_gib_per_rank"][0]
            summary = {
                "run": f"summary-{strategy}", "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 3),
                "peak_ratio_per_rank": [round(p / peak_one, 4) for p in many["peak_gib_per_rank"]] if peak_one else None,
                "largest_loss_gap": round(max(gaps), 5), "loss_steps_compared": len(gaps),
            }
            print(json.dumps(summary), flush=True)
            rows.append(summary)
    card = card_name(count=args.gpus) if torch.cuda.is_available() else "cpu"
    out = args.out or result_path(args.strategies.replace(",", "-"), card=card)  # ddp, fsdp or ddp-fsdp
    existing = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(existing + rows, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
