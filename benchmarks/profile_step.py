"""Where one training step's time goes: torch.profiler over a few steps of the bench_engine.py
setup, per mode, the CPU-side CUDA runtime calls (syncs, allocations) and the top GPU kernels.

  python benchmarks/profile_step.py --seq 2048 --modes true,unsloth
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import FtuneStack, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", default="true,unsloth")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from ftune.presets import preset_config

    vocab = preset_config(args.preset).vocab_size
    for mode in args.modes.split(","):
        stack = FtuneStack(args.preset, kernels=True, mode=mode, budget_gib=None, seq=args.seq, batch=1)
        model = stack.model
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ids = torch.randint(0, vocab, (1, args.seq), device="cuda")

        def step():
            train_step(model, optimizer, ids)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.steps
        print(f"=== mode {mode}: {elapsed * 1000:.1f} ms per step (profiled)", flush=True)
        events = prof.key_averages()
        runtime = [e for e in events if e.key.startswith("cuda") or "Synchronize" in e.key or "HostAlloc" in e.key]
        for e in sorted(runtime, key=lambda e: -e.cpu_time_total)[:10]:
            print(f"  cpu {e.cpu_time_total / 1000 / args.steps:8.2f} ms/step  x{e.count // args.steps:5d}  {e.key}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        del stack, model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
