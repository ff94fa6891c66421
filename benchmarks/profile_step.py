"""Where one training step's time goes: torch.profiler over a few steps of the bench_engine.py
setup, per mode, the CPU-side CUDA runtime calls (syncs, allocations) and the top GPU kernels.

  python benchmarks/profile_step.py --seq 2048 --modes true,unsloth
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import FtuneStack, train_step  # noqa: E402


# Kernel names by what they do, first match wins: where the GPU's time goes, in a few lines.
KERNEL_KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)),
    ("bf16 GEMM", re.compile(r"gemm|cutlass|sm90|nvjet|cublas|xmma|ampere_bf16|s16816", re.I)),
    ("NF4 dequantize", re.compile(r"dequant", re.I)),
    ("host copies", re.compile(r"memcpy", re.I)),
    ("triton kernels", re.compile(r"triton|_kernel$", re.I)),
    ("fills", re.compile(r"memset|fill", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|unrolled", re.I)),
]


def print_gpu_time_by_kind(prof, steps: int) -> None:
    """Per step: the time the GPU had any kernel running (the union over streams) and each
    kind's summed kernel time. Wall time well above the busy time means the host sets the pace."""
    intervals, by_kind, unnamed = [], {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        intervals.append((event.time_range.start, event.time_range.end))
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(event.name)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us()
        if kind == "other":
            unnamed[event.name[:70]] = unnamed.get(event.name[:70], 0.0) + event.time_range.elapsed_us()
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    print(f"  GPU busy {busy / 1000 / steps:8.2f} ms/step (union of kernel intervals over all streams)")
    for kind, total in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"    {kind:16s} {total / 1000 / steps:8.2f} ms/step")
    for name, total in sorted(unnamed.items(), key=lambda item: -item[1])[:6]:
        print(f"      other: {total / 1000 / steps:8.2f} ms/step  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", default="true,unsloth",
                        help="checkpointing modes; MODE+fold with kernels/lora.py's folded 4-bit LoRA path")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from ftune.presets import preset_config

    vocab = preset_config(args.preset).vocab_size
    from ftune.kernels import lora

    for mode in args.modes.split(","):
        label = mode
        mode, _, variant = mode.partition("+")
        lora.FOLD_ADAPTER_INPUT_GRADIENT = variant == "fold"
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
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        print(f"=== mode {label}: {(time.perf_counter() - start) / args.steps * 1000:.1f} ms per step (not profiled)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.steps
        print(f"=== mode {label}: {elapsed * 1000:.1f} ms per step (profiled)", flush=True)
        events = prof.key_averages()
        runtime = [e for e in events if e.key.startswith("cuda") or "Synchronize" in e.key or "HostAlloc" in e.key]
        for e in sorted(runtime, key=lambda e: -e.cpu_time_total)[:10]:
            print(f"  cpu {e.cpu_time_total / 1000 / args.steps:8.2f} ms/step  x{e.count // args.steps:5d}  {e.key}")
        print_gpu_time_by_kind(prof, args.steps)
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        del stack, model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
