"""Activation-checkpointing modes timed step by step in one process: a step of each in turn, many rounds.

bench_engine.py runs each mode in its own process, which keeps memory figures clean but lets the
host's state between processes into the comparison: on the virtual machines the GPUs come with,
the same `true` run at 2048 tokens made 4,060 to 6,642 tokens/s from one process to the next
(docs/benchmarks.md). Here every mode's model is built once in one process (each as `ftune train`
builds it, the 8B shape is 5 GiB in 4-bit) and the modes take turns, a step each per round, the
order reversed every other round (ABBA) so that a drift during the run favours none of them.
Speed only: the models share the card, so the peaks say nothing.

    python benchmarks/bench_interleaved.py --seqs 2048,8192 --modes true,unsloth --rounds 30 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ftune.measure.results import result_path  # noqa: E402
from ftune.measure.stacks import RunSpec, build_stack  # noqa: E402
from ftune.measure.step import train_step  # noqa: E402


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seqs", default="2048,8192")
    parser.add_argument("--modes", default="true,unsloth", help="ftune modes, kernels on; the first is the reference")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds at 2048 tokens (fewer at longer ones)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append JSON results here (default benchmarks/results/<card>/<date>-interleaved.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_interleaved.py times GPU steps: run it on a CUDA machine")
    from ftune.presets import preset_config

    vocab = preset_config(args.preset).vocab_size
    modes = args.modes.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    models = {mode: build_stack(RunSpec("ftune+k", mode), args.preset, seq=seqs[0]).model for mode in modes}
    for model in models.values():
        model.train()
    optimizers = {mode: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
                  for mode, model in models.items()}
    rows = []
    for seq in seqs:
        ids = torch.randint(0, vocab, (1, seq), device="cuda")
        rounds = max(4, args.rounds * 2048 // seq)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for mode in modes:  # warm-up: Triton's compiles, the pinned pool, the allocator's cache
            timed_step(models[mode], optimizers[mode], ids)
        for round_index in range(rounds):
            order = modes if round_index % 2 == 0 else modes[::-1]
            for mode in order:
                times[mode].append(timed_step(models[mode], optimizers[mode], ids))
        reference = modes[0]
        for mode in modes:
            median = statistics.median(times[mode])
            # each round's own ratio: the two steps ran seconds apart under the same host conditions
            paired = [r / t for r, t in zip(times[reference], times[mode])]
            row = {"preset": args.preset, "seq": seq, "mode": mode, "rounds": rounds, "step_s": round(median, 4),
                   "tokens_per_s": round(seq / median, 1), "step_times_s": [round(t, 4) for t in times[mode]],
                   f"speed_vs_{reference}": round(statistics.median(times[reference]) / median, 4),
                   f"paired_speed_vs_{reference}": round(statistics.median(paired), 4),
                   "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}
            rows.append(row)
            print(f"seq {seq:6d} {mode:8s} {row['tokens_per_s']:8.0f} tok/s (median of {rounds}), "
                  f"{row[f'speed_vs_{reference}']:.3f} of {reference}'s, paired rounds {row[f'paired_speed_vs_{reference}']:.3f}",
                  flush=True)
    out = args.out or result_path("interleaved")
    existing = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(existing + rows, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
