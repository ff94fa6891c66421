"""What makes up the peak of one training step: the live allocations at the peak, by source line.

Builds the bench_engine.py setup (a preset shape, 4-bit, LoRA r=16, mode and kernels as asked),
runs a warm-up step, then records the CUDA allocator's history over one step, replays it to the
moment of the highest allocated memory, and prints what was alive then (grouped by the first
frame in ftune, transformers, peft or bitsandbytes). Then measures the peak once per variant of
the chunk sizes (fused loss logits, MLP intermediates), to see which lever moves it.

  python benchmarks/probe_peak.py --seq 8192 --ce-mib 256,128,64 --mlp-mib 128,64
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import GiB, FtuneStack, measure, train_step  # noqa: E402

MiB = 2**20
OURS = ("ftune/", "transformers/", "peft/", "bitsandbytes/", "torch/optim/")


def source_of(frames: list[dict]) -> str:
    for frame in frames:
        if any(part in frame["filename"] for part in OURS) and "bench_engine" not in frame["filename"]:
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
    parser.add_argument("--ce-mib", default="256", help="fused loss: largest chunk of logits, MiB (variants)")
    parser.add_argument("--mlp-mib", default="128", help="recomputed MLP: largest intermediate, MiB (variants)")
    parser.add_argument("--fold-lora", action="store_true",
                        help="also measure each variant with ftune.kernels.lora.FOLD_ADAPTER_INPUT_GRADIENT on")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ftune.kernels.fused_linear_cross_entropy as fused_loss
    import ftune.kernels.lora as lora
    from ftune.presets import preset_config

    config = preset_config(args.preset)
    stack = FtuneStack(args.preset, kernels=True, mode=args.mode, budget_gib=None, seq=args.seq, batch=1)
    shape = dict(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers)
    measure(stack, args.seq, 1, 1, **shape)  # warm-up: Triton compiles, the pinned pool fills

    model = stack.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), device="cuda")

    def step():
        train_step(model, optimizer, ids)
        torch.cuda.synchronize()

    step()
    at_rest = torch.cuda.memory_allocated()
    folds = [False, True] if args.fold_lora else [False]
    breakdowns = {}
    for fold in folds:
        lora.FOLD_ADAPTER_INPUT_GRADIENT = fold
        step()  # the optimizer states exist before the recorded step, whichever path made them
        peak, sources = live_at_peak(step)
        breakdowns[f"fold_{fold}".lower()] = {k: v / MiB for k, v in sources.items()}
        print(f"fold {fold}: at rest {at_rest / GiB:.3f} GiB, peak {peak / GiB:.3f} GiB; allocated during the step, "
              "alive at the peak:")
        for source, size in list(sources.items())[:25]:
            print(f"  {size / MiB:9.1f} MiB  {source}")

    optimizer.state.clear()  # measure() makes its own: these states would count against every variant
    rows = []
    variants = [(int(ce), int(mlp), fold) for ce in args.ce_mib.split(",") for mlp in args.mlp_mib.split(",")
                for fold in folds]
    for ce, mlp, fold in variants:
        lora.FOLD_ADAPTER_INPUT_GRADIENT = fold
        fused_loss.MAX_CHUNK_LOGITS_BYTES = ce * MiB
        for wrapped in stack.engine.layers:
            halves = getattr(wrapped.forward, "halves", None)
            if halves is not None:
                halves.chunk_bytes = mlp * MiB
        row = measure(stack, args.seq, 1, 3, **shape)
        row.update(ce_mib=ce, mlp_mib=mlp, fold_lora=fold)
        rows.append(row)
        print(f"ce {ce} MiB, mlp {mlp} MiB, fold {fold}: peak {row['peak_gib']} GiB, {row['tokens_per_s']} tok/s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "at_rest_gib": at_rest / GiB,
                                        "peak_sources_mib": breakdowns,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
