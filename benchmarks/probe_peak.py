"""What makes up the peak of one training step: the live allocations at the peak, by source line.

Builds an ftune stack of ftune/measure/stacks.py (a preset shape, 4-bit, LoRA r=16, the mode asked,
kernels on), runs ftune/measure/step.py's warm-up and timed steps, then records the CUDA
allocator's history over one more step, replays it to the moment of the highest allocated memory,
and prints what was alive then (grouped by the first frame in ftune, transformers, peft or
bitsandbytes).

  python benchmarks/probe_peak.py --seq 8192 --out peak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ftune.measure.results import result_path  # noqa: E402
from ftune.measure.stacks import RunSpec, build_stack  # noqa: E402
from ftune.measure.step import GiB, train_step, train_steps  # noqa: E402

MiB = 2**20
OURS = ("ftune/", "transformers/", "peft/", "bitsandbytes/", "torch/optim/")


def source_of(frames: list[dict]) -> str:
    for frame in frames:
        if any(part in frame["filename"] for part in OURS) and "ftune/measure/" not in frame["filename"]:
            return f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']} {frame['name']}"
    return "(other)"


def live_at_peak(step) -> tuple[int, dict[str, int]]:
    torch.cuda.memory._record_memory_history(max_entries=500000)
    base = torch.cuda.memory_allocated()
    step()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], source_of(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak, peak_live = current, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    by_source: dict[str, int] = defaultdict(int)
    for size, source in peak_live.values():
        by_source[source] += size
    return base + peak, dict(sorted(by_source.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--mode", default="unsloth")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON here (default benchmarks/results/<card>/<date>-peak-SEQ.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_peak.py reads the CUDA allocator's history: run it on a CUDA machine")
    from ftune.presets import preset_config

    config = preset_config(args.preset)
    stack = build_stack(RunSpec("ftune+k", args.mode), args.preset, seq=args.seq)
    model = stack.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device="cuda")
    # a warm-up and three timed steps: Triton compiles, the pinned pool fills, the optimizer's states exist
    measured = train_steps(model, [ids] * 4, optimizer=optimizer)
    print(f"peak {measured.peak_bytes / GiB:.3f} GiB, {measured.tokens_per_s:.0f} tok/s (median of 3 steps)")

    def step():
        train_step(model, optimizer, ids)
        torch.cuda.synchronize()

    at_rest = torch.cuda.memory_allocated()
    peak, sources = live_at_peak(step)
    print(f"at rest {at_rest / GiB:.3f} GiB, peak {peak / GiB:.3f} GiB; allocated during the step, alive at the peak:")
    for source, size in list(sources.items())[:25]:
        print(f"  {size / MiB:9.1f} MiB  {source}")
    out = args.out or result_path(f"peak-{args.seq}")
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "preset": args.preset, "mode": args.mode,
                               "seq": args.seq, "at_rest_gib": at_rest / GiB, "peak_gib": peak / GiB,
                               "measured_peak_gib": measured.peak_bytes / GiB,
                               "tokens_per_s": measured.tokens_per_s,
                               "peak_sources_mib": {k: v / MiB for k, v in sources.items()}}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
